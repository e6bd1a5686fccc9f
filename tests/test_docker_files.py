"""docker/Dockerfile and docker/docker-compose.yml match the code (no Docker engine here: the
files are parsed, and every scancache command in them goes through the real argument parser)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from service import cli

DOCKER = Path(__file__).resolve().parent.parent / "docker"
REPO = DOCKER.parent
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")  # ${NAME:-default}, as Compose substitutes it


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _with_defaults(words: list[str]) -> list[str]:
    return [DEFAULT.sub(lambda m: m[2], str(w)) for w in words]


def _instruction(name: str) -> list[str]:
    """A Dockerfile instruction's exec-form (JSON) arguments."""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith(name + " "):
            return json.loads(line[len(name) + 1 :])
    raise AssertionError(f"no {name} in docker/Dockerfile")


def test_every_scancache_command_parses_and_no_secret_is_on_a_command_line():
    services = _compose()["services"]
    assert {"scheduler", "worker-1", "worker-2", "preprocess", "server", "sample-data"} <= set(services)
    commands = {name: s["command"] for name, s in services.items() if "entrypoint" not in s}
    assert set(commands) == {"preprocess", "server", "sample-data"}
    for name, command in commands.items():
        argv = _with_defaults(command)
        assert "--token" not in argv, name
        args = cli.build_parser().parse_args(argv)  # SystemExit (a failure) on a stale option
        assert args.command == argv[0]
    assert cli.build_parser().parse_args(_instruction("CMD")).command == "serve"
    assert _instruction("ENTRYPOINT") == ["scancache"]


def test_services_share_the_data_paths_and_depend_on_services_that_exist():
    compose = _compose()
    services = compose["services"]
    volumes = {name: s.get("volumes") for name, s in services.items()}
    assert len({json.dumps(v) for v in volumes.values()}) == 1  # workers see the job's paths
    assert any(v.endswith(":/data") for v in volumes["server"])
    assert set(compose["volumes"]) == {v.split(":")[0] for v in volumes["server"] if not v.startswith("$")}
    for name, service in services.items():
        assert set(service.get("depends_on") or ()) <= set(services), name
    assert "SCANCACHE_TOKEN" in services["server"]["environment"]
    assert services["preprocess"]["hostname"]  # the job lock names the host: keep it stable
    job = cli.build_parser().parse_args(_with_defaults(services["preprocess"]["command"]))
    assert job.source == "/data/source" and job.store == "/data/store" and job.scheduler


def test_the_image_holds_every_package_the_commands_import():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE))
    assert copied == {"client", "store", "service", "loaders"}
    assert all((REPO / name / "__init__.py").is_file() for name in copied)
    allowed = (DOCKER / "Dockerfile.dockerignore").read_text()
    assert all(f"!{name}/**" in allowed for name in copied)
    assert 'pip install ".[service,s3]"' in dockerfile


def test_the_s3_compose_file_writes_to_s3_from_a_cluster_and_balances_two_servers():
    compose = yaml.safe_load((DOCKER / "docker-compose.s3.yml").read_text())
    services = compose["services"]
    assert {
        "s3",
        "scheduler",
        "worker-1",
        "worker-2",
        "preprocess",
        "server-1",
        "server-2",
        "balancer",
    } <= set(services)
    job = cli.build_parser().parse_args(_with_defaults(services["preprocess"]["command"]))
    assert job.store.startswith("s3://") and job.scheduler
    for name in ("server-1", "server-2"):
        argv = _with_defaults(services[name]["command"])
        assert cli.build_parser().parse_args(argv).store == job.store
    for name, service in services.items():
        words = [str(w) for w in service.get("command") or []] + [
            str(w) for w in service.get("entrypoint") or []
        ]
        assert not any("SECRET" in w or w == "--token" for w in words), name  # secrets: environment only
        assert set(service.get("depends_on") or ()) <= set(services), name
    for name in ("worker-1", "worker-2", "preprocess", "server-1", "server-2"):
        env = services[name]["environment"]
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), name
        assert not services[name].get("volumes") or all(
            ":/data/source" in v for v in services[name]["volumes"]
        )
    upstream = (DOCKER / "nginx-two-servers.conf").read_text()
    assert "server server-1:8000;" in upstream and "server server-2:8000;" in upstream


def test_only_servers_are_health_checked_in_both_compose_files():
    """The image's HEALTHCHECK asks a server's /health: a job or a Dask process would show as
    unhealthy forever, so every other service of the scancache image turns it off."""
    for name in ("docker-compose.yml", "docker-compose.s3.yml"):
        services = yaml.safe_load((DOCKER / name).read_text())["services"]
        for service_name, service in services.items():
            if "scancache" not in str(service.get("image", "")):
                continue
            check = service.get("healthcheck") or {}
            if service_name.startswith("server"):
                assert "/health" in " ".join(check["test"]), (name, service_name)
            else:
                assert check.get("disable") is True, (name, service_name)
