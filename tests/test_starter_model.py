"""Tests for the offline starter model: data, tokenizer, template, build, cache, CLI."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf import starter, starter_data

CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "Sure! 2 + 3 = 5."},
]
EXPECTED_TEXT = (
    "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\nHello!<|end|>\n"
    "<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\nSure! 2 + 3 = 5.<|end|>\n"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("starter") / "tiny"
    return out, starter.build_starter_model(out, "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(built: tuple[Path, dict]):
    return AutoTokenizer.from_pretrained(built[0])


@pytest.fixture(scope="module")
def model(built: tuple[Path, dict]):
    return AutoModelForCausalLM.from_pretrained(built[0]).eval()


def test_build_writes_hf_files_and_metrics(built: tuple[Path, dict]) -> None:
    out, metrics = built
    for name in ("model.safetensors", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "starter.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "starter.json").read_text()) == metrics
    assert metrics["preset"] == "tiny" and metrics["parameters"] > 0
    assert set(metrics["heldout_accuracy"]["per_kind"]) == set(starter_data.KINDS)


def test_chat_template_matches_hand_written_format(tok) -> None:
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_TEXT
    prompt = tok.apply_chat_template(CONVERSATION[:3], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == EXPECTED_TEXT.split("Sure!")[0]
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    assert tok.apply_chat_template(with_system, tokenize=False).startswith(
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n")


def test_training_encoding_equals_chat_template_ids(tok) -> None:
    ids, mask = starter.encode_conversation(tok, CONVERSATION)
    assert ids == tok(EXPECTED_TEXT, add_special_tokens=False)["input_ids"]
    answer = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert answer == "Hello!<|end|>Sure! 2 + 3 = 5.<|end|>"


def test_tokenizer_special_tokens_and_roundtrip(tok) -> None:
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|end|>")
    assert tok.padding_side == "left" and tok.model_max_length == 256
    for text in ("Grüße, naïve café! 你好 🤖🎉 ∑x²", "  two  spaces\tand\nlines ",
                 "12345 + 67890 = 80235"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]


def test_model_generates_and_stops_at_end_token(tok, model) -> None:
    prompts = [[{"role": "user", "content": p}] for p in ("hi", "What is 3 + 4?", "thanks",
                                                          "Write cat in capital letters.")]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    new = out[:, enc["input_ids"].shape[1]:]
    stopped = [(row == tok.eos_token_id).any().item() for row in new]
    assert sum(stopped) >= 2, tok.batch_decode(new)
    decoded = tok.batch_decode(new, skip_special_tokens=True)
    assert all("<|" not in text for text in decoded)
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_build_is_deterministic(built: tuple[Path, dict], tmp_path: Path) -> None:
    starter.build_starter_model(tmp_path, "tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (built[0] / name).read_bytes(), name


def test_check_accepts_every_style_and_rejects_wrong_answers() -> None:
    rng = random.Random(1)
    for task in starter_data.make_tasks(160, seed=3):
        rendered = {starter_data.render_answer(task, s, rng) for s in starter_data.ANSWER_STYLES}
        assert all(starter_data.check(task, text) for text in rendered), (task, rendered)
        if task.kind != "chat":
            assert len(rendered) == len(starter_data.ANSWER_STYLES)
        assert not starter_data.check(task, _wrong_answer(task)), task


def _wrong_answer(task: starter_data.Task) -> str:
    if task.kind in ("add", "sub", "count_words", "count_letters"):
        return f"Sure! The answer is {int(task.answer) + 1}."
    if task.kind == "sort":
        return "In order: " + " ".join(reversed(task.answer.split())) + " 10."
    if task.kind == "reverse":
        return f"Reversed: {' '.join(reversed(task.answer.split()))}."
    if task.kind == "upper":
        return f"In capitals: {task.answer.lower()}."
    return "42"


def test_data_generators_are_deterministic() -> None:
    assert starter_data.pretraining_corpus(50, 7) == starter_data.pretraining_corpus(50, 7)
    assert starter_data.pretraining_corpus(50, 7) != starter_data.pretraining_corpus(50, 8)
    assert starter_data.make_tasks(30, 1) == starter_data.make_tasks(30, 1)
    adds = starter_data.make_tasks(5, 1, kinds=["add"])
    assert {t.kind for t in adds} == {"add"}
    with pytest.raises(ValueError):
        starter_data.make_tasks(1, 1, kinds=["nope"])


def test_ensure_starter_model_builds_once_into_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    calls = []

    def fake_build(out_dir: Path, preset, seed: int = 0) -> dict:
        calls.append(out_dir)
        (Path(out_dir) / "starter.json").write_text("{}")
        return {}

    monkeypatch.setattr(starter, "build_starter_model", fake_build)
    target = starter.starter_model_dir("tiny")
    assert target.parent == tmp_path / "models" and target.name.startswith("starter-tiny-")
    assert target != starter.starter_model_dir("starter")
    assert starter.ensure_starter_model("tiny") == target
    assert starter.ensure_starter_model("tiny") == target
    assert len(calls) == 1 and calls[0] != target
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        [target.name, f".{target.name}.lock"])


def test_cli_reuses_existing_build(built: tuple[Path, dict], capsys) -> None:
    assert starter.main(["--preset", "tiny", "--out", str(built[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(built[0].resolve())
    assert json.loads("\n".join(lines[:-1]))["preset"] == "tiny"
