"""Benchmarks and harnesses: their own top floor (docs/design.md §2).

Every benchmark (`rlhf bench SUITE`, ``python -m bench.X``) and every harness that drives the
product from outside (`rlhf simulate`, the efficacy loop, the data-parallel check) lives here,
on one shared kit (``bench.kit``). bench may import the product (serving, learner, ui, rlhf);
the product never imports bench, except rlhf/cli.py, the one door, lazily inside the command
functions (tests/test_contracts.py enforces both).
"""
