"""One learner iteration as six named phases (docs/design.md §1, §3, §4):

1. drain      the comparisons and demonstrations streams -> the durable datasets (Intake);
              the SFT set (learner.demonstrations) goes on ``Work.demonstrations``
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
Across restarts (docs/design.md §5): publish saves a checkpoint (learner/checkpoint.py: policy
LoRA, value head, Adam, KL controller, PPO step) before registering the version, and a new
``Learner`` continues from it with parent = that version; the reference stays the base with
adapters off. Records left "running" by a killed process become "interrupted"; such an
iteration is not resumed (its RM and PPO progress lived in memory only): the next trigger
runs a new one from the last checkpoint. A kill between checkpoint and registration is
finished at startup (the version is registered then), so checkpoint and registry agree.
"""

from __future__ import annotations

import logging
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
from tqdm import tqdm

from learner import checkpoint, records
from learner.cluster import Cluster
from learner.config import LearnerConfig
from learner.dataset import ComparisonDataset, DemonstrationDataset
from learner.demonstrations import count_new, sft_demonstrations
from learner.intake import Intake
from learner.ppo import (
    POLICY,
    PPOState,
    make_ppo_state,
    ppo_step,
    ptx_forward,
    rollout,
)
from learner.ppo import score as ppo_score
from learner.ptx_corpus import text_source
from learner.records import HISTORY, PHASES, RECORDS, SEQ, Progress, pause_for_tests
from learner.reward_model import RewardModel, fit_reward_model, split_by_labeler
from learner.samples import reference_samples, rm_scores
from rlhf import adapter_store, settings, tasks
from rlhf.modeling import LoadedModel
from rlhf.v1.feedback_pb2 import Comparison, Demonstration

log = logging.getLogger(__name__)

__all__ = ["HISTORY", "PHASES", "RECORDS", "SEQ", "Learner", "Progress"]  # records re-exported
CHECKPOINT = "checkpoint"  # DATA/checkpoint/: what a restart continues from


@dataclass
class Work:
    """What the phases of one iteration hand each other."""

    comparisons: list[Comparison] = field(default_factory=list)
    # the SFT set (learner.demonstrations) and how many of it arrived in this drain
    demonstrations: list[Demonstration] = field(default_factory=list)
    new_demonstrations: int = 0
    golden: dict[str, tasks.Golden] = field(default_factory=dict)  # golden task answers
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
                 client: redis.Redis | None = None, cluster: Cluster | None = None) -> None:
        self.cfg, self.loaded = cfg, loaded
        self.rm_cfg, self.ppo_cfg = cfg.rm, cfg.ppo
        self.cluster = cluster or Cluster()  # ranks > 0 of torchrun: no Redis, no data dir
        self.data_dir = Path(cfg.data_dir)
        self.name = cfg.consumer or f"learner-{socket.gethostname()}"
        # (n, seed, heldout) -> ptx texts; the corpus is checked here (CorpusError),
        # before any dataset lock is taken.
        self.ptx_corpus, self.ptx_texts = text_source(cfg.ptx_corpus, cfg.model)
        if self.cluster.is_leader:
            self.client = client or redis.Redis.from_url(cfg.redis_url,
                                                         socket_connect_timeout=5.0)
            self.dataset = ComparisonDataset(self.data_dir / "comparisons")
            self.demonstration_dataset = DemonstrationDataset(self.data_dir / "demonstrations")
            self.intake = Intake(cfg.redis_url, self.dataset, self.name,
                                 demonstrations=self.demonstration_dataset)
        torch.manual_seed(cfg.seed)
        self.rm = RewardModel(loaded.model, self.rm_cfg)  # the one base, wrapped once
        # Retraining "on all data" starts from the same init each time (not from last time).
        self._rm_init = [p.detach().clone() for p in self._rm_tensors()]
        self.ppo: PPOState | None = None  # made after the first RM fit (value head <- RM)
        self.parent: str | None = None  # the version the policy was last published as
        self.active: Progress | None = None  # the iteration run() runs or ran last
        self.lock = threading.Lock()
        try:
            self._recover()
        except BaseException:  # e.g. a checkpoint of another base: release the dataset lock
            self.close()
            raise

    def _recover(self) -> None:
        """Startup: mark killed iterations, sweep what a kill left, continue the policy from
        the newest checkpoint (a fresh data dir starts from the base); the other ranks of
        a cluster get rank 0's checkpoint from it."""
        restored = None
        if self.cluster.is_leader:
            interrupted = records.mark_interrupted(self.client, self.data_dir / "iterations",
                                                   self.name)
            swept = checkpoint.sweep_leftovers(self.data_dir, CHECKPOINT,
                                               self.cfg.adapter_store,
                                               set(adapter_store.list_versions(self.client)))
            if interrupted or swept:
                log.warning("recovered from a restart: interrupted %s, removed leftovers %s",
                            interrupted, swept)
            restored = checkpoint.load_latest(self.data_dir / CHECKPOINT, self.loaded.name,
                                              "cpu" if self.cluster.distributed
                                              else self.rm.device)
        if self.cluster.distributed:
            restored = self.cluster.share(restored)
        if restored is None:
            log.info("no checkpoint in %s: the policy starts from the base", self.data_dir)
            return
        info, saved = restored
        self.ppo = make_ppo_state(self.rm.peft, self.loaded.tokenizer, self.ppo_cfg,
                                  rm=self.rm)  # reference: the base, adapters off, as before
        checkpoint.load_ppo_state_dict(self.ppo, saved, info.kl_kind)
        self.parent = info.version
        if self.cluster.is_leader:
            self._ensure_registered(info.version)
        log.info("resumed the policy published as %s (ppo step %d, beta %.4g)", info.version,
                 self.ppo.step, self.ppo.kl_ctl.value)

    def _ensure_registered(self, version: str) -> None:  # see register_if_missing
        checkpoint.register_if_missing(self.client, self.cfg.adapter_store, version,
                                       self.loaded.name)

    def _rm_tensors(self) -> list[torch.Tensor]:
        return [*self.rm.trainable_parameters(), self.rm.bias]

    def new_id(self) -> str:
        return f"it-{int(self.client.incr(SEQ)):04d}"

    def phases(self) -> dict[str, Callable[[Work, Progress], None]]:
        """The phases of one iteration, in order, by their PHASES name."""
        return dict(zip(PHASES, [self.drain, self.reward_model, self.train_policy,
                                 self.evaluate, self.publish, self.record], strict=True))

    def run(self, progress: Progress) -> Progress:
        """Phases 1-6 in order; a failing phase marks the iteration failed (and re-raises)."""
        work = Work()
        with self.lock, self.cluster.iteration():
            self.active, progress.learner = progress, self.name
            try:
                for number, (name, phase) in enumerate(self.phases().items(), 1):
                    progress.phase, progress.phase_number = name, number
                    progress.step = progress.steps = 0
                    self._store_record(progress)  # "running" in this phase: a kill shows
                    log.info("iteration %s: phase %d/%d %s", progress.id, number, len(PHASES),
                             name)
                    pause_for_tests(name)
                    start = time.perf_counter()
                    self.cluster.before_phase(name, progress.id, work)  # shared: all ranks
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
            finally:
                log.info("%s", records.summary_line(progress))
        return progress

    # 1 ------------------------------------------------------------------------------------
    def drain(self, work: Work, progress: Progress) -> None:
        old_demos, old_comparisons = self.demonstration_dataset.ids(), self.dataset.ids()
        result = self.intake.drain()
        work.comparisons = self.dataset.load_all()
        work.demonstrations = sft_demonstrations(self.demonstration_dataset.load_all(),
                                                 work.comparisons)
        work.new_demonstrations = count_new(work.demonstrations, old_demos, old_comparisons)
        work.golden = tasks.golden_map(self.client)  # on Work: the RM phase runs on every rank
        progress.metrics.update({"data/new": result.stored, "data/duplicates": result.duplicates,
                                 "data/malformed": result.malformed,
                                 "data/comparisons": len(work.comparisons),
                                 "data/demonstrations": len(work.demonstrations),
                                 "data/demonstrations_new": work.new_demonstrations})
        if not work.comparisons:
            raise RuntimeError("no comparisons yet: nothing to learn from")

    # 2 ------------------------------------------------------------------------------------
    def reward_model(self, work: Work, progress: Progress) -> None:
        with torch.no_grad():
            for p, init in zip(self._rm_tensors(), self._rm_init, strict=True):
                p.copy_(init)
        cfg = self.cfg
        train, heldout, _ = split_by_labeler(work.comparisons, cfg.rm.heldout_fraction, cfg.seed)
        train_prompts, held_prompts = distinct_prompts(train), distinct_prompts(heldout)
        unseen = [p for p in held_prompts if p not in set(train_prompts)]
        pool = train_prompts or held_prompts
        work.prompts = pool[-cfg.prompts_per_iteration:]
        work.eval_prompts = (unseen or pool)[-cfg.eval_prompts:]
        progress.metrics["eval/prompts_heldout"] = bool(unseen)
        samples = reference_samples(self.rm, self.loaded.tokenizer, self.ppo_cfg, work.prompts,
                                    cfg.seed + 1)
        reference = [([{"role": "user", "content": prompt}], text) for prompt, text in samples]
        with self._bar(progress, "reward model") as bar:
            def on_step(done: int, total: int) -> None:
                progress.step, progress.steps, bar.total = done, total, total
                bar.update(done - bar.n)

            progress.metrics.update(fit_reward_model(self.rm, self.loaded.tokenizer,
                                                     work.comparisons, self.rm_cfg, reference,
                                                     on_step=on_step,
                                                     golden=work.golden))

    # 3 ------------------------------------------------------------------------------------
    def train_policy(self, work: Work, progress: Progress) -> None:
        if self.ppo is None:  # value head starts as the freshly trained RM head
            self.ppo = make_ppo_state(self.rm.peft, self.loaded.tokenizer, self.ppo_cfg,
                                      rm=self.rm)
        # Later iterations keep the value head PPO fitted on the policy's own features:
        # restarting it from each retrained RM measured worse (efficacy bench, starter,
        # ptx off, lr 2e-3: gold win rate 0.49 -> 0.55 restarted vs 0.49 -> 0.615 kept).
        cfg, bs = self.cfg, self.ppo_cfg.batch_size
        rng = random.Random(cfg.seed + self.ppo.step)
        work.ptx_eval = self.ptx_texts(cfg.ptx_eval_texts, cfg.seed + 10_000, True)
        progress.metrics["ptx/loss_before"] = self._ptx_loss(work.ptx_eval)
        progress.metrics["ptx/corpus"] = self.ptx_corpus
        nptx = self.ppo_cfg.ptx_batch_size if self.ppo_cfg.ptx_coef > 0 else 0
        ptx = self.ptx_texts(nptx * cfg.ppo_steps, cfg.seed + self.ppo.step, False)
        progress.steps, totals = cfg.ppo_steps, {}
        spent = dict.fromkeys(("generate", "score", "train"), 0.0)
        with self._bar(progress, "ppo", cfg.ppo_steps) as bar:
            for step in range(cfg.ppo_steps):
                batch = [rng.choice(work.prompts) for _ in range(bs)]
                stats = ppo_step(self.ppo, batch, ptx[step * nptx:(step + 1) * nptx])
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value / cfg.ppo_steps
                for key in spent:
                    spent[key] += stats[f"time/{key}_s"]
                progress.step = step + 1
                bar.set_postfix(score=f"{stats['ppo/score']:.3f}", kl=f"{stats['ppo/kl']:.4f}")
                bar.update()
        progress.metrics.update(totals)
        progress.metrics.update({f"time/{k}_total_s": v for k, v in spent.items()})
        progress.metrics["ppo/episodes_per_s"] = bs * cfg.ppo_steps / max(sum(spent.values()),
                                                                          1e-9)
        progress.metrics["ppo/total_steps"] = self.ppo.step

    # 4 ------------------------------------------------------------------------------------
    def evaluate(self, work: Work, progress: Progress) -> None:
        assert self.ppo is not None
        seed = self.cfg.seed + 20_000
        torch.manual_seed(seed)
        ro = rollout(self.ppo, work.eval_prompts)
        scored = ppo_score(self.ppo, ro)
        kl = ((scored.logprobs - scored.ref_logprobs) * ro.response_mask).sum(1).mean()
        tok = self.loaded.tokenizer
        reference = reference_samples(self.rm, tok, self.ppo_cfg, work.eval_prompts, seed)
        policy_scores = rm_scores(self.rm, tok, self.rm_cfg,
                                  list(zip(work.eval_prompts, ro.texts, strict=True)))
        ref_scores = rm_scores(self.rm, tok, self.rm_cfg, reference)
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
        """Store files (manifest last) -> checkpoint -> registry: a kill before the
        checkpoint leaves an unregistered, unused version (its number is never reused); a
        kill after it is finished by ``_ensure_registered`` at the next start."""
        assert self.ppo is not None
        if self.parent is not None:
            self._ensure_registered(self.parent)  # a registration that failed last time
        store = Path(self.cfg.adapter_store)
        version = adapter_store.next_version(self.client)
        while (store / version).exists():  # e.g. a registry reset under an old store
            version = adapter_store.next_version(self.client)
        config = {**settings.describe(self.cfg), "iteration": progress.id}
        metrics = {k: v for k, v in progress.metrics.items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory(prefix=".publish-", dir=self.data_dir) as tmp:
            self.ppo.peft.save_pretrained(tmp, selected_adapters=[POLICY])
            folder = Path(tmp) / POLICY  # PEFT nests a non-default adapter's files
            manifest = adapter_store.publish(
                store, version, folder if folder.is_dir() else Path(tmp), parent=self.parent,
                base_model=self.loaded.name, metrics=metrics, config=config)
        pause_for_tests("publish:stored")
        checkpoint.save(self.data_dir / CHECKPOINT, self.ppo, version=version,
                        parent=self.parent, base_model=self.loaded.name)
        self.parent = version  # the policy in memory and on disk is now this version
        pause_for_tests("publish:checkpointed")
        adapter_store.register(self.client, manifest, make_current=True)
        progress.version = version
        log.info("iteration %s published %s (parent %s)", progress.id, version,
                 manifest.parent)

    # 6 ------------------------------------------------------------------------------------
    def record(self, work: Work, progress: Progress) -> None:
        progress.status, progress.finished_at = "done", time.time()
        progress.seconds["record"] = 0.0
        self._store_record(progress)

    def _store_record(self, progress: Progress) -> None:
        records.save(self.client, self.data_dir / "iterations", progress.to_dict())

    def history(self) -> list[dict[str, Any]]:
        """Stored records, oldest first, without the one this process is running (the Runner
        lists its live progress) and with the live state of the one it just finished."""
        live, out = self.active, []
        for record in records.history(self.client):
            if live is not None and record.get("id") == live.id:
                if live.status == "running":
                    continue
                record = live.to_dict()
            out.append(record)
        return out

    # helpers ------------------------------------------------------------------------------
    def _bar(self, progress: Progress, what: str, total: int | None = None
             ) -> AbstractContextManager[tqdm]:
        return records.progress_bar(f"{progress.id} {what}", total,
                                    self.cfg.progress_bars and self.cluster.is_leader)

    @torch.no_grad()
    def _ptx_loss(self, texts: Sequence[str]) -> float:
        assert self.ppo is not None
        self.ppo.peft.set_adapter(POLICY)  # the RM phase left "rm" active
        loss, _ = ptx_forward(self.ppo, texts)
        return float(loss)

    def close(self) -> None:
        if self.cluster.is_leader:
            self.intake.close()
            self.dataset.close()
            self.demonstration_dataset.close()
            self.client.close()
