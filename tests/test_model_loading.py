"""Model loading paths a user relies on: a PEFT adapter to start from, pinning, 4-bit."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf.modeling import load_model
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from serving.adapters import AdapterManager
from serving.engine import Engine, Sampling
from tests.conftest import ServerProcess


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights, saved the standard way."""
    torch.manual_seed(0)
    loaded = load_model(str(tiny_model_dir))
    peft_model = get_peft_model(loaded.model, LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def greedy(stub: pbg.PolicyStub, version: str = "") -> tuple[str, set[str]]:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="What is 3 + 4?")],
                             adapter_version=version,
                             sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=16,
                                                        min_new_tokens=16))
    chunks = list(stub.Generate(req))
    return "".join(c.text for c in chunks), {c.adapter_version for c in chunks}


def test_serve_starts_from_an_adapter_and_pins_versions(tiny_model_dir, adapter_dir):
    srv = ServerProcess(tiny_model_dir, extra=["--adapter", str(adapter_dir),
                                               "--adapter-version", "v1"])
    try:
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = pbg.PolicyStub(channel)
            info = stub.GetInfo(pb.GetInfoRequest())
            assert info.current_adapter_version == "v1"
            assert list(info.loaded_adapter_versions) == ["base", "v1"]
            adapted, versions = greedy(stub)
            assert versions == {"v1"}
            base, versions = greedy(stub, "base")
            assert versions == {"base"}
            assert adapted != base, "the adapter changes what the model says"

            # Both versions in one batch (PEFT mixed-adapter rows): each row as if alone.
            results: list[tuple[str, str]] = []

            def run(version: str) -> None:
                results.append((version, greedy(stub, version)[0]))

            threads = [threading.Thread(target=run, args=(v,)) for v in ("base", "v1") * 3]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(results) == sorted([("base", base), ("v1", adapted)] * 3)
    finally:
        srv.stop()


def test_four_bit_loading_generates(tiny_model_dir):
    """NF4 weights through bitsandbytes (CPU here, GPU for real users)."""
    loaded = load_model(str(tiny_model_dir), load_in_4bit=True)
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "Linear4bit" in kinds
    engine = Engine(loaded.tokenizer, adapters=AdapterManager(loaded.model),
                    eos_token_ids=loaded.eos_token_ids, context_length=loaded.context_length,
                    max_batch_size=4, max_queue=4, threads=1)
    engine.start()

    async def main() -> list:
        ids = loaded.tokenizer("12 plus 7 is", add_special_tokens=False)["input_ids"]
        handle = engine.submit("q", list(ids), 2, Sampling(8, seed=3, min_new_tokens=8))
        return [e async for events in handle for e in events if e.finish_reason]

    try:
        finals = asyncio.run(main())
    finally:
        engine.stop()
    assert sorted(e.index for e in finals) == [0, 1]
    assert all(e.completion_tokens == 8 for e in finals)
