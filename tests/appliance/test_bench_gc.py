"""bench/gc runs end to end, small: a generated storage is collected while pulls go on,
every generated garbage blob is freed, no pull fails, and its figures are reported.

The figures themselves (time, memory at 1,000 tags / 5,000 blobs) are read off the
bench's own output (README, Benchmarks), not asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/gc"


def test_bench_gc_frees_the_generated_garbage_with_no_failed_pull():
    result = subprocess.run(
        [str(BENCH), "--tags", "40", "--blobs", "200", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # no failed pull
    figures = json.loads(result.stdout)
    assert figures["freed_blobs"] == figures["garbage_blobs"] > 0
    assert figures["pulls"] > 0 and figures["failed_pulls"] == 0
    assert figures["collector_peak_mb"] > 0 and figures["appliance_ctl_peak_mb"] > 0
    assert 0 < figures["collector_s"] <= figures["window_s"] <= figures["wall_s"]
