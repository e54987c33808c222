"""The examples of the tutorial and the how-to guides run, and print what the pages show.

On each page below, a fenced block whose info string is exactly ``python`` is a complete program:
it runs in a fresh directory and must exit 0. When the block right after it is a plain fence
(no info string), that block is its output, compared with what the program printed once run ids,
timestamps and timings are masked. Not run: blocks labelled ``py`` (fragments, such as a call to
show), and ``python`` blocks whose first line is a ``# path/file.py`` comment (a file of a
multi-file example). docs/how-to/typed-jobs.md and docs/explanation/coming-from.md have tests of
their own (test_docs_typed_jobs.py, test_docs.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import Block, parse_blocks, run_block

DOCS = Path(__file__).parent.parent / "docs"
PAGES = [
    "index.md",
    "quickstart.md",
    "how-to/retries.md",
    "how-to/scheduling.md",
    "how-to/priorities-and-concurrency.md",
    "how-to/flows.md",
    "how-to/failures.md",
    "how-to/testing.md",
    "how-to/monitoring.md",
    "how-to/postgres.md",
]
_A_FILE = re.compile(r"^# [\w./-]+\.py\s*$")


def _programs() -> list[tuple[str, Block, Block | None]]:
    found = []
    for name in PAGES:
        blocks = parse_blocks((DOCS / name).read_text(encoding="utf-8"))
        for i, block in enumerate(blocks):
            if block.info != "python" or _A_FILE.match(block.source.split("\n", 1)[0]):
                continue
            after = blocks[i + 1] if i + 1 < len(blocks) else None
            shown = after if after is not None and after.info == "" else None
            found.append((name, block, shown))
    return found


PROGRAMS = _programs()

_MASKS = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<id>"),
    (re.compile(r"\brun [0-9a-f]{8}\b"), "run <id>"),
    (re.compile(r"\b\d+\.\d+s\b"), "<t>s"),
]


def _masked(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def test_the_pages_have_examples() -> None:
    pages = {name for name, _, _ in PROGRAMS}
    # The testing guide's test file runs under pytest (below); PostgreSQL's snippets need a server.
    assert pages == set(PAGES) - {"how-to/testing.md", "how-to/postgres.md"}
    assert sum(shown is not None for _, _, shown in PROGRAMS) >= 12


@pytest.mark.parametrize(
    ("page", "block", "shown"), PROGRAMS, ids=[f"{n}:{b.line}" for n, b, _ in PROGRAMS]
)
def test_example_runs_and_prints_what_the_page_shows(
    page: str, block: Block, shown: Block | None, tmp_path: Path
) -> None:
    done = run_block(f"docs/{page}", block, tmp_path, timeout=120)
    if shown is not None:
        assert _masked(done.stdout) == _masked(shown.source), f"docs/{page}:{block.line}"


def test_the_testing_guide_test_file_passes(tmp_path: Path) -> None:
    """docs/how-to/testing.md, "In one file": the test file passes under pytest as shown."""
    blocks = parse_blocks((DOCS / "how-to" / "testing.md").read_text(encoding="utf-8"))
    (test_file,) = [b for b in blocks if b.source.startswith("# test_greet.py\n")]
    (tmp_path / "test_greet.py").write_text(test_file.source, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_greet.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_the_readme_links_point_at_files_that_exist() -> None:
    """The site checks its own links (mkdocs build --strict); the README is outside it."""
    root = DOCS.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert len(local) >= 8
    missing = [t for t in local if not (root / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
