"""`python -m bench.run [--smoke]`: every benchmark phase, one markdown table of every figure.

Phases (each starts its own private processes and stops them all at the end, also on an error or
Ctrl-C): ingest (bench/ingest.py), pipeline (bench/pipeline.py), scale (bench/scale.py) and
baseline (bench/baseline.py, against the naive design in bench/naive.py) and delivery
(bench/delivery.py: an https webhook attempt's cost, connection kept or not). Progress goes to stderr;
the table goes to stdout and to bench/results/latest.md (--smoke: latest-smoke.md).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

from bench import (
    baseline,
    delivery,
    ingest,
    pipeline,
    preflight,
    scale,
    uploads,
    variance,
    waiters,
)
from bench.common import FULL, SMOKE, Row, machine_line, say
from bench.loadgen import WRK_INSTALL_HINT, wrk_available
from cli.stack import REPO_ROOT

PHASES = (
    "ingest",
    "pipeline",
    "scale",
    "baseline",
    "delivery",
    "uploads",
    "preflight",
    "waiters",
    "variance",
)
RESULTS = REPO_ROOT / "bench" / "results"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Once: the unwinding that follows stops every process and must not be cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def table(rows: list[Row]) -> str:
    lines = ["| phase | figure | value | target | met |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = (row.phase, row.figure, row.value, row.target, row.met)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}"
    )
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    sizes = SMOKE if args.smoke else FULL
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if not wrk_available():
        say(f"{WRK_INSTALL_HINT}; ingest will use the Python load generator instead")

    work = Path(tempfile.mkdtemp(prefix="igw-bench-"))
    rows: list[Row] = []
    failed: list[str] = []
    gateway: scale.ScaleOutcome | None = None
    started = time.monotonic()
    try:
        for phase in phases:
            say(f"phase {phase}: starting")
            phase_started = time.monotonic()
            try:
                if phase == "ingest":
                    rows += ingest.run(sizes, work / phase)
                elif phase == "pipeline":
                    rows += pipeline.run(sizes, work / phase)
                elif phase == "scale":
                    scale_rows, gateway = scale.run(sizes, work / phase)
                    rows += scale_rows
                elif phase == "baseline":
                    rows += baseline.run(sizes, work / phase, gateway)
                elif phase == "delivery":
                    rows += delivery.run(sizes, work / phase)
                elif phase == "uploads":
                    rows += uploads.run(sizes, work / phase)
                elif phase == "preflight":
                    rows += preflight.run(sizes, work / phase)
                elif phase == "waiters":
                    rows += waiters.run(sizes, work / phase)
                else:
                    rows += variance.run(sizes, work / phase)
            except Exception as exc:
                traceback.print_exc()
                failed.append(phase)
                rows.append(Row(phase, "phase failed", f"error: {type(exc).__name__}: {exc}"))
            say(f"phase {phase}: done in {time.monotonic() - phase_started:.0f} s")
    except KeyboardInterrupt:
        say(f"interrupted; every process stopped; logs kept in {work}")
        return 130
    total = time.monotonic() - started

    command = "python -m bench.run" + (" --smoke" if args.smoke else "")
    if args.phases != ",".join(PHASES):
        command += f" --phases {args.phases}"
    title = "SMOKE run (tiny sizes: figures not meaningful)" if args.smoke else "Benchmark"
    report = "\n".join(
        [
            f"## {title} — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            "",
            table(rows),
            "",
            f"Machine: {machine_line()}",
            f"Command: `{command}` — total {total:.0f} s",
            "",
        ]
    )
    print(report, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("latest-smoke.md" if args.smoke else "latest.md")
    out.write_text(report)
    say(f"wrote {out.relative_to(REPO_ROOT)}")
    if failed:
        say(f"phase(s) failed: {', '.join(failed)}; logs kept in {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
