"""bench/push runs end to end on a small layer: every route pushes, pulls back the same
bytes (the bench exits non-zero when a pulled digest differs) and reports its figures.

The figures themselves are not judged here: speed goals are read off the bench's own
output on a quiet machine, not asserted by a timed test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench/push"


def test_every_route_of_bench_push_moves_the_layer_both_ways():
    result = subprocess.run(
        [str(BENCH), "--size-mb", "1", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for client in ("skopeo", "curl"):
        for path in ("direct", "tls", "nginx", "socket"):
            for direction in ("push", "pull"):
                key = f"{client}_{path}_{direction}"
                assert summary[f"{key}_mbps"] > 0, key
                assert f"{key}_registry_cpu_seconds_per_gb" in summary, key
                if path in ("nginx", "socket"):
                    assert f"{key}_nginx_cpu_seconds_per_gb" in summary, key
                    assert summary[f"{key}_ratio_to_tls"] > 0, key
