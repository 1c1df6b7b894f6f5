"""UIConfig: the one frozen configuration of the ranking UI process (`rlhf ui`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class UIConfig:
    """Everything `rlhf ui` needs; CLI flags and RLHF_UI_* env vars override defaults."""

    policy_target: str = _f("127.0.0.1:50051", "gRPC address of `rlhf serve` (host:port)",
                           address="host:port")
    auth_token: str = _f("", "bearer token for serving: its --ui-token, so the logged-in "
                         "labeler is believed (serving's shared --auth-token cannot submit "
                         "rankings); empty = none", secret=True)
    host: str = _f("127.0.0.1", "interface the UI binds to")
    port: int = _f(7860, "HTTP port of the UI", bounds=(0, 65535))
    k: int = _f(4, "alternatives per turn the labeler ranks (2..9)")
    max_new_tokens: int = _f(128, "tokens per alternative")
    min_new_tokens: int = _f(1, "tokens each alternative has at least (no empty answers)")
    temperature: float = _f(0.9, "sampling temperature of the alternatives")
    top_p: float = _f(1.0, "nucleus sampling mass of the alternatives")
    users: str = _f("", "labeler accounts: 'alice:pw1,bob:pw2' or a file of user:password lines",
                    secret=True)
    rpc_timeout_s: float = _f(120.0, "deadline of each call to serving, seconds")
    learner_url: str = _f("http://127.0.0.1:8100", "admin API of `rlhf learn` that the "
                          "Dashboard tab reads", address="url")
    learner_token: str = _f("", "bearer token of the learner's admin API; empty = none",
                            secret=True)
    operators: str = _f("", "labeler ids allowed to trigger iterations from the Dashboard: "
                        "'alice,bob' (everyone else sees it read-only)")
    redis_url: str = _f("", "Redis of the task queue (`rlhf tasks load`): 'Next task' in the "
                        "ranking tab leases queued prompts; empty = free chat only",
                        secret=True, address="url")
    task_lease_s: float = _f(600.0, "seconds a leased task stays the labeler's (a closed tab "
                             "gives it back after this)")
    golden_rate: float = _f(0.1, "share of 'Next task' draws that serve a golden task (known "
                            "answer, shown like any other) while the labeler has one left")
    guidelines: str = _f("", "Markdown file of labeling guidelines shown beside the answers; "
                         "empty = the built-in ones (helpful, honest, harmless; how to rank)")
    dashboard_refresh_s: float = _f(2.0, "seconds between Dashboard refreshes while an "
                                    "iteration runs")

    def __post_init__(self) -> None:
        problems = []
        if not 2 <= self.k <= 9:
            problems.append("k must be in 2..9")
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append("min_new_tokens must be in 0..max_new_tokens")
        if not (self.temperature == 0 or 0.01 <= self.temperature <= 100):
            problems.append("temperature must be 0 (greedy) or in 0.01..100 (as serving "
                            "demands)")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.rpc_timeout_s <= 0:
            problems.append("rpc_timeout_s must be > 0")
        if self.task_lease_s <= 0 or not 0 <= self.golden_rate <= 1:
            problems.append("task_lease_s must be > 0 and golden_rate in [0, 1]")
        if self.guidelines and not Path(self.guidelines).is_file():
            problems.append(f"guidelines file {self.guidelines} does not exist")
        if self.dashboard_refresh_s <= 0:
            problems.append("dashboard_refresh_s must be > 0")
        if problems:
            raise ValueError("invalid ui config: " + "; ".join(problems))

    def operator_ids(self) -> frozenset[str]:
        """The labeler ids that may trigger iterations."""
        return frozenset(u.strip() for u in self.operators.split(",") if u.strip())

    def accounts(self) -> list[tuple[str, str]]:
        """The labeler accounts as (user, password) pairs, from the inline list or a file."""
        text = self.users.strip()
        if not text:
            return []
        if ":" not in text.split(",")[0] or Path(text).is_file():
            text = Path(text).read_text()
        return parse_accounts(text)


def parse_accounts(text: str) -> list[tuple[str, str]]:
    """'alice:pw1,bob:pw2' or one 'user:password' per line ('#' comments allowed)."""
    pairs = []
    for raw in text.replace(",", "\n").splitlines():
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"labeler account {user.strip()!r} must be written user:password")
        pairs.append((user.strip(), password))
    return pairs
