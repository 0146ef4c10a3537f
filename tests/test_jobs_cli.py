"""`inpaint-gateway jobs …` and `inpaint-gateway usage` as a team runs them: the venv's command
in a subprocess, configured by environment variables, against a real stack over HTTP."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cli.jobs import parse_settings, progress_text
from cli.stack import Stack, free_port, venv_script
from core.clients import ClientStore, NewClientCredentials
from tests.support.stack import served_stack

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUEUED_LONG = "[emulator:queue=30]"
PROGRESS_LINE = re.compile(r"^job_\w+ \w+ · (queue position \d+ · )?\d+ s$")


@pytest.fixture(scope="module")
def cli_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, emulator, gunicorn API, then worker and beat (outputs as whole signed URLs)."""
    with served_stack(tmp_path_factory.mktemp("jobs-cli"), "jobs-cli") as stack:
        yield stack


@pytest.fixture
def creds(cli_stack: Stack) -> NewClientCredentials:
    with cli_stack.redis() as redis_client:
        return ClientStore(redis_client).create("jobs-cli-test")


@pytest.fixture
def team_env(cli_stack: Stack, creds: NewClientCredentials) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "INPAINT_GATEWAY_URL": cli_stack.api_url,
        "INPAINT_GATEWAY_API_KEY": creds.api_key,
    }


@pytest.fixture
def samples(cli_stack: Stack, tmp_path: Path) -> tuple[Path, Path]:
    """The emulator's sample picture and mask, saved as local files."""
    paths = []
    for name in ("image", "mask"):
        answer = requests.get(f"{cli_stack.emulator_url}/samples/{name}.png", timeout=10)
        answer.raise_for_status()
        (path := tmp_path / f"{name}.png").write_bytes(answer.content)
        paths.append(path)
    return paths[0], paths[1]


def run(env: dict[str, str], *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_script("inpaint-gateway"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def submit_args(image: str | Path, mask: str | Path, prompt: str) -> list[str]:
    return ["jobs", "submit", "--image", str(image), "--mask", str(mask), "--prompt", prompt]


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """A non-zero exit with one line on stderr besides any progress lines of a wait."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# --- end to end ---------------------------------------------------------------------------------


def test_submit_wait_out_from_local_files_writes_the_png(
    team_env: dict[str, str],
    creds: NewClientCredentials,
    samples: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "result.png"
    result = run(
        team_env,
        *submit_args(*samples, "a red sky"),
        "--set",
        "seed=42",
        "--set",
        "output_format=png",
        "--wait",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert "succeeded" in result.stdout and str(out) in result.stdout
    progress = result.stderr.splitlines()
    assert any(" queued · " in line for line in progress), result.stderr  # a line per change
    assert any(" succeeded · " in line for line in progress), result.stderr
    assert creds.api_key not in result.stdout + result.stderr


def test_get_list_wait_and_cancel(
    cli_stack: Stack, team_env: dict[str, str], samples: tuple[Path, Path], tmp_path: Path
) -> None:
    done = json.loads(run(team_env, *submit_args(*samples, "first"), "--json").stdout)
    assert done["status"] == "queued" and done["input"]["image_url"].startswith("upload:")
    waited = run(team_env, "jobs", "wait", done["id"], "--out", f"{tmp_path}/outs/")
    assert waited.returncode == 0, waited.stderr
    [saved] = (tmp_path / "outs").iterdir()
    assert saved.suffix == ".png" and saved.read_bytes().startswith(PNG_SIGNATURE)

    url = f"{cli_stack.emulator_url}/samples/image.png"
    held = json.loads(
        run(team_env, *submit_args(url, samples[1], f"held {QUEUED_LONG}"), "--json").stdout
    )
    shown = json.loads(run(team_env, "jobs", "get", held["id"], "--json").stdout)
    assert shown["id"] == held["id"] and shown["input"]["image_url"] == url
    assert held["id"] in run(team_env, "jobs", "get", held["id"]).stdout

    listed = run(team_env, "jobs", "list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == [held["id"], done["id"]]  # newest first
    assert run(team_env, "jobs", "list", "--limit", "1").stdout.split()[0] == held["id"]
    succeeded = run(team_env, "jobs", "list", "--status", "succeeded", "--json").stdout
    assert [json.loads(line)["id"] for line in succeeded.splitlines()] == [done["id"]]

    gave_up = run(team_env, "jobs", "wait", held["id"], "--timeout", "1")
    assert_one_line_error(gave_up, held["id"], f"inpaint-gateway jobs wait {held['id']}")

    cancelled = run(team_env, "jobs", "cancel", held["id"], "--json")
    assert json.loads(cancelled.stdout)["cancel_requested"] is True
    final = run(team_env, "jobs", "wait", held["id"], "--json")
    assert json.loads(final.stdout)["status"] == "cancelled"
    assert_one_line_error(final, "cancelled")  # a job that did not succeed exits non-zero
    assert_one_line_error(run(team_env, "jobs", "cancel", done["id"]), "Conflict")


def test_usage_shows_the_teams_own_jobs_and_spend(
    cli_stack: Stack, team_env: dict[str, str]
) -> None:
    url = f"{cli_stack.emulator_url}/samples/"
    job = json.loads(
        run(
            team_env,
            *submit_args(url + "image.png", url + "mask.png", "count"),
            "--wait",
            "--json",
        ).stdout
    )
    usage = json.loads(run(team_env, "usage", "--json").stdout)
    assert usage["total"]["jobs"]["succeeded"] == 1
    assert usage["total"]["cost_usd"] == pytest.approx(job["cost"]["usd"])
    table = run(team_env, "usage").stdout
    total = next(line for line in table.splitlines() if line.startswith("total"))
    assert f"{job['cost']['usd']:.4f}" in total
    day = job["finished_at"][:10]
    one_day = json.loads(run(team_env, "usage", "--from", day, "--to", day, "--json").stdout)
    assert [d["date"] for d in one_day["days"]] == [day]


# --- waiting as people expect -----------------------------------------------------------------


def test_ctrl_c_while_waiting_says_the_job_goes_on(
    cli_stack: Stack, team_env: dict[str, str], samples: tuple[Path, Path]
) -> None:
    held = json.loads(run(team_env, *submit_args(*samples, f"wait {QUEUED_LONG}"), "--json").stdout)
    waiting = subprocess.Popen(
        [venv_script("inpaint-gateway"), "jobs", "wait", held["id"]],
        env=team_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stderr is not None
    first = waiting.stderr.readline()  # the first answer came: it is waiting in earnest now
    assert PROGRESS_LINE.match(first.strip()), first
    waiting.send_signal(signal.SIGINT)
    _, stderr = waiting.communicate(timeout=20)
    assert waiting.returncode == 130
    assert "Traceback" not in stderr
    assert f"job {held['id']} goes on" in stderr
    assert f"inpaint-gateway jobs wait {held['id']}" in stderr
    assert not run(team_env, "jobs", "cancel", held["id"]).returncode  # it was still going


def test_on_a_terminal_the_progress_line_is_rewritten_in_place(
    team_env: dict[str, str], samples: tuple[Path, Path]
) -> None:
    controller, terminal = pty.openpty()
    waiting = subprocess.Popen(
        [venv_script("inpaint-gateway"), *submit_args(*samples, "[emulator:queue=2]"), "--wait"],
        env=team_env,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 60
    while waiting.poll() is None and time.monotonic() < deadline:
        if select.select([controller], [], [], 0.2)[0]:
            try:
                shown += os.read(controller, 4096)
            except OSError:
                break
    waiting.communicate(timeout=30)
    os.close(controller)
    assert waiting.returncode == 0
    redraws = shown.split(b"\r\x1b[K")
    assert len(redraws) >= 3, shown  # the elapsed time moves on while queued
    assert b" succeeded \xc2\xb7 " in redraws[-1]


# --- one readable line for every failure --------------------------------------------------------


def test_every_error_is_one_line_without_a_traceback(
    cli_stack: Stack, team_env: dict[str, str], samples: tuple[Path, Path]
) -> None:
    wrong_key = team_env | {"INPAINT_GATEWAY_API_KEY": "igw_wrong-key-0123456789"}
    refused = run(wrong_key, "jobs", "list")
    assert_one_line_error(refused, "Unauthorized")
    assert "igw_wrong-key-0123456789" not in refused.stderr

    assert_one_line_error(run(team_env, "jobs", "get", "job_0123456789abcdef"), "Not Found")

    invalid = run(
        team_env,
        *submit_args(*samples, "bad"),
        "--set",
        "strength=5",
        "--set",
        "image_size=huge",
    )
    assert_one_line_error(invalid, "strength:", "image_size:")

    down = team_env | {"INPAINT_GATEWAY_URL": f"http://127.0.0.1:{free_port()}"}
    assert_one_line_error(run(down, "jobs", "get", "job_x"), "cannot connect")
    assert_one_line_error(run(down, "usage"), "cannot connect")

    no_key = {k: v for k, v in team_env.items() if k != "INPAINT_GATEWAY_API_KEY"}
    assert_one_line_error(run(no_key, "jobs", "list"), "INPAINT_GATEWAY_API_KEY")
    assert_one_line_error(run(team_env, *submit_args(*samples, "x"), "--set", "seed"), "seed")
    assert_one_line_error(
        run(team_env, *submit_args(*samples, "x"), "--set", "prompt=y"), "--prompt"
    )
    assert_one_line_error(run(team_env, *submit_args("nope.png", samples[1], "x")), "nope.png")


# --- pure decisions -----------------------------------------------------------------------------


def test_set_values_parse_as_json_where_they_can() -> None:
    fields = parse_settings(
        ("seed=7", "strength=0.5", 'loras=[{"path": "a/b"}]', "image_size=square", "note=a=b")
    )
    assert fields == {
        "seed": 7,
        "strength": 0.5,
        "loras": [{"path": "a/b"}],
        "image_size": "square",
        "note": "a=b",
    }


def test_progress_names_status_queue_position_and_elapsed() -> None:
    from inpaint_gateway_client import Job

    job = Job.from_json(
        {"id": "job_1", "status": "submitted", "upstream": {"queue_position": 3}, "input": {}}
    )
    assert progress_text(job, 12.4) == "job_1 submitted · queue position 3 · 12 s"
