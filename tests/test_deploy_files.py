"""deploy/ cannot rot silently: Docker is not available here, so the compose file, the
Dockerfile and the env example are checked against the code they drive — every service
command is a real `rlhf` subcommand whose flags parse into a valid config, the shared
volumes line up with the paths the flags name, and every documented variable is a setting."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from learner.config import ENV_PREFIX as LEARN_PREFIX
from learner.config import LearnerConfig
from rlhf import cli, settings
from serving.config import ServingConfig
from ui.config import UIConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIGS = {"serve": (ServingConfig, "RLHF_SERVE_"), "learn": (LearnerConfig, LEARN_PREFIX),
           "ui": (UIConfig, "RLHF_UI_")}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def parse_command(command: list[str]):
    """The config `rlhf <cmd> <flags>` would run with (environment ignored), via the same
    flag parser the CLI uses; argparse exits on an unknown flag."""
    assert command[0] == "rlhf" and command[1] in cli.COMMANDS, command
    cls, prefix = CONFIGS[command[1]]
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(parser, cls)
    args = parser.parse_args(command[2:])
    return settings.build(cls, args, prefix, env={})


def mounts(service: dict) -> dict[str, str]:
    """container path -> volume name (or host path) of a service."""
    out = {}
    for item in service.get("volumes", []):
        source, target = item.split(":")[:2]
        out[target] = source
    return out


def test_services_volumes_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"redis", "serving", "learner", "ui"}
    assert set(compose["volumes"]) >= {"redis-data", "adapters", "learner-data"}
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for source in mounts(service).values():
            assert source in compose["volumes"] or (DEPLOY / source).exists(), source


def test_redis_keeps_an_append_only_file_on_its_volume(compose):
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    conf_in_container = cmd[1]
    host_conf = mounts(redis)
    assert Path(DEPLOY / host_conf[conf_in_container]).resolve() == DEPLOY / "redis.conf"
    assert re.search(r"^appendonly yes$", (DEPLOY / "redis.conf").read_text(), re.M)
    data_dir = cmd[cmd.index("--dir") + 1]
    assert mounts(redis)[data_dir] == "redis-data"


def test_every_rlhf_service_command_parses_into_a_valid_config(compose):
    services = compose["services"]
    serve = parse_command(services["serving"]["command"])
    learn = parse_command(services["learner"]["command"])
    ui = parse_command(services["ui"]["command"])

    # Serving and the learner meet in Redis and in one adapter store (the same volume).
    assert serve.redis_url == learn.redis_url
    assert serve.redis_url.startswith("redis://redis:")
    assert mounts(services["serving"])[serve.adapter_store] == "adapters"
    assert mounts(services["learner"])[learn.adapter_store] == "adapters"
    assert mounts(services["learner"])[learn.data_dir] == "learner-data"
    # Everything listens beyond the container and publishes the port it listens on.
    assert {serve.host, learn.host, ui.host} == {"0.0.0.0"}
    published = {s: {int(p.split(":")[-1]) for p in services[s].get("ports", [])}
                 for s in services}
    assert {serve.grpc_port, serve.http_port} <= published["serving"]
    assert learn.port in published["learner"] and ui.port in published["ui"]
    # The UI reaches serving's gRPC port and the learner's API by service name.
    assert ui.policy_target == f"serving:{serve.grpc_port}"
    healthcheck = " ".join(services["serving"]["healthcheck"]["test"])
    assert f"127.0.0.1:{serve.http_port}/healthz" in healthcheck


def test_environment_entries_are_real_settings(compose):
    by_service = {"serving": "serve", "learner": "learn", "ui": "ui"}
    for name, cmd in by_service.items():
        cls, prefix = CONFIGS[cmd]
        fields = {prefix + k.name.upper() for k in settings.knobs(cls)}
        env = compose["services"][name].get("environment", {})
        assert set(env) <= fields, f"{name}: unknown {set(env) - fields}"
    learn = parse_command(compose["services"]["learner"]["command"])
    ui_env = compose["services"]["ui"]["environment"]
    assert ui_env["RLHF_UI_LEARNER_URL"] == f"http://learner:{learn.port}"


SECTIONS = (("serve", "rlhf serve: the policy server (gRPC + OpenAI-compatible HTTP, "
               "Feedback API)"),
            ("learn", "rlhf learn: the learner (reward model + LoRA-PPO iterations, admin API)"),
            ("ui", "rlhf ui: the ranking UI (Gradio)"))


def render_env_example() -> str:
    """deploy/rlhf.env.example as the configs define it: its header, then every setting."""
    text = (DEPLOY / "rlhf.env.example").read_text()
    lines = [text[:text.index("# --- ")].rstrip("\n"), ""]
    for command, title in SECTIONS:
        cls, prefix = CONFIGS[command]
        lines += [f"# --- {title}", *settings.env_lines(cls, prefix), ""]
    return "\n".join(lines)


def test_env_example_documents_every_setting_with_its_default():
    """Regenerate with `python -m tests.test_deploy_files` after adding a setting."""
    assert (DEPLOY / "rlhf.env.example").read_text() == render_env_example(), (
        "deploy/rlhf.env.example is stale: run `.venv/bin/python -m tests.test_deploy_files`")


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_installs_the_pinned_torch_and_every_package():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    project = _pyproject()
    pins = dict(d.split("==") for d in project["project"]["dependencies"])
    assert f"ARG TORCH_VERSION={pins['torch']}" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile  # the CPU build by default
    copied = {shlex.split(line)[1] for line in dockerfile.splitlines()
              if line.startswith("COPY ")}
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied and (ROOT / package).is_dir(), package
    assert "pyproject.toml" in copied and "proto" in copied


def test_compose_builds_this_dockerfile(compose):
    build = compose["x-rlhf"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for name in ("serving", "learner", "ui"):
        assert compose["services"][name]["image"] == compose["x-rlhf"]["image"]


def test_readme_example_up_config_is_valid(tmp_path: Path):
    """The README's up.toml example parses, and its child tables name real flags."""
    from rlhf.up_config import parse_args, read_config_file

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```toml\n(# up\.toml.*?)```", readme, re.S).group(1)
    path = tmp_path / "up.toml"
    path.write_text(block)
    config, extras, _ = parse_args(["--config", str(path)])
    assert config.load_in_4bit and config.users
    _, file_extras = read_config_file(str(path))
    assert extras == file_extras and extras["learn"]
    for cmd, flags in extras.items():
        if flags:
            parse_command(["rlhf", cmd, *flags])


if __name__ == "__main__":
    (DEPLOY / "rlhf.env.example").write_text(render_env_example())
