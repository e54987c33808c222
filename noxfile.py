"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``.

``nox -s bench [-- --only map --repeat 1]`` prints the benchmarks (not run by default).
"""

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test,integrations]")
    # coverage must start before pytest loads the pgflow_py plugin, hence `coverage run`.
    # Subprocesses (workers, isolation children) are measured too, each into a .coverage.*
    # file of its own (see [tool.coverage.run] in pyproject.toml): combine them, then report.
    session.run("coverage", "erase")
    try:
        session.run("coverage", "run", "-m", "pytest", *session.posargs)
    finally:  # a report even when tests fail, and no .coverage.* files left behind
        session.run("coverage", "combine", "--quiet")
        session.run("coverage", "report", "-m")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.4")
    session.run("ruff", "check", "pgflow_py", "tests", "examples", "benchmarks")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", "mypy>=1.8")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
