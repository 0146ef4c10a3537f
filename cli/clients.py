"""`inpaint-gateway clients …`: the operator's commands for API clients — create, list, show,
limits, keys and secrets, revoke. They read and write the store in REDIS_URL."""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import redis

from core.admission import FairAdmission
from core.clients import API_KEY_ROTATION_OVERLAP_S, Client, ClientStore
from core.limits import BUDGET_PERIODS, NO_LIMITS
from core.settings import SettingsError, load_redis_target
from core.store import connect_redis
from core.usage import UsageBook, month_span


def url_without_password(url: str) -> str:
    """`url` with its password, if any, replaced by ***: fit for a terminal or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _redis_url_source() -> str:
    """Which setting gave the store's URL (REDIS_URL_FILE wins, as load_redis_target reads it)."""
    if os.environ.get("REDIS_URL_FILE"):
        return "REDIS_URL_FILE"
    if os.environ.get("REDIS_URL"):
        return "REDIS_URL"
    return "the default: REDIS_URL is unset"


def redis_for_cli() -> redis.Redis:
    """The store's Redis as REDIS_URL gives it, said on stderr (which Redis a command reads is
    not obvious when another one answers on the default port), and checked to answer."""
    # Only the store matters here: don't demand the RunComfy token of an operator.
    try:
        target = load_redis_target()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    redis_url = target.url
    via = f", master {target.sentinel.master!r} via sentinels" if target.sentinel else ""
    click.echo(
        f"clients: Redis at {url_without_password(redis_url)} ({_redis_url_source()}{via})",
        err=True,
    )
    client = connect_redis(target, socket_timeout_s=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(
            f"Redis at REDIS_URL is not reachable ({exc}); start it or set REDIS_URL"
        ) from None
    return client


def _client_store() -> ClientStore:
    return ClientStore(redis_for_cli())


@click.group()
def clients() -> None:
    """Manage API clients (REDIS_URL selects the store)."""


@clients.command("create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print {client_id, api_key, webhook_secret}.")
def clients_create(name: str, as_json: bool) -> None:
    """Create a client; its API key and webhook secret are shown only now."""
    creds = _client_store().create(name)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "client_id": creds.client_id,
                    "api_key": creds.api_key,
                    "webhook_secret": creds.webhook_secret,
                }
            )
        )
    else:
        click.echo(
            f"client_id:      {creds.client_id}\napi_key:        {creds.api_key}\nwebhook_secret: {creds.webhook_secret}"
        )
        click.echo("Keep the key and secret now: they are not shown again.", err=True)


@clients.command("list")
@click.option("--json", "as_json", is_flag=True)
def clients_list(as_json: bool) -> None:
    """List clients with their limits (no secrets)."""
    rows = [c.summary() for c in _client_store().list()]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        state = "revoked" if row["revoked"] else "active"
        click.echo(
            f"{row['client_id']}  {state:8} {row['name']:24} {describe_limits(row['limits'])}"
        )


def describe_limits(limits: dict[str, Any]) -> str:
    """A client's limits in one line, as set-limits takes them."""
    parts = [
        f"--{name.replace('_', '-')} {limits[name]}"
        for name in ("max_in_flight", "max_queued", "rate_per_min")
        if limits.get(name) is not None
    ]
    if limits.get("budget_usd") is not None:
        parts.append(
            f"--budget-usd {limits['budget_usd']} --budget-period {limits['budget_period']}"
        )
    return " ".join(parts) or "no limits"


@clients.command("show")
@click.argument("client_id")
@click.option("--json", "as_json", is_flag=True)
def clients_show(client_id: str, as_json: bool) -> None:
    """A client with its limits and what it uses now: unfinished jobs, slots at RunComfy,
    this month's jobs and spend, its budget."""
    store = _client_store()
    client = store.get(client_id)
    if client is None:
        raise click.ClickException(f"no client {client_id}")
    shown = client_now(store.redis, client, time.time())
    if as_json:
        click.echo(json.dumps(shown))
        return
    click.echo(f"{client.id}  {client.name}  ({'revoked' if client.revoked_at else 'active'})")
    click.echo(f"limits:       {describe_limits(shown['limits'])}")
    click.echo(f"unfinished:   {shown['unfinished']} jobs, {shown['in_flight']} at RunComfy")
    month = shown["this_month"]
    jobs = ", ".join(f"{n} {status}" for status, n in month["jobs"].items())
    click.echo(f"this month:   {jobs}; {month['cost_usd']:.4f} USD")
    budget = shown["budget"]
    if budget is not None:
        click.echo(
            f"budget:       {budget['limit_usd']} USD a {budget['period']} "
            f"({budget['period_id']}): {budget['spent_usd']:.4f} spent, "
            f"{budget['reserved_usd']:.4f} reserved, {budget['remaining_usd']:.4f} remaining"
        )


def client_now(client: redis.Redis, who: Client, now: float) -> dict[str, Any]:
    """What `clients show` says of a client (no secrets)."""
    book = UsageBook(client)
    first, last = month_span(now)
    return {
        **who.summary(),
        "unfinished": book.unfinished(who.id),
        "in_flight": FairAdmission.client_in_flight_of(client, who.id, now),
        "this_month": book.usage(who.id, first, last)["total"],
        "budget": book.budget(who.id, who.limits, now),
    }


@clients.command("set-limits")
@click.argument("client_id")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="Jobs at RunComfy at once.")
@click.option("--max-queued", type=click.IntRange(min=1), help="Unfinished jobs (more: 429).")
@click.option("--rate-per-min", type=click.IntRange(min=1), help="POSTs a minute (more: 429).")
@click.option("--budget-usd", type=click.FloatRange(min=0), help="Spend per period (more: 402).")
@click.option("--budget-period", type=click.Choice(BUDGET_PERIODS), help="day or month (UTC).")
@click.option("--clear", is_flag=True, help="Remove every limit first.")
@click.option("--json", "as_json", is_flag=True)
def clients_set_limits(
    client_id: str,
    max_in_flight: int | None,
    max_queued: int | None,
    rate_per_min: int | None,
    budget_usd: float | None,
    budget_period: str | None,
    clear: bool,
    as_json: bool,
) -> None:
    """Set a client's limits; those not named keep their value (--clear: start from none)."""
    store = _client_store()
    client = store.get(client_id)
    if client is None:
        raise click.ClickException(f"no client {client_id}")
    if (budget_usd is None) != (budget_period is None) and client.limits.budget_usd is None:
        raise click.UsageError("a budget needs both --budget-usd and --budget-period")
    base = NO_LIMITS if clear else client.limits
    try:
        limits = base.changed(
            max_in_flight=max_in_flight,
            max_queued=max_queued,
            rate_per_min=rate_per_min,
            budget_usd=budget_usd,
            budget_period=budget_period,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    changed = store.set_limits(client_id, limits)
    if changed is None:
        raise click.ClickException(f"no client {client_id}")
    shown = changed.limits.to_dict()
    click.echo(
        json.dumps({"client_id": client_id, "limits": shown}) if as_json else describe_limits(shown)
    )


@clients.command("revoke")
@click.argument("client_id")
def clients_revoke(client_id: str) -> None:
    """Revoke a client's API keys (its running jobs still finish and call back)."""
    if not _client_store().revoke(client_id):
        raise click.ClickException(f"no client {client_id}")
    click.echo(f"revoked {client_id}")


@clients.command("rotate-key")
@click.argument("client_id")
@click.option(
    "--overlap-s",
    type=click.FloatRange(min=0),
    default=API_KEY_ROTATION_OVERLAP_S,
    show_default=True,
    help="How long the replaced key keeps working.",
)
@click.option("--json", "as_json", is_flag=True, help="Print {client_id, api_key, old_key_until}.")
def clients_rotate_key(client_id: str, overlap_s: float, as_json: bool) -> None:
    """A new API key, shown only now; the replaced one works for --overlap-s more, then 401."""
    api_key = _client_store().rotate_api_key(client_id, overlap_s=overlap_s)
    if api_key is None:
        raise click.ClickException(f"no client {client_id}, or it is revoked")
    until = time.time() + overlap_s
    if as_json:
        click.echo(json.dumps({"client_id": client_id, "api_key": api_key, "old_key_until": until}))
        return
    click.echo(f"api_key: {api_key}")
    click.echo(
        f"The replaced key works until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}.",
        err=True,
    )


@clients.command("rotate-secret")
@click.argument("client_id")
@click.option("--json", "as_json", is_flag=True)
def clients_rotate_secret(client_id: str, as_json: bool) -> None:
    """New webhook secret; for 24 h webhooks carry signatures with both."""
    secret = _client_store().rotate_webhook_secret(client_id)
    if secret is None:
        raise click.ClickException(f"no client {client_id}")
    click.echo(
        json.dumps({"client_id": client_id, "webhook_secret": secret})
        if as_json
        else f"webhook_secret: {secret}"
    )
