"""Flows and a database of runs in every state, for the dashboard's browser tests and its
screenshots (``python tests/dashboard_demo.py demo.db`` fills a file and prints the command to
look at it)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pgflow_py as pf

CARD_ACCEPTED = {"declined": False}
"""Set ``declined`` to ``True`` and a ``card: "declined"`` order charges: what a fix deployed
after the failure would do."""

orders = pf.flow("process_order", max_attempts=3, base_delay=0.01, timeout=10)


@orders.step()
def validate(input: dict[str, Any], ctx: pf.Context) -> list[dict[str, Any]]:
    if not input.get("items"):
        raise ValueError("an order needs at least one item")
    return list(input["items"])


@orders.map(array=validate)
def reserve(item: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    return {"sku": item["sku"], "reserved": item["qty"]}


@orders.step(depends_on=[validate])
def charge(deps: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    card = ctx.flow_input.get("card", "visa")
    if card == "declined" and not CARD_ACCEPTED["declined"]:
        raise PaymentDeclined(f"card declined for {_total(deps['validate']):.2f} EUR")
    return {"charged": _total(deps["validate"]), "card": card}


def _total(items: list[dict[str, Any]]) -> float:
    return float(sum(i["price"] * i["qty"] for i in items))


@orders.step(if_={"gift": True})
def wrap_gift(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    """Only for gifts: other orders skip it (its condition is not met) and ship without it."""
    return {"wrapped": True}


@orders.step(depends_on=[charge, reserve, wrap_gift])
def ship(deps: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    return {"parcels": len(deps["reserve"]), "carrier": "DHL", "gift": "wrap_gift" in deps}


@orders.step(depends_on=[ship])
def notify(deps: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    return {"sent_to": ctx.flow_input.get("email", "customer@example.com")}


class PaymentDeclined(Exception):
    pass


@pf.job(queue="send_email", max_attempts=2, base_delay=0.01)
def send_email(input: dict[str, Any], ctx: pf.Context) -> dict[str, Any]:
    if "@" not in input.get("to", ""):
        raise ValueError(f"not an e-mail address: {input.get('to')!r}")
    return {"sent": True}


@pf.job(queue="nightly_report")
def nightly_report(input: Any, ctx: pf.Context) -> dict[str, Any]:
    return {"rows": 1200}


FLOWS: list[pf.Flow] = [orders, send_email, nightly_report]


def order(n: int, card: str = "visa") -> dict[str, Any]:
    return {
        "order": n, "card": card, "email": f"buyer{n}@example.com", "gift": n % 4 == 0,
        "items": [{"sku": f"SKU-{n}-{i}", "qty": 1 + i, "price": 9.5 + i} for i in range(1 + n % 3)],
    }


def fill(store: pf.Store) -> dict[str, pf.Run]:
    """Runs in every state: completed and failed ones (served here), then queued, scheduled and
    cancelled ones left as they are. Returns a few of them by name."""
    for flow in FLOWS:
        store.register(flow)
    named: dict[str, pf.Run] = {}
    for n in range(1, 9):
        store.start(orders, order(n), key=f"order-{n}")
    named["declined"] = store.start(orders, order(9, card="declined"), key="order-9")
    for n in range(12):
        store.start(send_email, {"to": f"user{n}@example.com"})
    named["bad_email"] = store.start(send_email, {"to": "not-an-address"})
    store.start(nightly_report, {"day": "2026-11-30"})
    pf.run_flows(FLOWS, store=store, until_idle=True, handle_signals=False)
    named["queued"] = store.start(orders, order(10), key="order-10")
    store.start(nightly_report, {"day": "2026-12-01"}, delay=3600)
    named["cancelled"] = store.cancel(store.start(send_email, {"to": "cancel@example.com"}).id)
    for n in range(11, 14):
        store.start(orders, order(n), key=f"order-{n}")
    return named


def fill_hour(path: str) -> None:
    """An hour of traffic before :func:`fill`'s runs: each minute a few orders and e-mails, some
    of them failing, served on a clock that steps through the hour (so the overview's chart
    has an hour to show)."""
    import random

    rng = random.Random(7)
    clock = pf.testing.FakeClock(time.time() - 3600)
    with pf.connect(path, clock=clock) as store:
        for minute in range(60):
            wave = 3 + int(4 * (1 + math.sin(minute / 9)))
            for n in range(wave):
                store.start(orders, order(100 + minute * 10 + n,
                                          "declined" if rng.random() < 0.04 else "visa"))
            store.start_many(send_email, [
                {"to": "nobody" if rng.random() < 0.05 else f"u{minute}-{i}@example.com"}
                for i in range(wave * 3)
            ])
            pf.run_flows([orders, send_email], store=store, until_idle=True, handle_signals=False)
            clock.advance(60 - (clock.now() % 60) + 1)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "demo.db"
    with pf.connect(path) as demo:
        fill(demo)
    print(f"filled {path}; look at it with: pgflow dashboard --database {path}")
