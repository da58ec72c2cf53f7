"""`epara demo` end to end: a cluster forms, requests are served, nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from epara.models.store import ModelStore


def test_demo_runs_a_cluster_and_cleans_up(tmp_path: Path, zoo_store: ModelStore) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "epara.node.cli", "demo", "--seconds", "3", "--nodes", "2",
         "--out", str(out), "--store", str(zoo_store.root)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cluster formed: leader demo-node" in result.stdout
    assert "cluster goodput:" in result.stdout
    assert (out / "mask.png").stat().st_size > 0
    leftover = subprocess.run(["pgrep", "-f", f"--store {zoo_store.root}"],
                              capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
