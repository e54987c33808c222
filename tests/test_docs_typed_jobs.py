"""Every plain ```python block of docs/how-to/typed-jobs.md runs as its own program, so it never rots."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_docs import Block, parse_blocks, run_block

PAGE = Path(__file__).parent.parent / "docs" / "how-to" / "typed-jobs.md"
SNIPPETS = [b for b in parse_blocks(PAGE.read_text(encoding="utf-8")) if b.info == "python"]


def test_the_page_has_its_examples() -> None:
    headings = {b.heading for b in SNIPPETS}
    assert {"With attrs", "With dataclasses, async handlers and flows",
            "When the input does not fit", "The converter: custom types"} <= headings


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda b: b.id)
def test_snippet_runs(block: Block, tmp_path: Path) -> None:
    run_block(PAGE.name, block, tmp_path)
