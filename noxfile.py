"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s docs``.

``nox -s bench [-- --only map --repeat 1]`` prints the benchmarks (not run by default).
``nox -s docs -- serve`` serves the site at http://127.0.0.1:8000/ while you edit it.
"""

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]


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
    session.run("ruff", "check", "pgflow_py", "tests", "examples", "benchmarks", "tools")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", "mypy>=1.8")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site into site/ with every warning an error (a broken link or reference)."""
    session.install("-e", ".[docs]")
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # Material's notice, not a warning about the site
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)
