"""bench/storage-migrate runs end to end, small: 2 MiB of images migrated from filesystem
to s3 (moto) while pulls go on, no pull fails, and its figures are reported.

The figures themselves (MiB/s, the window's length at 256 MiB) are read off the bench's
own output (README, Storage migration), not asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/storage-migrate"


def test_bench_storage_migrate_reports_its_figures_with_no_failed_pull():
    result = subprocess.run(
        [str(BENCH), "2", "--json"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr  # no failed pull
    figures = json.loads(result.stdout)
    assert figures["mib"] == 2 and figures["verified_blobs"] > 0
    assert figures["pulls"] > 0 and figures["failed_pulls"] == 0
    assert 0 < figures["window_s"] < figures["wall_s"]
    assert figures["copy_mib_s"] > 0
