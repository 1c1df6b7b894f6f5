"""LearnerConfig: the one frozen configuration of a learner process (docs/design.md §7).

The SFT, reward-model and PPO loops' own configs nest inside it (``cfg.sft``, ``cfg.rm``,
``cfg.ppo``), so every knob is defined once, where it is used, and is still a flag and a
variable through ``rlhf.settings``: ``--sft-lr`` / ``RLHF_LEARN_SFT_LR``, ``--rm-lr`` /
``RLHF_LEARN_RM_LR``, ``--ppo-kl-horizon`` / ``RLHF_LEARN_PPO_KL_HORIZON``. ``seed`` and
``threads`` are the learner's and flow down.
"""

from __future__ import annotations

from dataclasses import dataclass

from learner.ppo import PPOConfig
from learner.reward_model import RMConfig
from learner.sft import SFTConfig
from rlhf.settings import nested, propagate_shared
from rlhf.settings import port as _port
from rlhf.settings import setting as _f

ENV_PREFIX = "RLHF_LEARN_"


@dataclass(frozen=True)
class LearnerConfig:
    """Everything `rlhf learn` needs; CLI flags and RLHF_LEARN_* env vars override defaults."""

    model: str = _f("", "base model, the same string serving runs: a name of `rlhf models "
                    "list` (fetched on first use), a local directory or a hub id; empty = the "
                    "built-in starter model")
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
    ptx_corpus: str = _f("", "pretraining text for PPO's ptx term and the held-out ptx loss: "
                         "a plain-text file (documents split on blank lines), a JSONL file of "
                         '{"text": ...} lines or a directory of such files, streamed; empty = '
                         "the model's default: the starter's synthetic sentences for the "
                         "starter presets, the shipped World Factbook prose for other models")
    ptx_eval_texts: int = _f(16, "held-out pretraining texts for the ptx loss before/after "
                             "PPO (a fixed tenth of the corpus, by a hash of each text)")
    seed: int = _f(0, "seed of splits, sampling and shuffling")

    nproc: int = _f(1, "processes on this machine: > 1 starts `torchrun --nproc_per_node` "
                    "with these flags (ONE learner: rank 0 serves the API, all ranks train)")
    dist_timeout_s: float = _f(1800.0, "seconds a collective of a multi-process learner "
                               "waits for the other ranks before it fails")
    dist_heartbeat_s: float = _f(30.0, "seconds between rank 0's heartbeats to idle ranks "
                                 "(keeps their wait under dist_timeout_s)")

    ppo_steps: int = _f(10, "PPO steps (each ppo_batch_size episodes) per iteration")
    sft: SFTConfig = nested(SFTConfig, "supervised fine-tuning on demonstrations (--sft-*); "
                            "the adapter has the RM's LoRA layout (--rm-lora-rank)",
                            shared=("seed", "threads"))
    rm: RMConfig = nested(RMConfig, "reward model training (--rm-*)",
                          shared=("seed", "threads"))
    ppo: PPOConfig = nested(PPOConfig, "LoRA-PPO (--ppo-*)", shared=("seed",))

    def __post_init__(self) -> None:
        problems = []
        if self.prompts_per_iteration < 1 or self.eval_prompts < 1 or self.ppo_steps < 1:
            problems.append("prompts_per_iteration, eval_prompts and ppo_steps must be >= 1")
        if self.auto_trigger_after < 0 or not self.auto_poll_s > 0:
            problems.append("auto_trigger_after >= 0 and auto_poll_s > 0 required")
        if self.nproc < 1 or not 0 < self.dist_heartbeat_s < self.dist_timeout_s:
            problems.append("nproc >= 1 and 0 < dist_heartbeat_s < dist_timeout_s required")
        if self.ptx_eval_texts < 1:
            problems.append("ptx_eval_texts must be >= 1")
        if problems:
            raise ValueError("invalid learner config: " + "; ".join(problems))
        propagate_shared(self)
