"""SFT (learner/sft.py) and its phase in the iteration: answer-only labels worked by hand,
fit_sft on the tiny model, an iteration with new demonstrations making the SFT adapter the
policy's start and PPO's KL reference (kept across a restart), one without skipping it, a
failing SFT changing nothing, and `rlhf sft` publishing a version `rlhf learn` continues.

Tiny starter model, private Redis db 14; demonstrations go in through the stream, as the
Feedback service stores them, or a file (`rlhf sft`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from learner.config import LearnerConfig
from learner.iteration import Learner, Progress, Work
from learner.lora import adapter_tensors, lora_config
from learner.ppo import _forward, rollout, token_logprobs
from learner.ppo import score as ppo_score
from learner.reward_model import RewardModel, RMConfig
from learner.sft import (
    IGNORE,
    SFT,
    SFTConfig,
    encode_demonstration,
    fit_sft,
    mean_answer_loss,
    sft_row,
)
from rlhf import adapter_store
from rlhf.comparisons import append_many
from rlhf.modeling import load_model
from rlhf.settings import from_flat
from rlhf.v1 import policy_pb2 as pb
from tests.conftest import ROOT
from tests.test_learner_crash import SMALL
from tests.test_learner_iteration import demo, demos, make_comparison, submit

X = IGNORE


def test_sft_row_labels_only_the_answer_and_its_eos():
    # prompt 10 11 12, answer 20 21, eos 2: loss on 20 21 2 only
    assert sft_row([10, 11, 12], [20, 21], 2, 16) == ([10, 11, 12, 20, 21, 2],
                                                      [X, X, X, 20, 21, 2])
    # too long: the prompt loses its left end first (keeping max_length // 4 = 2)...
    assert sft_row([10, 11, 12, 13], [20, 21], 2, 6) == ([11, 12, 13, 20, 21, 2],
                                                         [X, X, X, 20, 21, 2])
    assert sft_row([10, 11, 12, 13], [20, 21, 22, 23, 24], 2, 8) == (
        [12, 13, 20, 21, 22, 23, 24, 2], [X, X, 20, 21, 22, 23, 24, 2])
    # ...then the answer its right end, EOS included (do not teach stopping mid-answer)
    assert sft_row([10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26], 2, 8) == (
        [12, 13, 20, 21, 22, 23, 24, 25], [X, X, 20, 21, 22, 23, 24, 25])
    assert sft_row([], [20], 2, 8) == ([20, 2], [20, 2])


def test_a_demonstration_row_by_hand(loaded):
    """The tiny template: <|bos|><|user|>\\nhi<|end|>\\n<|assistant|>\\n + answer + <|end|>
    (its EOS, id 2); the template's trailing newline after <|end|> is not trained."""
    tok = loaded.tokenizer
    ids, labels = encode_demonstration(tok, demo(0, "hi", "yo there"), 64)
    prompt = [1, 4, 204, 77, 78, 2, 204, 5, 204]  # bos user \n h i end \n assistant \n
    answer = [94, 84, 264, 439, 2]  # "yo there" + <|end|>
    assert ids == prompt + answer and labels == [X] * len(prompt) + answer
    full = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo there"}],
                                   tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == [*ids, 204]  # + "\n"


def test_fit_sft_lowers_heldout_loss_and_raises_the_answers_likelihood(loaded):
    torch.set_num_threads(1)
    rm = RewardModel(loaded.model, RMConfig(lora_rank=4))
    rm_before = adapter_tensors(rm.peft, "rm")
    data, tok = demos(24), loaded.tokenizer
    row = [encode_demonstration(tok, data[0], 128)]
    with rm.peft.disable_adapter():
        base_nll = mean_answer_loss(rm.peft, tok, row, 1, rm.device)
    cfg = SFTConfig(heldout_fraction=0.25, epochs=4)
    m = fit_sft(rm.peft, tok, data, cfg, lora_config(rm.peft, 4))
    assert m["sft/demonstrations"] == 24 and m["sft/split"] == "labeler"
    assert m["sft/heldout_demonstrations"] > 0
    assert m["sft/loss_heldout_after"] < m["sft/loss_heldout_before"] - 1.0
    assert rm.peft.active_adapter == SFT
    assert mean_answer_loss(rm.peft, tok, row, 1, rm.device) < base_nll - 1.0
    for name, tensor in adapter_tensors(rm.peft, "rm").items():  # other adapters untouched
        assert torch.equal(tensor, rm_before[name]), name
    again = fit_sft(rm.peft, tok, data, cfg, lora_config(rm.peft, 4))  # fresh init: same
    assert again["sft/loss_heldout_after"] == pytest.approx(m["sft/loss_heldout_after"])


class FlakyLearner(Learner):
    """With ``bad`` set, the drain adds a demonstration the chat template rejects to the SFT
    set (the intake would dead-letter it: this only makes the SFT phase fail mid-way)."""

    bad = False

    def drain(self, work: Work, progress: Progress) -> None:
        super().drain(work, progress)
        if not self.bad:
            return
        bad = demo(99, "hi", "yo")
        bad.messages.insert(0, pb.ChatMessage(role="tool", content="x"))
        work.demonstrations.append(bad)
        work.new_demonstrations += 1


def kl_check(learner: Learner, prompts: list[str]) -> tuple:
    torch.manual_seed(7)
    ppo = learner.ensure_ppo()
    ro = rollout(ppo, prompts)
    scored = ppo_score(ppo, ro)
    with ppo.peft.disable_adapter():
        base = token_logprobs(_forward(ppo, ro)[0], ro.response, ppo.cfg)
    return ro, scored, base


@pytest.fixture
def cfg(tiny_model_dir, redis_server, tmp_path) -> LearnerConfig:
    client = redis.Redis.from_url(redis_server.db_url(14))
    client.flushdb()
    client.close()
    return from_flat(LearnerConfig, dict(
        model=str(tiny_model_dir), device="cpu", redis_url=redis_server.db_url(14),
        data_dir=str(tmp_path / "data"), adapter_store=str(tmp_path / "store"),
        consumer="sft-learner", sft_epochs=2, **{**SMALL, "ppo_steps": 1}))


def test_iteration_sft_becomes_the_reference_and_survives_a_restart(cfg):
    torch.set_num_threads(1)
    client = redis.Redis.from_url(cfg.redis_url)
    submit(client, 0, 9)
    append_many(client, demos(12))  # as the Feedback service stores them
    ideal = make_comparison(100, "What is 9 - 1?", "8")
    ideal.ideal_answer = "Answer: 8. Done!"  # a comparison's ideal answer is one more
    append_many(client, [ideal])
    first = Learner(cfg, load_model(cfg.model, device="cpu"))
    progress, work = Progress(first.new_id()), Work()
    first.run(progress, work, ("drain", "sft", "reward_model"))
    m = progress.metrics
    assert m["sft/ran"] is True and m["sft/demonstrations"] == 13 and not progress.skipped
    assert m["sft/loss_heldout_after"] < m["sft/loss_heldout_before"]
    assert first.ref_adapter == SFT and first.ppo is None  # PPO state made after the RM
    ro, scored, base = kl_check(first, ["What is 2 + 3?", "What is 6 - 2?"])
    assert first.ppo is not None and first.ppo.ref_adapter == SFT
    assert torch.equal(scored.logprobs, scored.ref_logprobs)  # KL 0 to SFT at step 0
    assert not torch.allclose(scored.logprobs, base)  # the policy is not the base
    first.run(progress, work, ("ppo", "evaluate", "publish", "record"))
    assert progress.status == "done" and progress.version == "v1"
    assert progress.metrics["ppo/kl"] == 0.0  # one PPO step: sampled before any update
    sft_weights = adapter_tensors(first.rm.peft, SFT)
    after = ppo_score(first.ppo, ro)
    first.reset_rm()  # what each RM phase starts from: the SFT LoRA, its own head init
    for name, tensor in adapter_tensors(first.rm.peft, "rm").items():
        assert torch.equal(tensor, sft_weights[name.replace(".rm.", f".{SFT}.")]), name
    assert torch.equal(first.rm.head.weight, first._rm_init[-2])
    first.close()

    second = FlakyLearner(cfg, load_model(cfg.model, device="cpu"))  # a restart
    try:
        assert second.ref_adapter == SFT and second.parent == "v1"
        assert second.ppo is not None and second.ppo.ref_adapter == SFT
        for name, tensor in adapter_tensors(second.rm.peft, SFT).items():
            assert torch.equal(tensor, sft_weights[name]), name
        again = ppo_score(second.ppo, ro)
        assert torch.equal(again.ref_logprobs, after.ref_logprobs)  # the same reference
        assert torch.equal(again.logprobs, after.logprobs)  # the same policy

        submit(client, 9, 3)  # no new demonstrations: sft is skipped
        done = second.run(Progress(second.new_id()))
        assert done.skipped == ["sft"] and done.metrics["sft/ran"] is False
        assert "sft" in done.seconds and done.version == "v2"
        for name, tensor in adapter_tensors(second.rm.peft, SFT).items():
            assert torch.equal(tensor, sft_weights[name]), name

        # A failing SFT (the template rejects a role) leaves the reference and the policy
        # as they were, and publishes nothing.
        second.bad = True
        policy = adapter_tensors(second.rm.peft, "policy")
        with pytest.raises(Exception, match="Unknown role"):
            second.run(Progress(second.new_id()))
        assert second.active.status == "failed" and second.active.phase == "sft"
        assert second.ref_adapter == SFT and second.ppo is not None
        for name, tensor in adapter_tensors(second.rm.peft, SFT).items():
            assert torch.equal(tensor, sft_weights[name]), name
        for name, tensor in adapter_tensors(second.rm.peft, "policy").items():
            assert torch.equal(tensor, policy[name]), name
        assert adapter_store.list_versions(client) == ["v1", "v2"]
        second.bad = False

        # New demonstrations later on: SFT again on all 17, the running policy is replaced
        # by a copy of the new SFT adapter (KL 0 at its first step), the step count goes on.
        append_many(client, demos(4, start=50))
        steps = second.ppo.step
        submit(client, 12, 3)
        done = second.run(Progress(second.new_id()))
        assert done.status == "done" and done.version == "v3" and not done.skipped
        assert done.metrics["sft/demonstrations"] == 17 and done.metrics["ppo/kl"] == 0.0
        assert second.ppo.step == steps + 1 and second.ppo.ref_adapter == SFT
        changed = adapter_tensors(second.rm.peft, SFT)
        assert any(not torch.equal(changed[n], sft_weights[n]) for n in changed)
    finally:
        second.close()
        client.close()


def test_rlhf_sft_publishes_a_version_learn_continues_from(cfg, tmp_path):
    path = tmp_path / "demos.jsonl"
    lines = [{"prompt": d.messages[0].content, "response": d.answer} for d in demos(6)]
    lines += [{"messages": [{"role": "user", "content": d.messages[0].content},
                            {"role": "assistant", "content": d.answer}]}
              for d in demos(2, start=30)]  # the chat format too
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flags = ["--model", cfg.model, "--device", "cpu", "--threads", "1", "--data-dir",
             cfg.data_dir, "--adapter-store", cfg.adapter_store, "--consumer", cfg.consumer,
             "--rm-lora-rank", "4", "--sft-epochs", "2", "--no-progress-bars"]
    env = {**os.environ, "RLHF_LEARN_REDIS_URL": cfg.redis_url}

    def sft(file: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", "--demonstrations",
                               str(file), *flags], cwd=ROOT, text=True, capture_output=True,
                              timeout=120, env=env)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + "\n{\"prompt\": \"x\"}\n")
    refused = sft(bad)
    assert refused.returncode == 2 and "bad.jsonl line 2: response" in refused.stderr
    proc = sft(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["event"] == "published" and event["version"] == "v1"
    assert event["metrics"]["sft/demonstrations"] == 8
    client = redis.Redis.from_url(cfg.redis_url)
    try:
        assert adapter_store.list_versions(client) == ["v1"]
        assert adapter_store.current(client) == "v1"
        manifest = adapter_store.verify(cfg.adapter_store, "v1", cfg.model)
        assert manifest.parent is None and "sft/loss_heldout_after" in manifest.metrics
        learner = Learner(cfg, load_model(cfg.model, device="cpu"))  # what `rlhf learn` does
        try:
            assert learner.parent == "v1" and learner.ref_adapter == SFT
            assert learner.ppo is None and learner.reference.demonstrations == 8
            assert len(learner.demonstration_dataset) == 8  # kept for every later SFT
            assert learner.history()[-1]["skipped"] == [] and \
                learner.history()[-1]["phases"] == 3
            submit(client, 0, 9)  # the first learn iteration: PPO from the SFT adapter
            done = learner.run(Progress(learner.new_id()))
            assert done.version == "v2" and done.skipped == ["sft"]
            assert learner.ppo is not None and learner.ppo.ref_adapter == SFT
            assert adapter_store.verify(cfg.adapter_store, "v2", cfg.model).parent == "v1"
            steps = learner.ppo.step
        finally:
            learner.close()
        # `rlhf sft` again, over a learner with a PPO policy: SFT on the 8 (stored once) +
        # 2 new, the policy is replaced by it (v3, parent v2); the step counter goes on.
        more = tmp_path / "more.jsonl"
        more.write_text("".join(json.dumps({"prompt": d.messages[0].content,
                                            "response": d.answer}) + "\n"
                                for d in demos(2, start=60)))
        proc = sft(more)
        assert proc.returncode == 0, proc.stderr[-3000:]
        event = json.loads(proc.stdout.strip().splitlines()[-1])
        assert event["version"] == "v3" and event["metrics"]["sft/demonstrations"] == 10
        assert adapter_store.verify(cfg.adapter_store, "v3", cfg.model).parent == "v2"
        learner = Learner(cfg, load_model(cfg.model, device="cpu"))
        try:
            assert learner.parent == "v3" and learner.ppo is None
            assert learner.ensure_ppo().step == steps and learner.ppo.ref_adapter == SFT
        finally:
            learner.close()
    finally:
        client.close()


def test_demonstrations_without_comparisons_publish_the_sft_policy(cfg):
    """Demonstrations but no comparisons yet: sft runs, reward_model/ppo/evaluate are
    recorded as skipped and the SFT adapter is published; with nothing new after that the
    drain refuses again; the first comparisons then run PPO from that SFT adapter."""
    torch.set_num_threads(1)
    client = redis.Redis.from_url(cfg.redis_url)
    append_many(client, demos(8))
    learner = Learner(cfg, load_model(cfg.model, device="cpu"))
    try:
        done = learner.run(Progress(learner.new_id()))
        assert done.status == "done" and done.version == "v1"
        assert done.skipped == ["reward_model", "ppo", "evaluate"]
        assert done.metrics["sft/ran"] is True and done.metrics["data/comparisons"] == 0
        assert learner.ppo is None and learner.ref_adapter == SFT
        assert adapter_store.current(client) == "v1"
        manifest = adapter_store.verify(cfg.adapter_store, "v1", cfg.model)
        assert manifest.parent is None and "sft/loss_heldout_after" in manifest.metrics
        stored = learner.history()[-1]
        assert stored["status"] == "done" and stored["skipped"] == done.skipped

        with pytest.raises(RuntimeError, match="no comparisons yet and no new demonstrations"):
            learner.run(Progress(learner.new_id()))
        assert learner.active.status == "failed" and learner.active.phase == "drain"
        assert adapter_store.list_versions(client) == ["v1"]

        submit(client, 0, 9)
        done = learner.run(Progress(learner.new_id()))
        assert done.status == "done" and done.version == "v2" and done.skipped == ["sft"]
        assert learner.ppo is not None and learner.ppo.ref_adapter == SFT
        assert adapter_store.verify(cfg.adapter_store, "v2", cfg.model).parent == "v1"
    finally:
        learner.close()
        client.close()


def test_neither_comparisons_nor_demonstrations_is_refused(cfg):
    learner = Learner(cfg, load_model(cfg.model, device="cpu"))
    try:
        with pytest.raises(RuntimeError, match="no comparisons yet"):
            learner.run(Progress(learner.new_id()))
        assert learner.active.phase == "drain" and learner.active.skipped == []
    finally:
        learner.close()
