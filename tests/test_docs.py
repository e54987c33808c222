"""Every pgflow_py snippet of docs/explanation/coming-from.md runs as its own program, so the page never rots.

A snippet is a fenced block whose info string is exactly ``python``; the other systems' snippets
(```` ```python celery ````, ```` ```elixir ````, ...) are sketches and are not run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

PAGE = Path(__file__).parent.parent / "docs" / "explanation" / "coming-from.md"

SYSTEMS = ("PhoenixKit", "RouteMQ", "Portico", "Celery", "Huey", "RQ")

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<title>.+?)\s*#*\s*$")


@attrs.frozen
class Block:
    index: int
    info: str
    source: str
    line: int  # 1-based line of the opening fence
    heading: str  # nearest heading above the block
    section: str  # nearest level-2 heading above the block

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.index:02d}-{slug}"


def parse_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown page, each with the headings it sits under."""
    blocks: list[Block] = []
    heading = section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            title = _HEADING.match(lines[i])
            if title is not None:
                heading = title["title"]
                if len(title["level"]) <= 2:
                    section = heading
            i += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].lstrip().startswith(fence[0] * len(fence))
            and lines[j].strip() == fence[0] * len(lines[j].strip())
        ):
            body.append(lines[j])
            j += 1
        blocks.append(
            Block(len(blocks), opening["info"].strip(), "\n".join(body) + "\n", i + 1, heading, section)
        )
        i = j + 1
    return blocks


BLOCKS = parse_blocks(PAGE.read_text(encoding="utf-8"))
SNIPPETS = [b for b in BLOCKS if b.info == "python"]


def _numbered(source: str) -> str:
    return "\n".join(f"{n:3d}  {line}" for n, line in enumerate(source.splitlines(), 1))


def run_block(
    where: str, block: Block, tmp_path: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``block`` as a program of its own in ``tmp_path``; fail the test, naming ``where``
    (the page) and the block's line and section, unless it exits with 0."""
    script = tmp_path / "snippet.py"
    script.write_text(block.source, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{where}:{block.line} (section {block.heading!r}) exited with {done.returncode}\n"
        f"--- source ---\n{_numbered(block.source)}\n"
        f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    )
    return done


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda b: b.id)
def test_snippet_runs(block: Block, tmp_path: Path) -> None:
    run_block(PAGE.name, block, tmp_path)


def test_every_system_has_a_pgflow_snippet() -> None:
    sections = {b.section for b in BLOCKS}
    for system in SYSTEMS:
        matching = [s for s in sections if re.search(rf"\b{re.escape(system)}\b", s)]
        assert matching, f"no section about {system} in {PAGE.name}; sections: {sorted(sections)}"
        ours = [b for b in SNIPPETS if b.section in matching]
        theirs = [b for b in BLOCKS if b.section in matching and b.info not in ("python", "")]
        assert ours, f"section {matching} has no plain ```python (pgflow_py) snippet"
        assert theirs, f"section {matching} has no snippet of {system} itself"


def test_other_systems_snippets_are_labelled() -> None:
    """A plain ``` block would be neither run nor recognised as another system's snippet."""
    unlabelled = [b.line for b in BLOCKS if b.info == ""]
    assert not unlabelled, f"fenced blocks without an info string at lines {unlabelled}"
    assert len(SNIPPETS) >= len(SYSTEMS)


def test_parse_blocks() -> None:
    text = (
        "# Page\n\n## Celery\n\n```python celery\n@app.task\n```\n\n### Beat\n\n"
        "````python\nprint('```')\n````\n\n## RQ\n\n```python\nx = 1\n```\n"
    )
    blocks = parse_blocks(text)
    assert [(b.info, b.heading, b.section, b.line) for b in blocks] == [
        ("python celery", "Celery", "Celery", 5),
        ("python", "Beat", "Celery", 11),
        ("python", "RQ", "RQ", 17),
    ]
    assert blocks[1].source == "print('```')\n"
    assert blocks[1].id == "01-beat"


def test_the_readme_snippet_runs(tmp_path: Path):
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in parse_blocks(readme) if b.info == "python" and b.heading == "In one screen"]
    done = subprocess.run(
        [sys.executable, "-c", block.source], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'sent': True}"
