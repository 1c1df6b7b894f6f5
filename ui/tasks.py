"""Queued tasks in the ranking tab: "Next task", the guidelines panel, keyboard ranking.

"Next task" leases the labeler's next queued prompt from the task queue (``rlhf.tasks``, in
the Redis of ``--redis-url``): its fixed answers when the task has them (golden tasks, and
overlapped tasks once their first labeler's answers are frozen), else K fresh answers
streamed from serving, frozen on the task when several labelers should rank it so that
they all rank the same ones (the agreement is computed on them). The ranking carries the
task id; serving checks the lease. Skip or New conversation give the task back (not
offered to this labeler again); a closed tab keeps it until the lease expires, and the
labeler gets it back on their next "Next task".

Keyboard (not while typing in a text box): 1-9 rank the highlighted answer and move to
the next one, ←/→ move between answers, Enter submits, N takes the next task.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import redis

import rlhf.tasks as tasks
from ui.config import UIConfig
from ui.logic import Alternative, Turn, display_order

if TYPE_CHECKING:
    from ui.app import RankingApp

log = logging.getLogger(__name__)

DEFAULT_GUIDELINES = """\
**What a good answer is** (InstructGPT's criteria, in this order when they conflict):

- **Helpful**: does what the user asked, in the way they asked; clear and to the point; asks
  for clarification instead of guessing when the request is ambiguous.
- **Honest**: says true things; does not make facts up; says when it does not know.
- **Harmless**: no dangerous advice, no abuse, no demeaning content about people or groups.

**How to rank**: 1 is the best answer. Give equal ranks to answers that are equally good
(a tie). Judge the answer, not its length: a short correct answer beats a long wrong one.
Use the flags for problems you see (made-up facts, harmful...), even on the best answer.
If you would have answered differently, write the better answer below.
"""

SHORTCUTS = ("⌨️ **1–9** rank the highlighted answer (then the next one is highlighted) · "
             "**← →** move between answers · **Enter** submit · **N** next task "
             "(shortcuts work outside text boxes)")

# Gradio runs this once the page loaded (launch(js=...)). Plain DOM: the rank radios are
# found by their element ids (#rank-<pos>) and labels, as a person would click them.
KEYBOARD_JS = """
() => {
  let cur = 0;
  // the answers of this turn: those whose rank radio is shown (a task may fix fewer than K)
  const visible = () => [...document.querySelectorAll('[id^="rank-"]')]
    .filter(el => /^rank-[0-9]+$/.test(el.id) && el.offsetParent !== null);
  const mark = () => {
    const n = visible().length;
    document.querySelectorAll('[id^="cand-"]').forEach(el => {
      const i = Number(el.id.slice(5));
      el.classList.toggle('kbd-current', i === cur && i < n);
    });
  };
  document.addEventListener('keydown', (ev) => {
    const t = ev.target;
    if (t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'radio'
        && t.type !== 'checkbox'))) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const n = visible().length;
    if (!n) return;
    if (/^[1-9]$/.test(ev.key)) {
      const labels = [...document.querySelectorAll('#rank-' + cur + ' label')];
      const label = labels.find(l => l.textContent.trim() === ev.key);
      const input = label && label.querySelector('input');
      if (input && !input.disabled) { input.click(); cur = Math.min(cur + 1, n - 1); }
    } else if (ev.key === 'ArrowRight') { cur = (cur + 1) % n; }
    else if (ev.key === 'ArrowLeft') { cur = (cur - 1 + n) % n; }
    else if (ev.key === 'Enter') {
      const b = document.querySelector('#submit');
      if (b && !b.disabled) { b.click(); cur = 0; }
    } else if (ev.key === 'n' || ev.key === 'N') {
      const b = document.querySelector('#next-task');
      if (b && !b.disabled) { b.click(); cur = 0; }
    } else { return; }
    ev.preventDefault();
    mark();
  });
  const style = document.createElement('style');
  style.textContent = '.kbd-current { outline: 3px solid #2563eb; border-radius: 6px; }';
  document.head.appendChild(style);
  new MutationObserver(mark).observe(document.body, {childList: true, subtree: true});
}
"""


def guidelines_text(config: UIConfig) -> str:
    return Path(config.guidelines).read_text() if config.guidelines else DEFAULT_GUIDELINES


class TaskQueue:
    """The UI's side of ``rlhf.tasks``: lease, give back, freeze answers."""

    def __init__(self, client: redis.Redis | None, lease_s: float = 600.0,
                 golden_rate: float = 0.0, rng: random.Random | None = None) -> None:
        self.client, self.lease_s, self.golden_rate = client, lease_s, golden_rate
        self.rng = rng or random.SystemRandom()

    @classmethod
    def from_config(cls, config: UIConfig) -> TaskQueue:
        client = (redis.Redis.from_url(config.redis_url, socket_connect_timeout=2.0,
                                       socket_timeout=5.0) if config.redis_url else None)
        return cls(client, config.task_lease_s, config.golden_rate)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def take(self, labeler: str) -> tasks.Task | None:
        return tasks.lease(self.client, labeler, self.lease_s, self.golden_rate, self.rng)

    def give_back(self, task_id: str, labeler: str) -> None:
        tasks.release(self.client, task_id, labeler, skip=True)

    def freeze(self, task: tasks.Task, turn: Turn) -> tuple[tasks.Candidate, ...]:
        return tasks.freeze_candidates(self.client, task.id, [
            tasks.Candidate(a.text, a.adapter_version, a.seed) for a in turn.alternatives])


def fixed_turn(task: tasks.Task, candidates: tuple[tasks.Candidate, ...], request_id: str,
               seed: int) -> Turn:
    """A turn whose answers are given (no generation): shown in a shuffled order."""
    alts = [Alternative(index=i, text=c.text, adapter_version=c.adapter_version, seed=c.seed,
                        done=True) for i, c in enumerate(candidates)]
    return Turn(messages=[{"role": r, "content": c} for r, c in task.messages],
                request_id=request_id, sampling=None, order=display_order(len(alts), seed),
                alternatives=alts, finished_at=time.monotonic())


class TaskPanel:
    """The ranking tab's task controls; the handlers use the app's turn machinery."""

    def __init__(self, app: RankingApp, queue: TaskQueue) -> None:
        self.app, self.queue = app, queue

    def layout(self) -> None:
        with gr.Row():
            self.next_btn = gr.Button("Next task", elem_id="next-task", scale=0,
                                      min_width=160, visible=self.queue.enabled)
            gr.Markdown(SHORTCUTS, elem_id="shortcuts")
        with gr.Accordion("Guidelines", open=False, elem_id="guidelines"):
            gr.Markdown(guidelines_text(self.app.config), elem_id="guidelines-text")

    def wire(self, everything: list) -> None:
        self.next_btn.click(self.next_task, [self.app.state], everything)

    def give_back(self, session: dict, request: gr.Request | None) -> None:
        who = getattr(request, "username", None) or ""
        if session.get("task_id") and self.queue.enabled and who:
            try:
                self.queue.give_back(session["task_id"], who)
            except redis.RedisError as exc:  # the lease expires on its own
                log.warning("could not give task %s back: %s", session["task_id"], exc)
        session["task_id"] = ""

    def next_task(self, session: dict, request: gr.Request):
        app, base = self.app, {self.app.state: session}
        who = getattr(request, "username", None) or ""
        if session["turn"] is not None or session["pending"] is not None:
            yield {**base, app.status: "Rank (or skip) the current answers first."}
            return
        try:
            task = self.queue.take(who) if who and self.queue.enabled else None
        except redis.RedisError as exc:
            yield {**base, app.status: f"⚠️ The task queue (Redis) is unreachable: {exc}"}
            return
        if task is None:
            yield {**base, app.status: "No queued task is left for you: chat freely."}
            return
        session["task_id"], session["messages"] = task.id, []
        messages = [{"role": r, "content": c} for r, c in task.messages]
        if task.candidates:
            yield self._show(session, task, task.candidates)
            return
        yield from app._generate(session, messages, request)
        turn = session["turn"]
        if turn is not None and turn.complete and task.wanted > 1:
            frozen = self.queue.freeze(task, turn)  # the first labeler's answers win
            if [c.text for c in frozen] != [a.text for a in turn.alternatives]:
                yield self._show(session, task, frozen)

    def _show(self, session: dict, task: tasks.Task,
              candidates: tuple[tasks.Candidate, ...]) -> dict[Any, Any]:
        app = self.app
        turn = fixed_turn(task, candidates, f"task-{task.id}", random.randrange(1 << 31))
        session["turn"] = turn
        return {app.state: session, **app._controls(turn, reset=True),
                app.chat: turn.messages, app.msg: "",
                app.status: "All answers are in: rank them (1 = best; ties allowed)."}
