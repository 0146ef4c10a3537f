"""`inpaint-gateway`: a team's jobs and usage, client management, a webhook listener, and the
local stack."""

from __future__ import annotations

import os
import sys

import click

from cli.clients import clients
from cli.jobs import jobs, team_usage
from cli.usage import clients_usage


@click.group()
def main() -> None:
    """inpaint-gateway operations."""


# The operator's every-client table sits under `clients`; `usage` is a team's own (PRODUCT §11).
clients.add_command(clients_usage)
main.add_command(clients)
main.add_command(jobs)
main.add_command(team_usage)


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
