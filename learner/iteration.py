"""One learner iteration as six named phases (DESIGN.md §1, §3, §4):

1. drain      the comparisons stream -> the durable dataset (Intake)
2. reward     retrain the RM on ALL comparisons so far (split by labeler, held-out accuracy,
              bias so reference samples score mean 0)
3. ppo        LoRA-PPO on the user turns of the collected conversations, ptx from the
              pretraining corpus
4. evaluate   RM score of policy vs reference samples on held-out prompts, KL, ptx loss
              before/after
5. publish    adapter vN+1 into the store + registry (made current: replicas follow)
6. record     metrics JSON in data_dir/iterations/ and a Redis hash + history list

``Learner`` holds what lives for the whole process: the one base model (loaded once), the
dataset, the RM and the PPO state, so the policy adapter carries over between iterations.
It is NOT persisted across restarts: a new process starts again from the base policy.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import redis
import torch

from learner.config import LearnerConfig
from learner.dataset import ComparisonDataset
from learner.intake import Intake
from learner.ppo import POLICY, PPOState, make_ppo_state, ppo_step, ptx_forward, rollout
from learner.ppo import score as ppo_score
from learner.reward_model import (
    Encoded,
    RewardModel,
    collate,
    encode_sample,
    fit_reward_model,
    prompt_ids,
    split_by_labeler,
)
from rlhf import adapter_store, settings
from rlhf.modeling import LoadedModel
from rlhf.starter_data import pretraining_corpus
from rlhf.v1.feedback_pb2 import Comparison

log = logging.getLogger(__name__)

PHASES = ("drain", "reward_model", "ppo", "evaluate", "publish", "record")
HISTORY = "rlhf:learner:history"  # list of iteration ids, oldest first
RECORDS = "rlhf:learner:iterations"  # hash: iteration id -> record JSON
SEQ = "rlhf:learner:iteration_seq"


@dataclass
class Progress:
    """What an operator sees of one iteration; mutated only by the worker thread."""

    id: str
    status: str = "running"  # running | done | failed
    phase: str = "pending"
    phase_number: int = 0
    phases: int = len(PHASES)
    step: int = 0  # within the phase (PPO steps)
    steps: int = 0
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    version: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A snapshot; safe while the worker updates (dict() copies atomically under the GIL,
        where ``asdict`` would iterate a dict that may change size)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["metrics"], out["seconds"] = dict(self.metrics), dict(self.seconds)
        return out


@dataclass
class Work:
    """What the phases of one iteration hand each other."""

    comparisons: list[Comparison] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)
    ptx_eval: list[str] = field(default_factory=list)


def distinct_prompts(comparisons: Sequence[Comparison]) -> list[str]:
    """The user turn each comparison's candidates answer (its last one), most recent last,
    each once."""
    seen: dict[str, None] = {}
    for c in comparisons:
        for turn in [m.content for m in c.messages if m.role == "user" and m.content][-1:]:
            seen.pop(turn, None)
            seen[turn] = None
    return list(seen)


class Learner:
    """The learner's long-lived state and ``run`` = one iteration (not thread-safe: one
    iteration at a time, which ``admin_api.Runner`` guarantees)."""

    def __init__(self, cfg: LearnerConfig, loaded: LoadedModel,
                 client: redis.Redis | None = None) -> None:
        self.cfg, self.loaded = cfg, loaded
        self.rm_cfg, self.ppo_cfg = cfg.rm_config(), cfg.ppo_config()
        self.client = client or redis.Redis.from_url(cfg.redis_url, socket_connect_timeout=5.0)
        self.data_dir = Path(cfg.data_dir)
        self.dataset = ComparisonDataset(self.data_dir / "comparisons")
        consumer = cfg.consumer or f"learner-{socket.gethostname()}"
        self.intake = Intake(cfg.redis_url, self.dataset, consumer)
        torch.manual_seed(cfg.seed)
        self.rm = RewardModel(loaded.model, self.rm_cfg)  # the one base, wrapped once
        # Retraining "on all data" starts from the same init each time (not from last time).
        self._rm_init = [p.detach().clone() for p in self._rm_tensors()]
        self.ppo: PPOState | None = None  # made after the first RM fit (value head <- RM)
        self.parent: str | None = None  # the version this process published last
        self.lock = threading.Lock()

    def _rm_tensors(self) -> list[torch.Tensor]:
        return [*self.rm.trainable_parameters(), self.rm.bias]

    def new_id(self) -> str:
        return f"it-{int(self.client.incr(SEQ)):04d}"

    def run(self, progress: Progress) -> Progress:
        """Phases 1-6 in order; a failing phase marks the iteration failed (and re-raises)."""
        work = Work()
        steps: list[Callable[[Work, Progress], None]] = [
            self.drain, self.reward_model, self.train_policy, self.evaluate, self.publish,
            self.record]
        with self.lock:
            try:
                for number, (name, phase) in enumerate(zip(PHASES, steps, strict=True), 1):
                    progress.phase, progress.phase_number = name, number
                    log.info("iteration %s: phase %d/%d %s", progress.id, number, len(PHASES),
                             name)
                    start = time.perf_counter()
                    phase(work, progress)
                    progress.seconds[name] = time.perf_counter() - start
            except Exception as exc:
                progress.status, progress.error = "failed", f"{type(exc).__name__}: {exc}"
                progress.finished_at = time.time()
                log.exception("iteration %s failed in phase %s", progress.id, progress.phase)
                try:
                    self._store_record(progress)
                except Exception:  # e.g. Redis down: the API still holds the progress
                    log.exception("could not record failed iteration %s", progress.id)
                raise
        return progress

    # 1 ------------------------------------------------------------------------------------
    def drain(self, work: Work, progress: Progress) -> None:
        result = self.intake.drain()
        work.comparisons = self.dataset.load_all()
        progress.metrics.update({"data/new": result.stored, "data/duplicates": result.duplicates,
                                 "data/malformed": result.malformed,
                                 "data/comparisons": len(work.comparisons)})
        if not work.comparisons:
            raise RuntimeError("no comparisons yet: nothing to learn from")

    # 2 ------------------------------------------------------------------------------------
    def reward_model(self, work: Work, progress: Progress) -> None:
        with torch.no_grad():
            for p, init in zip(self._rm_tensors(), self._rm_init, strict=True):
                p.copy_(init)
        cfg = self.cfg
        train, heldout, _ = split_by_labeler(work.comparisons, cfg.rm_heldout_fraction, cfg.seed)
        train_prompts, held_prompts = distinct_prompts(train), distinct_prompts(heldout)
        unseen = [p for p in held_prompts if p not in set(train_prompts)]
        pool = train_prompts or held_prompts
        work.prompts = pool[-cfg.prompts_per_iteration:]
        work.eval_prompts = (unseen or pool)[-cfg.eval_prompts:]
        progress.metrics["eval/prompts_heldout"] = bool(unseen)
        reference = [([{"role": "user", "content": prompt}], text)
                     for prompt, text in self._reference_samples(work.prompts, cfg.seed + 1)]
        progress.metrics.update(fit_reward_model(self.rm, self.loaded.tokenizer,
                                                 work.comparisons, self.rm_cfg, reference))

    # 3 ------------------------------------------------------------------------------------
    def train_policy(self, work: Work, progress: Progress) -> None:
        if self.ppo is None:  # value head starts as the freshly trained RM head
            self.ppo = make_ppo_state(self.rm.peft, self.loaded.tokenizer, self.ppo_cfg,
                                      rm=self.rm)
        cfg, bs = self.cfg, self.ppo_cfg.batch_size
        rng = random.Random(cfg.seed + self.ppo.step)
        work.ptx_eval = pretraining_corpus(cfg.ptx_eval_texts, cfg.seed + 10_000)
        progress.metrics["ptx/loss_before"] = self._ptx_loss(work.ptx_eval)
        ptx = pretraining_corpus(bs * cfg.ppo_steps, cfg.seed + self.ppo.step)
        progress.steps, totals = cfg.ppo_steps, {}
        for step in range(cfg.ppo_steps):
            batch = [rng.choice(work.prompts) for _ in range(bs)]
            stats = ppo_step(self.ppo, batch, ptx[step * bs:(step + 1) * bs])
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.ppo_steps
            progress.step = step + 1
        progress.metrics.update(totals)
        progress.metrics["ppo/total_steps"] = self.ppo.step

    # 4 ------------------------------------------------------------------------------------
    def evaluate(self, work: Work, progress: Progress) -> None:
        assert self.ppo is not None
        seed = self.cfg.seed + 20_000
        torch.manual_seed(seed)
        ro = rollout(self.ppo, work.eval_prompts)
        scored = ppo_score(self.ppo, ro)
        kl = ((scored.logprobs - scored.ref_logprobs) * ro.response_mask).sum(1).mean()
        reference = self._reference_samples(work.eval_prompts, seed=seed)
        policy_scores = self._rm_scores(list(zip(work.eval_prompts, ro.texts, strict=True)))
        ref_scores = self._rm_scores(reference)
        progress.metrics.update({
            "eval/policy_score": float(policy_scores.mean()),
            "eval/reference_score": float(ref_scores.mean()),
            "eval/win_rate": float((policy_scores > ref_scores).float().mean()),
            "eval/kl": float(kl), "eval/prompts": len(work.eval_prompts),
            "ptx/loss_after": self._ptx_loss(work.ptx_eval)})
        progress.metrics["ptx/loss_delta"] = (progress.metrics["ptx/loss_after"]
                                              - progress.metrics["ptx/loss_before"])

    # 5 ------------------------------------------------------------------------------------
    def publish(self, work: Work, progress: Progress) -> None:
        assert self.ppo is not None
        version = adapter_store.next_version(self.client)
        config = {**settings.describe(self.cfg), "iteration": progress.id}
        metrics = {k: v for k, v in progress.metrics.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory(dir=self.data_dir) as tmp:
            self.ppo.peft.save_pretrained(tmp, selected_adapters=[POLICY])
            folder = Path(tmp) / POLICY  # PEFT nests a non-default adapter's files
            manifest = adapter_store.publish(
                self.cfg.adapter_store, version, folder if folder.is_dir() else Path(tmp),
                parent=self.parent, base_model=self.loaded.name, metrics=metrics,
                config=config)
        adapter_store.register(self.client, manifest, make_current=True)
        self.parent = progress.version = version
        log.info("iteration %s published %s (parent %s)", progress.id, version,
                 manifest.parent)

    # 6 ------------------------------------------------------------------------------------
    def record(self, work: Work, progress: Progress) -> None:
        progress.status, progress.finished_at = "done", time.time()
        progress.seconds["record"] = 0.0
        self._store_record(progress)

    def _store_record(self, progress: Progress) -> None:
        record = json.dumps(progress.to_dict(), sort_keys=True, default=str)
        folder = self.data_dir / "iterations"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{progress.id}.json").write_text(record)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(RECORDS, progress.id, record)
        pipe.rpush(HISTORY, progress.id)
        pipe.execute()

    def history(self) -> list[dict[str, Any]]:
        ids = [i.decode() for i in self.client.lrange(HISTORY, 0, -1)]
        raws = self.client.hmget(RECORDS, ids) if ids else []
        return [json.loads(raw) for raw in raws if raw is not None]

    # helpers ------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_samples(self, prompts: Sequence[str], seed: int) -> list[tuple[str, str]]:
        """(prompt, sample) of the reference policy: the base with every adapter off."""
        peft, tok, cfg = self.rm.peft, self.loaded.tokenizer, self.ppo_cfg
        texts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        batch = batch.to(self.rm.device)
        torch.manual_seed(seed)
        with peft.disable_adapter():
            out = peft.generate(**batch, do_sample=True, temperature=cfg.temperature,
                                top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers = tok.batch_decode(out[:, batch["input_ids"].size(1):], skip_special_tokens=True)
        return list(zip(prompts, answers, strict=True))

    @torch.no_grad()
    def _rm_scores(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """RM scores [N] of (prompt, response) pairs, tokenized as the RM trained."""
        tok = self.loaded.tokenizer
        length = min(self.rm_cfg.max_length, self.rm.context_length)
        rows = [Encoded((encode_sample(tok, prompt_ids(tok, [{"role": "user", "content": p}]),
                                       text, length),), (1,)) for p, text in pairs]
        ids, mask, _, _ = collate(rows, tok.pad_token_id, self.rm.device)
        return self.rm.score(ids, mask).float().cpu()

    @torch.no_grad()
    def _ptx_loss(self, texts: Sequence[str]) -> float:
        assert self.ppo is not None
        self.ppo.peft.set_adapter(POLICY)  # the RM phase left "rm" active
        loss, _ = ptx_forward(self.ppo, texts)
        return float(loss)

    def close(self) -> None:
        self.intake.close()
        self.dataset.close()
        self.client.close()
