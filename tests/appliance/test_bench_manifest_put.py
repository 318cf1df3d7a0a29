"""bench/manifest-put runs end to end, briefly: every case PUTs (or GETs) its manifest
through nginx TLS with no failed request, and its figures are reported.

The figures themselves are not judged here: the cost of the tag rules is read off the
bench's own output, not asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/manifest-put"


def test_bench_manifest_put_reports_every_case():
    result = subprocess.run(
        [str(BENCH), "--duration", "1", "--connections", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr  # no non-2xx, no socket error
    figures = json.loads(result.stdout)
    assert set(figures) == {"no-gate", "no-rules", "other-tag", "immutable", "protected", "get"}
    for case, figure in figures.items():
        assert figure["requests"] > 0 and figure["rate"] > 0, case
        assert figure["p99_ms"] >= figure["p50_ms"] > 0, case
        assert figure["non_2xx"] == 0, case
