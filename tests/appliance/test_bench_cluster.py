"""bench/cluster runs end to end on a tiny size: a two-node cluster of network-namespace
hosts, every figure measured through the front with one node and with two, and the
failover after a node is killed.

The figures themselves are not judged here (README, Several hosts, has them, measured on
a quiet machine); that every request was answered is (the bench exits 1 otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench/cluster"


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_bench_cluster_measures_one_and_two_nodes_and_the_failover():
    result = subprocess.run(
        [str(BENCH), "--duration", "1", "--connections", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    for what in ("tokens", "small", "manifests"):
        for nodes in ("one_node", "two_nodes"):
            assert summary[f"{what}_per_s_{nodes}"] > 0, (what, nodes)
        assert summary[f"{what}_ratio"] > 0
    assert summary["non_2xx"] == 0
    assert summary["failover_pulls_after_kill"] > 0
    assert summary["failover_last_failure_s"] < 5
