"""deploy/: the systemd units, the Dockerfile and the compose file, checked without deploying.

What each check can see: ``systemd-analyze verify`` parses the units as systemd would (skipped
where it is not installed); the compose file is parsed as YAML; the Dockerfile is parsed here
instruction by instruction (``docker build`` needs a daemon, which CI does not have). On top,
every ``pgflow`` command line in them is parsed by the CLI itself, so an option that does not
exist fails here, and each stop timeout must outlast the worker's shutdown timeout.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import pytest

from pgflow_py.cli import main as cli

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
UNITS = ("pgflow-worker.service", "pgflow-dashboard.service")


def _parse_pgflow(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a ``pgflow SUBCOMMAND ...`` command line as the CLI would; return the subcommand
    and its parameters. Unknown options and bad values raise click's errors."""
    assert Path(argv[0]).name == "pgflow", argv
    name = argv[1]
    command = cli.commands[name]
    with command.make_context(name, list(argv[2:])) as ctx:
        return name, dict(ctx.params)


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(DEPLOY / name, encoding="utf-8")
    return parser


def _seconds(value: str) -> float:
    """A systemd or compose duration: ``45``, ``45s``, ``1min 30s``, ``1m30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts, value
    return sum(float(n) * units[u] for n, u in parts)


# --- systemd --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    pgflow = Path(sys.executable).parent / "pgflow"
    assert pgflow.exists(), "the pgflow script of this environment"
    for name in UNITS:
        # verify checks that ExecStart's program exists: point it at this environment's.
        text = (DEPLOY / name).read_text(encoding="utf-8")
        text = text.replace("/srv/myapp/.venv/bin/pgflow", str(pgflow))
        text = text.replace("WorkingDirectory=/srv/myapp", f"WorkingDirectory={tmp_path}")
        (tmp_path / name).write_text(text, encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True, text=True, timeout=120,
    )
    # verify exits 0 even for an unknown key or a bad value (it warns and ignores them): any
    # line about our units is a mistake.
    about_ours = [line for line in (done.stdout + done.stderr).splitlines()
                  if any(n in line for n in UNITS)]
    assert done.returncode == 0 and about_ours == [], done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is worth something: verify reports a misspelt key and a bad duration."""
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nTimeoutStopSecs=45\nRestartSec=soon\n")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)],
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert "TimeoutStopSecs" in output and "soon" in output, output


def test_the_worker_unit_runs_a_real_worker_command_and_outlasts_its_shutdown() -> None:
    service = _unit("pgflow-worker.service")["Service"]
    name, params = _parse_pgflow(shlex.split(service["ExecStart"]))
    assert name == "worker"
    assert params["modules"] == ("myapp.jobs",)
    assert service["KillSignal"] == "SIGTERM"
    assert _seconds(service["TimeoutStopSec"]) > params["shutdown_timeout"] + 10
    assert service["User"] != "root"
    assert service["Environment"].startswith("PGFLOW_DATABASE=/var/lib/pgflow/")
    assert service["StateDirectory"] == "pgflow"  # /var/lib/pgflow, writable by User


def test_the_dashboard_unit_runs_a_real_dashboard_command_on_loopback() -> None:
    service = _unit("pgflow-dashboard.service")["Service"]
    name, params = _parse_pgflow(shlex.split(service["ExecStart"]))
    assert name == "dashboard"
    assert (params["host"], params["read_only"]) == ("127.0.0.1", True)
    # The same database as the worker's.
    assert service["Environment"] == _unit("pgflow-worker.service")["Service"]["Environment"]


# --- compose ------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the test extra)")
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    return loaded


def test_compose_has_a_worker_and_a_dashboard_sharing_the_database_volume() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"worker", "dashboard"}
    assert set(compose["volumes"]) == {"pgflow-data"}
    for service in services.values():
        assert service["volumes"] == ["pgflow-data:/data"]
        assert service["environment"]["PGFLOW_DATABASE"] == "/data/pgflow.db"
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_compose_commands_are_real_and_the_worker_outlasts_its_shutdown() -> None:
    services = _compose()["services"]
    name, worker = _parse_pgflow(services["worker"]["command"])
    assert name == "worker"
    assert _seconds(services["worker"]["stop_grace_period"]) > worker["shutdown_timeout"] + 10
    name, dashboard = _parse_pgflow(services["dashboard"]["command"])
    assert name == "dashboard"
    assert dashboard["read_only"] is True
    # Published on the host's loopback only, on the port the dashboard listens on.
    assert services["dashboard"]["ports"] == [f"127.0.0.1:{dashboard['port']}:{dashboard['port']}"]


# --- Dockerfile ---------------------------------------------------------------------------------

_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        word, _, rest = text.partition(" ")
        instructions.append((word, rest.strip()))
    assert not pending, "a continuation line ends the file"
    return instructions


def test_the_dockerfile_parses() -> None:
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    unknown = [word for word, _ in instructions if word not in _INSTRUCTIONS]
    assert unknown == [], "instructions must be upper-case Dockerfile instructions"
    for word, rest in instructions:
        if word in ("CMD", "ENTRYPOINT", "VOLUME"):
            assert isinstance(json.loads(rest), list), f"{word} in exec (JSON) form: {rest}"
        if word in ("COPY", "ADD"):
            *sources, _dest = shlex.split(rest)
            for source in sources:  # relative to the build context: the repository root
                assert (ROOT / source).exists(), f"{word} {source}: not in the build context"


def test_the_dockerfile_installs_real_extras_runs_a_real_worker_and_not_as_root() -> None:
    instructions = _dockerfile()
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    extras = re.search(r"pip install '/src\[([a-z,]+)\]'", runs)
    assert extras is not None, runs
    provided = set(metadata.metadata("pgflow_py").get_all("Provides-Extra") or ())
    assert set(extras[1].split(",")) <= provided
    (cmd,) = [json.loads(rest) for word, rest in instructions if word == "CMD"]
    name, params = _parse_pgflow(cmd)
    assert name == "worker"
    # The module the worker serves is one the image copies into its WORKDIR, and defines jobs.
    (workdir,) = [rest for word, rest in instructions if word == "WORKDIR"]
    copied = [shlex.split(rest) for word, rest in instructions if word == "COPY"]
    (module,) = params["modules"]
    assert [f"examples/{module}.py", f"{workdir}/"] in copied
    from pgflow_py.cli.worker import flows_in_modules

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        assert [f.slug for f in flows_in_modules([module])] == ["greet"]
    finally:
        sys.path.remove(str(ROOT / "examples"))
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("STOPSIGNAL", "SIGTERM") in instructions


def test_the_docker_build_context_leaves_out_local_environments() -> None:
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert {".git", ".venv", "**/*.db"} <= set(ignored)


def test_a_bad_option_in_a_command_line_would_fail_these_checks() -> None:
    with pytest.raises(click.UsageError):
        _parse_pgflow(["pgflow", "worker", "--shutdown-grace", "30"])
