"""bench/pull-storm runs end to end, briefly: every GOGC value it is given gets a pull
storm through nginx TLS with no failed request, and its figures are reported.

The figures themselves are not judged here: the GOGC default is read off the bench's
own output on a quiet machine, not asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/pull-storm"


def test_bench_pull_storm_reports_each_gogc_value():
    result = subprocess.run(
        [str(BENCH), "--duration", "1", "--connections", "8", "--gogc", "100", "400", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # no non-2xx, no socket error
    figures = json.loads(result.stdout)
    assert set(figures) == {"100", "400"}
    for gogc, figure in figures.items():
        assert figure["requests"] > 0 and figure["pulls_per_s"] > 0, gogc
        assert figure["registry_peak_rss_mb"] > 0 and figure["p99_ms"] > 0, gogc
        assert figure["non_2xx"] == 0, gogc
