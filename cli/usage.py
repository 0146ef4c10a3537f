"""`inpaint-gateway clients usage`: every client's jobs and spend over some UTC days, for operators
(read from the store in REDIS_URL)."""

from __future__ import annotations

import json
import time
from datetime import date, datetime
from typing import Any

import click

from cli.clients import redis_for_cli
from core.clients import ClientStore
from core.usage import MAX_USAGE_DAYS, UsageBook, usage_span


@click.command(name="usage")
@click.option("--client", "client_id", help="One client (default: all).")
@click.option("--from", "first", type=click.DateTime(["%Y-%m-%d"]), help="First UTC day.")
@click.option("--to", "last", type=click.DateTime(["%Y-%m-%d"]), help="Last UTC day, inclusive.")
@click.option("--json", "as_json", is_flag=True, help="One usage object per client.")
def clients_usage(
    client_id: str | None, first: datetime | None, last: datetime | None, as_json: bool
) -> None:
    """Jobs by final status and spend per client (default: this month, UTC)."""
    now = time.time()
    span = usage_span(first.date() if first else None, last.date() if last else None, now)
    if span[0] > span[1] or (span[1] - span[0]).days + 1 > MAX_USAGE_DAYS:
        raise click.UsageError(f"--from must not be after --to, at most {MAX_USAGE_DAYS} days")
    client = redis_for_cli()
    store, book = ClientStore(client), UsageBook(client)
    chosen = [c for c in store.list() if client_id in (None, c.id)]
    if client_id is not None and not chosen:
        raise click.ClickException(f"no client {client_id}")
    rows = [usage_row(book, c.id, c.name, c.limits, span, now) for c in chosen]
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(format_table(rows, span))


def usage_row(
    book: UsageBook, client_id: str, name: str, limits: Any, span: tuple[date, date], now: float
) -> dict[str, Any]:
    """One client's usage over `span`, as /v1/usage answers it."""
    return {
        "client_id": client_id,
        "name": name,
        "from": span[0].isoformat(),
        "to": span[1].isoformat(),
        **book.usage(client_id, *span),
        "limits": limits.to_dict(),
        "budget": book.budget(client_id, limits, now),
    }


def format_table(rows: list[dict[str, Any]], span: tuple[date, date]) -> str:
    """Clients as a table: jobs by final status, spend, budget left."""
    header = f"{'client':22} {'name':18} {'succeeded':>9} {'failed':>6} {'cancelled':>9} {'expired':>7} {'cost USD':>10}  budget"
    lines = [f"usage {span[0]} .. {span[1]} (UTC)", header]
    for row in rows:
        jobs = row["total"]["jobs"]
        budget = row["budget"]
        left = (
            f"{budget['remaining_usd']:.4f} of {budget['limit_usd']} a {budget['period']}"
            if budget
            else "-"
        )
        lines.append(
            f"{row['client_id']:22} {row['name'][:18]:18} {jobs['succeeded']:>9} {jobs['failed']:>6} "
            f"{jobs['cancelled']:>9} {jobs['expired']:>7} {row['total']['cost_usd']:>10.4f}  {left}"
        )
    total = sum(row["total"]["cost_usd"] for row in rows)
    lines.append(f"{'all clients':41} {'':>9} {'':>6} {'':>9} {'':>7} {total:>10.4f}")
    return "\n".join(lines)
