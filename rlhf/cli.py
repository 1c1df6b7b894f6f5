"""The `rlhf` console script: one entry point, one subcommand per process or tool."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(argv: Sequence[str]) -> int:
    import asyncio

    from rlhf import settings
    from serving.config import ServingConfig
    from serving.server import serve

    parser = argparse.ArgumentParser(prog="rlhf serve", description="Run the policy server "
                                     "(gRPC + OpenAI-compatible HTTP). Every flag can also be "
                                     "set as RLHF_SERVE_<FLAG_NAME>.")
    settings.add_arguments(parser, ServingConfig)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    try:
        config = settings.build(ServingConfig, args, "RLHF_SERVE_")
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    asyncio.run(serve(config))
    return 0


def _ui(argv: Sequence[str]) -> int:
    from rlhf import settings
    from ui.app import main
    from ui.config import UIConfig

    parser = argparse.ArgumentParser(prog="rlhf ui", description="Run the ranking UI (Gradio). "
                                     "Every flag can also be set as RLHF_UI_<FLAG_NAME>.")
    settings.add_arguments(parser, UIConfig)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _logging(args.verbose)
    try:
        config = settings.build(UIConfig, args, "RLHF_UI_")
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    logging.getLogger("rlhf.ui").info("ui config: %s", settings.describe(config))
    return main(config)


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


def _bench(argv: Sequence[str]) -> int:
    from serving.bench import main

    _logging(False)
    return main(list(argv))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (_serve, "run the policy server (gRPC + OpenAI-compatible HTTP)"),
    "ui": (_ui, "run the ranking UI (Gradio) against a running serve"),
    "starter-model": (_starter, "build (or reuse) the built-in starter model; prints its path"),
    "codegen": (_codegen, "regenerate the Python stubs of proto/"),
    "data": (_data, "export the comparisons stream as JSONL; import chosen/rejected pairs"),
    "bench": (_bench, "benchmarks that print JSON (rlhf bench serving|feedback)"),
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
