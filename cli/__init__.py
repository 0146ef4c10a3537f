"""`inpaint-gateway`: client management, a webhook listener, and the local stack."""

from __future__ import annotations

import json
import os
import sys
from urllib.parse import urlsplit, urlunsplit

import click
import redis

from core.clients import ClientStore
from core.settings import SettingsError, load_redis_url
from core.store import connect_redis


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
    """Which setting gave the store's URL (REDIS_URL_FILE wins, as load_redis_url reads it)."""
    if os.environ.get("REDIS_URL_FILE"):
        return "REDIS_URL_FILE"
    if os.environ.get("REDIS_URL"):
        return "REDIS_URL"
    return "the default: REDIS_URL is unset"


def _client_store() -> ClientStore:
    # Only the store matters here: don't demand the RunComfy token of someone adding a client.
    try:
        redis_url = load_redis_url()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"clients: Redis at {url_without_password(redis_url)} ({_redis_url_source()})", err=True
    )
    client = connect_redis(redis_url, socket_timeout_s=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(
            f"Redis at REDIS_URL is not reachable ({exc}); start it or set REDIS_URL"
        ) from None
    return ClientStore(client)


@click.group()
def main() -> None:
    """inpaint-gateway operations."""


@main.group()
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
    """List clients (no secrets)."""
    rows = [c.summary() for c in _client_store().list()]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(
            f"{row['client_id']}  {'revoked' if row['revoked'] else 'active ':8} {row['name']}"
        )


@clients.command("revoke")
@click.argument("client_id")
def clients_revoke(client_id: str) -> None:
    """Revoke a client's API key (its running jobs still finish and call back)."""
    if not _client_store().revoke(client_id):
        raise click.ClickException(f"no client {client_id}")
    click.echo(f"revoked {client_id}")


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


@main.command()
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--secret", envvar="WEBHOOK_SECRET", help="The client's whsec_ secret (or WEBHOOK_SECRET)."
)
def listen(port: int, host: str, secret: str | None) -> None:
    """Receive webhooks, verify their signatures, print each event as a JSON line."""
    from cli.listener import WebhookReceiver, print_event, print_refusal

    if not secret:
        raise click.ClickException(
            "give the client's webhook secret with --secret or WEBHOOK_SECRET"
        )
    receiver = WebhookReceiver(
        secret=secret, host=host, port=port, on_event=print_event, on_refusal=print_refusal
    )
    click.echo(f"listening on {receiver.url} (verifying signatures)", err=True)
    try:
        receiver.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()


@main.command()
@click.option(
    "--api-port", type=int, default=int(os.environ.get("API_PORT", 8000)), show_default=True
)
@click.option("--listener-port", type=int, default=8765, show_default=True)
@click.option("--emulator-port", type=int, default=8100, show_default=True)
@click.option("--workers", "worker_concurrency", type=int, default=2, show_default=True)
def up(api_port: int, listener_port: int, emulator_port: int, worker_concurrency: int) -> None:
    """Run the whole stack in the foreground (what `make run` does); Ctrl-C stops it."""
    from cli.devstack import run_dev_stack

    sys.exit(
        run_dev_stack(
            api_port=api_port,
            listener_port=listener_port,
            emulator_port=emulator_port,
            worker_concurrency=worker_concurrency,
        )
    )
