"""Member processes on loopback: real zeroconf (interfaces=['127.0.0.1']) and ZeroMQ.

The tests run in order on one cluster (module fixture), each starting from the state
the previous one left, because starting processes and electing costs seconds each.
Timed assertions allow 3x the issue's bounds (removal 1.5 s, failover 3 s): the
machine is shared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

from epara.peer import capabilities, cli
from epara.peer.discovery import SERVICE_TYPE
from epara.peer.security import create_cluster_credentials, load_cluster_credentials
from epara.peer.testing import MemberProcess, agreed, claimants, views, wait_for

REMOVE_BOUND = 3 * 1.5
FAILOVER_BOUND = 3 * 3.0
IDS = ["n0", "n1", "n2", "n3"]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.creds = root / "cluster"
        self.rogue_creds = root / "rogue"
        create_cluster_credentials(self.creds)
        create_cluster_credentials(self.rogue_creds)
        self.cache = root / "cache"
        capabilities.probe(self.cache)  # measure once; the children read the cache
        self.procs: dict[str, MemberProcess] = {}
        self.killed_at: dict[str, float] = {}

    def spawn(self, node_id: str, *extra: str, creds: Path | None = None) -> MemberProcess:
        proc = MemberProcess(
            node_id, self.root / f"{node_id}.json",
            ["--credentials", str(creds or self.creds), "--interface", "127.0.0.1",
             "--cache-dir", str(self.cache), "--command-every", "0.5", *extra],
            log_file=self.root / f"{node_id}.log")
        proc.start()
        self.procs[node_id] = proc
        return proc

    def running(self) -> list[MemberProcess]:
        return [p for p in self.procs.values() if p.alive and p.node_id != "rogue"]

    def leader(self) -> str:
        ids = {p.node_id for p in self.running()}
        found = agreed(self.running(), ids)
        assert found is not None, views(self.running())
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("loopback"))
    try:
        for node_id in IDS:
            c.spawn(node_id, *(["--never-lead"] if node_id == "n3" else []))
        yield c
    finally:
        for proc in c.procs.values():
            proc.stop()


def test_discover_and_elect_one_leader(cluster: Cluster) -> None:
    wait_for(lambda: agreed(cluster.running(), set(IDS)) is not None, 20)
    leader = cluster.leader()
    assert leader != "n3"  # configured never_lead
    assert claimants(cluster.running()) == {leader}
    # State records and capability records flow (status files refresh every second).
    def full(v: dict[str, Any]) -> bool:
        return all(m["capabilities"] and m["state"].get("uptime_s") is not None
                   for m in v["members"])
    wait_for(lambda: all(full(v) for v in views(cluster.running()).values()), 10)
    # The leader's commands reach every follower, stamped with its term.
    def pinged(v: dict[str, Any]) -> bool:
        return any(c["from"] == leader and c["term"] == v["term"] for c in v["commands"])
    wait_for(lambda: all(pinged(v) for v in views(cluster.running()).values()), 10)


def test_plain_mdns_browser_lists_the_nodes(cluster: Cluster) -> None:
    found: dict[str, dict[bytes, bytes | None]] = {}

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            info = zeroconf.get_service_info(service_type, name, 3000)
            if info is not None:
                found[name] = dict(info.properties)

    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:
        ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        wait_for(lambda: {f"{n}.{SERVICE_TYPE}" for n in IDS} <= set(found), 10)
    finally:
        zc.close()
    cluster_id = load_cluster_credentials(cluster.creds).cluster_id.encode()
    secret = load_cluster_credentials(cluster.creds).secret_key
    for props in found.values():
        assert props[b"cid"] == cluster_id
        assert not any(secret in (v or b"") for v in props.values())


def test_sigkilled_member_removed_within_bound(cluster: Cluster) -> None:
    leader = cluster.leader()
    victim = next(n for n in IDS if n not in (leader, "n3"))
    cluster.procs[victim].kill()
    start = time.monotonic()
    took = wait_for(lambda: agreed(cluster.running(), set(IDS) - {victim}) == leader,
                    REMOVE_BOUND)
    print(f"removal of a SIGKILLed follower seen by all: {took:.2f} s")
    assert time.monotonic() - start <= REMOVE_BOUND


def test_leader_death_elects_a_new_leader(cluster: Cluster) -> None:
    old = cluster.leader()
    cluster.procs[old].kill()
    remaining = {p.node_id for p in cluster.running()}
    took = wait_for(lambda: agreed(cluster.running(), remaining) not in (None, old),
                    FAILOVER_BOUND)
    print(f"leader failover: {took:.2f} s")
    new = cluster.leader()
    assert new != "n3" and claimants(cluster.running()) == {new}
    new_term = views(cluster.running())[new]["term"]
    assert new_term > 1


def test_restarted_nodes_rejoin_without_a_second_leader(cluster: Cluster) -> None:
    leader = cluster.leader()
    term = views(cluster.running())[leader]["term"]
    before = {n: v for n, v in views(cluster.running()).items()}
    old_inc = {m["node_id"]: m["incarnation"] for m in before[leader]["members"]}
    dead = [n for n in IDS if not cluster.procs[n].alive]
    assert dead
    for node_id in dead:
        cluster.spawn(node_id)
    # While they rejoin, never two claimants among nodes that see each other.
    deadline = time.monotonic() + 20
    while agreed(cluster.running(), set(IDS)) is None:
        assert time.monotonic() < deadline, views(cluster.running())
        claims = claimants(cluster.running())
        if len(claims) > 1:
            # Tolerated only while the claimants have not yet heard each other.
            seen = views(cluster.running())
            for a in claims:
                assert not any(m["node_id"] in claims - {a} and m["status"] == "alive"
                               and m["role"] == "leader" for m in seen[a]["members"])
        time.sleep(0.05)
    # The incumbent keeps leading: rejoining nodes adopt it rather than depose it.
    assert cluster.leader() == leader and claimants(cluster.running()) == {leader}
    assert views(cluster.running())[leader]["term"] == term
    incs = {m["node_id"]: m["incarnation"] for m in views(cluster.running())[leader]["members"]}
    assert all(incs[n] > old_inc.get(n, 0) for n in dead)


def test_wrong_credentials_refused(cluster: Cluster) -> None:
    leader = cluster.leader()
    endpoint = views(cluster.running())[leader]["endpoint"]
    rogue = cluster.spawn("rogue", "--peer", endpoint, creds=cluster.rogue_creds)
    # The rogue leads only itself and sends pings, which nobody may act on.
    wait_for(lambda: (rogue.status() or {}).get("leader") == "rogue"
             and len(rogue.status()["commands"]) >= 3, 15)
    time.sleep(1.0)
    assert [m["node_id"] for m in rogue.status()["members"]] == ["rogue"]
    for v in views(cluster.running()).values():
        assert "rogue" not in {m["node_id"] for m in v["members"]}
        assert all(c["from"] != "rogue" for c in v["commands"])
    assert cluster.leader() == leader
    rogue.stop()


def test_status_from_any_node_via_cli_helpers(cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = next(p for p in cluster.running() if p.node_id != leader)
    endpoint = views(cluster.running())[follower.node_id]["endpoint"]
    text = cli.status(cluster.creds, endpoint)
    assert text.startswith(f"leader {leader}  term ")
    assert f"{follower.node_id} *" in text and len(text.splitlines()) == 2 + len(IDS)
    data = json.loads(cli.status(cluster.creds, endpoint, as_json=True))
    assert data["leader"] == leader and len(data["members"]) == len(IDS)
    with pytest.raises(TimeoutError):  # the wrong cluster's key gets no answer
        cli.status(cluster.rogue_creds, endpoint, timeout=1.0)
