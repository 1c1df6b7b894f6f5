"""The Dashboard tab: what the learner is doing, read from its admin API over HTTP.

One call, ``GET /v1/dashboard`` (learner/dashboard.py), fills everything: per-iteration
curves (RM accuracy, win rates, gold ones when a simulation logged them, reward, KL,
pretraining loss) and the same numbers as a table, the queue of comparisons not yet
consumed by the learner, comparisons and demonstrations per labeler, adapter versions, and
the Labelers view (agreement on overlapped tasks, golden accuracy, time per ranking, flag
rate). Operators (config ``operators``) get a Trigger button (``POST /v1/iterations``); while
an iteration runs a ``gr.Timer`` refreshes the tab, and stops once it finished. Everyone else
sees the tab read-only, and the handler itself refuses them too (Gradio events are callable
by any logged-in user). The UI imports no learner code: the HTTP API is the contract.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr
import httpx

from ui.charts import line_chart
from ui.config import UIConfig
from ui.labelers_view import HEADERS as LABELER_HEADERS
from ui.labelers_view import bar_chart, overall_text, table_rows

log = logging.getLogger(__name__)

# (plot title, metric keys); every key naming a gold metric joins the first plot (0..1).
CURVES = (("RM accuracy and win rates", ("rm/accuracy", "eval/win_rate")),
          ("Reward", ("ppo/reward", "ppo/score")),
          ("KL to the reference", ("ppo/kl", "eval/kl")),
          ("Pretraining (ptx) loss", ("ptx/loss_before", "ptx/loss_after")))
# Table columns (metric key, heading), shown only when some iteration has the key.
COLUMNS = (("rm/accuracy", "RM accuracy"), ("ppo/reward", "reward"), ("ppo/kl", "KL"),
           ("eval/win_rate", "win rate vs ref"), ("ptx/loss_after", "ptx loss"))


class LearnerError(Exception):
    """A failed call to the learner, with a sentence meant for the person."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LearnerAdmin:
    """Synchronous client of the learner's admin API (Gradio runs handlers in threads)."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        try:
            reply = self._http.request(method, path)
        except httpx.HTTPError as exc:
            log.warning("learner %s %s failed: %s", method, path, exc)
            raise LearnerError(f"The learner at {self.url} is unreachable ({type(exc).__name__})"
                               "; is `rlhf learn` running?") from None
        if reply.status_code == 401:
            raise LearnerError("The UI's token for the learner is wrong or missing "
                               "(RLHF_UI_LEARNER_TOKEN; ask an operator).", 401)
        if not reply.is_success:
            try:
                detail = reply.json().get("detail", reply.text)
            except ValueError:
                detail = reply.text
            raise LearnerError(f"The learner answered {reply.status_code}: {detail}",
                               reply.status_code)
        return reply.json()

    def dashboard(self) -> dict[str, Any]:
        return self._call("GET", "/v1/dashboard")

    def trigger(self) -> dict[str, Any]:
        return self._call("POST", "/v1/iterations")

    def close(self) -> None:
        self._http.close()


# --- pure formatting ------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"  # KL ~0.001 and losses ~5 alike
    return "–" if value is None else str(value)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "–"


def _table(headings: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |"
              for row in rows]  # a labeler id may hold a "|"
    return "\n".join(lines)


def _gold_keys(iterations: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({k for it in iterations for k in it.get("metrics", {}) if "gold" in k})


def curve_charts(iterations: Sequence[Mapping[str, Any]]) -> list[str]:
    """One SVG chart per ``CURVES`` entry; x = iteration ids in history order, a series per
    metric some iteration logged (gold keys join the first chart)."""
    ids = [str(it.get("id")) for it in iterations]
    gold, charts = _gold_keys(iterations), []
    for i, (title, keys) in enumerate(CURVES):
        series = {key: [it.get("metrics", {}).get(key) for it in iterations]
                  for key in [*keys, *(gold if i == 0 else [])]}
        charts.append(line_chart(title, ids, series, elem_id=f"dash-chart-{i}"))
    return charts


def iterations_table(iterations: Sequence[Mapping[str, Any]]) -> str:
    """Newest first; metric columns only for keys some iteration logged."""
    if not iterations:
        return "No iterations yet."
    present = {k for it in iterations for k in it.get("metrics", {})}
    cols = [(k, h) for k, h in COLUMNS if k in present]
    cols += [(k, k) for k in _gold_keys(iterations)]
    rows = [[it.get("id"), it.get("status"), it.get("version"),
             *(it.get("metrics", {}).get(k) for k, _ in cols), it.get("seconds")]
            for it in reversed(iterations)]
    return _table(["iteration", "status", "version", *(h for _, h in cols), "seconds"], rows)


def queue_text(queue: Mapping[str, int]) -> str:
    return (f"**Waiting for the learner: {queue['depth']}** comparisons "
            f"({queue['lag']} not yet read, {queue['pending']} read but not stored) · "
            f"{queue['stream_length']} in the stream in all")


def labelers_table(labelers: Mapping[str, Mapping[str, int]]) -> str:
    if not labelers:
        return "No comparisons or demonstrations yet."
    rows = [[who, c["submitted"], c["learned"], c.get("demonstrations_submitted", 0),
             c.get("demonstrations_learned", 0)] for who, c in labelers.items()]
    return _table(["labeler", "comparisons submitted", "in the learner's dataset",
                   "demonstrations submitted", "demonstrations in the dataset"], rows)


def adapters_table(adapters: Sequence[Mapping[str, Any]]) -> str:
    """Newest first, with parent, creation time and RM accuracy."""
    if not adapters:
        return "No adapter published yet: serving runs the base model."
    rows = [[a["version"] + (" (current)" if a.get("current") else ""), a.get("parent"),
             _when(a.get("created_at")), a.get("iteration"),
             a.get("metrics", {}).get("rm/accuracy")] for a in reversed(adapters)]
    return _table(["version", "parent", "created", "iteration", "RM accuracy"], rows)


def progress_text(status: Mapping[str, Any], iterations: Sequence[Mapping[str, Any]]) -> str:
    """The running iteration's phase n/7 and step/steps, or the last one's outcome."""
    it = status.get("iteration")
    if status.get("running") and it:
        text = (f"⏳ **{it['id']}** running: phase {it['phase_number']}/{it['phases']} "
                f"`{it['phase']}`")
        if it.get("steps"):
            text += f", step {it['step']}/{it['steps']}"
        return text + f" · {time.time() - it['started_at']:.0f} s so far"
    if not iterations:
        return "Idle: no iteration has run yet."
    last = iterations[-1]
    if last.get("status") == "done":
        skipped = ", ".join(last.get("skipped") or [])
        return (f"Idle. Last iteration **{last['id']}** done: published "
                f"`{last.get('version')}` in {fmt(last.get('seconds'))} s"
                + (f" ({skipped} skipped: nothing new)" if skipped else ""))
    # failed, interrupted (a restart), or running in another learner process
    return (f"Idle. Last iteration **{last['id']}** {last.get('status')}: "
            f"{last.get('error') or 'no adapter published'}")


# --- the tab ------------------------------------------------------------------------------

class DashboardTab:
    """Components and handlers of the Dashboard tab; ``build`` inside a ``gr.Tab``."""

    def __init__(self, config: UIConfig, admin: LearnerAdmin | None = None) -> None:
        self.config = config
        self.admin = admin or LearnerAdmin(config.learner_url, config.learner_token)
        self.operators = config.operator_ids()

    def is_operator(self, request: gr.Request | None) -> bool:
        return (getattr(request, "username", None) or "") in self.operators

    def refresh(self, request: gr.Request) -> dict:
        try:
            board = self.admin.dashboard()
        except LearnerError as exc:  # keep what is shown, say that it may be stale
            return {self.message: f"⚠️ {exc} (anything below is from the last refresh)"}
        return {self.message: "", **self._show(board, request)}

    def trigger(self, request: gr.Request) -> dict:
        if not self.is_operator(request):
            return {self.message: "⚠️ Only operators can start an iteration."}
        try:
            started = self.admin.trigger()
            note = f"✅ Started iteration **{started['id']}**."
        except LearnerError as exc:
            note = ("⚠️ An iteration is already running; watch its progress above."
                    if exc.status == 409 else f"⚠️ {exc}")
        out = self.refresh(request)
        return {**out, self.message: note + (f"\n\n{out[self.message]}"
                                             if out.get(self.message) else "")}

    def _show(self, board: Mapping[str, Any], request: gr.Request | None) -> dict:
        status, iterations = board["status"], board["iterations"]
        running, operator = bool(status.get("running")), self.is_operator(request)
        out = {self.progress: progress_text(status, iterations),
               self.queue: queue_text(board["queue"]),
               self.labelers: labelers_table(board["labelers"]),
               self.adapters: adapters_table(board["adapters"]),
               self.iterations: iterations_table(iterations),
               self.trigger_btn: gr.update(interactive=operator and not running),
               self.note: "" if operator else
               "Read-only: only operators can start iterations.",
               self.timer: gr.Timer(active=running)}
        quality = board.get("labeler_quality")  # the Labelers view (ui.labelers_view)
        out.update({self.quality_text: overall_text(quality),
                    self.quality_table: table_rows(quality),
                    self.quality_chart: bar_chart((quality or {}).get("labelers", []))})
        out.update(zip(self.plots, curve_charts(iterations), strict=True))
        return out

    def build(self, tab: gr.Tab) -> None:
        """The tab's layout and events (call inside ``with gr.Tab(...) as tab``)."""
        with gr.Row():
            self.progress = gr.Markdown("Open this tab to load the learner's state.",
                                        elem_id="dash-progress")
        with gr.Row():
            self.trigger_btn = gr.Button("Trigger iteration", variant="primary",
                                         interactive=False, elem_id="dash-trigger", scale=0,
                                         min_width=200)
            refresh_btn = gr.Button("Refresh", elem_id="dash-refresh", scale=0, min_width=120)
            self.note = gr.Markdown("", elem_id="dash-note")
        self.message = gr.Markdown("", elem_id="dash-message")
        self.queue = gr.Markdown("", elem_id="dash-queue")
        self.plots = []
        for row in range(0, len(CURVES), 2):
            with gr.Row():
                self.plots += [gr.HTML(line_chart(title, [], {}), elem_id=f"dash-plot-{i}")
                               for i, (title, _) in enumerate(CURVES[row:row + 2], row)]
        gr.Markdown("### Iterations")
        self.iterations = gr.Markdown("", elem_id="dash-iterations")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Adapter versions")
                self.adapters = gr.Markdown("", elem_id="dash-adapters")
            with gr.Column():
                gr.Markdown("### Comparisons and demonstrations per labeler")
                self.labelers = gr.Markdown("", elem_id="dash-labelers")
        gr.Markdown("### Labelers")
        self.quality_text = gr.Markdown("", elem_id="dash-labeler-overall")
        with gr.Row():
            self.quality_table = gr.Dataframe(headers=LABELER_HEADERS, interactive=False,
                                              elem_id="dash-labeler-table", scale=3)
            self.quality_chart = gr.HTML(bar_chart([]), elem_id="dash-labeler-plot")
        self.timer = gr.Timer(self.config.dashboard_refresh_s, active=False)
        shown = [self.progress, self.message, self.queue, self.labelers, self.adapters,
                 self.iterations, self.trigger_btn, self.note, self.timer, *self.plots,
                 self.quality_text, self.quality_table, self.quality_chart]
        tab.select(self.refresh, None, shown, show_progress="hidden")
        refresh_btn.click(self.refresh, None, shown)
        self.timer.tick(self.refresh, None, shown, show_progress="hidden")
        self.trigger_btn.click(self.trigger, None, shown)

