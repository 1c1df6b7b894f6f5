"""`rlhf ui`: the Gradio ranking app. Handlers only; rules live in ui.logic, the wire in
ui.client.

One turn: the labeler sends a message, K alternatives stream in side by side (shuffled,
no model identity), the rank controls open once all K finished, Submit stores the
Comparison through Feedback.Submit (and a written better answer also as a Demonstration,
Feedback.SubmitDemonstration) and the chat continues from the top-ranked answer.
A ranking that could not be stored is kept and Retry resends the very same records.
The Dashboard tab (ui.dashboard) shows the learner's state and lets operators trigger.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import Any

import gradio as gr

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from ui.client import ServingClient, ServingError
from ui.config import UIConfig
from ui.dashboard import DashboardTab
from ui.logic import (
    FLAG_LABELS,
    Alternative,
    RankingError,
    Turn,
    build_comparison,
    build_demonstration,
    continue_with,
    display_order,
    parse_flags,
    parse_ranks,
)
from ui.tasks import KEYBOARD_JS, TaskPanel, TaskQueue

log = logging.getLogger(__name__)
UPDATE_EVERY_S = 0.1  # at most ~10 screen updates a second while streaming


def _new_session() -> dict[str, Any]:
    # messages: the conversation; turn: the Turn being ranked; pending: the records kept
    # for Retry as {"record": bytes, "demonstration": bytes | None, "request_id": str,
    # "ranks": [...]} (each one set to None once stored); task_id: the queued task being
    # ranked (ui.tasks), "" in free chat.
    return {"messages": [], "turn": None, "pending": None, "task_id": ""}


class RankingApp:
    """The handlers of one app, sharing one gRPC client."""

    def __init__(self, config: UIConfig, client: ServingClient,
                 queue: TaskQueue | None = None) -> None:
        self.config, self.client, self.k = config, client, config.k
        self.tasks = TaskPanel(self, queue or TaskQueue.from_config(config))

    # --- building blocks -------------------------------------------------------------
    def _sampling(self, seed: int) -> pb.SamplingParams:
        c = self.config
        return pb.SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                 top_p=c.top_p, min_new_tokens=c.min_new_tokens, seed=seed)

    def _controls(self, turn: Turn | None, *, reset: bool) -> dict:
        """Candidate boxes, rank radios and flags for the turn (by displayed position)."""
        ready = turn is not None and turn.complete
        out: dict = {}
        shown = turn.shown() if turn is not None else []
        n = len(shown) or self.k  # a queued task may fix fewer answers than K
        for pos in range(self.k):
            out[self.cands[pos]] = shown[pos].text if pos < len(shown) else ""
            rank = gr.update(interactive=ready, visible=pos < n)
            flags = gr.update(interactive=ready, visible=pos < n)
            if reset:
                rank = gr.update(value=None, interactive=ready, visible=pos < n,
                                 choices=[str(r) for r in range(1, n + 1)])
                flags = gr.update(value=[], interactive=ready, visible=pos < n)
            out[self.ranks[pos]], out[self.flags[pos]] = rank, flags
        out[self.submit_btn] = gr.update(interactive=ready)
        if reset:
            out[self.comment], out[self.ideal] = "", ""
        return out

    def _header(self, adapter: str | None, request: gr.Request | None) -> str:
        who = getattr(request, "username", None) or "nobody"
        if adapter is None:
            try:
                adapter = self.client.info().current_adapter_version
            except ServingError as exc:
                return f"**Serving:** unreachable ({exc}) · **labeler:** {who}"
        return f"**Serving adapter:** `{adapter}` · **labeler:** {who}"

    # --- handlers ------------------------------------------------------------------
    def load(self, request: gr.Request) -> str:
        return self._header(None, request)

    def send(self, session: dict, text: str, request: gr.Request):
        base = {self.state: session}
        if session["turn"] is not None:
            yield {**base, self.status: "Rank (or skip) the current answers first."}
            return
        if not text.strip():
            yield {**base, self.status: "Type a message first."}
            return
        messages = [*session["messages"], {"role": "user", "content": text.strip()}]
        yield from self._generate(session, messages, request, text)

    def _generate(self, session: dict, messages: list[dict], request: gr.Request | None,
                  text: str = ""):
        """Stream K fresh answers to ``messages`` into a new turn (send and Next task)."""
        base = {self.state: session}
        seed = secrets.randbits(31)
        turn = Turn(messages=messages, request_id=uuid.uuid4().hex,
                    sampling=self._sampling(seed), order=display_order(self.k, seed),
                    alternatives=[Alternative(index=i) for i in range(self.k)])
        session["turn"] = turn
        yield {**base, **self._controls(turn, reset=True), self.chat: messages,
               self.msg: "", self.status: f"Generating {self.k} answers…"}
        last = 0.0
        try:
            for delta in self.client.generate(messages, self.k, turn.sampling,
                                              turn.request_id):
                alt = turn.alternatives[delta.index]
                alt.text += delta.text
                alt.adapter_version, alt.seed = delta.adapter_version, delta.seed
                alt.done = alt.done or delta.done
                if time.monotonic() - last >= UPDATE_EVERY_S:
                    last = time.monotonic()
                    yield {**base, **self._controls(turn, reset=False)}
        except ServingError as exc:
            session["turn"] = None
            yield {**base, **self._controls(None, reset=True), self.msg: text,
                   self.chat: session["messages"], self.status: f"⚠️ {exc}"}
            return
        for alt in turn.alternatives:  # a stream that ended cleanly finished every index
            alt.done = True
        turn.finished_at = time.monotonic()
        version = turn.alternatives[0].adapter_version
        yield {**base, **self._controls(turn, reset=False),
               self.header: self._header(version, request),
               self.status: "All answers are in: rank them (1 = best; ties allowed)."}

    def submit(self, request: gr.Request, session: dict, *values: Any):
        # request first: Gradio injects it by annotation, which a keyword-only one after
        # *values would not get.
        k = self.k
        ranks_raw, flags_raw = values[:k], values[k:2 * k]
        comment, ideal = values[2 * k], values[2 * k + 1]
        if session["pending"] is not None:
            return self.retry(session)
        turn: Turn | None = session["turn"]
        if turn is None:
            return {self.state: session, self.status: "Nothing to rank yet: send a message."}
        n = len(turn.alternatives)  # K, or the answers a queued task fixed
        try:
            ranks = parse_ranks(list(ranks_raw)[:n], n)
            flags = [parse_flags(f) for f in flags_raw[:n]]
            record = build_comparison(
                turn, comparison_id=uuid.uuid4().hex,
                labeler_id=getattr(request, "username", None) or "", ranks=ranks, flags=flags,
                comment=comment or "", ideal_answer=ideal or "",
                rank_time_ms=int((time.monotonic() - (turn.finished_at or 0)) * 1000),
                created_at_ms=int(time.time() * 1000))
        except RankingError as exc:
            return {self.state: session, self.status: f"⚠️ {exc}"}
        record.task_id = session.get("task_id", "")  # a queued task's ranking (ui.tasks)
        demo = build_demonstration(turn, demonstration_id=uuid.uuid4().hex, comparison=record)
        session["pending"] = {"record": record.SerializeToString(),
                              "demonstration": demo.SerializeToString() if demo else None,
                              "request_id": turn.request_id, "ranks": ranks}
        return self._send_pending(session)

    def retry(self, session: dict) -> dict:
        if session["pending"] is None:
            return {self.state: session, self.status: "Nothing to retry.",
                    self.retry_btn: gr.update(visible=False)}
        return self._send_pending(session)

    def _send_pending(self, session: dict) -> dict:
        pending = session["pending"]
        done = []
        try:
            if pending["record"] is not None:
                reply = self.client.submit(fb.Comparison.FromString(pending["record"]))
                pending["record"] = None
                done.append(f"Ranking stored (id `{reply.id}`"
                            f"{', already stored before' if reply.duplicate else ''})")
            if pending.get("demonstration") is not None:
                self.client.submit_demonstration(
                    fb.Demonstration.FromString(pending["demonstration"]))
                pending["demonstration"] = None
                done.append("your better answer stored as a demonstration")
        except ServingError as exc:
            if exc.retryable or pending["record"] is not None:  # the ranking is not stored
                if not exc.retryable:
                    session["pending"] = None
                return {self.state: session, self.status: "; ".join([*done, f"⚠️ {exc}"]),
                        self.retry_btn: gr.update(visible=exc.retryable)}
            # The ranking is stored (with the text as its ideal_answer): carry on.
            done.append(f"⚠️ the better answer was not stored as a demonstration: {exc}")
        session["pending"] = None
        session["task_id"] = ""
        out = {self.state: session, self.retry_btn: gr.update(visible=False),
               self.status: f"✅ {'; '.join(done) or 'Stored'}."}
        turn: Turn | None = session["turn"]
        if turn is not None and turn.request_id == pending["request_id"]:
            session["messages"] = continue_with(turn, pending["ranks"])
            session["turn"] = None
            out.update(self._controls(None, reset=True))
            out[self.chat] = session["messages"]
        return out

    def skip(self, session: dict, request: gr.Request = None) -> dict:
        self.tasks.give_back(session, request)
        session["turn"] = None
        return {self.state: session, **self._controls(None, reset=True),
                self.chat: session["messages"], self.status: "Skipped; nothing was stored."}

    def new_conversation(self, session: dict, request: gr.Request = None) -> dict:
        self.tasks.give_back(session, request)
        session["turn"], session["messages"] = None, []
        return {self.state: session, **self._controls(None, reset=True), self.chat: [],
                self.status: "New conversation."}

    # --- layout --------------------------------------------------------------------
    def build(self, dashboard: DashboardTab | None = None) -> gr.Blocks:
        with gr.Blocks(title="RLHF ranking") as demo:
            self.header = gr.Markdown("**Serving adapter:** …", elem_id="header")
            with gr.Tab("Rank", id="rank"):
                self._layout()
            if dashboard is not None:
                with gr.Tab("Dashboard", id="dashboard", elem_id="dashboard-tab") as tab:
                    dashboard.build(tab)
            self._wire(demo)
        return demo

    def _layout(self) -> None:
        """The ranking tab: chat, K answers with rank radios and flags, submit."""
        k = self.k
        self.state = gr.State(_new_session())
        self.chat = gr.Chatbot(label="Conversation", elem_id="chat", height=300)
        with gr.Row():
            self.msg = gr.Textbox(label="Your message", elem_id="msg", scale=5)
            self.send_btn = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        self.cands, self.ranks, self.flags = [], [], []
        with gr.Row(equal_height=False):
            for pos in range(k):
                with gr.Column(min_width=160):
                    self.cands.append(gr.Textbox(label=f"Answer {pos + 1}", lines=6,
                                                 interactive=False, elem_id=f"cand-{pos}"))
                    self.ranks.append(gr.Radio([str(r) for r in range(1, k + 1)],
                                               label="Rank (1 = best)", interactive=False,
                                               elem_id=f"rank-{pos}"))
                    self.flags.append(gr.CheckboxGroup(list(FLAG_LABELS), label="Flags",
                                                       interactive=False,
                                                       elem_id=f"flags-{pos}"))
        with gr.Row():
            self.comment = gr.Textbox(label="Comment (optional)", elem_id="comment")
            self.ideal = gr.Textbox(label="Write a better answer (optional)", lines=3,
                                    elem_id="ideal")
        with gr.Row():
            self.submit_btn = gr.Button("Submit ranking", variant="primary",
                                        interactive=False, elem_id="submit")
            self.retry_btn = gr.Button("Retry", visible=False, elem_id="retry")
            self.skip_btn = gr.Button("Skip", elem_id="skip")
            self.new_btn = gr.Button("New conversation", elem_id="new")
        self.status = gr.Markdown("", elem_id="status")
        self.tasks.layout()  # Next task, shortcuts, guidelines (ui.tasks)

    def _wire(self, demo: gr.Blocks) -> None:
        """Events of the ranking tab."""
        everything = [self.state, self.header, self.chat, self.msg, self.status,
                      self.submit_btn, self.retry_btn, self.comment, self.ideal,
                      *self.cands, *self.ranks, *self.flags]
        demo.load(self.load, None, self.header)
        sending = [self.send_btn.click(self.send, [self.state, self.msg], everything),
                   self.msg.submit(self.send, [self.state, self.msg], everything)]
        self.submit_btn.click(self.submit, [self.state, *self.ranks, *self.flags,
                                            self.comment, self.ideal], everything)
        self.retry_btn.click(self.retry, [self.state], everything)
        # Skip / New conversation also stop a turn that is still streaming.
        self.skip_btn.click(self.skip, [self.state], everything, cancels=sending)
        self.new_btn.click(self.new_conversation, [self.state], everything, cancels=sending)
        self.tasks.wire(everything)


def build_app(config: UIConfig, client: ServingClient | None = None,
              dashboard: DashboardTab | None = None) -> gr.Blocks:
    """The Gradio Blocks app: the Rank tab and the Dashboard tab (the learner's admin API
    at ``config.learner_url``); ``client`` defaults to one for ``config.policy_target``."""
    client = client or ServingClient(config.policy_target, config.auth_token,
                                     config.rpc_timeout_s)
    return RankingApp(config, client).build(dashboard or DashboardTab(config))


def main(config: UIConfig) -> int:
    """Run the UI until interrupted (`rlhf ui`; rlhf.cli parses the flags into ``config``)."""
    accounts = config.accounts()
    if not accounts:
        raise SystemExit("rlhf ui: labeler accounts are required (--users 'alice:pw,...' or "
                         "a file of user:password lines; env RLHF_UI_USERS)")
    demo = build_app(config)
    log.info("ranking UI on http://%s:%d (serving at %s, K=%d, %d labeler account(s), "
             "learner at %s, %d operator(s))", config.host, config.port,
             config.policy_target, config.k, len(accounts), config.learner_url,
             len(config.operator_ids()))
    demo.queue(default_concurrency_limit=16)
    demo.launch(server_name=config.host, server_port=config.port, auth=accounts,
                auth_message="Log in with your labeler account.", show_error=True,
                ssr_mode=False, quiet=True, footer_links=[], js=KEYBOARD_JS)
    return 0
