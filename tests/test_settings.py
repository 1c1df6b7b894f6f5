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


def _config_class(command: str) -> type:
    from learner.config import LearnerConfig
    from rlhf.up_config import UpConfig
    from ui.config import UIConfig

    return {"serve": ServingConfig, "learn": LearnerConfig, "ui": UIConfig,
            "up": UpConfig}[command]


def _build(command: str, argv: list[str]):
    """Each process's flags as its CLI resolves them (the CLI turns the ValueError into a
    usage error, exit 2: test_grpc_port_70000_does_not_listen_on_4464)."""
    cls = _config_class(command)
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, cls)
    return settings.build(cls, parser.parse_args(argv), "RLHF_TEST_", {})


@pytest.mark.parametrize(("command", "flag", "field", "value"), [
    ("serve", "--http-port", "http_port", "-2"), ("learn", "--port", "port", "65536"),
    ("ui", "--port", "port", "-1"), ("up", "--grpc-port", "grpc_port", "70000"),
    ("up", "--redis-port", "redis_port", "99999"), ("up", "--ui-port", "ui_port", "-5"),
])
def test_out_of_range_ports_are_refused_with_the_field_named(command, flag, field, value):
    with pytest.raises(ValueError, match=f"{field}: must be between"):
        _build(command, [flag, value])


@pytest.mark.parametrize(("command", "flag", "value", "says"), [
    ("serve", "--redis-url", "redis://127.0.0.1:70000/0", "redis_url: Port out of range"),
    ("learn", "--redis-url", "redis://127.0.0.1:99999/0", "redis_url: Port out of range"),
    ("ui", "--policy-target", "127.0.0.1:70000", "policy_target: the port must be in"),
    ("ui", "--learner-url", "http://127.0.0.1:65536", "learner_url: Port out of range"),
    ("up", "--redis-url", "redis://h:123456", "redis_url: Port out of range"),
])
def test_ports_inside_addresses_are_checked_too(command, flag, value, says):
    with pytest.raises(ValueError) as err:
        _build(command, [flag, value])
    assert says in str(err.value)
    if "redis" in flag:
        assert value not in str(err.value)  # a Redis URL may hold a password: not echoed


def test_grpc_port_70000_does_not_listen_on_4464():
    """The red team's case, as a real process: it exits at once with the reason."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "serve", "--grpc-port", "70000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "grpc_port: must be between 0 and 65535, got 70000" in done.stderr


def test_every_port_setting_of_every_process_is_bounded():
    import dataclasses

    from learner.config import LearnerConfig
    from rlhf.up_config import UpConfig
    from ui.config import UIConfig

    for cls in (ServingConfig, LearnerConfig, UIConfig, UpConfig):
        for f in dataclasses.fields(cls):
            if f.name == "port" or f.name.endswith("_port"):
                low, high = f.metadata["bounds"]
                assert low in (0, -1) and high == 65535, (cls.__name__, f.name)


def test_nested_configs_are_flags_and_variables_with_one_default_each():
    from learner.config import ENV_PREFIX, LearnerConfig
    from learner.ppo import PPOConfig
    from learner.reward_model import RMConfig

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, LearnerConfig)
    args = parser.parse_args(["--rm-lr", "0.5", "--ppo-kl-horizon", "77", "--seed", "3",
                              "--rm-lora-targets", "q_proj,v_proj"])
    env = {"RLHF_LEARN_RM_EPOCHS": "5", "RLHF_LEARN_RM_LR": "9", "RLHF_LEARN_PPO_TARGET_KL": "6"}
    cfg = settings.build(LearnerConfig, args, ENV_PREFIX, env)
    assert (cfg.rm.lr, cfg.rm.epochs, cfg.ppo.kl_horizon, cfg.ppo.target_kl) == (0.5, 5, 77, 6.0)
    assert cfg.rm.lora_targets == ("q_proj", "v_proj")
    assert cfg.ppo.clip == PPOConfig().clip and cfg.rm.batch == RMConfig().batch  # defaults
    # seed (and threads) are the learner's: they flow down, they are not knobs of their own
    assert cfg.rm.seed == cfg.ppo.seed == 3
    names = {k.name for k in settings.knobs(LearnerConfig)}
    assert {"rm_lr", "ppo_clip", "ppo_gamma", "ppo_lam", "ppo_max_grad_norm",
            "ppo_ptx_max_length", "ppo_vf_coef"} <= names
    assert not {"rm_seed", "ppo_seed", "rm_threads"} & names
    assert settings.describe(cfg)["rm"]["lr"] == 0.5
    with pytest.raises(ValueError, match="unknown LearnerConfig settings \\['rm_speed'\\]"):
        settings.from_flat(LearnerConfig, {"rm_speed": 1})
    assert settings.from_flat(LearnerConfig, {"ppo_lr": "0.25", "seed": 4}).ppo.seed == 4


@pytest.mark.parametrize("command", ["serve", "learn", "ui", "up"])
def test_every_command_prints_its_help(command: str, capsys):
    """Help texts may hold '%' ("cosine to 10%"): argparse must print them, not crash."""
    from rlhf import cli

    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0 and "--" in capsys.readouterr().out
