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
