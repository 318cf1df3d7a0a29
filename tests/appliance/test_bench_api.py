"""bench/api runs end to end, small: a generated repository listed through the admin API
via nginx, every tag in the answer, its figures reported (the figures of 1,000 tags are
read off the bench's output into the README, not asserted by a timed test)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/api"


def test_bench_api_lists_every_generated_tag_and_reports_its_figures():
    result = subprocess.run(
        [str(BENCH), "--tags", "30", "--runs", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout)
    assert figures["tags"] == 30 and figures["repositories_tags"] == 30
    assert figures["first_s"] > 0 and 0 < figures["median_s"] <= figures["p95_s"]
