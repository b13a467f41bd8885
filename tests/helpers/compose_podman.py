"""docker-compose.yml run by podman: the services of one profile turned into `podman` commands.

Why our own translation instead of podman-compose: Debian bookworm's podman-compose (1.0.3) ignores
`depends_on: {condition: service_healthy}` (it only orders the starts) and has no Docker engine's
healthcheck scheduler to wait on; here each service starts only once the services it depends on pass
their healthchecks, as with `docker compose up`. What is the same as compose: the file's own variable
interpolation (`${VAR:-default}`, `${VAR:?error}`, `$$`), one network per project on which each service
is reachable by its name, named volumes per project, the published ports, healthchecks (start period
included), restart policies, stop grace periods, /dev/shm sizes, memory limits, file secrets (each
bind-mounted read-only at /run/secrets/NAME, as compose does outside swarm) and the log driver with its
size rotation. What differs: GPU reservations (`deploy.resources`) are not translated (a service that
has them is refused: start only CPU services), a healthcheck runs when `wait_healthy` asks (`podman
healthcheck run`), not on its interval, and podman's json-file driver keeps one rotated file whatever
`max-file` says. Any other key this module does not know is an error naming it, so nothing in the file
is silently dropped.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
_KNOWN = {"image", "build", "command", "entrypoint", "environment", "volumes", "ports", "healthcheck",
          "depends_on", "restart", "stop_grace_period", "shm_size", "profiles", "ulimits", "deploy", "secrets",
          "mem_limit", "logging"}
_LOG_OPTIONS = {"max-size": "max-size", "max-file": None}  # compose's json-file options → podman's (None: none)


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution on every string in `value` (a YAML tree)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name, op, arg = match.group(2) or match.group(5), match.group(3), match.group(4) or ""
        current = env.get(name)
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise ValueError(f"{name}: {arg or 'required'}")
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        return current or ""

    return _VARIABLE.sub(substitute, value)


def seconds(duration: str | int) -> int:
    """'3m', '90s', '1m30s' → seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.findall(r"(\d+)(h|m|s|ms)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"stop_grace_period/interval: cannot read duration {duration!r}")
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0}[u] for n, u in parts)


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} … exited {result.returncode}: {result.stderr[-3000:]}")
    return result


@dataclass
class Stack:
    """One compose project: `compose_file` interpolated with `env`, services of `profiles`."""

    compose_file: Path
    env: dict[str, str]
    project: str
    profiles: tuple[str, ...] = ()
    scale_zero: tuple[str, ...] = ()  # `--scale NAME=0`
    image_tag: str | None = None  # tag of the images the stack builds, instead of the file's (one per test run)
    extra_environment: dict[str, dict[str, str]] = field(default_factory=dict)  # service → variables added
    services: dict = field(init=False)
    volumes: list[str] = field(init=False)
    secrets: dict[str, Path] = field(init=False)  # name → its file

    def __post_init__(self) -> None:
        raw = yaml.safe_load(self.compose_file.read_text())
        self.services = {}
        for name, service in raw["services"].items():
            active = not service.get("profiles") or set(service["profiles"]) & set(self.profiles)
            if active and name not in self.scale_zero:
                unknown = set(service) - _KNOWN
                if unknown:
                    raise ValueError(f"services.{name}: {sorted(unknown)} not translated to podman")
                self.services[name] = interpolate(service, self.env)
                if self.image_tag and "build" in service:  # two runs on one podman store never retag each other's
                    repository = self.services[name]["image"].rsplit(":", 1)[0]
                    self.services[name]["image"] = f"{repository}:{self.image_tag}"
        self.volumes = list(raw.get("volumes") or {})
        self.secrets = {}
        for name, secret in interpolate(raw.get("secrets") or {}, self.env).items():
            if set(secret) != {"file"}:
                raise ValueError(f"secrets.{name}: only file secrets are translated, not {sorted(secret)}")
            self.secrets[name] = (self.compose_file.parent / secret["file"]).resolve()

    @property
    def built_images(self) -> list[str]:
        return sorted({service["image"] for service in self.services.values() if "build" in service})

    def container(self, service: str) -> str:
        return f"{self.project}-{service}-1"

    def build(self, extra_args: dict[str, dict[str, str]], mounts: list[str]) -> dict[str, float]:
        """`podman build` each image a started service builds (once per image); `extra_args` per image
        are added to the file's build args, `mounts` are build-time volumes (host:container:ro)."""
        took = {}
        for name, service in self.services.items():
            if "build" not in service or service["image"] in took:
                continue
            build = service["build"]
            context = (self.compose_file.parent / build.get("context", ".")).resolve()
            args = {**(build.get("args") or {}), **extra_args.get(service["image"], {})}
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            # docker format: the OCI format drops HEALTHCHECK
            command = ["build", "--format", "docker", "-f", str(dockerfile), "-t", service["image"]]
            command += [f"--build-arg={key}={value}" for key, value in args.items()]
            command += [f"--volume={mount}" for mount in mounts]
            start = time.monotonic()
            podman(*command, str(context), timeout=900)
            took[service["image"]] = time.monotonic() - start
        return took

    def run_args(self, name: str) -> list[str]:
        """The `podman run` arguments for one service."""
        s = self.services[name]
        if s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"):
            raise ValueError(f"services.{name}.deploy: GPU reservations are not translated; scale it to 0")
        args = ["run", "-d", "--name", self.container(name), "--network", self.project, "--network-alias", name,
                "--label", f"rigl.stack={self.project}", "--label", f"com.docker.compose.service={name}"]
        environment = s.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        environment = {**environment, **self.extra_environment.get(name, {})}
        for key, value in environment.items():
            args += ["--env", f"{key}={'' if value is None else value}"]
        for volume in s.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith((".", "/")):
                source = str((self.compose_file.parent / source).resolve())
            elif source in self.volumes:
                source = f"{self.project}_{source}"
            else:
                raise ValueError(f"services.{name}.volumes: {source!r} is neither a path nor a declared volume")
            args += ["--volume", ":".join([source, target, *mode])]
        for port in s.get("ports", []):
            args += ["--publish", str(port)]
        for secret in s.get("secrets", []):
            if not isinstance(secret, str) or secret not in self.secrets:
                raise ValueError(f"services.{name}.secrets: {secret!r} is not a top-level file secret (long form "
                                 "not translated)")
            args += ["--volume", f"{self.secrets[secret]}:/run/secrets/{secret}:ro"]
        if "mem_limit" in s:
            args += ["--memory", str(s["mem_limit"])]
        if "logging" in s:
            args += ["--log-driver", s["logging"].get("driver", "json-file")]
            for option, value in (s["logging"].get("options") or {}).items():
                if option not in _LOG_OPTIONS:
                    raise ValueError(f"services.{name}.logging.options: {option!r} not translated")
                if _LOG_OPTIONS[option]:
                    args += ["--log-opt", f"{_LOG_OPTIONS[option]}={value}"]
        if "healthcheck" in s:
            check = s["healthcheck"]
            kind, *test = check["test"]
            if kind == "CMD-SHELL":
                args += ["--health-cmd", test[0]]
            elif kind == "CMD":
                args += ["--health-cmd", json.dumps(test)]
            else:
                raise ValueError(f"services.{name}.healthcheck.test: {kind!r} not translated")
            args += ["--health-interval", check.get("interval", "30s"), "--health-timeout", check.get("timeout", "30s"),
                     "--health-retries", str(check.get("retries", 3)),
                     "--health-start-period", check.get("start_period", "0s")]
        if "restart" in s:
            args += ["--restart", s["restart"]]
        if "stop_grace_period" in s:
            args += ["--stop-timeout", str(seconds(s["stop_grace_period"]))]
        if "shm_size" in s:
            args += ["--shm-size", str(s["shm_size"]).lower().removesuffix("b")]
        for limit, value in (s.get("ulimits") or {}).items():
            value = f"{value['soft']}:{value['hard']}" if isinstance(value, dict) else value
            args += ["--ulimit", f"{limit}={value}"]
        if "entrypoint" in s:
            entrypoint = s["entrypoint"]
            args += ["--entrypoint", json.dumps(entrypoint) if isinstance(entrypoint, list) else entrypoint]
        args.append(s["image"])
        command = s.get("command")
        if command is not None:
            args += command if isinstance(command, list) else ["sh", "-c", command]
        return args

    def order(self) -> list[str]:
        """Services in start order: each after those it depends on."""
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in path:
                raise ValueError(f"depends_on cycle: {' → '.join(path + (name,))}")
            for dependency in self.services[name].get("depends_on") or {}:
                visit(dependency, path + (name,))
            done.append(name)

        for name in self.services:
            visit(name, ())
        return done

    def up(self, health_timeout: float = 300) -> dict[str, float]:
        """Create the network and volumes and start every service, each once its `service_healthy`
        dependencies are healthy; returns each service's seconds from `up` until it was healthy (or
        started, for one without a healthcheck)."""
        start = time.monotonic()
        podman("network", "create", "--label", f"rigl.stack={self.project}", self.project)
        for volume in self.volumes:
            podman("volume", "create", "--label", f"rigl.stack={self.project}", f"{self.project}_{volume}")
        ready: dict[str, float] = {}
        for name in self.order():
            depends = self.services[name].get("depends_on") or {}
            for dependency, condition in (depends.items() if isinstance(depends, dict) else
                                          ((d, {"condition": "service_started"}) for d in depends)):
                if condition.get("condition") == "service_healthy" and dependency not in ready:
                    self.wait_healthy(dependency, health_timeout)
                    ready[dependency] = time.monotonic() - start
            podman(*self.run_args(name))
        for name in self.services:
            if name not in ready:
                if "healthcheck" in self.services[name]:
                    self.wait_healthy(name, health_timeout)
                ready[name] = time.monotonic() - start
        return ready

    def wait_healthy(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = podman("inspect", "--format", "{{.State.Status}}", self.container(name), check=False).stdout.strip()
            if state in ("exited", "dead"):
                raise RuntimeError(f"{name} exited before it was healthy:\n{self.logs(name)}")
            if podman("healthcheck", "run", self.container(name), check=False, timeout=120).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after {timeout}s:\n{self.logs(name)}")
            time.sleep(1)

    def exec(self, name: str, *command: str) -> str:
        return podman("exec", self.container(name), *command).stdout

    def logs(self, name: str, tail: int = 60) -> str:
        result = podman("logs", "--tail", str(tail), self.container(name), check=False)
        return result.stdout + result.stderr

    def down(self) -> None:
        """Stop and remove the containers (each within its grace period), the volumes and the network."""
        names = [n for n in reversed(self.order())] if self.services else []
        for name in names:
            podman("stop", "--time", str(seconds(self.services[name].get("stop_grace_period", "10s"))),
                   self.container(name), check=False, timeout=300)
        ids = podman("ps", "-aq", "--filter", f"label=rigl.stack={self.project}", check=False).stdout.split()
        if ids:
            podman("rm", "-f", "--time", "0", *ids, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "-f", f"{self.project}_{volume}", check=False)
        podman("network", "rm", "-f", self.project, check=False)
