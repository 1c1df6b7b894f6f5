"""The `rlhf` console script: one entry point, one subcommand per process or tool."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence


def _logging(verbose: bool) -> None:
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s")


def _config(argv: Sequence[str], cls: type, prog: str, what: str, prefix: str):
    """Parse a process's flags into its one frozen config (flag > env var > default)."""
    return _parse(argv, cls, prog, what, prefix)[0]


def _parse(argv: Sequence[str], cls: type, prog: str, what: str, prefix: str,
           extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """(config, args): ``_config`` plus the options ``extra`` adds to the parser."""
    from rlhf import settings

    parser = argparse.ArgumentParser(prog=prog, description=f"{what} Every flag can also be "
                                     f"set as {prefix}<FLAG_NAME>.")
    settings.add_arguments(parser, cls)
    if extra is not None:
        extra(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    try:
        config = settings.build(cls, args, prefix)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    logging.getLogger(f"rlhf.{prog.split()[-1]}").info("config: %s", settings.describe(config))
    return config, args


def _resolve_model(prog: str, name: str) -> None:
    """Fetch/build a named model before the process starts serving; a bad name or a failed
    download ends the command with its message (exit 2 / 1), not a traceback."""
    from rlhf import models
    from rlhf.modeling import resolve_model_name

    try:
        resolve_model_name(name)
    except models.UnknownModel as exc:
        sys.stderr.write(f"{prog}: --model: {exc}\n")
        raise SystemExit(2) from None
    except models.ModelFetchError as exc:
        sys.stderr.write(f"{prog}: --model {name}: {exc}\n")
        raise SystemExit(1) from None


def _check_ptx_corpus(prog: str, corpus: str) -> None:
    """A bad --ptx-corpus ends the command with its path and reason (exit 2), before the
    model loads."""
    from learner.ptx_corpus import CorpusError, check_corpus

    try:
        if corpus.strip():
            check_corpus(corpus.strip())
    except CorpusError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        raise SystemExit(2) from None


def _passive_omp() -> None:
    """Idle OpenMP threads sleep instead of spinning. libgomp reads this once, when torch
    loads it, so it is set before anything imports torch. On a shared or busy CPU a
    spinning thread takes the core its partner needs to reach the next barrier: measured
    here, a 2-thread SmolLM2 decode step took 10x longer spinning than sleeping (serving
    and the learner share the cores under `rlhf up`). OMP_WAIT_POLICY=ACTIVE in the
    environment keeps spinning (dedicated cores)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve(argv: Sequence[str]) -> int:
    _passive_omp()
    import asyncio

    from serving.config import ServingConfig
    from serving.server import serve

    config = _config(argv, ServingConfig, "rlhf serve",
                     "Run the policy server (gRPC + OpenAI-compatible HTTP).", "RLHF_SERVE_")
    _resolve_model("rlhf serve", config.model)
    asyncio.run(serve(config))
    return 0


def _ui(argv: Sequence[str]) -> int:
    from ui.app import main
    from ui.config import UIConfig

    return main(_config(argv, UIConfig, "rlhf ui", "Run the ranking UI (Gradio).", "RLHF_UI_"))


def _starter(argv: Sequence[str]) -> int:
    from rlhf.starter import main

    _logging(False)
    return main(list(argv))


def _codegen(argv: Sequence[str]) -> int:
    from rlhf.codegen import main

    return main(list(argv))


def _data(argv: Sequence[str]) -> int:
    from rlhf.data import main

    _logging(False)
    return main(list(argv))


def _tasks(argv: Sequence[str]) -> int:
    from rlhf.tasks_cli import main

    return main(list(argv))


def _adapters(argv: Sequence[str]) -> int:
    from rlhf.adapters_cli import main

    return main(list(argv))


def _models(argv: Sequence[str]) -> int:
    from rlhf.models_cli import main

    return main(list(argv))


def _learn(argv: Sequence[str]) -> int:
    _passive_omp()
    from learner.config import ENV_PREFIX, LearnerConfig
    from learner.main import run

    config = _config(argv, LearnerConfig, "rlhf learn",
                     "Run the learner: iterations on demand via its admin API.", ENV_PREFIX)
    _check_ptx_corpus("rlhf learn", config.ptx_corpus)
    _resolve_model("rlhf learn", config.model)
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ:  # become torchrun's agent
        from learner.main import torchrun_argv

        cmd = torchrun_argv(config.nproc, argv)
        sys.stdout.flush()
        os.execv(cmd[0], cmd)
    return run(config)


def _sft(argv: Sequence[str]) -> int:
    _passive_omp()
    from learner.config import ENV_PREFIX, LearnerConfig
    from learner.sft_cli import add_options, run

    config, args = _parse(argv, LearnerConfig, "rlhf sft", "Cold start: SFT on a JSONL file of "
                          "demonstrations, published as an adapter version and checkpointed "
                          "so `rlhf learn` continues from it (the same learner flags).",
                          ENV_PREFIX, add_options)
    _resolve_model("rlhf sft", config.model)
    return run(config, args.demonstrations, args.labeler_id)


def _learner_client(argv: Sequence[str]) -> int:
    from learner.main import client_main

    return client_main(argv)


def _up(argv: Sequence[str]) -> int:
    from rlhf.launcher import main

    return main(list(argv))


def _simulate(argv: Sequence[str]) -> int:
    from bench.simulate import main

    _logging(False)
    return main(list(argv), prog="rlhf simulate")


def _bench(argv: Sequence[str]) -> int:
    _passive_omp()  # the in-process baseline too, as the server it is compared with
    from bench.cli import main

    _logging(False)
    return main(list(argv))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "up": (_up, "run the whole loop here: Redis, serve, learn, ui (Ctrl-C stops all)"),
    "serve": (_serve, "run the policy server (gRPC + OpenAI-compatible HTTP)"),
    "ui": (_ui, "run the ranking UI (Gradio) against a running serve"),
    "starter-model": (_starter, "build (or reuse) the built-in starter model; prints its path"),
    "codegen": (_codegen, "regenerate the Python stubs of proto/"),
    "data": (_data, "export/import comparisons (chosen/rejected pairs) and demonstrations"),
    "tasks": (_tasks, "queue prompts for labelers (rlhf tasks load FILE | status)"),
    "models": (_models, "named base models: list, pull (fetch + convert once, cached)"),
    "adapters": (_adapters, "list, show, promote or roll back adapter versions (registry)"),
    "learn": (_learn, "run the learner (RM + PPO iterations) with its admin HTTP API"),
    "sft": (_sft, "cold start: SFT on a demonstrations file, published + checkpointed for learn"),
    "learner": (_learner_client, "trigger / status / history of a running learner (JSON)"),
    "simulate": (_simulate, "simulated labelers chat and rank by the gold preference (JSON)"),
    "bench": (_bench, "benchmarks that print JSON (rlhf bench SUITE; `rlhf bench` lists them)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
        sys.stdout.write("usage: rlhf COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + "\n")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    func, _ = COMMANDS[argv[0]]
    return func(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
