"""bench/web runs end to end, briefly: the tags page of a repository with a few tags is
served (every view 200 with the tags in it) and its figures are reported.

The latency goal (p95 under 200 ms for 1,000 tags) is read off the bench's own output
(README, "Web interface"), not asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/web"


def test_bench_web_reports_the_tags_page():
    result = subprocess.run(
        [str(BENCH), "--tags", "20", "--requests", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout)
    assert figures["tags_pushed"] == 20
    page = figures["tags_page"]
    assert page["requests"] == 10
    assert page["max_ms"] >= page["p95_ms"] >= page["p50_ms"] > 0
    assert figures["project_page"]["requests"] >= 10
    assert figures["page_bytes"] > 20 * 200  # a row per tag
