"""schemathesis against the live API, briefly (`make fuzz` runs it at length): no 5xx, no
schema-valid request refused, no invalid one taken, every answer as the document declares it."""

from __future__ import annotations

import subprocess
import time

import pytest

from cli.stack import Stack
from tests.fuzzing import live_api, run_schemathesis

pytestmark = pytest.mark.integration

FUZZ_DB = 6  # a database of the stack's redis-server that no worker reads


def redis_db(stack: Stack) -> str:
    return stack.redis_server.url.rsplit("/", 1)[0] + f"/{FUZZ_DB}"


def test_schemathesis_finds_no_answer_that_breaks_the_document(stack: Stack) -> None:
    started = time.monotonic()
    with live_api(redis_db(stack)) as api:
        try:
            report = run_schemathesis(
                api, "--max-examples", "8", "--seed", "20261207", timeout_s=150
            )
        except subprocess.CalledProcessError as failed:
            pytest.fail(f"schemathesis found failures:\n{failed.output[-6000:]}")
    assert "passed" in report and "failed" not in report.split("SUMMARY")[-1], report[-3000:]
    assert time.monotonic() - started < 150


def test_schemathesis_would_see_a_rule_the_document_does_not_state(stack: Stack) -> None:
    """Control: without the control-window hook (a rule JSON Schema cannot state), the same run
    reports schema-valid bodies refused — the checks do look at the answers."""
    with live_api(redis_db(stack)) as api, pytest.raises(subprocess.CalledProcessError) as failed:
        run_schemathesis(
            api,
            "--phases",
            "coverage",
            "--include-path",
            "/v1/jobs",
            "--include-method",
            "POST",
            timeout_s=150,
            hooks=False,
        )
    assert "Must not exceed control_end." in failed.value.output, failed.value.output[-3000:]
