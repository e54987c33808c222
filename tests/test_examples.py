"""Every example runs as a test, so the examples never rot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import pgflow_py as pf

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))

# Examples of integrations, and what they need beyond the test extra (the integrations extra).
NEEDS = {"fastapi_app": ("fastapi", "httpx")}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would be: annotations (typed payloads) are resolved in the module.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_there_are_examples():
    assert any(p.name == "quickstart.py" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_main_completes_its_runs(path: Path, tmp_path: Path):
    for name in NEEDS.get(path.stem, ()):
        pytest.importorskip(name, reason=f"{name} is not installed (the integrations extra)")
    module = _load(path)
    result = module.main(str(tmp_path / f"{path.stem}.db"))
    runs = result if isinstance(result, list) else [result]
    assert runs, "main() should return the runs it processed"
    for run in runs:
        assert isinstance(run, pf.Run)
        assert run.status is pf.RunStatus.COMPLETED, (run.status, run.error)


def test_quickstart_as_the_readme_runs_it(tmp_path: Path):
    script = Path(__file__).parent.parent / "examples" / "quickstart.py"
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pgflow.db").exists()
    assert sum(" completed " in line for line in done.stdout.splitlines()) == 3
    assert "Hello, Ada!" in done.stdout
