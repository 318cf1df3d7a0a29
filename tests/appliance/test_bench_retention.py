"""bench/retention runs end to end, small: a generated storage and history, a policy,
a preview and a real run that delete the same tags, and its figures reported.

The figures themselves (2,000 tags) are read off the bench's own output (README), not
asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/retention"


def test_bench_retention_preview_and_run_delete_the_same_tags():
    result = subprocess.run(
        [str(BENCH), "--tags", "60", "--per-repository", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout)
    assert figures["preview_equals_run"] is True
    assert 0 < figures["deleted"] == figures["listed"] < 60
    assert figures["tags_left_in_touched_repositories"] == 60 - figures["deleted"]
    assert figures["preview_s"] > 0 and figures["run_s"] > 0
