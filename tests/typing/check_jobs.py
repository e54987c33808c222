"""Static typing of jobs: checked by mypy in CI (.ci/run), never run.

Each ``assert_type`` is a type mypy must infer; each ``# type: ignore[code]`` marks a line that
must be an error (``warn_unused_ignores``: if the error went away, the ignore is reported).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

import attrs
from typing_extensions import assert_type

import pgflow_py as pf


@attrs.frozen
class Email:
    to: str
    subject: str = ""


@attrs.frozen
class Receipt:
    message_id: str


@pf.job(queue="send_email", max_attempts=3)
def send_email(input: Email, ctx: pf.Context) -> Receipt:
    return Receipt(message_id=f"<{input.to}>")


assert_type(send_email, pf.Job[Email, Receipt])
assert_type(send_email.perform(Email("a@example.com")), Receipt)
assert_type(send_email.perform(Email("a@example.com"), None), Receipt)
send_email.perform({"to": "a@example.com"})  # type: ignore[arg-type]
send_email.perform(Receipt("x"))  # type: ignore[arg-type]
send_email.perform(Email("a@example.com"), ctx=1)  # type: ignore[arg-type]


async def in_a_loop() -> None:
    assert_type(await send_email.aperform(Email("a@example.com")), Receipt)
    await send_email.aperform("a@example.com")  # type: ignore[arg-type]


store = pf.connect(":memory:")
assert_type(store.start(send_email, Email("a@example.com")), pf.Run)
assert_type(store.start(send_email, Email("a@example.com"), delay=30, key="k", priority=1), pf.Run)
store.start(send_email, {"to": 123})  # type: ignore[misc]
store.start(send_email, Receipt("x"))  # type: ignore[misc]
assert_type(store.start_many(send_email, [Email("a"), Email("b")]), list[pf.Run])
store.start_many(send_email, [{"to": "a"}])  # type: ignore[misc]
store.start_many(send_email, Email("a"))  # type: ignore[arg-type]
# By slug the store cannot know the handler: any input is accepted (and checked by the worker).
store.start("send_email", {"to": "a@example.com"})


# async handlers: the output is what the coroutine returns
@dataclasses.dataclass
class Resize:
    path: str
    width: int


@pf.job(queue="resize")
async def resize(input: Resize, ctx: pf.Context) -> int:
    return input.width


assert_type(resize, pf.Job[Resize, int])
assert_type(resize.perform(Resize("a.png", 10)), int)
store.start(resize, Email("a"))  # type: ignore[misc]


# bare @pf.job, and @pf.perform below it, keep the types
@pf.job
def bare(input: int, ctx: pf.Context) -> str:
    return str(input)


assert_type(bare, pf.Job[int, str])
bare.perform("1")  # type: ignore[arg-type]


@pf.job(queue="notify")
@pf.perform("send")
def notify(input: Email, ctx: pf.Context) -> None:
    return None


assert_type(notify, pf.Job[Email, None])
assert_type(notify.perform(Email("a")), None)


@pf.job(queue="notify_bare")
@pf.perform
def notify_bare(input: Email, ctx: pf.Context) -> None:
    return None


assert_type(notify_bare, pf.Job[Email, None])


# dict-typed handlers take dicts, as before
@pf.job(queue="plain")
def plain(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    return input


assert_type(plain, pf.Job[dict[str, Any], dict[str, Any]])
store.start(plain, {"any": "thing"})
store.start(plain, ["not", "a", "dict"])  # type: ignore[misc]


# TypedDict inputs: mypy infers a dict literal's type on its own (dict[str, int]), so pass the
# TypedDict's constructor (or an annotated variable).
class Point(TypedDict):
    x: int
    y: int


@pf.job(queue="plot")
def plot(input: Point, ctx: pf.Context) -> None:
    return None


store.start(plot, Point(x=1, y=2))
point: Point = {"x": 1, "y": 2}
store.start(plot, point)
store.start(plot, Email("a"))  # type: ignore[misc]


# a handler must take (input, ctx)
def no_ctx(input: int) -> None: ...


def wrong_ctx(input: int, ctx: int) -> None: ...


pf.job(queue="no_ctx")(no_ctx)  # type: ignore[arg-type]
pf.job(queue="wrong_ctx")(wrong_ctx)  # type: ignore[arg-type]

# Job is a Flow: everything taking flows takes it
flows: list[pf.Flow] = [send_email, resize, bare]
pf.run_flows(flows, store=store, until_idle=True)
