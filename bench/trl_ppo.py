"""LoRA-PPO episodes/s: ours (``make_ppo_state`` + ``ppo_step``) vs TRL 1.12's
``trl.experimental.ppo.PPOTrainer`` (the last TRL release that ships PPO).

Both sides: the same model directory, prompts from the starter tasks through the chat template
(left-padded), a policy LoRA of the same rank/alpha/modules on the frozen base, reference =
the base with the adapter off, sampling at temperature 1 with top-k/top-p off, responses cut at
EOS after at most ``--response-length`` tokens, ``--ppo-batch`` episodes per batch, one PPO
epoch in minibatches of ``--minibatch`` (one optimizer step each), fp32, same threads.

What TRL cannot be given: our one-base layout. TRL needs a separate reward model and a
separate value model; both are the same directory loaded as
``AutoModelForSequenceClassification(num_labels=1)`` (a scalar head on the same base, as our
RM), and TRL trains the whole value model (every weight, not a head on the policy trunk). Our
RM is the shared base + an untrained "rm" LoRA + head; neither RM is trained here, which does
not change the work per episode. Timing: wall-clock per PPO batch (ours around each
``ppo_step``; TRL from ``on_train_begin`` to each ``on_step_end`` callback), so TRL's own
per-step logging and cleanup count, its constructor does not. TRL's first batch cannot be run
apart from the others, so both sides report all batches and the batches after the first. CPU
seconds of the process over the same spans are reported too: on a machine shared with other
work they move far less than wall-clock (one torch thread: CPU time is the work done).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time

import torch
from peft import LoraConfig

from bench.kit.stats import ratio_spread, spread_runs
from learner.ppo import PPOConfig, make_ppo_state, ppo_step
from learner.reward_model import RewardModel, RMConfig
from rlhf.modeling import load_model
from rlhf.starter_data import make_tasks

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the policy LoRA targets of learner.ppo


class GenerationMeter:
    """Wraps a model's ``generate`` (instrumentation only): decode steps and real response
    tokens (up to and including the first EOS) of every call, so both sides can show they
    sampled comparable lengths."""

    def __init__(self, model: torch.nn.Module, eos_id: int) -> None:
        self.model, self.eos, self.calls = model, eos_id, []
        self.inner = model.generate
        model.generate = self  # type: ignore[method-assign]

    def __call__(self, *a, **kw):
        out = self.inner(*a, **kw)
        seqs = out.sequences if hasattr(out, "sequences") else out
        width = kw["input_ids"].size(1) if "input_ids" in kw else a[0].size(1)
        resp = seqs[:, width:]
        is_eos = (resp == self.eos).long()
        before = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
        self.calls.append((resp.size(1), before.sum(1).float().mean().item(),
                           is_eos.any(1).float().mean().item()))
        return out

    def summary(self) -> dict:
        n = max(len(self.calls), 1)
        return {"decode_steps_per_batch": sum(c[0] for c in self.calls) / n,
                "mean_response_tokens": sum(c[1] for c in self.calls) / n,
                "fraction_with_eos": sum(c[2] for c in self.calls) / n}


def prompts(n: int, seed: int) -> list[str]:
    return [t.prompt for t in make_tasks(n, seed)]


def query_ids(tok, prompt: str) -> list[int]:
    """The prompt as our rollouts encode it: one user turn through the chat template, ready
    for the assistant's answer, no extra special tokens."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _rates(wall: list[float], cpu: list[float], batch: int) -> dict:
    """Episodes per wall-clock second (all batches, and after the first) and per CPU second
    of this process (less disturbed when other work shares the cores)."""
    rest = wall[1:] or wall
    return {"episodes_per_s": batch * len(wall) / sum(wall),
            "episodes_per_s_after_first": batch * len(rest) / sum(rest),
            "episodes_per_cpu_s": batch * len(cpu) / sum(cpu),
            "seconds_first_batch": wall[0]}


def run_ours(args: argparse.Namespace, model_dir: str, batches: list[list[str]]) -> dict:
    """Fresh base; "rm" adapter + head (RewardModel) and "policy" adapter + value head on the
    same PeftModel (one base in memory); ``ppo_step`` per batch, each timed."""
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    torch.manual_seed(args.seed)
    rm = RewardModel(loaded.model, RMConfig(lora_rank=args.lora_rank, lora_targets=TARGETS))
    cfg = PPOConfig(lr=args.ppo_lr, batch_size=args.ppo_batch, minibatch_size=args.minibatch,
                    epochs=1, max_new_tokens=args.response_length, temperature=1.0,
                    top_p=1.0, lora_rank=args.lora_rank, seed=args.seed)
    state = make_ppo_state(rm.peft, loaded.tokenizer, cfg, rm=rm)
    meter = GenerationMeter(state.peft, loaded.tokenizer.eos_token_id)
    wall, cpu = [], []
    for batch in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        stats = ppo_step(state, batch)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        log.info("ours: batch %d %.2f s (gen %.2f s)", len(wall), wall[-1],
                 stats["time/generate_s"])
    trainable = sum(p.numel() for p in state.trainable_parameters())
    return {**_rates(wall, cpu, args.ppo_batch), **meter.summary(),
            "trainable_params": trainable, "models_in_memory": 1}


def _trl_config(args: argparse.Namespace, out_dir: str, episodes: int):
    """Batch = per_device_train_batch_size (no accumulation), rollouts generated in one
    call, ``num_mini_batches`` so each minibatch is ``--minibatch`` episodes = one
    optimizer step, 1 PPO epoch; fp32 and no gradient checkpointing (TRL's defaults are bf16
    + checkpointing); no sample generations, saving or reporting inside the timing."""
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig

    return TRLPPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.ppo_batch,
        gradient_accumulation_steps=1, num_mini_batches=args.ppo_batch // args.minibatch,
        local_rollout_forward_batch_size=args.ppo_batch, num_ppo_epochs=1,
        total_episodes=episodes, response_length=args.response_length, stop_token="eos",
        temperature=1.0, kl_coef=0.02, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        gamma=1.0, lam=0.95, learning_rate=args.ppo_lr, num_sample_generations=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=args.seed, dataloader_num_workers=0)


def _trl_models(model_dir: str, args: argparse.Namespace):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)  # left padding, as ours
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqcls = [AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32) for _ in range(2)]
    for m in seqcls:
        m.config.pad_token_id = tok.pad_token_id
    return tok, policy, seqcls[0], seqcls[1]


def run_trl(args: argparse.Namespace, model_dir: str, batches: list[list[str]]) -> dict:
    """PPOTrainer with ``peft_config`` (policy LoRA, reference = adapter off), a reward model
    and a value model; ``train()`` over exactly ``len(batches)`` batches, each timed."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOTrainer

    tok, policy, reward, value = _trl_models(model_dir, args)
    flat = [p for b in batches for p in b]
    data = Dataset.from_dict({"input_ids": [query_ids(tok, p) for p in flat]})
    ends: list[tuple[float, float]] = []  # (wall, cpu) at train begin and each step end

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        trainer = PPOTrainer(args=_trl_config(args, out, len(flat)), processing_class=tok,
                             model=policy, ref_model=None, reward_model=reward,
                             value_model=value, train_dataset=data,
                             eval_dataset=data.select(range(args.ppo_batch)),
                             peft_config=lora, callbacks=[StepClock()])
        meter = GenerationMeter(trainer.model.policy, tok.eos_token_id)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    steps = list(itertools.pairwise(ends))
    times = [b[0] - a[0] for a, b in steps]
    cpu = [b[1] - a[1] for a, b in steps]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {**_rates(times, cpu, args.ppo_batch), **meter.summary(), "train_wall_s": wall,
            "torch_threads_after_train": torch.get_num_threads(),
            "trainable_params": trainable, "models_in_memory": 3}


def run(args: argparse.Namespace, model_dir: str) -> dict:
    """Phases: 1. prompts (shared), 2. alternate ours / TRL ``repeats`` times, 3. summary."""
    flat = prompts(args.steps * args.ppo_batch, args.seed + 3)  # 1
    batches = [flat[i:i + args.ppo_batch] for i in range(0, len(flat), args.ppo_batch)]
    ours, theirs = [], []
    for i in range(args.repeats):  # 2
        log.info("ppo bench repeat %d/%d: ours", i + 1, args.repeats)
        ours.append(run_ours(args, model_dir, batches))
        log.info("ppo bench repeat %d/%d: trl", i + 1, args.repeats)
        theirs.append(run_trl(args, model_dir, batches))

    return {"ours": spread_runs(ours), "trl": spread_runs(theirs),  # 3
            "ratio_ours_over_trl": ratio_spread(ours, theirs, "episodes_per_s"),
            "ratio_ours_over_trl_cpu_time": ratio_spread(ours, theirs, "episodes_per_cpu_s"),
            "ratio_ours_over_trl_after_first_batch": ratio_spread(
                ours, theirs, "episodes_per_s_after_first"),
            "target": "episodes/s >= 1.5x TRL's",
            "setup": {"batches": args.steps, "episodes_per_batch": args.ppo_batch,
                      "minibatch": args.minibatch, "ppo_epochs": 1,
                      "response_length": args.response_length, "lora_rank": args.lora_rank},
            "matched": [
                "base model directory, fp32, dropout off, same torch threads",
                f"policy LoRA r={args.lora_rank} alpha={2 * args.lora_rank} dropout 0 on "
                f"{', '.join(TARGETS)}; reference = base with the adapter disabled",
                "the same prompts and chat-template encoding, left-padded",
                "sampling temperature 1, top-k 0, top-p 1; stop at EOS; max new tokens",
                "episodes per batch, episodes per optimizer step, 1 PPO epoch",
                "kl coef 0.02, clip 0.2, value clip 0.2, vf coef 0.1, gamma 1, lambda 0.95",
                "Adam(W) betas (0.9, 0.95), no weight decay, fp32, no gradient checkpointing"],
            "not_matched": [
                "TRL needs a separate reward model and value model (3 models in memory); "
                "both are the base dir as AutoModelForSequenceClassification(num_labels=1); "
                "TRL trains the whole value model, ours a value head on the policy trunk",
                "TRL takes rollout logprobs from generate's scores (no policy forward in "
                "scoring); ours re-forwards the policy for logprobs, values and entropy",
                "responses are sampled, so their lengths differ between sides "
                "(mean_response_tokens / decode_steps_per_batch show by how much)",
                "learning-rate schedule: ours constant, TRL linear decay (no effect on speed)"]}
