"""ETL as a flow: extract records, transform each one in its own task, summarise the results.

Typed: each handler declares its input and output as attrs classes (or a TypedDict for a step's
dependencies); pgflow_py structures the stored JSON into them, and mypy checks the calls.
No network: the "source" is the list of records below. Run it with:

    python examples/etl_flow.py [DATABASE]      # default: ./etl.db
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any, TypedDict

import attrs

import pgflow_py as pf


@attrs.frozen
class Extract:
    """The flow's input."""

    source: str = "local"


@attrs.frozen
class Record:
    """A raw record as the source exports it."""

    id: int
    customer: str
    country: str
    amount_cents: int


@attrs.frozen
class Row:
    """A cleaned record."""

    id: int
    customer: str
    country: str
    amount: float


class SummaryDeps(TypedDict):
    """What ``summarize`` depends on: the outputs of the map step, by its slug."""

    transform: list[Row]


# The local "source system": raw records as they might arrive from an export.
RECORDS: list[dict[str, Any]] = [
    {"id": 1, "customer": "  ada lovelace ", "country": "gb", "amount_cents": 1250},
    {"id": 2, "customer": "GRACE HOPPER", "country": "us", "amount_cents": 4999},
    {"id": 3, "customer": "linus torvalds", "country": "fi", "amount_cents": 0},  # voided
    {"id": 4, "customer": "Margaret Hamilton", "country": "US", "amount_cents": 15000},
    {"id": 5, "customer": "alan turing", "country": "gb", "amount_cents": 320},
    {"id": 6, "customer": "edsger dijkstra", "country": "nl", "amount_cents": -500},  # refund
]

etl = pf.flow("etl_orders", max_attempts=3, base_delay=0.1, timeout=10)


@etl.step()
def extract(input: Extract, ctx: pf.Context) -> list[Record]:
    """Fetch the records to process (here: the local list), skipping voids and refunds."""
    ctx.logger.info("extracting from %s", input.source)
    return [Record(**record) for record in RECORDS if record["amount_cents"] > 0]


@etl.map(array=extract)
def transform(record: Record, ctx: pf.Context) -> Row:
    """Clean one record; each record is its own task, retried on its own."""
    return Row(
        id=record.id,
        customer=" ".join(part.capitalize() for part in record.customer.split()),
        country=record.country.upper(),
        amount=round(record.amount_cents / 100, 2),
    )


@etl.step(depends_on=[transform])
def summarize(deps: SummaryDeps, ctx: pf.Context) -> dict[str, Any]:
    """Aggregate the transformed records (they arrive in the order they were extracted)."""
    rows = deps["transform"]
    by_country: dict[str, float] = defaultdict(float)
    for row in rows:
        by_country[row.country] += row.amount
    return {
        "source": ctx.flow_input.get("source", "local"),
        "records": len(rows),
        "total": round(sum(row.amount for row in rows), 2),
        "by_country": {country: round(total, 2) for country, total in sorted(by_country.items())},
        "customers": [row.customer for row in rows],
    }


def main(database: str = "etl.db") -> pf.Run:
    with pf.connect(database) as store:
        run = store.start(etl, Extract(source="local"))
        pf.run_flows([etl], store=store, until_idle=True)
        done = store.get_run(run.id)
        print(f"run {done.id}: {done.status.value}")
        print(f"output: {done.output}")
        if done.error:
            print(f"error: {done.error}")
        return done


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "etl.db")
