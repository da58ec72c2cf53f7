"""Per-device identity (peer/security.py): an authority off the devices, certificates
binding node ids to CURVE keys, signed revocation lists spread through the cluster.

The cluster test runs real member processes on loopback (mDNS on 127.0.0.1, CurveZMQ)
and a hand-driven impostor connection that holds a valid certificate of its own."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("nacl")

from epara.peer import capabilities, membership, statesync
from epara.peer.member import fetch_certificate, parse_endpoint
from epara.peer.security import (
    CERT_FILE,
    REVOCATIONS_FILE,
    Certificate,
    CredentialsError,
    Revocations,
    admit_device,
    create_authority,
    create_cluster_credentials,
    load_cluster_credentials,
    revoke_device,
)
from epara.peer.testing import MemberProcess, agreed, views, wait_for
from epara.peer.transport import Transport, control_message, try_send


def test_admit_signs_a_device_key_and_the_authority_stays_off_the_device(tmp_path: Path) -> \
        None:
    auth = tmp_path / "auth"
    info = create_authority(auth)
    device = tmp_path / "dev"
    admit_device(auth, "pi-1", device)
    # No shared secret on the device: its own key is its server key too.
    assert sorted(p.name for p in device.iterdir()) == sorted(
        ["authority.pub", "node.cert", "node.key", "revocations.cbor"])
    assert (device / "node.key").stat().st_mode & 0o777 == 0o600
    creds = load_cluster_credentials(device)
    assert creds.per_device and creds.certificate.node_id == "pi-1"
    assert creds.cluster_id == info["cluster_id"] and creds.public_key is None
    assert creds.server_public == creds.node_public
    # A directory an older admit made (with the cluster key) still loads, and ignores it;
    # a key of another cluster there is refused; re-admitting removes it.
    shutil.copy(auth / "cluster.key", device / "cluster.key")
    assert load_cluster_credentials(device).server_secret == creds.node_secret
    create_cluster_credentials(tmp_path / "elsewhere")
    shutil.copy(tmp_path / "elsewhere" / "cluster.key", device / "cluster.key")
    with pytest.raises(CredentialsError, match="not the key of the cluster"):
        load_cluster_credentials(device)
    admit_device(auth, "pi-1", device)
    assert not (device / "cluster.key").exists()
    # A certificate for another key, or edited, does not load.
    other = tmp_path / "other"
    admit_device(auth, "pi-2", other)
    shutil.copy(other / CERT_FILE, device / CERT_FILE)
    with pytest.raises(CredentialsError):
        load_cluster_credentials(device)
    cert = Certificate.decode((other / CERT_FILE).read_text().strip())
    forged = Certificate(cert.cluster_id, "pi-1", cert.curve_public, cert.issued,
                         cert.signature)
    assert not forged.verify(creds.trust.authority, creds.cluster_id)
    # Re-admitting a directory that already has a key signs that key (made on the device).
    key_before = (other / "node.key").read_text()
    admit_device(auth, "pi-2", other)
    assert (other / "node.key").read_text() == key_before


def test_revocation_lists_are_signed_versioned_and_refuse_the_device(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    create_authority(auth)
    admit_device(auth, "a", tmp_path / "a")
    admit_device(auth, "b", tmp_path / "b")
    trust = load_cluster_credentials(tmp_path / "a").trust
    b = load_cluster_credentials(tmp_path / "b")
    assert trust.node_for(b.node_public, b.certificate.encode()) == "b"
    assert trust.node_for(b.public_key, b.certificate.encode()) is None  # not its key
    assert revoke_device(auth, "b")["version"] == 1
    blob = (auth / REVOCATIONS_FILE).read_bytes()
    unsigned = Revocations.decode(blob)
    tampered = Revocations(unsigned.cluster_id, 5, unsigned.node_ids | {"a"}, unsigned.keys,
                           unsigned.signature)
    assert not trust.offer(tampered.encode())
    assert trust.offer(blob) and not trust.offer(blob)  # a version is adopted once
    assert trust.node_for(b.node_public, b.certificate.encode()) is None
    assert (tmp_path / "a" / REVOCATIONS_FILE).read_bytes() == blob  # kept for restarts
    with pytest.raises(CredentialsError):
        admit_device(auth, "b", tmp_path / "b2")  # a revoked id is not handed out again


def test_upgrading_a_shared_key_cluster_keeps_its_id(tmp_path: Path) -> None:
    legacy = create_cluster_credentials(tmp_path / "cluster")
    create_authority(tmp_path / "auth", tmp_path / "cluster")  # the one-line upgrade
    admit_device(tmp_path / "auth", "n1", tmp_path / "n1")
    assert load_cluster_credentials(tmp_path / "n1").cluster_id == legacy.cluster_id
    assert not load_cluster_credentials(tmp_path / "cluster").per_device  # still works


# --- a cluster of member processes ----------------------------------------------------


class IdCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.auth = root / "auth"
        create_authority(self.auth)
        self.cache = root / "cache"
        capabilities.probe(self.cache)
        self.procs: dict[str, MemberProcess] = {}

    def device(self, node_id: str) -> Path:
        path = self.root / "devices" / node_id
        if not path.exists():
            admit_device(self.auth, node_id, path)
        return path

    def spawn(self, node_id: str) -> MemberProcess:
        proc = MemberProcess(node_id, self.root / f"{node_id}.json",
                             ["--credentials", str(self.device(node_id)), "--interface",
                              "127.0.0.1", "--cache-dir", str(self.cache), "--command-every",
                              "0.5"], log_file=self.root / f"{node_id}.log")
        proc.start()
        self.procs[node_id] = proc
        return proc

    def running(self, *ids: str) -> list[MemberProcess]:
        return [self.procs[i] for i in ids]


@pytest.fixture
def id_cluster(tmp_path: Path) -> Iterator[IdCluster]:
    cluster = IdCluster(tmp_path)
    try:
        yield cluster
    finally:
        for proc in cluster.procs.values():
            proc.stop()


async def _impersonate(device: Path, endpoint: str, victim: str, leader_term: int) -> None:
    """With a valid certificate of its own, claim to be ``victim`` and the leader."""
    creds = load_cluster_credentials(device)
    transport = Transport(creds)
    transport.start()
    try:
        host, port = parse_endpoint(endpoint)
        key = creds.trust.certificate_key(await fetch_certificate(host, port))
        assert key is not None
        sock = transport.connect_dealer(host, port, key)
        beat = membership.Heartbeat(victim, 1, 10**9, "127.0.0.1", 9, leader_term, victim,
                                    999, True, 0, statesync.EMPTY_DIGEST)
        for _ in range(40):  # a couple of seconds of claims, once connected
            try_send(sock, control_message("hb", **beat.to_wire()))
            try_send(sock, control_message("cmd", kind="ping", body={}, term=leader_term,
                                           **{"from": victim}, inc=1, seq=int(time.time())))
            await asyncio.sleep(0.05)
        sock.close(linger=0)
    finally:
        transport.close()


def test_certified_devices_join_impostors_fail_and_revocation_shuts_one_out(
        id_cluster: IdCluster) -> None:
    ids = {"d0", "d1", "d2"}
    for node_id in sorted(ids):
        id_cluster.spawn(node_id)
    procs = id_cluster.running(*sorted(ids))
    wait_for(lambda: agreed(procs, ids) is not None, 60)
    leader = agreed(procs, ids)
    term = views(procs)[leader]["term"]

    # A device with a valid certificate of its own cannot speak as another node, nor
    # claim the leadership in that node's name.
    victim = next(n for n in sorted(ids) if n != leader)
    target = views(procs)[leader]["endpoint"]
    asyncio.run(_impersonate(id_cluster.device("mallory"), target, victim, term + 50))
    after = views(procs)[leader]
    assert after["leader"] == leader and after["term"] < term + 50
    assert {m["node_id"] for m in after["members"]} == ids  # mallory never became one
    log = (id_cluster.root / f"{leader}.log").read_text()
    assert "certified as 'mallory'" in log

    # Revoke d2 (not re-keying anyone): drop the list into one member's directory.
    revoked = "d2" if leader != "d2" else "d1"
    revoke_device(id_cluster.auth, revoked)
    first = next(n for n in sorted(ids) if n != revoked)
    blob = (id_cluster.auth / REVOCATIONS_FILE).read_bytes()
    tmp = id_cluster.device(first) / ".drop"
    tmp.write_bytes(blob)
    os.replace(tmp, id_cluster.device(first) / REVOCATIONS_FILE)
    rest = ids - {revoked}
    others = id_cluster.running(*sorted(rest))
    wait_for(lambda: agreed(others, rest) is not None, 30)
    # It spread: every remaining member holds the new list, and the cluster works on.
    for node_id in rest:
        assert (id_cluster.device(node_id) / REVOCATIONS_FILE).read_bytes() == blob
    # Restarted, the revoked device still cannot get back in.
    id_cluster.procs[revoked].stop()
    id_cluster.spawn(revoked)
    time.sleep(4.0)
    assert agreed(others, rest) is not None
    new_leader = agreed(others, rest)
    assert all(c["from"] == new_leader for v in views(others).values()
               for c in v["commands"][-3:])


def test_doctor_reports_the_device_identity_and_its_revocation(tmp_path: Path) -> None:
    from epara.node.doctor import check_credentials

    create_authority(tmp_path / "auth")
    admit_device(tmp_path / "auth", "pi-9", tmp_path / "dev")
    finding, _ = check_credentials(tmp_path / "dev")
    assert finding.status == "ok" and "device pi-9 certified" in finding.detail
    assert check_credentials(tmp_path / "auth")[0].status == "warn"  # the authority itself
    revoke_device(tmp_path / "auth", "pi-9")
    shutil.copy(tmp_path / "auth" / REVOCATIONS_FILE, tmp_path / "dev" / REVOCATIONS_FILE)
    load_cluster_credentials(tmp_path / "dev").trust.reload()
    assert check_credentials(tmp_path / "dev")[0].status == "fail"
