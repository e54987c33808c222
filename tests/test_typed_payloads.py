"""Typed payloads: a handler annotated with an attrs class, a dataclass or a TypedDict receives
its input structured into that type, in ``perform`` and in the runner alike (SQLite and
PostgreSQL); its typed output is stored as JSON; an input that does not fit fails the run at
once with a line naming the field."""

from __future__ import annotations

import dataclasses
import enum
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

import attrs
import pytest
from _helpers import drain

import pgflow_py as pf
from pgflow_py.payloads import payloads_of


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


@attrs.frozen
class Email:
    to: str
    subject: str = ""
    priority: Priority = Priority.LOW
    send_at: datetime | None = None


@attrs.frozen
class Receipt:
    to: str
    sent_at: datetime


SEEN: list[Any] = []


@pf.job(queue="typed_send", max_attempts=3, base_delay=0)
def typed_send(input: Email, ctx: pf.Context) -> Receipt:
    SEEN.append(input)
    assert isinstance(input, Email)
    return Receipt(to=input.to, sent_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc))


@dataclasses.dataclass
class Resize:
    path: str
    width: int
    height: int = 0


@pf.job(queue="typed_resize")
async def typed_resize(input: Resize, ctx: pf.Context) -> Resize:
    assert isinstance(input, Resize)
    return Resize(input.path, input.width // 2, input.height // 2)


@attrs.frozen
class Order:
    id: int
    lines: list[Line]


@attrs.frozen
class Line:
    sku: str
    quantity: int


@attrs.frozen
class Priced:
    sku: str
    cents: int


class TotalDeps(TypedDict):
    order: Order
    priced: list[Priced]


@attrs.frozen
class NoteDeps:
    total: int


orders = pf.flow("typed_orders")


@orders.step()
def order(input: Order, ctx: pf.Context) -> Order:
    assert isinstance(input, Order) and all(isinstance(line, Line) for line in input.lines)
    return input


# The map needs an array: a step that hands over the order's lines.
@orders.step(depends_on=[order])
def order_lines(deps: dict[str, Any], ctx: pf.Context) -> list[dict[str, Any]]:
    assert type(deps["order"]) is dict  # untyped: the JSON itself
    lines: list[dict[str, Any]] = deps["order"]["lines"]
    return lines


@orders.map(array="order_lines")
def priced(item: Line, ctx: pf.Context) -> Priced:
    assert isinstance(item, Line)
    return Priced(item.sku, 250 * item.quantity)


@orders.step(depends_on=[order, priced])
def total(deps: TotalDeps, ctx: pf.Context) -> int:
    assert isinstance(deps["order"], Order)
    assert all(isinstance(p, Priced) for p in deps["priced"])
    return sum(p.cents for p in deps["priced"])


@orders.step(depends_on=[total])
def note(deps: NoteDeps, ctx: pf.Context) -> str:
    assert isinstance(deps, NoteDeps)
    return f"order {ctx.flow_input['id']}: {deps.total} cents"


line_costs = pf.flow("typed_line_costs", max_attempts=3, base_delay=0)


@line_costs.map()
def line_cost(item: Line, ctx: pf.Context) -> int:
    return 250 * item.quantity


ORDER = Order(7, [Line("apple", 2), Line("pear", 1)])


# --- perform -------------------------------------------------------------------------------------


def test_perform_structures_the_input_and_returns_the_typed_output() -> None:
    receipt = typed_send.perform(Email("a@example.com", priority=Priority.HIGH))
    assert receipt == Receipt("a@example.com", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert SEEN[-1] == Email("a@example.com", priority=Priority.HIGH)
    # The stored JSON form works as input too: what a run started by slug holds.
    typed_send.perform({"to": "b@example.com", "priority": "high"})
    assert SEEN[-1] == Email("b@example.com", priority=Priority.HIGH)


def test_aperform_of_an_async_dataclass_handler() -> None:
    import asyncio

    assert asyncio.run(typed_resize.aperform(Resize("a.png", 100, 50))) == Resize("a.png", 50, 25)
    assert typed_resize.perform({"path": "b.png", "width": 10}) == Resize("b.png", 5, 0)


def test_flow_perform_structures_roots_map_items_and_deps() -> None:
    output = orders.perform(ORDER)
    # A flow's run output is the stored JSON of its leaves.
    assert output == {"note": "order 7: 750 cents"}
    assert orders.perform_step("priced", [{"sku": "fig", "quantity": 3}]) == [Priced("fig", 750)]
    assert orders.perform_step(
        "total", {"order": attrs.asdict(ORDER), "priced": [{"sku": "x", "cents": 5}]}
    ) == 5
    ctx = pf.Context(flow_slug="typed_orders", step_slug="note", flow_input={"id": 9})
    assert orders.perform_step("note", {"total": 3}, ctx) == "order 9: 3 cents"


def test_perform_refuses_an_input_that_does_not_fit_naming_the_field() -> None:
    with pytest.raises(pf.InputError) as info:
        typed_send.perform({"to": 123})
    assert str(info.value) == (
        "job 'typed_send': the input does not fit Email: to: expected str, got int 123"
    )
    with pytest.raises(pf.InputError, match=r"subject: expected str, got null None; "
                       r"priority: invalid value for type, expected Priority"):
        typed_send.perform({"to": "a", "subject": None, "priority": "urgent"})
    with pytest.raises(pf.InputError, match=r"the input does not fit Email: to: required field missing"):
        typed_send.perform({})
    with pytest.raises(pf.InputError, match=r"expected an object, got array"):
        typed_send.perform([1])
    with pytest.raises(pf.InputError, match=r"flow 'typed_orders', step 'priced', task 1: "
                       r"the input does not fit Line: quantity: expected int, got str '2'"):
        orders.perform_step("priced", [{"sku": "a", "quantity": 1}, {"sku": "b", "quantity": "2"}])


def test_perform_step_takes_the_step_object() -> None:
    assert orders.perform_step(priced, [{"sku": "fig", "quantity": 1}]) == [Priced("fig", 250)]
    assert isinstance(priced, pf.MapStep) and isinstance(priced, pf.Step)
    assert not isinstance(order, pf.MapStep)
    assert orders.perform_step(order, ORDER) == ORDER
    with pytest.raises(pf.DefinitionError, match=r"flow 'typed_line_costs': step 'order' belongs "
                       r"to flow 'typed_orders'"):
        line_costs.perform_step(order, ORDER)


# --- the runner, SQLite and PostgreSQL -----------------------------------------------------------


def test_runner_structures_inputs_and_stores_typed_outputs_as_json(store: pf.Store) -> None:
    run = store.start(typed_send, Email("c@example.com", send_at=datetime(2031, 5, 6, tzinfo=timezone.utc)))
    # start unstructures with the same converter: datetimes and enums as JSON strings.
    assert run.input == {
        "to": "c@example.com", "subject": "", "priority": "low",
        "send_at": "2031-05-06T00:00:00+00:00",
    }
    resized = store.start(typed_resize, Resize("a.png", 8, 4))
    stats = drain(store, typed_send, typed_resize)
    assert stats.completed == 2
    assert store.get_run(run.id).output == {"to": "c@example.com", "sent_at": "2030-01-02T03:04:05+00:00"}
    assert SEEN[-1] == Email("c@example.com", send_at=datetime(2031, 5, 6, tzinfo=timezone.utc))
    assert store.get_run(resized.id).output == {"path": "a.png", "width": 4, "height": 2}


def test_runner_runs_a_typed_flow_as_perform_does(store: pf.Store) -> None:
    run = store.start(orders, ORDER)
    drain(store, orders)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.COMPLETED, done.history
    assert done.output == orders.perform(ORDER) == {"note": "order 7: 750 cents"}
    assert done.step("priced").output == [{"sku": "apple", "cents": 500}, {"sku": "pear", "cents": 250}]


def test_an_input_that_does_not_fit_fails_for_good_with_one_line(store: pf.Store) -> None:
    run = store.start(typed_send, {"to": 123, "priority": "urgent"})
    stats = drain(store, typed_send)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.FAILED
    assert (stats.failed, stats.retried) == (1, 0)
    assert done.attempts == 1  # max_attempts=3, but the same input would never fit
    assert done.error == (
        "InputError: job 'typed_send': the input does not fit Email: "
        "to: expected str, got int 123; priority: invalid value for type, expected Priority"
    )
    (record,) = done.history
    assert record.error == done.error
    assert record.traceback is not None
    assert "Structuring class Email @ attribute to" in record.traceback  # cattrs' own detail


def test_a_bad_map_item_fails_the_run_without_retry(store: pf.Store) -> None:
    run = store.start(line_costs, [{"sku": "a", "quantity": 1}, {"sku": "b"}])
    stats = drain(store, line_costs)
    done = store.get_run(run.id)
    assert done.status is pf.RunStatus.FAILED
    assert stats.retried == 0
    assert done.error == (
        "InputError: flow 'typed_line_costs', step 'line_cost': the input does not fit Line: "
        "quantity: required field missing"
    )
    assert [h.task_index for h in done.history] == [1]


# --- untyped handlers keep the JSON itself -------------------------------------------------------


def _plain(input, ctx):  # type: ignore[no-untyped-def]
    return input


def _as_dict(input: dict, ctx: pf.Context) -> dict:  # type: ignore[type-arg]
    return input


def _as_any(input: Any, ctx: Any) -> Any:
    return input


def _as_json(input: dict[str, list[Any]], ctx: object) -> list[dict[str, Any]]:
    return [input]


@pytest.mark.parametrize("fn", [_plain, _as_dict, _as_any, _as_json])
def test_untyped_and_json_annotated_handlers_are_not_converted(fn: Any) -> None:
    assert payloads_of(fn, "job 'x'") is None  # nothing to do per call: today's cost
    job = pf.job(queue=f"plain{fn.__name__}")(fn)
    value = {"a": [1, "2", None]}
    out = job.perform(value)
    assert out == value or out == [value]


# --- the converter -------------------------------------------------------------------------------


class Cents:
    """A type cattrs knows nothing about (registered once, below: the converter is global)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cents) and other.value == self.value


@attrs.frozen
class Invoice:
    amount: Cents
    currency: str = "EUR"


@pf.job(queue="typed_invoice")
def typed_invoice(input: Invoice, ctx: pf.Context) -> Invoice:
    return Invoice(Cents(input.amount.value * 2), input.currency)


def test_other_types_need_a_hook_and_the_error_says_how_to_register_one() -> None:
    with pytest.raises(pf.InputError, match=r"no cattrs hook structures Cents: register one "
                       r"with pf.converter.register_structure_hook\(Cents, \.\.\.\)"):
        typed_invoice.perform({"amount": "125"})
    pf.converter.register_structure_hook(Cents, lambda value, _: Cents(int(value)))
    pf.converter.register_unstructure_hook(Cents, lambda cents: str(cents.value))
    assert typed_invoice.perform({"amount": "125"}) == Invoice(Cents(250))
    assert pf.converter.unstructure(Invoice(Cents(1))) == {"amount": "1", "currency": "EUR"}


def test_a_string_annotation_naming_a_local_class_fails_at_decoration() -> None:
    source = textwrap.dedent("""
        from __future__ import annotations
        import attrs, pgflow_py as pf

        def define():
            @attrs.frozen
            class Local:
                x: int

            @pf.job(queue="local_typed")
            def local_typed(input: Local, ctx: pf.Context) -> None: ...
        define()
    """)
    with pytest.raises(pf.DefinitionError, match=r"job 'local_typed': the input's annotation "
                       r"\(input\) 'Local' cannot be resolved .*define the type at module level"):
        exec(compile(source, "<typed>", "exec"), {"__name__": "typed_local"})


# --- isolation="process": the child structures its own input --------------------------------------

HANDLERS = textwrap.dedent("""
    import attrs
    import pgflow_py as pf

    @attrs.frozen
    class Point:
        x: int
        y: int

    @pf.job(queue="iso_typed", isolation="process", max_attempts=3, base_delay=0)
    def iso_typed(input: Point, ctx: pf.Context) -> Point:
        assert isinstance(input, Point)
        return Point(input.y, input.x)
""")


def test_a_process_isolated_handler_is_typed_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "iso_typed_handlers.py").write_text(HANDLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("iso_typed_handlers", None)
    import iso_typed_handlers as handlers

    try:
        with pf.connect(tmp_path / "iso.db") as store:
            good = store.start(handlers.iso_typed, handlers.Point(1, 2))
            bad = store.start(handlers.iso_typed, {"x": "1", "y": 2})
            pf.run_flows([handlers.iso_typed], store=store, until_idle=True)
            good, bad = store.get_run(good.id), store.get_run(bad.id)
    finally:
        sys.modules.pop("iso_typed_handlers", None)
    assert good.output == {"x": 2, "y": 1}
    assert bad.status is pf.RunStatus.FAILED and bad.attempts == 1
    assert bad.error == (
        "InputError: job 'iso_typed': the input does not fit Point: x: expected int, got str '1'"
    )
    assert bad.history[0].traceback is not None and "Structuring class Point" in bad.history[0].traceback
