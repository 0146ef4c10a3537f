"""`inpaint-gateway jobs …` and `inpaint-gateway usage`: a team's commands, over the SDK
(configured by INPAINT_GATEWAY_URL and INPAINT_GATEWAY_API_KEY)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
from inpaint_gateway_client import (
    FINAL_STATUSES,
    Client,
    GatewayError,
    Job,
    Usage,
    ValidationError,
    WaitTimeout,
)

STATUSES = ("queued", "submitted", "running", *sorted(FINAL_STATUSES))
# How often the terminal's progress line is redrawn (its elapsed time moves on between answers).
PROGRESS_REDRAW_S = 1.0
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def gateway_options(command: F) -> F:
    """--url and --api-key, read from the environment when not given (the key never shown)."""
    command = click.option(
        "--api-key",
        envvar="INPAINT_GATEWAY_API_KEY",
        show_envvar=True,
        help="The team's API key (better in the environment than on the command line).",
    )(command)
    return click.option(
        "--url",
        envvar="INPAINT_GATEWAY_URL",
        show_envvar=True,
        help="The gateway's base URL, e.g. https://inpaint.internal",
    )(command)


def gateway_client(url: str | None, api_key: str | None) -> Client:
    """The SDK client for the options given, or a usage error naming what is missing."""
    if not url:
        raise click.ClickException("give the gateway's URL with --url or INPAINT_GATEWAY_URL")
    if not api_key:
        raise click.ClickException("give the API key with --api-key or INPAINT_GATEWAY_API_KEY")
    return Client(url, api_key)


def error_line(error: Exception) -> str:
    """One readable line for a failure: the problem's detail and every field's errors."""
    if isinstance(error, ValidationError) and error.errors:
        fields = "; ".join(f"{name}: {' '.join(texts)}" for name, texts in error.errors.items())
        return f"{error.detail or error.title} ({fields})"
    if isinstance(error, GatewayError):
        line = f"{error.title}: {error.detail}" if error.detail else error.title
        if error.retry_after is not None:
            line += f" (retry after {error.retry_after:g} s)"
        return line
    if isinstance(error, OSError):
        return f"{error.strerror or type(error).__name__}: {error.filename or ''}".rstrip(": ")
    return str(error)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the SDK's and the file system's errors into click's one-line `Error: …` exit 1."""
    try:
        yield
    except (GatewayError, OSError) as error:
        raise click.ClickException(" ".join(error_line(error).split())) from None


# Fields given by options of their own; a --set of one would contradict its option.
FIELDS_WITH_OPTIONS = {
    "prompt": "--prompt",
    "image_url": "--image",
    "mask_image_url": "--mask",
    "webhook_url": "--webhook-url",
}


def parse_settings(pairs: tuple[str, ...]) -> dict[str, Any]:
    """--set FIELD=VALUE pairs as input fields: JSON where the value parses (numbers, lists,
    objects, true/false), else the text itself."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise click.ClickException(f"--set {pair!r} is not FIELD=VALUE")
        if name.strip() in FIELDS_WITH_OPTIONS:
            raise click.ClickException(
                f"--set {name.strip()}: give it with {FIELDS_WITH_OPTIONS[name.strip()]}"
            )
        try:
            fields[name.strip()] = json.loads(text)
        except ValueError:
            fields[name.strip()] = text
    return fields


def image_source(value: str) -> str | Path:
    """A URL, upload ref or data URI as it is; anything else a local file, which must exist."""
    if value.startswith(("http://", "https://", "upload:", "data:")):
        return value
    path = Path(value)
    if not path.is_file():
        raise click.ClickException(f"no such file: {value}")
    return path


def progress_text(job: Job, elapsed_s: float) -> str:
    """A waiting job in a few words: its status, its place in RunComfy's queue, time so far."""
    parts = [f"{job.id} {job.status}"]
    if job.queue_position is not None:
        parts.append(f"queue position {job.queue_position}")
    parts.append(f"{elapsed_s:.0f} s")
    return " · ".join(parts)


class WaitProgress:
    """Shows a wait on stderr: on a terminal one line redrawn in place, else a line per change."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self.started = time.monotonic()
        self.job: Job | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None

    def __call__(self, job: Job) -> None:
        """The SDK's on_progress: the job's status or queue position changed."""
        with self._lock:
            self.job = job
        if self.interactive:
            self._redraw()
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
        else:
            self.stream.write(progress_text(job, time.monotonic() - self.started) + "\n")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(PROGRESS_REDRAW_S):
            self._redraw()

    def _redraw(self) -> None:
        with self._lock:
            if self.job is None:
                return
            self.stream.write("\r\033[K" + progress_text(self.job, time.monotonic() - self.started))
            self.stream.flush()

    def close(self) -> None:
        """Stop redrawing and leave the cursor on a fresh line."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self.interactive and self.job is not None:
                self.stream.write("\n")
                self.stream.flush()
            self.job = None


def wait_with_progress(
    client: Client, job_id: str, timeout: float | None, submitted: Job | None = None
) -> Job:
    """The final job, its progress on stderr (from `submitted`, when just submitted); Ctrl-C
    stops waiting, not the job."""
    progress = WaitProgress(sys.stderr)
    if submitted is not None:
        progress(submitted)
    try:
        return client.wait(job_id, timeout=timeout, on_progress=progress)
    except KeyboardInterrupt:
        progress.close()
        click.echo(
            f"stopped waiting; job {job_id} goes on. Wait again with: "
            f"inpaint-gateway jobs wait {job_id}",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except WaitTimeout as timed_out:
        progress.close()
        raise click.ClickException(
            f"{timed_out}; it goes on. Wait again with: inpaint-gateway jobs wait {job_id}"
        ) from None
    finally:
        progress.close()


def save_outputs(client: Client, job: Job, where: str) -> list[Path]:
    """The job's images saved to `where`: a directory (existing, or given with a trailing /)
    keeps their own names; otherwise it is the file (a second image gets -2, -3… before its
    suffix)."""
    out = Path(where)
    if out.is_dir() or where.endswith(("/", "\\")):
        return client.download(job, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        saved = []
        for number, path in enumerate(client.download(job, scratch), start=1):
            suffix = out.suffix or path.suffix
            name = out.stem + (f"-{number}" if number > 1 else "") + suffix
            saved.append(Path(shutil.move(path, out.with_name(name))))
        return saved


def describe_job(job: Job) -> str:
    """A job for people: a few lines, the output URLs last."""
    lines = [f"{job.id}  {job.status}", f"  created   {job.created_at}"]
    if job.finished_at:
        lines.append(f"  finished  {job.finished_at}")
    if job.queue_position is not None:
        lines.append(f"  queue     position {job.queue_position}")
    lines.append(f"  prompt    {job.input.get('prompt', '')}")
    if job.error:
        lines.append(f"  error     {job.error.get('code')}: {job.error.get('message')}")
    if job.cost:
        lines.append(f"  cost      {job.cost.get('usd')} USD ({job.cost.get('source')})")
    lines.extend(f"  image     {url}" for url in job.images)
    return "\n".join(lines)


def finish(client: Client, job: Job, out: str | None, as_json: bool) -> None:
    """Print the final job, save its outputs if asked; exit 1 when it did not succeed."""
    saved = save_outputs(client, job, out) if out is not None and job.images else []
    if as_json:
        click.echo(json.dumps(job.raw))
    else:
        click.echo(describe_job(job))
        for path in saved:
            click.echo(f"  saved     {path}")
    if job.status != "succeeded":
        reason = f": {job.error.get('message')}" if job.error else ""
        raise click.ClickException(f"job {job.id} {job.status}{reason}")


@click.group()
def jobs() -> None:
    """Submit, follow and cancel your team's jobs (INPAINT_GATEWAY_URL, INPAINT_GATEWAY_API_KEY)."""


@jobs.command()
@click.option("--image", required=True, help="The picture: a local file, an http(s) URL or ref.")
@click.option("--mask", required=True, help="The mask (white = repaint): a file, URL or ref.")
@click.option("--prompt", required=True, help="What to paint where the mask is white.")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Another input field, e.g. --set seed=7 --set output_format=webp (JSON values parse).",
)
@click.option("--webhook-url", help="Where the gateway posts the job's events.")
@click.option("--wait", "wait_for_it", is_flag=True, help="Wait until the job is final.")
@click.option("--timeout", type=float, help="With --wait: give up waiting after this many s.")
@click.option("--out", type=click.Path(), help="Save the output: a file, or a directory/.")
@click.option("--json", "as_json", is_flag=True, help="Print the job resource as JSON.")
@gateway_options
def submit(
    image: str,
    mask: str,
    prompt: str,
    settings: tuple[str, ...],
    webhook_url: str | None,
    wait_for_it: bool,
    timeout: float | None,
    out: str | None,
    as_json: bool,
    url: str | None,
    api_key: str | None,
) -> None:
    """Submit a job; local files are uploaded first. --out implies --wait."""
    inputs = parse_settings(settings)
    sources = image_source(image), image_source(mask)
    client = gateway_client(url, api_key)
    with client, one_line_errors():
        job = client.submit(
            prompt=prompt, image=sources[0], mask=sources[1], webhook_url=webhook_url, **inputs
        )
        if not (wait_for_it or out is not None):
            echo_job(job, as_json)
            return
        if not as_json:
            click.echo(f"submitted {job.id}", err=True)
        finish(client, wait_with_progress(client, job.id, timeout, job), out, as_json)


def echo_job(job: Job, as_json: bool) -> None:
    """The job on stdout: its resource as JSON, or a few readable lines."""
    click.echo(json.dumps(job.raw) if as_json else describe_job(job))


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job resource as JSON.")
@gateway_options
def get(job_id: str, as_json: bool, url: str | None, api_key: str | None) -> None:
    """Show a job as it stands."""
    client = gateway_client(url, api_key)
    with client, one_line_errors():
        job = client.get(job_id)
    echo_job(job, as_json)


@jobs.command(name="list")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One job resource per line.")
@gateway_options
def list_jobs(
    status: str | None, limit: int, as_json: bool, url: str | None, api_key: str | None
) -> None:
    """Your team's jobs, newest first."""
    client = gateway_client(url, api_key)
    with client, one_line_errors():
        for job in islice(client.jobs(status=status, page_size=min(limit, 100)), limit):
            if as_json:
                click.echo(json.dumps(job.raw))
            else:
                prompt = " ".join(str(job.input.get("prompt", "")).split())
                click.echo(f"{job.id}  {job.status:9}  {job.created_at}  {prompt[:48]}")


@jobs.command(name="wait")
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up waiting after this many seconds.")
@click.option("--out", type=click.Path(), help="Save the output: a file, or a directory/.")
@click.option("--json", "as_json", is_flag=True, help="Print the final job resource as JSON.")
@gateway_options
def wait_for_job(
    job_id: str,
    timeout: float | None,
    out: str | None,
    as_json: bool,
    url: str | None,
    api_key: str | None,
) -> None:
    """Wait until a job is final (Ctrl-C stops waiting; the job goes on)."""
    client = gateway_client(url, api_key)
    with client, one_line_errors():
        finish(client, wait_with_progress(client, job_id, timeout), out, as_json)


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job resource as JSON.")
@gateway_options
def cancel(job_id: str, as_json: bool, url: str | None, api_key: str | None) -> None:
    """Cancel a job that has not ended."""
    client = gateway_client(url, api_key)
    with client, one_line_errors():
        job = client.cancel(job_id)
    echo_job(job, as_json)


def format_usage(usage: Usage) -> str:
    """The team's usage as a table: one row per day with jobs, then the total and the budget."""
    statuses = ("succeeded", "failed", "cancelled", "expired")
    header = "date        " + " ".join(f"{s:>9}" for s in statuses) + f" {'cost USD':>10}"
    lines = [f"usage of {usage.client_id}, {usage.from_} .. {usage.to} (UTC)", header]
    for day in usage.days:
        counts = day.get("jobs") or {}
        if not any(counts.values()) and not day.get("cost_usd"):
            continue
        lines.append(
            f"{day['date']:12}"
            + " ".join(f"{counts.get(s, 0):>9}" for s in statuses)
            + f" {float(day.get('cost_usd') or 0):>10.4f}"
        )
    totals = usage.total.get("jobs") or {}
    lines.append(
        f"{'total':12}"
        + " ".join(f"{totals.get(s, 0):>9}" for s in statuses)
        + f" {usage.cost_usd:>10.4f}"
    )
    if usage.budget:
        budget = usage.budget
        lines.append(
            f"budget: {budget.get('remaining_usd')} of {budget.get('limit_usd')} USD left "
            f"this {budget.get('period')}"
        )
    return "\n".join(lines)


@click.command(name="usage")
@click.option("--from", "first", type=click.DateTime(["%Y-%m-%d"]), help="First UTC day.")
@click.option("--to", "last", type=click.DateTime(["%Y-%m-%d"]), help="Last UTC day, inclusive.")
@click.option("--json", "as_json", is_flag=True, help="The usage object as the API answers it.")
@gateway_options
def team_usage(
    first: datetime | None,
    last: datetime | None,
    as_json: bool,
    url: str | None,
    api_key: str | None,
) -> None:
    """Your team's jobs and spend per UTC day (default: this month)."""
    client = gateway_client(url, api_key)
    with client, one_line_errors():
        answer = client.usage(
            from_=first.date() if first else None, to=last.date() if last else None
        )
    click.echo(json.dumps(answer.raw) if as_json else format_usage(answer))
