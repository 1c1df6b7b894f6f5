"""UpConfig: the one frozen configuration of `rlhf up`, from flags, RLHF_UP_* variables and
a TOML file (flag > env var > file > default).

A file holds the same keys as the flags (``ui_port = 0``) and optional tables ``[serve]``,
``[learn]``, ``[ui]`` whose keys are flags of that command, passed on to it
(``[learn] ppo_steps = 2`` -> ``rlhf learn ... --ppo-steps 2``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rlhf import settings
from rlhf.models import DEFAULT_RUN_MODEL
from rlhf.settings import port as _port
from rlhf.settings import setting as _f

ENV_PREFIX = "RLHF_UP_"
SECTIONS = ("serve", "learn", "ui")  # TOML tables of extra flags for each child


@dataclass(frozen=True)
class UpConfig:
    """Everything `rlhf up` needs; flags, RLHF_UP_* env vars and --config keys set it."""

    model: str = _f(DEFAULT_RUN_MODEL, "base model serving and the learner share: a name of "
                    "`rlhf models list` (fetched/built on first use), a local directory or a "
                    "hub id; empty or 'starter' = the built-in starter model")
    data_dir: str = _f(".rlhf", "private Redis data (redis/), the learner's dataset "
                       "(learner/) and the adapter store (adapters/)")
    redis_url: str = _f("", "use this Redis; empty = run a private redis-server (AOF on) "
                        "and stop it on exit", secret=True, address="url")
    redis_port: int = _port(6390, "port of the private redis-server (0 = a free one)")
    redis_server: str = _f("redis-server", "redis-server binary for the private Redis")
    host: str = _f("127.0.0.1", "interface every part binds to")
    grpc_port: int = _port(50051, "serving's gRPC port (0 = a free one)")
    http_port: int = _port(8000, "serving's OpenAI-compatible HTTP port (0 = a free one)")
    learner_port: int = _port(8100, "the learner's admin API port (0 = a free one)")
    ui_port: int = _port(7860, "the ranking UI's port (0 = a free one)")
    users: str = _f("", "labeler accounts of the UI: 'alice:pw,bob:pw' or a file; empty = "
                    "$RLHF_UI_USERS, else demo:demo", secret=True)
    operator_token: str = _f("", "bearer token of the learner's admin API (the UI's Dashboard "
                             "sends it); empty = $RLHF_LEARN_ADMIN_TOKEN, else none", secret=True)
    auth_token: str = _f("", "bearer token serving demands of programs (it cannot submit "
                         "rankings); empty = $RLHF_SERVE_AUTH_TOKEN, else none", secret=True)
    ui_token: str = _f("", "the ranking UI's service token for serving (serving believes the "
                       "logged-in labeler only from it); written to DATA_DIR/ui-token for "
                       "`rlhf simulate`; empty = $RLHF_SERVE_UI_TOKEN, else a fresh random "
                       "one per start", secret=True)
    device: str = _f("auto", "cpu, cuda, cuda:N or auto, for serving and the learner")
    load_in_4bit: bool = _f(False, "load the base model in 4-bit (bitsandbytes; GPU)")
    learner_procs: int = _f(1, "learner processes (torchrun on this machine, one learner: "
                            "each holds the base model and trains on its share of a batch)")
    k: int = _f(4, "alternatives per turn in the UI (2..9)")
    ready_timeout_s: float = _f(600.0, "seconds each part gets to become ready (after the "
                                "model is fetched/built)")
    stop_timeout_s: float = _f(30.0, "seconds each part gets to stop before SIGKILL")

    def __post_init__(self) -> None:
        ports = (self.redis_port, self.grpc_port, self.http_port, self.learner_port,
                 self.ui_port)
        if any(not 0 <= p <= 65535 for p in ports):
            raise ValueError("ports must be in 0..65535")
        if self.learner_procs < 1:
            raise ValueError("learner_procs must be >= 1")
        if not (self.ready_timeout_s > 0 and self.stop_timeout_s > 0):
            raise ValueError("ready_timeout_s and stop_timeout_s must be > 0")


def read_config_file(path: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """A TOML file -> (UpConfig values as RLHF_UP_* strings, extra flags per child)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config file {path}: {exc}") from None
    known = {f.name for f in fields(UpConfig)}
    values: dict[str, str] = {}
    extras: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            extras[key] = [arg for k, v in value.items() for arg in flag_args(k, v)]
        elif key in known and not isinstance(value, (dict, list)):
            values[ENV_PREFIX + key.upper()] = _as_text(value)
        else:
            raise ValueError(f"config file {path}: unknown key {key!r} (known: "
                             f"{', '.join(sorted(known))}; tables: {', '.join(SECTIONS)})")
    return values, extras


def _as_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def flag_args(key: str, value: Any) -> list[str]:
    """``ppo_steps = 2`` -> ``--ppo-steps 2``; booleans become ``--flag`` / ``--no-flag``."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{flag}" if value else f"--no-{flag}"]
    return [f"--{flag}", str(value)]


def parse_args(argv: Sequence[str]) -> tuple[UpConfig, dict[str, list[str]], bool]:
    parser = argparse.ArgumentParser(
        prog="rlhf up", description="Run Redis, serving, the learner and the ranking UI on "
        "this machine; Ctrl-C stops them all. Every flag can also be set as RLHF_UP_<FLAG> "
        "or as a key of --config.")
    parser.add_argument("--config", help="TOML file of these settings; tables [serve], "
                        "[learn], [ui] add flags of those commands")
    settings.add_arguments(parser, UpConfig)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(list(argv))
    try:
        file_values, extras = read_config_file(args.config) if args.config else ({}, {})
        config = settings.build(UpConfig, args, ENV_PREFIX, env={**file_values, **os.environ})
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return config, {name: extras.get(name, []) for name in SECTIONS}, args.verbose


