"""Config resolution: CLI flag beats env var beats default; bad values say what is wrong."""

from __future__ import annotations

import argparse

import pytest

from rlhf import settings
from serving.config import ServingConfig


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, ServingConfig)
    return parser.parse_args(argv)


def test_flag_beats_env_beats_default():
    env = {"RLHF_SERVE_MAX_QUEUE": "7", "RLHF_SERVE_MAX_N": "3", "RLHF_SERVE_LOAD_IN_4BIT": "yes"}
    config = settings.build(ServingConfig, parse(["--max-queue", "9"]), "RLHF_SERVE_", env)
    assert (config.max_queue, config.max_n, config.load_in_4bit) == (9, 3, True)
    assert config.max_batch_size == ServingConfig().max_batch_size
    flags_off = settings.build(ServingConfig, parse(["--no-load-in-4bit"]), "RLHF_SERVE_", env)
    assert flags_off.load_in_4bit is False


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="max_queue: expected int, got 'many'"):
        settings.build(ServingConfig, parse(["--max-queue", "many"]), "RLHF_SERVE_", {})
    with pytest.raises(ValueError, match=r"max_n must be in 1\.\.max_batch_size"):
        settings.build(ServingConfig, parse(["--max-n", "100"]), "RLHF_SERVE_", {})


def test_secrets_are_masked_in_logs():
    config = ServingConfig(auth_token="s3cret")
    assert settings.describe(config)["auth_token"] == "***"
    assert "s3cret" not in repr(settings.describe(config))
