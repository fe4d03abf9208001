"""deploy/: the compose stack, prepare.sh, the Dockerfile and the edge agent's systemd unit.

No Docker daemon runs here, so the stack is checked the way Compose and the containers will
read it, with the real tools where they exist:

- ``deploy/prepare.sh`` runs for real (``meshwatch broker-config``, ``meshwatch dashboards
  export``, openssl) into a temporary copy of ``deploy/``; every host path the stack mounts or
  reads must exist afterwards;
- ``compose.yaml`` is checked against the Compose Specification's rules that matter here
  (known keys, durations, ports, volumes, ``depends_on`` conditions, profiles), with explicit
  checks rather than the spec's JSON schema, and ``${...}`` interpolated from ``.env.example``;
- each service's command is parsed by ``meshwatch``'s own parser and its environment loaded
  by ``meshwatch.config.load_config`` over the mounted ``meshwatch.toml``; every path the
  configuration names must lie on one of that service's mounts;
- a real mosquitto runs the prepared broker configuration (container paths mapped back to
  their host sources) and admits each service with the credentials compose hands it;
- ``systemd-analyze verify`` checks the edge unit; the unit's stop timeout, state directory and
  memory limit are checked against the agent's configuration and BENCHMARKS.md;
- the Dockerfile must install every distribution the services import.

What this cannot show without Docker: that the images start, that the healthchecks pass inside
the containers, and that the pinned image tags exist in the registry.
"""

from __future__ import annotations

import ast
import csv
import importlib.metadata
import os
import pwd
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, SecretStr
from servers import Mosquitto, free_port

from meshwatch.cli import PLUGIN_COMMANDS, _build_parser, main
from meshwatch.config import ENV_PREFIX, Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MESHWATCH_BIN = Path(sys.executable).parent / "meshwatch"
REGISTRY = """\
device_id,device_kind,customer_type,critical,site,district,gateway_id,cadence_s,lat,lon
mtr-1,customer_meter,residential,false,dma-01,dma-01,dma-01-gw-001,900,51.5,-0.1
mtr-2,customer_meter,residential,false,dma-01,dma-01,dma-01-gw-001,900,51.5,-0.1
mtr-3,customer_meter,commercial,true,dma-02,dma-02,dma-02-gw-001,900,51.6,-0.2
"""
SERVICES_BUILT = ("bridge", "flow", "remediation")
"""The Meshwatch services of the stack; the rest are upstream images."""

# -- the Compose Specification, the parts that matter here ------------------------------------

TOP_LEVEL = {"version", "name", "include", "services", "networks", "volumes", "configs",
             "secrets", "models"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop", "cgroup",
    "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
    "cpu_shares", "cpu_period", "cpu_quota", "cpu_rt_runtime", "cpu_rt_period", "cpus",
    "cpuset", "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules",
    "devices", "dns", "dns_opt", "dns_search", "domainname", "driver_opts", "entrypoint",
    "env_file", "environment", "expose", "extends", "external_links", "extra_hosts", "gpus",
    "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels",
    "label_file", "links", "logging", "mac_address", "mem_limit", "mem_reservation",
    "mem_swappiness", "memswap_limit", "models", "network_mode", "networks",
    "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform", "ports",
    "post_start", "pre_stop", "privileged", "profiles", "provider", "pull_policy", "read_only",
    "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open",
    "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits",
    "use_api_socket", "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir",
}
BUILD_KEYS = {"context", "dockerfile", "dockerfile_inline", "args", "ssh", "cache_from",
              "cache_to", "additional_contexts", "extra_hosts", "isolation", "privileged",
              "labels", "no_cache", "pull", "network", "shm_size", "target", "secrets", "tags",
              "ulimits", "platforms", "entitlements"}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval",
                    "disable"}
DEPENDS_ON_KEYS = {"condition", "restart", "required"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
PORT = re.compile(r"^(?:(?:(?P<ip>[\d.]+|\[[0-9a-fA-F:]+\]):)?(?P<host>\d+(?:-\d+)?):)?"
                  r"(?P<container>\d+(?:-\d+)?)(?:/(?P<proto>tcp|udp|sctp))?$")
VOLUME_MODES = {"ro", "rw", "z", "Z", "cached", "delegated", "consistent", "nocopy"}
PINNED = re.compile(r"^[\w./-]+:(?P<tag>\d+(\.\d+)+[\w.-]*)(@sha256:[0-9a-f]{64})?$")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$|PRIVATE")
PLACEHOLDER = "change-me"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    """``.env.example``: what ``deploy/.env`` starts as, so what compose interpolates."""
    return read_env_file(DEPLOY / ".env.example")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any], dotenv: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The services with every ``${...}`` interpolated from ``.env.example``."""
    result: dict[str, dict[str, Any]] = interpolate(compose["services"], dotenv)
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ after running the real prepare.sh (broker config, provisioning)."""
    base = tmp_path_factory.mktemp("deploy")
    copy = base / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("generated", ".env"))
    registry = base / "registry.csv"
    registry.write_text(REGISTRY, encoding="utf-8")
    result = run_prepare(copy, "--registry", str(registry), "--self-signed", "localhost")
    assert result.returncode == 0, result.stderr
    return copy


@pytest.fixture(scope="module")
def configs(prepared: Path, services: dict[str, dict[str, Any]]) -> dict[str, Config]:
    """Each Meshwatch service's configuration as its container sees it: file plus env."""
    return {name: service_config(prepared, name, services[name]) for name in SERVICES_BUILT}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    return monkeypatch


# -- helpers ----------------------------------------------------------------------------------


def run_prepare(deploy_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHWATCH": str(MESHWATCH_BIN)}
    return subprocess.run([str(deploy_dir / "prepare.sh"), *args], env=env, text=True,
                          capture_output=True, timeout=120, check=False)


def read_env_file(path: Path) -> dict[str, str]:
    """A compose/systemd env file: ``KEY=VALUE`` lines, ``#`` comments, no quoting used."""
    values = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: {line!r} is not KEY=VALUE"
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}:{number}: {key!r}"
        assert key not in values, f"{path}:{number}: {key} twice"
        values[key] = value
    return values


_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])"
                  r"(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation: ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``${V:+a}``, $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":?", "?"):
            if not present:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if present else ""
        return env.get(name, "")

    return _VAR.sub(substitute, value)


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(source, target, read_only)`` of a service's volumes, short or long syntax."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            assert 2 <= len(parts) <= 3, f"volume {volume!r}: use source:target[:mode]"
            modes = set(parts[2].split(",")) if len(parts) == 3 else set()
            assert modes <= VOLUME_MODES, f"volume {volume!r}: unknown mode"
            result.append((parts[0], parts[1], "ro" in modes))
        else:
            assert volume.get("type") in {"bind", "volume", "tmpfs"}, volume
            result.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
    return result


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def host_path(deploy_dir: Path, service: dict[str, Any], path: str | PurePosixPath
              ) -> tuple[Path | None, str, bool] | None:
    """Where a container path of ``service`` lives: (host path or None, mount source, ro)."""
    container = PurePosixPath(path)
    best = None
    for source, target, read_only in mounts(service):
        target_path = PurePosixPath(target)
        inside = container == target_path or target_path in container.parents
        if inside and (best is None or len(target_path.parts) > len(PurePosixPath(best[1]).parts)):
            best = (source, target, read_only)
    if best is None:
        return None
    source, target, read_only = best
    rest = container.relative_to(target)
    host = (deploy_dir / source / rest).resolve() if is_bind(source) else None
    return host, source, read_only


def mounted_file(deploy_dir: Path, service: dict[str, Any], path: str) -> Path:
    """The host file behind container path ``path`` (a bind mount); fails if there is none."""
    located = host_path(deploy_dir, service, path)
    assert located is not None, f"{path} is on no mount"
    assert located[0] is not None, f"{path} is on a named volume, not a file from deploy/"
    assert located[0].is_file(), f"{path} -> {located[0]} is not a file"
    return located[0]


def service_env(deploy_dir: Path, service: dict[str, Any]) -> dict[str, str]:
    """The environment compose gives the container: env_file(s), then ``environment``."""
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for entry in [files] if isinstance(files, str) else files:
        env.update(read_env_file(deploy_dir / (entry if isinstance(entry, str) else entry["path"])))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: str(value) for key, value in environment.items()})
    return env


def config_key_of(env_name: str) -> list[str]:
    """``MESHWATCH_A__B`` -> ``["a", "b"]`` if that is a key of :class:`Config`, else fail."""
    assert env_name.startswith(ENV_PREFIX), env_name
    path = env_name[len(ENV_PREFIX):].lower().split("__")
    model: type[BaseModel] = Config
    for depth, part in enumerate(path):
        fields = model.model_fields
        assert part in fields, f"{env_name}: {'.'.join(path[:depth + 1])} is not a config key"
        annotation = fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if depth < len(path) - 1:
            assert candidates, f"{env_name}: {'.'.join(path[:depth + 1])} has no sub-keys"
            model = candidates[0]
    return path


def config_file_of(service: dict[str, Any]) -> str:
    command = service["command"]
    return command[command.index("--config") + 1]


def service_config(deploy_dir: Path, name: str, service: dict[str, Any]) -> Config:
    """Load the mounted meshwatch.toml with exactly the container's MESHWATCH_* variables."""
    config_file = mounted_file(deploy_dir, service, config_file_of(service))
    env = {k: v for k, v in service_env(deploy_dir, service).items() if k.startswith(ENV_PREFIX)}
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(env)
        config = load_config(config_file)
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)
    for key, value in env.items():  # each variable must have landed on its key
        node: Any = config
        for part in config_key_of(key):
            node = getattr(node, part)
        if isinstance(node, SecretStr):
            node = node.get_secret_value()
        if isinstance(node, list):
            node = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in node]
            assert node == yaml.safe_load(value), f"{name}: {key} did not apply"
        else:
            assert str(node) == value, f"{name}: {key}={value!r} did not apply (got {node!r})"
    return config


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    text = " ".join(test[1:]) if isinstance(test, list) else test
    match = re.search(r"https?://[^'\" ]+", text)
    assert match, f"no URL in healthcheck {test!r}"
    return match.group(0)


def container_ports(service: dict[str, Any]) -> dict[int, str | None]:
    """Published container port -> host ip (None: every interface)."""
    result: dict[int, str | None] = {}
    for port in service.get("ports", []):
        match = PORT.match(str(port))
        assert match, f"port {port!r} is not [[ip:]host:]container[/proto]"
        result[int(match["container"])] = match["ip"]
    return result


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd or compose time span: ``30``, ``30s``, ``1min 30s``, ``1m30s``."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value):
        total += float(number) * units[unit]
    return total


def megabytes(value: str) -> float:
    factors = {"K": 1 / 1024, "M": 1, "G": 1024}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG])", value)
    assert match, f"size {value!r}: write it as a number and K, M or G"
    return float(match[1]) * factors[match[2]]


# -- compose.yaml against the Compose Specification -------------------------------------------


def test_compose_uses_only_known_keys_and_valid_values(compose: dict[str, Any]) -> None:
    assert set(compose) - TOP_LEVEL <= {k for k in compose if k.startswith("x-")}
    assert compose["services"], "no services"
    for name, service in compose["services"].items():
        assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name)
        unknown = {k for k in service if not k.startswith("x-")} - SERVICE_KEYS
        assert not unknown, f"{name}: unknown keys {unknown}"
        assert RESTART.match(service.get("restart", "")), f"{name}: restart policy missing"
        if "build" in service:
            build = service["build"]
            assert isinstance(build, str) or set(build) <= BUILD_KEYS, f"{name}: build {build}"
        if "healthcheck" in service:
            check = service["healthcheck"]
            assert set(check) <= HEALTHCHECK_KEYS, f"{name}: healthcheck keys {set(check)}"
            test = check["test"]
            assert isinstance(test, str) or test[0] in {"CMD", "CMD-SHELL", "NONE"}, test
            for key in ("interval", "timeout", "start_period", "start_interval"):
                if key in check:
                    assert DURATION.match(check[key]), f"{name}: healthcheck {key}"
        if "stop_grace_period" in service:
            assert DURATION.match(service["stop_grace_period"]), name
        for key in ("command", "entrypoint"):
            if key in service:
                assert isinstance(service[key], list), f"{name}: {key} as a list (no shell)"
        profiles = service.get("profiles", [])
        assert all(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", p) for p in profiles), name


def test_every_service_has_a_pinned_image_or_a_build(compose: dict[str, Any]) -> None:
    built_images = set()
    for name, service in compose["services"].items():
        if "build" in service:
            build = service["build"]
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no Dockerfile"
            assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
            built_images.add(service.get("image"))
        else:
            image = service.get("image", "")
            match = PINNED.match(image)
            assert match, f"{name}: image {image!r} must be pinned to a version tag"
            assert not match["tag"].endswith(("latest", "-rc")), f"{name}: {image}"
    assert set(SERVICES_BUILT) <= {n for n, s in compose["services"].items() if "build" in s}
    assert len(built_images) == 1, f"the services share one image, got {built_images}"


def test_depends_on_names_conditions_and_profiles(compose: dict[str, Any]) -> None:
    all_services = compose["services"]
    graph: dict[str, set[str]] = {}
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        graph[name] = set(depends)
        for dep, spec in depends.items():
            assert dep in all_services, f"{name} depends on unknown service {dep}"
            assert set(spec) <= DEPENDS_ON_KEYS, f"{name} -> {dep}: {set(spec)}"
            condition = spec.get("condition", "service_started")
            assert condition in CONDITIONS, f"{name} -> {dep}: condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in all_services[dep], f"{dep} has no healthcheck"
            extra = set(all_services[dep].get("profiles", [])) - set(
                service.get("profiles", []))
            if extra:  # the dependency may be switched off: it must be optional
                assert spec.get("required") is False, f"{name} -> {dep} (profiles {extra})"

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        for dep in graph[node]:
            visit(dep, (*path, node))

    for node in graph:
        visit(node, ())
    # every service of the default profile starts only once what it talks to can answer
    for name in SERVICES_BUILT:
        conditions = {dep: spec["condition"] for dep, spec
                      in all_services[name]["depends_on"].items()}
        assert conditions.get("mosquitto") == "service_healthy", name
    assert all_services["flow"]["depends_on"]["influxdb"]["condition"] == "service_healthy"


def test_every_volume_secret_and_config_referenced_is_declared(compose: dict[str, Any]) -> None:
    declared = {kind: set(compose.get(kind) or {}) for kind in ("volumes", "secrets", "configs")}
    used: set[str] = set()
    for name, service in compose["services"].items():
        for source, target, _ in mounts(service):
            assert target.startswith("/"), f"{name}: mount target {target} is not absolute"
            if not is_bind(source):
                assert source in declared["volumes"], f"{name}: volume {source} not declared"
                used.add(source)
        for kind in ("secrets", "configs"):
            for entry in service.get(kind, []):
                ref = entry if isinstance(entry, str) else entry["source"]
                assert ref in declared[kind], f"{name}: {kind[:-1]} {ref} not declared"
        targets = [target for _, target, _ in mounts(service)]
        assert len(targets) == len(set(targets)), f"{name}: a target is mounted twice"
    assert declared["volumes"] == used, f"unused volumes: {declared['volumes'] - used}"


def test_every_mounted_host_path_exists_after_prepare(
    prepared: Path, services: dict[str, dict[str, Any]]
) -> None:
    for name, service in services.items():
        for source, target, read_only in mounts(service):
            if not is_bind(source):
                continue
            host = (prepared / source).resolve()
            assert host.exists(), f"{name}: {source} (-> {target}) missing after prepare.sh"
            assert prepared.resolve() in host.parents, f"{name}: {source} outside deploy/"
            assert read_only, f"{name}: bind mount {source} should be read-only"
        for entry in service.get("env_file", []):
            assert (prepared / entry).is_file(), f"{name}: env_file {entry} missing"


def test_prepare_generates_into_ignored_paths_and_keeps_passwords(prepared: Path) -> None:
    for path in ("deploy/generated/", "deploy/generated/broker/credentials.csv", "deploy/.env"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert result.returncode == 0, f"{path} is not git-ignored"
    for path in ("deploy/.env.example", "deploy/compose.yaml", "deploy/meshwatch.toml"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert result.returncode == 1, f"{path} must not be git-ignored"
    generated = prepared / "generated"
    assert generated.stat().st_mode & 0o077 == 0, "generated/ must be private to its owner"
    for private in ("broker/credentials.csv", "env/bridge.env", "env/flow.env"):
        assert (generated / private).stat().st_mode & 0o077 == 0, private
    before = {p.name: p.read_text() for p in (generated / "env").iterdir()}
    registry = prepared.parent / "registry.csv"
    again = run_prepare(prepared, "--registry", str(registry), "--self-signed", "localhost")
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_text() for p in (generated / "env").iterdir()} == before
    missing = run_prepare(prepared, "--self-signed", "localhost")
    assert missing.returncode != 0
    assert "--registry" in missing.stderr


# -- the services: commands, configuration, ports ---------------------------------------------


def test_every_command_is_a_real_meshwatch_subcommand(
    prepared: Path, services: dict[str, dict[str, Any]]
) -> None:
    entrypoint = dockerfile_instructions()["ENTRYPOINT"][-1]
    assert yaml.safe_load(entrypoint) == ["meshwatch"]
    for name in SERVICES_BUILT:
        service = services[name]
        assert "entrypoint" not in service, f"{name}: use the image's meshwatch entrypoint"
        command = service["command"]
        assert command[0] in PLUGIN_COMMANDS, f"{name}: {command[0]} is not a subcommand"
        args = _build_parser(command[0]).parse_args(command)  # SystemExit if invalid
        assert getattr(args, "handler", None) is not None, f"{name}: {command} runs nothing"
        located = host_path(prepared, service, args.config)
        assert located is not None, f"{name}: {args.config} is not mounted"
        assert located[0] == (prepared / "meshwatch.toml").resolve(), name


def test_meshwatch_toml_passes_config_check(prepared: Path, clean_env: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("MESHWATCH_REGISTRY__FILE", str(prepared / "generated" / "registry.csv"))
    assert main(["config", "check", str(DEPLOY / "meshwatch.toml")]) == 0
    assert "registry: " in capsys.readouterr().out


def test_every_meshwatch_variable_is_a_config_key_and_validates(
    configs: dict[str, Config], prepared: Path, services: dict[str, dict[str, Any]]
) -> None:
    for name in SERVICES_BUILT:
        env = service_env(prepared, services[name])
        keys = {k for k in env if k.startswith(ENV_PREFIX)}
        assert keys, f"{name}: no MESHWATCH_* variables (broker account?)"
        for key in keys:
            config_key_of(key)
        config = configs[name]
        assert config.mesh_broker.username, name
        assert config.mesh_broker.password, name
    assert configs["flow"].influxdb.token is not None
    assert configs["remediation"].remediation.operator_tokens
    accounts = {name: configs[name].mesh_broker.username for name in SERVICES_BUILT}
    assert accounts == {"bridge": "bridge", "flow": "dataflow", "remediation": "remediation"}
    assert configs["bridge"].site_broker.username == "bridge"


def test_config_paths_lie_on_the_services_mounts(
    configs: dict[str, Config], prepared: Path, services: dict[str, dict[str, Any]],
    clean_env: pytest.MonkeyPatch,
) -> None:
    volume_targets: set[str] = set()
    for name in SERVICES_BUILT:
        config, service = configs[name], services[name]
        assert config.registry.file is not None
        mounted_file(prepared, service, str(config.registry.file))
        writable: list[Path] = []
        if name == "flow":
            assert config.flow.recovery_dir, "flow: set flow.recovery_dir (state survives)"
            assert config.flow.lake_dir, "flow: set flow.lake_dir"
            writable += [config.flow.recovery_dir, config.flow.lake_dir]
        if name == "remediation":
            url = config.database.url
            file_default = load_config(mounted_file(prepared, service, config_file_of(service)))
            assert url == file_default.database.url, (
                "compose's MESHWATCH_DATABASE__URL default and meshwatch.toml's database.url "
                "differ: config check would not show what runs")
            assert url.startswith("sqlite:////"), f"default database {url}"
            writable.append(Path(url.removeprefix("sqlite:///")).parent)
        if name == "bridge":
            writable.append(config.bridge.opcua_store_path.parent)
        for path in writable:
            assert path.is_absolute(), f"{name}: {path} depends on the working directory"
            located = host_path(prepared, service, str(path))
            assert located is not None, f"{name}: {path} is on no volume (lost on recreate)"
            _, source, read_only = located
            assert not is_bind(source), f"{name}: {path} on bind mount {source}"
            assert not read_only, f"{name}: {path} on a read-only volume"
        volume_targets |= {t for s, t, _ in mounts(service) if not is_bind(s)}
    # the image's user owns every volume's mount point, so Docker initialises it so
    owned: set[str] = set()
    for run in dockerfile_instructions()["RUN"]:
        for match in re.finditer(r"install -d -o meshwatch -g meshwatch[^&]*", run):
            owned |= {w for w in match.group(0).split() if w.startswith("/")}
    assert volume_targets <= owned, f"not created for the meshwatch user: {volume_targets - owned}"


def test_healthchecks_and_ports_match_the_configuration(
    configs: dict[str, Config], services: dict[str, dict[str, Any]]
) -> None:
    bridge = urlsplit(healthcheck_url(services["bridge"]))
    assert (bridge.port, bridge.path) == (configs["bridge"].bridge.healthz_port, "/healthz")
    remediation = urlsplit(healthcheck_url(services["remediation"]))
    r = configs["remediation"].remediation
    assert (remediation.port, remediation.path) == (r.http_port, "/healthz")
    assert r.http_host == "0.0.0.0", "remediation must listen beyond the container's loopback"
    assert r.http_port in container_ports(services["remediation"])
    for name in SERVICES_BUILT:
        grace = seconds(services[name]["stop_grace_period"])
        timeouts = [configs[name].bridge.shutdown_timeout_s] if name == "bridge" else [0.0]
        assert grace > max(timeouts) + 5, f"{name}: stop_grace_period {grace}s too short"
    # web ports stay on the host's loopback; only MQTT over TLS is published to the network
    for name, service in services.items():
        for port, ip in container_ports(service).items():
            if (name, port) != ("mosquitto", 8883):
                assert ip == "127.0.0.1", f"{name}: port {port} published on every interface"


def test_brokers_influxdb_and_grafana_agree(
    configs: dict[str, Config], prepared: Path, services: dict[str, dict[str, Any]]
) -> None:
    conf = mosquitto_conf(prepared)
    listeners = {int(line.split()[0]) for line in conf.get("listener", [])}
    for name in SERVICES_BUILT:
        for broker in (configs[name].site_broker, configs[name].mesh_broker):
            url = urlsplit(broker.url)
            assert url.hostname in services, f"{name}: broker host {url.hostname}"
            assert url.port in listeners, f"{name}: broker port {url.port} not a listener"
    published = container_ports(services["mosquitto"])
    tls_port = int(conf["listener"][1].split()[0])
    assert tls_port in published, "the TLS listener is not published for gateways"
    assert not set(published) & (listeners - {tls_port}), "plain MQTT published to the network"

    influx = configs["flow"].influxdb
    assert influx.url is not None
    url = urlsplit(influx.url)
    env = services["influxdb"]["environment"]
    assert url.hostname in services
    assert url.port in container_ports(services["influxdb"])
    assert (env["DOCKER_INFLUXDB_INIT_ORG"], env["DOCKER_INFLUXDB_INIT_BUCKET"]) == (
        influx.org, influx.bucket)
    assert influx.token is not None
    assert env["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"] == influx.token.get_secret_value()

    grafana = services["grafana"]
    sources = yaml.safe_load(
        (prepared / "generated/grafana/provisioning/datasources/meshwatch.yaml").read_text())
    source = sources["datasources"][0]
    assert source["url"] == influx.url
    assert source["jsonData"]["dbName"] == influx.bucket
    token_var = re.fullmatch(r"Token \$\{(\w+)\}", source["secureJsonData"]["httpHeaderValue1"])
    assert token_var
    assert grafana["environment"].get(token_var[1]) == influx.token.get_secret_value()
    providers = yaml.safe_load(
        (prepared / "generated/grafana/provisioning/dashboards/meshwatch.yaml").read_text())
    board_dir = host_path(prepared, grafana, providers["providers"][0]["options"]["path"])
    assert board_dir
    assert board_dir[0]
    assert len(list(board_dir[0].glob("*.json"))) >= 6
    for kind in ("datasources", "dashboards"):
        mounted_file(prepared, grafana, f"/etc/grafana/provisioning/{kind}/meshwatch.yaml")


# -- the broker: the generated configuration inside its container -----------------------------


def mosquitto_conf(prepared: Path) -> dict[str, list[str]]:
    conf: dict[str, list[str]] = {}
    for line in (prepared / "generated/mosquitto/mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf.setdefault(key, []).append(value)
    return conf


def test_mosquitto_conf_paths_resolve_inside_the_container(
    prepared: Path, services: dict[str, dict[str, Any]]
) -> None:
    broker = services["mosquitto"]
    command = broker["command"]
    conf_path = host_path(prepared, broker, command[command.index("-c") + 1])
    assert conf_path
    assert conf_path[0] == (prepared / "generated/mosquitto/mosquitto.conf")
    conf = mosquitto_conf(prepared)
    for key in ("password_file", "acl_file", "certfile", "keyfile", "cafile"):
        for value in conf[key]:
            host = mounted_file(prepared, broker, value)
            assert host.stat().st_mode & 0o004, f"{value}: the mosquitto user cannot read it"
    assert "credentials.csv" not in {p.name for p in (prepared / "generated/mosquitto").iterdir()}
    assert conf["user"] == ["mosquitto"]
    for path in (conf["persistence_location"][0], conf["log_dest"][0].split()[1]):
        located = host_path(prepared, broker, path)
        assert located, f"{path} is on no mount"
        assert not is_bind(located[1]), f"{path} must be on a named volume"
    assert int(conf["max_inflight_messages"][0]) == 65_535  # never drop QoS1 for slow acks


class PreparedMosquitto(Mosquitto):
    """A real mosquitto running the prepared configuration, container paths mapped to host."""

    def __init__(self, base_dir: Path, prepared: Path, broker: dict[str, Any]) -> None:
        super().__init__(base_dir)
        self.prepared = prepared
        self.broker = broker
        self.tls_port = free_port()

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        volumes = {target: self.data_dir for source, target, _ in mounts(self.broker)
                   if not is_bind(source)}
        lines = []
        for line in (self.prepared / "generated/mosquitto/mosquitto.conf").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "listener":
                port = int(value.split()[0])
                line = f"listener {self.port if port == 1883 else self.tls_port} {self.host}"
            elif key == "user":
                line = f"user {pwd.getpwuid(os.geteuid()).pw_name}"
            elif key == "log_dest":
                line = "log_dest stderr"
            elif value.startswith("/mosquitto/"):
                located = host_path(self.prepared, self.broker, value)
                assert located is not None, f"{key} {value} is on no mount"
                host = located[0]
                if host is None:  # a named volume: a directory of this test instead
                    target = next(t for t in volumes if value.startswith(t))
                    host = volumes[target] / PurePosixPath(value).relative_to(target)
                line = f"{key} {host}{'/' if value.endswith('/') else ''}"
            lines.append(line)
        self.config_path.write_text("\n".join(lines) + "\n")

    def _is_ready(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(self._CONNECT)
                return sock.recv(4)[:2] == b"\x20\x02"
        except OSError:
            return False


@pytest.fixture(scope="module")
def running_broker(tmp_path_factory: pytest.TempPathFactory, prepared: Path,
                   services: dict[str, dict[str, Any]]) -> Iterator[PreparedMosquitto]:
    with PreparedMosquitto(tmp_path_factory.mktemp("mosquitto"), prepared,
                           services["mosquitto"]) as server:
        yield server


def connect(port: int, username: str, password: str, ca: Path | None = None) -> str:
    """CONNECT and return the reason ("Success", "Not authorized", ...)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    if ca is not None:
        client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    result: list[str] = []
    client.on_connect = lambda c, u, f, reason, p: result.append(str(reason))
    client.connect("127.0.0.1" if ca is None else "localhost", port)
    try:
        for _ in range(100):
            client.loop(0.05)
            if result:
                break
    finally:
        client.disconnect()
    assert result, "no CONNACK"
    return result[0]


def test_the_prepared_broker_admits_each_service_and_gateway(
    running_broker: PreparedMosquitto, prepared: Path, services: dict[str, dict[str, Any]]
) -> None:
    for name in SERVICES_BUILT:
        env = service_env(prepared, services[name])
        user, password = env["MESHWATCH_MESH_BROKER__USERNAME"], env[
            "MESHWATCH_MESH_BROKER__PASSWORD"]
        assert connect(running_broker.port, user, password) == "Success", name
        assert connect(running_broker.port, user, password + "x") == "Not authorized", name
    with (prepared / "generated/broker/credentials.csv").open(newline="") as handle:
        gateways = [row for row in csv.DictReader(handle) if row["role"] == "gateway"]
    assert {row["username"] for row in gateways} == {"dma-01-gw-001", "dma-02-gw-001"}
    ca = prepared / "generated/mosquitto/certs/ca.crt"
    for row in gateways:
        assert connect(running_broker.tls_port, row["username"], row["password"], ca) == "Success"


# -- secrets ----------------------------------------------------------------------------------


def test_no_secret_values_are_committed(
    compose: dict[str, Any], dotenv: dict[str, str], clean_env: pytest.MonkeyPatch
) -> None:
    for key, value in dotenv.items():
        if SECRET_NAME.search(key):
            assert PLACEHOLDER in value, f".env.example: {key} must be a {PLACEHOLDER} placeholder"
    assert read_env_file(DEPLOY / "edge/edge.env.example") == {
        "MESHWATCH_SITE_BROKER__PASSWORD": PLACEHOLDER}
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), (
                    f"{name}: {key} must come from deploy/.env as ${{VAR:?...}}")
        for key, value in environment.items():  # no default may carry a credential
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)), f"{name}: {key}"
    for path in (DEPLOY / "meshwatch.toml", DEPLOY / "edge/edge.toml"):
        config = load_config(path)
        assert config.site_broker.password is None
        assert config.mesh_broker.password is None
        assert config.influxdb.token is None, path
        assert not config.remediation.operator_tokens, path
        for broker in (config.site_broker, config.mesh_broker):
            assert urlsplit(broker.url).password is None, path
        assert not re.search(r"password\s*=|token\s*=", path.read_text()), path


# -- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> dict[str, list[str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    result: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            result.setdefault(instruction.upper(), []).append(rest.strip())
    return result


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def available_distributions(extras: set[str]) -> set[str]:
    """Every distribution ``pip install .[extras]`` brings, from pyproject.toml then metadata."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = list(project["dependencies"])
    done_extras: set[str] = set()
    todo = set(extras)
    while todo:
        extra = todo.pop()
        done_extras.add(extra)
        for spec in project["optional-dependencies"][extra]:
            requirement = Requirement(spec)
            if _normalise(requirement.name) == "meshwatch":
                todo |= requirement.extras - done_extras
            else:
                pending.append(spec)
    found: set[str] = set()
    while pending:
        requirement = Requirement(pending.pop())
        name = _normalise(requirement.name)
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            dep = Requirement(spec)
            wanted = requirement.extras or {""}
            if dep.marker is None or any(
                    dep.marker.evaluate({**default_environment(), "extra": e}) for e in wanted):
                pending.append(spec)
    return found


OUR_PACKAGES = ("meshwatch", "edge_agent", "mesh_bridge", "dataflows", "models", "remediation",
                "dashboards", "simulators")


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(entry: str) -> tuple[set[str], set[str]]:
    """(our modules, third-party top-level names) reachable by imports from ``entry``.

    Follows every import, lazy ones inside functions included, except ``TYPE_CHECKING``
    blocks; a lazy import needed only by an optional feature therefore shows up too.
    """
    ours: set[str] = set()
    third: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in ours or path is None:
            continue
        ours.add(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in OUR_PACKAGES:
                    todo.append(name)
                elif top and top not in sys.stdlib_module_names and top != "__future__":
                    third.add(top)
    return ours, third


OPTIONAL_IMPORTS = {
    "asyncua": "the bridge's own OPC-UA input (bridge.opcua_site): build with EXTRAS=cloud,edge",
}
"""Lazily imported distributions the image may lack, with the feature that needs them; the
test asserts that feature is off in deploy/meshwatch.toml."""


def test_dockerfile_installs_what_the_services_import(
    compose: dict[str, Any], configs: dict[str, Config]
) -> None:
    instructions = dockerfile_instructions()
    assert instructions["FROM"] == ["python:3.11-slim"]
    args = dict(arg.split("=", 1) for arg in instructions["ARG"] if "=" in arg)
    install = [run for run in instructions["RUN"] if "pip install" in run]
    assert len(install) == 1, install
    match = re.search(r"pip install \"\.\[(?P<extras>[^\]]+)\]\"", install[0])
    assert match, f"the project is not installed with extras: {install[0]}"
    distributions = importlib.metadata.packages_distributions()
    copied = {rest.split()[0] for rest in instructions["COPY"]}
    imports = {name: imported_modules(
        PLUGIN_COMMANDS[compose["services"][name]["command"][0]][0]) for name in SERVICES_BUILT}
    # built by compose (its build args) and by hand (`docker build`: the ARG defaults)
    for label, values in (("compose", {**args, **compose["x-meshwatch-build"]["args"]}),
                          ("the Dockerfile's ARG defaults", args)):
        extras = set(re.sub(r"\$\{(\w+)\}", lambda m, v=values: v.get(m[1], ""),
                            match["extras"]).split(","))
        available = available_distributions(extras)
        for name, (ours, third) in imports.items():
            for package in {module.split(".")[0] for module in ours}:
                assert package in copied, f"{name} imports {package}, which the image lacks"
            for top in sorted(third):
                dists = {_normalise(d) for d in distributions.get(top, [top])}
                if dists & available:
                    continue
                assert top in OPTIONAL_IMPORTS, (
                    f"{name} imports {top} ({', '.join(sorted(dists))}), not installed by "
                    f"pip install .[{','.join(sorted(extras))}] ({label})")
                assert configs["bridge"].bridge.opcua_site is None, OPTIONAL_IMPORTS[top]
    # a non-root user runs the services
    user = instructions["USER"][-1]
    assert user not in {"root", "0"}
    assert any("useradd" in run and user in run for run in instructions["RUN"])
    packaged = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["packages"]["find"]["include"]
    assert {f"{package}*" for package in OUR_PACKAGES} <= set(packaged)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for package in OUR_PACKAGES:
        assert f"!{package}/" in ignore, f"Dockerfile.dockerignore leaves out {package}"
        assert package in copied, f"the Dockerfile does not copy {package}"


# -- the edge agent under systemd -------------------------------------------------------------


EDGE_UNIT = DEPLOY / "edge" / "meshwatch-edge.service"


def test_systemd_analyze_verify_accepts_the_edge_unit(tmp_path: Path) -> None:
    analyzer = shutil.which("systemd-analyze")
    assert analyzer, "systemd-analyze is missing: apt-get install systemd"
    text = EDGE_UNIT.read_text(encoding="utf-8")
    exec_start = unit_entries(EDGE_UNIT)["Service"]["ExecStart"][0]
    binary = shlex.split(exec_start)[0]
    assert MESHWATCH_BIN.is_file()
    unit = tmp_path / EDGE_UNIT.name  # the same unit, ExecStart pointing at a binary that exists
    unit.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={MESHWATCH_BIN} "))
    result = subprocess.run([analyzer, "verify", "--man=no", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    report = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, report
    assert not report, report


def test_the_edge_unit_fits_the_agent_and_its_measured_memory(clean_env: pytest.MonkeyPatch
                                                              ) -> None:
    unit = unit_entries(EDGE_UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    command = shlex.split(service["ExecStart"])
    assert PurePosixPath(command[0]).name == "meshwatch"
    args = _build_parser("edge").parse_args(command[1:])
    assert args.handler is not None
    assert not args.simulate
    assert args.config == Path("/etc/meshwatch/edge.toml")
    for key, value in read_env_file(DEPLOY / "edge/edge.env.example").items():
        config_key_of(key)
        clean_env.setenv(key, value)
    config = load_config(DEPLOY / "edge/edge.toml")
    assert config.edge.site, "edge.site"
    assert config.edge.gateway_id, "edge.gateway_id"
    assert config.site_broker.password is not None
    assert service["User"] not in {"root", "0"}
    assert "DynamicUser" not in service
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM"
    stop_s = seconds(service["TimeoutStopSec"])
    assert stop_s >= config.edge.shutdown_timeout_s + 10, (
        f"TimeoutStopSec {stop_s}s leaves the agent no time to flush after "
        f"edge.shutdown_timeout_s {config.edge.shutdown_timeout_s}s")
    state = PurePosixPath("/var/lib") / service["StateDirectory"]
    for path in (config.edge.outbox_path, config.edge.model_staging_dir):
        assert state in PurePosixPath(path).parents, f"{path} is outside {state}"
    assert service["WorkingDirectory"] == str(state)
    hardening = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                 "PrivateTmp": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes"}
    assert {key: service.get(key) for key in hardening} == hardening
    assert service["CapabilityBoundingSet"] == ""
    # MemoryMax from BENCHMARKS.md's edge agent figures: the highest peak RSS measured, with
    # room for a second ONNX session during a model swap
    table = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").split(
        "## Edge agent, input to broker")[1].split("\n## ")[0]
    peaks = [float(m) for m in re.findall(r"\| \*\*(\d+(?:\.\d+)?)\*\* \(", table)]
    assert len(peaks) >= 3, "BENCHMARKS.md's edge RSS table moved; update this test"
    memory_max, memory_high = megabytes(service["MemoryMax"]), megabytes(service["MemoryHigh"])
    assert memory_max >= 1.5 * max(peaks), f"MemoryMax {memory_max} MB < 1.5 x {max(peaks)} MB"
    assert max(peaks) * 1.25 <= memory_high < memory_max


def test_deploy_doc_is_linked_and_its_links_resolve() -> None:
    doc = ROOT / "docs" / "deploy.md"
    assert "docs/deploy.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"docs/deploy.md links to missing {target}"
    for path in ("deploy/compose.yaml", "deploy/prepare.sh", "deploy/.env.example",
                 "meshwatch-edge.service"):
        assert path in text, f"docs/deploy.md does not mention {path}"
