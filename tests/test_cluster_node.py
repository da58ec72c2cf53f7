"""`epara node` processes forming one cluster: on loopback, and on namespace hosts (root).

The cluster fabric itself is tested in test_peer_*.py; these tests check that the node
daemon joins it with nothing but the cluster credentials, and that `epara status` on any
node shows the same members and leader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from epara.node.client import Client, NodeUnreachable
from epara.peer.testing import NamespaceLab, have_netns

from .helpers import make_add_model, start_node, stop_node, wait_for_socket, wait_until


def cluster_view(sock: Path) -> dict[str, Any] | None:
    try:
        with Client(sock, timeout=5) as client:
            return client.status()["cluster"]
    except NodeUnreachable:
        return None



def agreement(socks: Sequence[Path], expected: set[str]) -> str | None:
    """The leader, when every node sees exactly ``expected`` alive and the same leader."""
    leaders = set()
    for sock in socks:
        view = cluster_view(sock)
        if view is None:
            return None
        alive = {m["node_id"] for m in view["members"] if m["status"] != "suspect"}
        if alive != expected:
            return None
        leaders.add(view["leader"])
    if len(leaders) != 1:
        return None
    leader = leaders.pop()
    return leader if leader in expected else None


@pytest.fixture
def store(tmp_path: Path) -> Path:
    make_add_model(tmp_path / "store", "add", batch=None)
    return tmp_path / "store"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        stop_node(process)


def test_nodes_on_loopback_form_one_cluster_and_replace_a_dead_leader(
        tmp_path: Path, cluster_dir: Path, store: Path,
        processes: list[subprocess.Popen[bytes]]) -> None:
    socks = [tmp_path / f"n{i}" / "node.sock" for i in range(3)]
    by_id = {}
    for i, sock in enumerate(socks):
        node_id = f"node{i}"
        processes.append(start_node(store, sock, "--cluster", str(cluster_dir), "--node-id",
                                    node_id, "--interface", "127.0.0.1", "--port", "0"))
        by_id[node_id] = (processes[-1], sock)
    for process, sock in by_id.values():
        wait_for_socket(sock, process)
    ids = set(by_id)
    wait_until(lambda: agreement(socks, ids) is not None, 30, "one cluster of 3")
    leader = agreement(socks, ids)

    # The CLI shows the same view from any node.
    outputs = [json.loads(subprocess.run(
        [sys.executable, "-m", "epara.node.cli", "status", "--json", "--socket", str(sock)],
        capture_output=True, text=True, check=True).stdout)["cluster"] for sock in socks]
    assert {o["leader"] for o in outputs} == {leader}
    assert all({m["node_id"] for m in o["members"]} == ids for o in outputs)
    assert all(m["capabilities"] or m["headline"] for m in outputs[0]["members"])

    process, _ = by_id[leader]
    process.send_signal(signal.SIGKILL)
    process.wait()
    rest = [sock for node_id, (_, sock) in by_id.items() if node_id != leader]
    wait_until(lambda: agreement(rest, ids - {leader}) is not None, 15,
               "a new leader among the 2 survivors")
    assert agreement(rest, ids - {leader}) != leader


def test_node_without_credentials_runs_alone_and_says_so(
        tmp_path: Path, store: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    sock = tmp_path / "alone" / "node.sock"
    env = {"EPARA_CLUSTER_DIR": str(tmp_path / "missing")}
    command = [sys.executable, "-m", "epara.node.cli", "node", "--store", str(store),
               "--socket", str(sock)]
    log = tmp_path / "alone.log"
    with open(log, "wb") as out:
        processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, **env}))
    wait_for_socket(sock, processes[-1])
    assert cluster_view(sock) is None
    assert "running alone" in log.read_text()


@pytest.mark.root
@pytest.mark.skipif(have_netns() is not None, reason=str(have_netns()))
def test_nodes_on_namespace_hosts_form_one_cluster_with_only_credentials(
        tmp_path: Path, cluster_dir: Path, store: Path,
        processes: list[subprocess.Popen[bytes]]) -> None:
    lab = NamespaceLab(4).create()
    try:
        socks = [tmp_path / f"h{i}" / "node.sock" for i in range(4)]
        for i, sock in enumerate(socks):
            # No interface, port or peer options: the defaults (all interfaces of the
            # host, port 7370, mDNS) as on a real device.
            processes.append(start_node(store, sock, "--cluster", str(cluster_dir),
                                        "--node-id", f"host{i}", prefix=lab.prefix(i)))
        for process, sock in zip(processes, socks, strict=True):
            wait_for_socket(sock, process)
        ids = {f"host{i}" for i in range(4)}
        wait_until(lambda: agreement(socks, ids) is not None, 40, "one cluster of 4")
        view = cluster_view(socks[2])
        assert view is not None
        assert {m["host"] for m in view["members"]} == {lab.ip(i) for i in range(4)}
    finally:
        for process in processes:
            stop_node(process)
        lab.close()


def test_nodes_with_device_identities_form_one_cluster_and_forward(
        tmp_path: Path, store: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """Per-device credentials only (no cluster.key on any device): each node serves with
    its own key and dialers pin it from certificates, on the control plane and on the
    data plane: the daemons form one cluster, and dev1 (no model) forwards a request
    to dev0 and relays its answer."""
    pytest.importorskip("nacl")
    import numpy as np

    from epara.node.client import EparaError
    from epara.peer.security import admit_device, create_authority

    create_authority(tmp_path / "auth")
    (tmp_path / "empty-store").mkdir()
    socks = [tmp_path / f"d{i}" / "node.sock" for i in range(2)]
    for i, sock in enumerate(socks):
        device = tmp_path / "devices" / f"dev{i}"
        admit_device(tmp_path / "auth", f"dev{i}", device)
        assert not (device / "cluster.key").exists()
        processes.append(start_node(store if i == 0 else tmp_path / "empty-store", sock,
                                    "--cluster", str(device), "--interface", "127.0.0.1",
                                    "--port", "0"))
    for process, sock in zip(processes, socks, strict=True):
        wait_for_socket(sock, process)
    wait_until(lambda: agreement(socks, {"dev0", "dev1"}) is not None, 30,
               "one cluster of 2 devices")
    x = np.ones((1, 4), np.float32)

    def forwarded() -> bool:
        try:
            with Client(socks[1], timeout=10) as client:
                answer = client._call({"op": "infer", "model": "add", "inputs": {"x": x},
                                       "deadline_ms": 5000})
        except EparaError:
            return False  # not placed or not ready yet
        np.testing.assert_array_equal(answer["outputs"]["y"], x + 1)
        return answer.get("served_by") == "dev0"

    wait_until(forwarded, 60, "dev1 to forward `add` to dev0 over the pinned data plane")
