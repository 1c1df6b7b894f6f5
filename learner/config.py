"""LearnerConfig: the one frozen configuration of a learner process (DESIGN.md §7).

Flat scalar fields, so every knob is a ``--flag`` and an ``RLHF_LEARN_*`` variable through
``rlhf.settings``; ``rm_config()`` / ``ppo_config()`` turn the ``rm_*`` / ``ppo_*`` knobs
into the frozen configs of the reward-model and PPO loops (their other fields keep their
defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

from learner.ppo import PPOConfig
from learner.reward_model import RMConfig
from rlhf.settings import port as _port
from rlhf.settings import setting as _f

ENV_PREFIX = "RLHF_LEARN_"


@dataclass(frozen=True)
class LearnerConfig:
    """Everything `rlhf learn` needs; CLI flags and RLHF_LEARN_* env vars override defaults."""

    model: str = _f("", "hub id or local directory of the base model (the same string serving "
                    "runs); empty = the built-in starter model")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _f("auto", "float32, bfloat16, float16 or auto")
    load_in_4bit: bool = _f(False, "load the base model in 4-bit through bitsandbytes")
    threads: int = _f(0, "torch threads; 0 = torch's default")

    redis_url: str = _f("redis://127.0.0.1:6379/0", "Redis holding the comparisons stream and "
                        "the adapter registry", secret=True, address="url")
    data_dir: str = _f("learner-data", "durable dataset (comparisons/), iteration records "
                       "(iterations/) and the policy checkpoint a restart continues from "
                       "(checkpoint/)")
    adapter_store: str = _f("adapter-store", "adapter store directory (STORE/<version>/) the "
                            "serving replicas read")
    consumer: str = _f("", "consumer name in the learner group; empty = learner-<hostname>")

    host: str = _f("127.0.0.1", "interface of the admin HTTP API")
    port: int = _port(8100, "port of the admin HTTP API (0 = pick a free one)")
    admin_token: str = _f("", "bearer token the admin API demands; empty = no auth", secret=True)
    auto_trigger_after: int = _f(0, "start an iteration once this many new comparisons are in "
                                 "the stream; 0 = only on request")
    auto_poll_s: float = _f(5.0, "seconds between checks for --auto-trigger-after")
    progress_bars: bool = _f(True, "tqdm bars on stderr for the RM and PPO phases (shown only "
                             "when stderr is a terminal)")

    prompts_per_iteration: int = _f(64, "most recent distinct user turns PPO samples from")
    eval_prompts: int = _f(8, "held-out prompts for the evaluate phase")
    ptx_eval_texts: int = _f(16, "pretraining texts for the ptx loss before/after PPO")
    seed: int = _f(0, "seed of splits, sampling and shuffling")

    rm_lr: float = _f(1e-3, "reward model: peak learning rate")
    rm_epochs: int = _f(1, "reward model: passes over all comparisons per iteration")
    rm_batch: int = _f(4, "reward model: comparisons (all K candidates) per step; in one "
                       "epoch 4 beat 16 and 8 on held-out accuracy at the same s/epoch "
                       "(learner.trl_bench rm: 0.98 vs 0.85 and 0.93)")
    rm_micro_batch: int = _f(4, "reward model: comparisons per forward/backward inside a "
                             "step (same gradient, less activation memory); 0 = whole step")
    rm_max_length: int = _f(512, "reward model: tokens per prompt+completion row")
    rm_lora_rank: int = _f(8, "reward model: LoRA rank")
    rm_heldout_fraction: float = _f(0.1, "reward model: share held out (by labeler)")

    ppo_steps: int = _f(4, "PPO steps (each ppo_batch_size episodes) per iteration")
    ppo_lr: float = _f(1e-4, "PPO: learning rate of the policy LoRA and value head")
    ppo_batch_size: int = _f(16, "PPO: episodes per step")
    ppo_minibatch_size: int = _f(8, "PPO: episodes per optimizer step")
    ppo_epochs: int = _f(1, "PPO: passes over each batch")
    ppo_kl_coef: float = _f(0.02, "PPO: beta of the per-token KL penalty")
    ppo_target_kl: float = _f(0.0, "PPO: adaptive-KL target; 0 = fixed beta")
    ppo_ptx_coef: float = _f(0.0, "PPO: gamma_ptx, weight of the pretraining LM loss")
    ppo_temperature: float = _f(1.0, "PPO: sampling and scoring temperature")
    ppo_top_p: float = _f(1.0, "PPO: sampling and scoring top-p")
    ppo_max_new_tokens: int = _f(32, "PPO: response length cap")
    ppo_lora_rank: int = _f(8, "PPO: rank of the policy LoRA")

    def __post_init__(self) -> None:
        problems = []
        if self.prompts_per_iteration < 1 or self.eval_prompts < 1 or self.ppo_steps < 1:
            problems.append("prompts_per_iteration, eval_prompts and ppo_steps must be >= 1")
        if self.auto_trigger_after < 0 or not self.auto_poll_s > 0:
            problems.append("auto_trigger_after >= 0 and auto_poll_s > 0 required")
        if self.ptx_eval_texts < 1:
            problems.append("ptx_eval_texts must be >= 1")
        if problems:
            raise ValueError("invalid learner config: " + "; ".join(problems))
        self.rm_config()  # the nested configs check their own knobs now, not mid-iteration
        self.ppo_config()

    def rm_config(self) -> RMConfig:
        return RMConfig(lr=self.rm_lr, epochs=self.rm_epochs, max_length=self.rm_max_length,
                        comparisons_per_batch=self.rm_batch, lora_rank=self.rm_lora_rank,
                        micro_batch=self.rm_micro_batch,
                        heldout_fraction=self.rm_heldout_fraction, seed=self.seed)

    def ppo_config(self) -> PPOConfig:
        return PPOConfig(lr=self.ppo_lr, batch_size=self.ppo_batch_size,
                         minibatch_size=self.ppo_minibatch_size, ppo_epochs=self.ppo_epochs,
                         ptx_coef=self.ppo_ptx_coef, init_kl_coef=self.ppo_kl_coef,
                         target_kl=self.ppo_target_kl or None,
                         temperature=self.ppo_temperature, top_p=self.ppo_top_p,
                         max_new_tokens=self.ppo_max_new_tokens, lora_rank=self.ppo_lora_rank,
                         seed=self.seed)
