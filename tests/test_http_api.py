"""The OpenAI-compatible HTTP face against a real `rlhf serve` process and the tiny model.

Driven with the official ``openai`` client where a user would use it, raw httpx where the
client can't send what we need (wrong JSON types, oversize bodies, missing credentials).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.conftest import ServerProcess

QUESTION = [{"role": "user", "content": "What is 12 + 7?"}]
GREETING = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_base + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def auth_server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_model_dir, extra=["--auth-token", "s3cret"])
    yield srv
    srv.stop()


def chat(client: openai.OpenAI, model: str, **kwargs):
    kwargs.setdefault("messages", QUESTION)
    return client.chat.completions.create(model=model, **kwargs)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(server.http_base + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_non_streaming_n3_returns_three_choices_and_exact_usage(client, model, tiny_model_dir):
    r = chat(client, model, n=3, seed=0, max_tokens=6)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == model
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.message.content for c in r.choices)
    assert {c.finish_reason for c in r.choices} <= {"stop", "length"}
    assert r.adapter_version == "base" and r.system_fingerprint == "base"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt)
    completion = [len(tok(c.message.content, add_special_tokens=False)["input_ids"])
                  for c in r.choices]
    assert r.usage.completion_tokens == sum(completion)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for c, count in zip(r.choices, completion, strict=True):
        assert (c.finish_reason == "length") == (count == 6)


def test_streaming_n2_reassembles_to_the_non_streaming_text(client, model):
    params = {"n": 2, "seed": 7, "temperature": 0.8, "max_tokens": 24}
    expected = chat(client, model, **params)
    texts, roles, finish, usage = {0: "", 1: ""}, {}, {}, None
    for chunk in chat(client, model, stream=True, stream_options={"include_usage": True},
                      **params):
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if not chunk.choices:
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        assert choice.index not in finish, "a chunk arrived after the index's final chunk"
        if choice.index not in roles:
            roles[choice.index] = choice.delta.role
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts == {c.index: c.message.content for c in expected.choices}
    assert finish == {c.index: c.finish_reason for c in expected.choices}
    assert usage is not None and usage.completion_tokens == expected.usage.completion_tokens


def test_same_seed_same_text_different_seeds_differ(client, model):
    def text(seed: int) -> str:
        return chat(client, model, seed=seed, temperature=1.0, max_tokens=24) \
            .choices[0].message.content

    assert text(3) == text(3)
    assert len({text(s) for s in range(4)}) > 1


def test_stop_sequence_cuts_the_text_and_reports_stop(client, model):
    full = chat(client, model, messages=GREETING, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert " " in text.strip(), f"greedy reply has no space to stop at: {text!r}"
    expected = text[:text.index(" ", 1)]
    for stop in (" ", [" ", "zzz"]):
        r = chat(client, model, messages=GREETING, temperature=0, max_tokens=40, stop=stop)
        assert r.choices[0].message.content == expected
        assert " " not in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"


def test_min_tokens_extension_holds_off_the_end(client, model):
    r = chat(client, model, n=3, seed=0, max_tokens=8, extra_body={"min_tokens": 8})
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage.completion_tokens == 3 * 8


def test_models_lists_base_and_adapters_and_model_pins_the_version(client, model,
                                                                     tiny_model_dir):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == str(tiny_model_dir) and "base" in ids
    assert all(m.object == "model" and m.owned_by == "rlhf" for m in client.models.list())
    r = chat(client, "base", max_tokens=2, extra_body={"adapter_version": "base", "top_k": 5})
    assert r.adapter_version == "base"


@pytest.mark.parametrize(("kwargs", "mentions"), [
    ({"n": 0}, "n must be"),
    ({"n": 100}, "n must be"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "word " * 4000}]}, "context window"),
    ({"stop": [""]}, "stop"),
    ({"max_tokens": 4, "extra_body": {"min_tokens": 5}}, "min_tokens"),
])
def test_invalid_requests_are_400_with_a_message_saying_what_to_fix(client, model, kwargs,
                                                                     mentions):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, model, **kwargs)
    assert info.value.status_code == 400
    assert mentions in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": QUESTION, "n": "3"}, "n"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
    ({"messages": QUESTION, "stop": 5}, "stop"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ({"n": 1}, "messages"),
])
def test_wrong_json_types_are_400_not_422(server, body, param):
    r = httpx.post(server.http_base + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]


def test_malformed_json_is_400(server):
    r = httpx.post(server.http_base + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_text_content_parts_are_joined(client, model):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    r = chat(client, model, messages=[{"role": "user", "content": parts}], max_tokens=2)
    assert r.choices[0].message.content


def test_unknown_adapter_or_model_is_404(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, model, max_tokens=2, extra_body={"adapter_version": "v404"})
    assert "v404" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, "no-such-model", max_tokens=2)
    assert info.value.code == "model_not_found"


def test_oversize_body_is_413(server):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}'
    url = server.http_base + "/v1/chat/completions"
    sized = httpx.post(url, content=body, headers={"content-type": "application/json"})
    chunked = httpx.post(url, content=iter([body[:1000], body[1000:]]),
                         headers={"content-type": "application/json"})
    for r in (sized, chunked):
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_auth_token_is_required_on_v1_but_not_health_or_metrics(auth_server):
    base = auth_server.http_base
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="base", messages=QUESTION, max_tokens=2)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    right = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
    assert right.chat.completions.create(model="base", messages=QUESTION,
                                         max_tokens=2).choices[0].message.content
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/metrics").status_code == 200


def test_metrics_count_http_requests_and_tokens(server, client, model):
    ok = metric(server, "rlhf_serving_requests_total", api="http", code="ok")
    bad = metric(server, "rlhf_serving_requests_total", api="http", code="invalid_argument")
    generated = metric(server, "rlhf_serving_generated_tokens_total")
    prompt = metric(server, "rlhf_serving_prompt_tokens_total")
    r = chat(client, model, max_tokens=4, seed=1)
    with pytest.raises(openai.BadRequestError):
        chat(client, model, n=0)
    assert metric(server, "rlhf_serving_requests_total", api="http", code="ok") == ok + 1
    assert metric(server, "rlhf_serving_requests_total", api="http",
                  code="invalid_argument") == bad + 1
    assert metric(server, "rlhf_serving_prompt_tokens_total") == prompt + r.usage.prompt_tokens
    assert metric(server, "rlhf_serving_generated_tokens_total") > generated
    assert httpx.get(server.http_base + "/metrics").headers["content-type"].startswith(
        "text/plain")


def test_client_disconnect_cancels_the_generation(server, model):
    before = metric(server, "rlhf_serving_requests_total", api="http", code="cancelled")
    body = {"model": model, "messages": QUESTION, "n": 9, "max_tokens": 512,
            "temperature": 100, "stream": True}
    with httpx.stream("POST", server.http_base + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(server, "rlhf_serving_requests_total", api="http", code="cancelled") > before:
            return
        time.sleep(0.05)
    pytest.fail("the generation was not cancelled after the client went away")


def test_healthz_is_ok_when_ready(server, tiny_model_dir):
    r = httpx.get(server.http_base + "/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == str(tiny_model_dir)
