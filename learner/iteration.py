"""One learner iteration as seven named phases (docs/design.md §1, §3, §4):

1. drain      the comparisons and demonstrations streams -> the durable datasets (Intake);
              the SFT set (learner.demonstrations) goes on ``Work.demonstrations``; with
              neither comparisons nor new demonstrations it refuses ("nothing to learn")
2. sft        only with new demonstrations: an "sft" LoRA from a fresh init on ALL of them
              (learner/sft.py); the policy restarts from it and it becomes PPO's frozen KL
              reference; otherwise "skipped"
   (with demonstrations but no comparisons yet, 3-5 are "skipped": the SFT policy is published)
3. reward     retrain the RM on ALL comparisons so far (its LoRA starts from the SFT weights
              once there are some; split by labeler, held-out accuracy, bias so reference
              samples score mean 0)
4. ppo        LoRA-PPO on the user turns of the collected conversations, ptx from the
              pretraining corpus
5. evaluate   RM score of policy vs reference samples on held-out prompts, KL, ptx loss
              before/after
6. publish    adapter vN+1 into the store + registry (made current: replicas follow)
7. record     metrics JSON in data_dir/iterations/ and a Redis hash + history list

``Learner`` holds what lives for the whole process: the one base model (loaded once), the
dataset, the RM and the PPO state, so the policy adapter carries over between iterations.
Across restarts (docs/design.md §5): publish saves a checkpoint (learner/checkpoint.py: policy
LoRA, value head, Adam, KL controller, PPO step, the SFT reference adapter) before registering
the version, and a new ``Learner`` continues from it with parent = that version and the same
reference (the base with adapters off, or the SFT adapter the checkpoint carries). Records
left "running" by a killed process become "interrupted"; such an iteration is not resumed
(its SFT, RM and PPO progress lived in memory only): the next trigger runs a new one from the
last checkpoint (and redoes SFT when more demonstrations are stored than its reference
learned from). A kill between checkpoint and registration is finished at startup (the
version is registered then), so checkpoint and registry agree.
"""

from __future__ import annotations

import logging
import random
import socket
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
from learner.lora import lora_config
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
from learner.publish import Release, publish_version
from learner.records import HISTORY, PHASES, RECORDS, SEQ, Progress, pause_for_tests
from learner.reference import Reference
from learner.reward_model import ADAPTER as RM_ADAPTER
from learner.reward_model import RewardModel, fit_reward_model, split_by_labeler
from learner.samples import reference_samples, rm_scores
from learner.sft import SFT
from rlhf import adapter_store, settings, tasks
from rlhf.modeling import LoadedModel
from rlhf.v1.feedback_pb2 import Comparison, Demonstration

log = logging.getLogger(__name__)

__all__ = ["HISTORY", "PHASES", "RECORDS", "SEQ", "Learner", "Progress"]  # records re-exported
CHECKPOINT = "checkpoint"  # DATA/checkpoint/: what a restart continues from
COLD_START = ("sft", "publish", "record")  # the phases of `rlhf sft`


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


def _stepper(progress: Progress, bar: tqdm) -> Callable[[int, int], None]:
    """``on_step(done, total)`` of a training loop -> the record's step/steps and the bar."""
    def on_step(done: int, total: int) -> None:
        progress.step, progress.steps, bar.total = done, total, total
        bar.update(done - bar.n)

    return on_step


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
        self.reference = Reference(self.rm.peft, self._sft_lora)  # base until the first SFT
        self._ppo_steps = 0  # PPO steps of policies SFT replaced (seeds keep advancing)
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
        if info.reference == SFT:  # the same frozen reference as before the restart
            self.reference.restore(saved.get("reference"), info.sft_demonstrations)
        if info.ppo:
            self.ppo = self._new_ppo_state()
            checkpoint.load_ppo_state_dict(self.ppo, saved, info.kl_kind)
        else:  # SFT reset the policy (`rlhf sft`): the step counter goes on from here
            self._ppo_steps = info.ppo_step
        self.parent = info.version
        if self.cluster.is_leader:
            self._ensure_registered(info.version)
        log.info("resumed the policy published as %s (reference %s, ppo step %d)",
                 info.version, info.reference, self.ppo.step if self.ppo else 0)

    @property
    def ref_adapter(self) -> str | None:
        """PPO's frozen KL reference: None = the base, adapters off; "sft" after SFT."""
        return self.reference.adapter

    def _sft_lora(self):
        """The SFT adapter has the RM's LoRA layout, so the RM can start from it."""
        return lora_config(self.rm.peft, self.rm_cfg.lora_rank, self.rm_cfg.lora_targets)

    def _new_ppo_state(self) -> PPOState:
        """A fresh PPO state: the policy a copy of the reference adapter (or the base), the
        value head from the RM, a new Adam and KL controller."""
        return make_ppo_state(self.rm.peft, self.loaded.tokenizer, self.ppo_cfg, rm=self.rm,
                              ref_adapter=self.ref_adapter)

    def _ensure_registered(self, version: str) -> None:  # see register_if_missing
        checkpoint.register_if_missing(self.client, self.cfg.adapter_store, version,
                                       self.loaded.name)

    def _rm_tensors(self) -> list[torch.Tensor]:
        return [*self.rm.trainable_parameters(), self.rm.bias]

    def new_id(self) -> str:
        return f"it-{int(self.client.incr(SEQ)):04d}"

    def phases(self) -> dict[str, Callable[[Work, Progress], None]]:
        """The phases of one iteration, in order, by their PHASES name."""
        return dict(zip(PHASES, [self.drain, self.sft, self.reward_model, self.train_policy,
                                 self.evaluate, self.publish, self.record], strict=True))

    def run(self, progress: Progress, work: Work | None = None,
            phases: Sequence[str] = PHASES) -> Progress:
        """``phases`` (all of PHASES) in order; a failing phase marks the iteration failed
        (and re-raises). `rlhf sft` runs sft, publish, record on a ``work`` it filled."""
        work = work or Work()
        steps = self.phases()
        progress.phases = len(phases)
        with self.lock, self.cluster.iteration():
            self.active, progress.learner = progress, self.name
            try:
                for number, name in enumerate(phases, 1):
                    phase = steps[name]
                    progress.phase, progress.phase_number = name, number
                    progress.step = progress.steps = 0
                    self._store_record(progress)  # "running" in this phase: a kill shows
                    log.info("iteration %s: phase %d/%d %s", progress.id, number, len(phases),
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

    def cold_start(self, demonstrations: Sequence[Demonstration]) -> Progress:
        """`rlhf sft`: store ``demonstrations`` in the durable dataset (every later SFT
        trains on them too), then sft -> publish -> record on the whole SFT set."""
        work = Work()
        _, new = self._load(work, lambda: self.demonstration_dataset.append(demonstrations))
        work.new_demonstrations = len(demonstrations)  # asked for: trains even if none new
        progress = Progress(self.new_id())
        progress.metrics.update({"data/demonstrations": len(work.demonstrations),
                                 "data/demonstrations_new": new})
        return self.run(progress, work, COLD_START)

    def _load(self, work: Work, store: Callable[[], Any]) -> tuple[Any, int]:
        """``store()`` new records, then every comparison and the SFT set onto ``work``;
        (what ``store`` returned, how many SFT-set texts it added)."""
        old_demos, old_comparisons = self.demonstration_dataset.ids(), self.dataset.ids()
        result = store()
        work.comparisons = self.dataset.load_all()
        work.demonstrations = sft_demonstrations(self.demonstration_dataset.load_all(),
                                                 work.comparisons)
        return result, count_new(work.demonstrations, old_demos, old_comparisons)

    # 1 ------------------------------------------------------------------------------------
    def drain(self, work: Work, progress: Progress) -> None:
        result, work.new_demonstrations = self._load(work, self.intake.drain)
        work.golden = tasks.golden_map(self.client)  # on Work: the RM phase runs on every rank
        progress.metrics.update({"data/new": result.stored, "data/duplicates": result.duplicates,
                                 "data/malformed": result.malformed,
                                 "data/comparisons": len(work.comparisons),
                                 "data/demonstrations": len(work.demonstrations),
                                 "data/demonstrations_new": work.new_demonstrations})
        if not work.comparisons and not self.reference.due(work.demonstrations,
                                                           work.new_demonstrations):
            raise RuntimeError("no comparisons yet and no new demonstrations: nothing to "
                               "learn from")

    def _nothing_to_compare(self, work: Work, progress: Progress, phase: str) -> bool:
        """Demonstrations but no comparisons yet: the RM, PPO and evaluate phases are skipped
        (publish then ships the SFT adapter the drain made due)."""
        if work.comparisons:
            return False
        progress.skipped.append(phase)
        return True

    # 2 ------------------------------------------------------------------------------------
    def sft(self, work: Work, progress: Progress) -> None:
        """SFT on ALL demonstrations when new ones arrived (or more are stored than the
        reference learned from: a kill between drain and publish), else skipped. Then, as in
        InstructGPT, the policy restarts from the SFT adapter, which becomes PPO's frozen KL
        reference; the PPO state is dropped and made again after the RM phase (value head
        from the new RM, fresh Adam and KL controller: all three belonged to the replaced
        policy and reference); only the PPO step counter carries on. A failure restores the
        previous SFT adapter, so the reference never changes half-way."""
        if not self.reference.due(work.demonstrations, work.new_demonstrations):
            progress.skipped.append("sft")
            progress.metrics["sft/ran"] = False
            return
        with self._bar(progress, "sft") as bar:
            metrics = self.reference.train(self.loaded.tokenizer, work.demonstrations,
                                           self.cfg.sft, _stepper(progress, bar))
        if self.ppo is not None:  # the policy restarts from the SFT adapter
            self._ppo_steps = self.ppo.step
            self.rm.peft.set_adapter(SFT)
            self.rm.peft.delete_adapter(POLICY)
            self.ppo = None
        progress.metrics.update({**metrics, "sft/ran": True})

    # 3 ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_rm(self) -> None:
        """The RM's starting point: its first init, with the LoRA from the SFT adapter once
        there is one (the paper initialises the RM from the SFT model)."""
        for p, init in zip(self._rm_tensors(), self._rm_init, strict=True):
            p.copy_(init)
        self.reference.start(RM_ADAPTER)

    def reward_model(self, work: Work, progress: Progress) -> None:
        if self._nothing_to_compare(work, progress, "reward_model"):
            return
        self.reset_rm()
        cfg = self.cfg
        train, heldout, _ = split_by_labeler(work.comparisons, cfg.rm.heldout_fraction, cfg.seed)
        train_prompts, held_prompts = distinct_prompts(train), distinct_prompts(heldout)
        unseen = [p for p in held_prompts if p not in set(train_prompts)]
        pool = train_prompts or held_prompts
        work.prompts = pool[-cfg.prompts_per_iteration:]
        work.eval_prompts = (unseen or pool)[-cfg.eval_prompts:]
        progress.metrics["eval/prompts_heldout"] = bool(unseen)
        samples = reference_samples(self.rm, self.loaded.tokenizer, self.ppo_cfg, work.prompts,
                                    cfg.seed + 1, self.ref_adapter)
        reference = [([{"role": "user", "content": prompt}], text) for prompt, text in samples]
        with self._bar(progress, "reward model") as bar:
            progress.metrics.update(fit_reward_model(self.rm, self.loaded.tokenizer,
                                                     work.comparisons, self.rm_cfg, reference,
                                                     on_step=_stepper(progress, bar),
                                                     golden=work.golden))

    # 4 ------------------------------------------------------------------------------------
    def ensure_ppo(self) -> PPOState:
        """The PPO state, made (value head <- the freshly trained RM head) when there is
        none: the first iteration, after SFT reset the policy, after ``rlhf sft``."""
        if self.ppo is None:
            self.ppo = self._new_ppo_state()
            self.ppo.step = self._ppo_steps
        return self.ppo

    def train_policy(self, work: Work, progress: Progress) -> None:
        if self._nothing_to_compare(work, progress, "ppo"):
            return
        self.ensure_ppo()
        assert self.ppo is not None
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

    # 5 ------------------------------------------------------------------------------------
    def evaluate(self, work: Work, progress: Progress) -> None:
        if self._nothing_to_compare(work, progress, "evaluate"):
            return
        assert self.ppo is not None
        seed = self.cfg.seed + 20_000
        torch.manual_seed(seed)
        ro = rollout(self.ppo, work.eval_prompts)
        scored = ppo_score(self.ppo, ro)
        kl = ((scored.logprobs - scored.ref_logprobs) * ro.response_mask).sum(1).mean()
        tok = self.loaded.tokenizer
        reference = reference_samples(self.rm, tok, self.ppo_cfg, work.eval_prompts, seed,
                                      self.ref_adapter)
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

    # 6 ------------------------------------------------------------------------------------
    def publish(self, work: Work, progress: Progress) -> None:
        """Through ``learner.publish.publish_version`` (store -> checkpoint -> registry), the
        path `rlhf sft` uses too. Published: the policy, or with no PPO state yet (`rlhf sft`)
        the SFT adapter the policy will start from."""
        if self.ppo is None and self.ref_adapter is None:
            raise RuntimeError("nothing to publish: no policy and no SFT adapter")
        release = Release(
            peft=self.rm.peft, adapter=POLICY if self.ppo is not None else SFT, ppo=self.ppo,
            reference=self.reference.tensors(),
            sft_demonstrations=self.reference.demonstrations,
            ppo_step=self.ppo.step if self.ppo is not None else self._ppo_steps,
            metrics=dict(progress.metrics),
            config={**settings.describe(self.cfg), "iteration": progress.id})

        def checkpointed(version: str) -> None:
            self.parent = version  # the policy in memory and on disk is now this version

        manifest = publish_version(self.client, self.cfg.adapter_store, self.data_dir,
                                   CHECKPOINT, release, parent=self.parent,
                                   base_model=self.loaded.name, on_checkpointed=checkpointed)
        progress.version = manifest.version
        log.info("iteration %s published %s (parent %s)", progress.id, manifest.version,
                 manifest.parent)

    # 7 ------------------------------------------------------------------------------------
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
