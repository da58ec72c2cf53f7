"""`epara doctor` explains what it sees: credentials, adverts of other clusters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from epara.peer.security import create_cluster_credentials

from .helpers import make_add_model, start_node, stop_node, wait_for_socket


def doctor(*args: str) -> tuple[int, list[dict]]:
    result = subprocess.run([sys.executable, "-m", "epara.node.cli", "doctor", "--json",
                             "--interface", "127.0.0.1", "--seconds", "2.5", *args],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


def test_doctor_flags_a_node_of_another_cluster_and_missing_credentials(
        tmp_path: Path, cluster_dir: Path) -> None:
    other = tmp_path / "other"
    create_cluster_credentials(other)
    make_add_model(tmp_path / "store", "add")
    ours = tmp_path / "ours" / "node.sock"
    theirs = tmp_path / "theirs" / "node.sock"
    processes = [
        start_node(tmp_path / "store", ours, "--cluster", str(cluster_dir), "--node-id",
                   "doc-ours", "--interface", "127.0.0.1", "--port", "0"),
        start_node(tmp_path / "store", theirs, "--cluster", str(other), "--node-id",
                   "doc-stranger", "--interface", "127.0.0.1", "--port", "0"),
    ]
    try:
        for process, sock in zip(processes, (ours, theirs), strict=True):
            wait_for_socket(sock, process)
        code, findings = doctor("--cluster", str(cluster_dir), "--socket", str(ours))
        by_check = {f["check"]: f for f in findings}
        assert code == 0
        assert by_check["credentials"]["status"] == "ok"
        assert by_check["local node"]["status"] == "ok"
        stranger = by_check["advert doc-stranger"]
        assert stranger["status"] == "warn" and "belongs to cluster" in stranger["detail"]
        assert "advert doc-ours" not in by_check  # our own member is fine

        code, findings = doctor("--cluster", str(tmp_path / "missing"), "--socket",
                                str(ours))
        assert code == 1
        assert {f["check"]: f for f in findings}["credentials"]["status"] == "fail"
    finally:
        for process in processes:
            stop_node(process)
