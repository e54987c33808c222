"""Static typing of flows and their steps: checked by mypy in CI (.ci/run), never run."""

from __future__ import annotations

from typing import Any, TypedDict

import attrs
from typing_extensions import assert_type

import pgflow_py as pf


@attrs.frozen
class Site:
    url: str


@attrs.frozen
class Page:
    url: str
    words: int


class SummaryDeps(TypedDict):
    website: list[str]
    pages: list[Page]


analyze = pf.flow("analyze_website", max_attempts=3)
assert_type(analyze, pf.Flow)


@analyze.step()
def website(input: Site, ctx: pf.Context) -> list[str]:
    return [input.url]


assert_type(website, pf.Step[Site, list[str]])


@analyze.map(array=website)
async def pages(item: str, ctx: pf.Context) -> Page:
    return Page(item, 0)


assert_type(pages, pf.MapStep[str, Page])


@analyze.step(depends_on=[website, pages])
def summary(deps: SummaryDeps, ctx: pf.Context) -> int:
    return sum(page.words for page in deps["pages"])


assert_type(summary, pf.Step[SummaryDeps, int])

# The run output: {leaf: output}, as JSON
assert_type(analyze.perform(Site("https://example.com")), dict[str, Any] | None)
assert_type(analyze.perform({"url": "https://example.com"}), dict[str, Any] | None)

# One step, by object: checked against its handler
assert_type(analyze.perform_step(website, Site("https://example.com")), list[str])
assert_type(analyze.perform_step(pages, ["https://example.com"]), list[Page])
assert_type(analyze.perform_step(summary, SummaryDeps(website=[], pages=[])), int)
analyze.perform_step(summary, {"website": []})  # type: ignore[misc]
analyze.perform_step(website, "https://example.com")  # type: ignore[misc]
analyze.perform_step(pages, [1, 2])  # type: ignore[misc]
# ... or by slug, unchecked
assert_type(analyze.perform_step("summary", {"website": []}), Any)

store = pf.connect(":memory:")
store.start(analyze, {"url": "https://example.com"})  # a flow's input is not typed
store.start_many(analyze, [Site("a"), Site("b")])


# untyped handlers stay Any
@analyze.step(depends_on=["summary"])
def untyped(deps, ctx):  # type: ignore[no-untyped-def]
    return deps


assert_type(untyped, pf.Step[Any, Any])

# depends_on takes steps of any type
@analyze.step(depends_on=[summary, untyped])
def last(deps: dict[str, Any], ctx: pf.Context) -> None:
    return None
