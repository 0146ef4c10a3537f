"""The benchmark harness runs end to end: `python -m bench.run --smoke` (tiny sizes, no speed
asserted) exits 0 and prints one table with numeric figures for every phase."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import PHASES

REPO_ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d[\d,]*(\.\d+)?\b")


@pytest.mark.integration
def test_bench_smoke_prints_a_numeric_row_for_every_phase() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-5000:]}"

    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| phase ")
    ]
    assert rows, done.stdout
    assert all(len(row) == 5 for row in rows), rows
    for phase in PHASES:
        values = [row[2] for row in rows if row[0] == phase]
        assert values, f"no row for phase {phase}:\n{done.stdout}"
        assert any(NUMBER.match(v) for v in values), f"{phase}: no numeric value in {values}"
        assert not any(v.startswith("error") for v in values), values
    assert "nproc=" in done.stdout and "Python " in done.stdout
    assert "python -m bench.run --smoke" in done.stdout
