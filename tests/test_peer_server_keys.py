"""Per-device server keys pinned by dialers (peer/security.py, "Dialers pin the server key").

Every device's own CURVE keypair is its server key; a dialer uses only a key it took
from a checked certificate. In-process sockets show that a pinned dialer reaches the
holder of that key and nobody else, revoked or not; member processes on loopback show
a cluster forming from static seeds alone (certificates exchanged over UDP, endpoints
gossiped with theirs) and the data plane pinning keys too."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nacl")

from epara.node.dataplane import DataPlane
from epara.peer import capabilities
from epara.peer.cli import fetch_status
from epara.peer.member import fetch_certificate
from epara.peer.security import (
    CERT_FILE,
    REVOCATIONS_FILE,
    ClusterCredentials,
    admit_device,
    create_authority,
    load_cluster_credentials,
    revoke_device,
)
from epara.peer.testing import MemberProcess, agreed, views, wait_for
from epara.peer.transport import Transport, control_message, try_send


def _cert(device: Path) -> str:
    return (device / CERT_FILE).read_text().strip()


@pytest.fixture
def devices(tmp_path: Path) -> dict[str, Path]:
    create_authority(tmp_path / "auth")
    out = {"auth": tmp_path / "auth"}
    for node_id in ("a", "b", "c"):
        out[node_id] = tmp_path / node_id
        admit_device(tmp_path / "auth", node_id, out[node_id])
    return out


async def _delivered(dialer: ClusterCredentials, server: ClusterCredentials,
                     pinned: bytes | None, wait: float) -> bool:
    """Whether a message from ``dialer``, pinned to ``pinned``, reaches the control
    ROUTER ``server`` binds within ``wait`` seconds."""
    listening, dialling = Transport(server), Transport(dialer)
    listening.start()
    dialling.start()
    try:
        router, port = listening.bind_router("127.0.0.1", 0, control=True)
        sock = dialling.connect_dealer("127.0.0.1", port, pinned)
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        while loop.time() < end:
            try_send(sock, control_message("hb", id="probe"))
            try:
                await asyncio.wait_for(router.recv_multipart(), 0.1)
                return True
            except asyncio.TimeoutError:
                continue
        return False
    finally:
        dialling.close()
        listening.close()


def test_a_dialer_reaches_only_the_holder_of_the_key_it_pinned(devices: dict[str, Path]) -> \
        None:
    a, b = (load_cluster_credentials(devices[n]) for n in "ab")
    key_b = a.trust.certificate_key(_cert(devices["b"]), "b")
    key_c = a.trust.certificate_key(_cert(devices["c"]), "c")
    assert key_b == b.node_public and key_c is not None and key_b != key_c
    # The certificate binds the key to its node id: c's cannot stand for b.
    assert a.trust.certificate_key(_cert(devices["c"]), "b") is None
    assert asyncio.run(_delivered(a, b, key_b, 5.0))
    # The server at that address does not hold the secret of the key pinned: the CURVE
    # handshake never completes and nothing is sent (ZMQ_IMMEDIATE).
    assert not asyncio.run(_delivered(a, b, key_c, 1.5))
    with pytest.raises(ValueError, match="pin"):
        Transport(a).connect_dealer("127.0.0.1", 9, None)


def test_a_revoked_device_cannot_pose_as_a_server(devices: dict[str, Path]) -> None:
    a, c = (load_cluster_credentials(devices[n]) for n in "ac")
    revoke_device(devices["auth"], "c")
    assert a.trust.offer((devices["auth"] / REVOCATIONS_FILE).read_bytes())
    # c still holds its own secret, but no dialer takes its certificate any more ...
    assert a.trust.certificate_key(_cert(devices["c"]), "c") is None
    # ... and on an address it hijacked, it cannot answer for the key the dialer pinned
    # there (b's), which the shared server key used to let it do.
    key_b = a.trust.certificate_key(_cert(devices["b"]), "b")
    assert key_b is not None
    assert not asyncio.run(_delivered(a, c, key_b, 1.5))


def test_the_data_plane_pins_the_key_its_resolver_names(devices: dict[str, Path]) -> None:
    a, b = load_cluster_credentials(devices["a"]), load_cluster_credentials(devices["b"])
    # b's control plane has checked a's certificate (its data plane admits only such keys).
    assert b.trust.certificate_key(_cert(devices["a"]), "a") == a.node_public

    async def exchange(key: bytes | None) -> bool:
        keys: dict[tuple[str, int], bytes | None] = {}
        receiver = DataPlane(devices["b"], "127.0.0.1", server_key_for=keys.get)
        sender = DataPlane(devices["a"], "127.0.0.1", server_key_for=keys.get)
        got: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def on_data(header: dict, tensors: dict) -> None:
            if not got.done():
                got.set_result(bool(np.array_equal(tensors["x"], np.arange(4.0))))

        receiver.on("data", on_data)
        await receiver.start()
        await sender.start()
        keys[receiver.endpoint] = key
        try:
            await sender.send_when_connected(receiver.endpoint, {"kind": "data"},
                                             {"x": np.arange(4.0)}, timeout=1.5)
            return await asyncio.wait_for(got, 1.5)
        except asyncio.TimeoutError:
            return False
        finally:
            await sender.stop()
            await receiver.stop()

    assert asyncio.run(exchange(b.node_public))
    assert not asyncio.run(exchange(a.trust.certificate_key(_cert(devices["c"]), "c")))
    assert not asyncio.run(exchange(None))  # no known key: never dialled unpinned
    with pytest.raises(ValueError, match="server_key_for"):
        DataPlane(devices["a"], "127.0.0.1")


def _free_port() -> int:
    """A port free for TCP (control) and UDP (certificate queries) alike."""
    while True:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


@pytest.fixture
def seeded(tmp_path: Path, devices: dict[str, Path]) -> Iterator[list[MemberProcess]]:
    cache = tmp_path / "cache"
    capabilities.probe(cache)
    port = _free_port()
    procs = []
    try:
        for node_id in ("a", "b", "c"):
            # Only a's address is known to b and c: no mDNS; b and c learn each other
            # from a's gossip (endpoints with certificates).
            args = ["--credentials", str(devices[node_id]), "--interface", "127.0.0.1",
                    "--no-mdns", "--cache-dir", str(cache)]
            args += ["--port", str(port)] if node_id == "a" else \
                ["--peer", f"127.0.0.1:{port}"]
            proc = MemberProcess(node_id, tmp_path / f"{node_id}.json", args,
                                 log_file=tmp_path / f"{node_id}.log")
            proc.start()
            procs.append(proc)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def test_a_per_device_cluster_forms_from_seeds_with_pinned_keys(
        seeded: list[MemberProcess], devices: dict[str, Path]) -> None:
    ids = {"a", "b", "c"}

    def synced() -> bool:
        return agreed(seeded, ids) is not None and all(
            m["node_id"] == v["self"] or m["state"].get("uptime_s") is not None
            for v in views(seeded).values() for m in v["members"])

    wait_for(synced, 45, interval=0.2)
    endpoint = views(seeded)["a"]["endpoint"]
    host, port = endpoint.rsplit(":", 1)
    # `epara status` against another device: its key comes from its UDP answer.
    assert asyncio.run(fetch_certificate(host, int(port))) == _cert(devices["a"])
    view = fetch_status(devices["b"], endpoint)
    assert set(view.member_ids) == ids and view.leader_id in ids


def test_the_advert_carries_a_certificate_that_fits_and_round_trips(tmp_path: Path) -> None:
    from epara.peer.discovery import parse_advert, txt_properties

    create_authority(tmp_path / "auth")
    node_id = "n" * 64  # the longest id admit allows
    admit_device(tmp_path / "auth", node_id, tmp_path / "dev")
    creds = load_cluster_credentials(tmp_path / "dev")
    headline = {"cls": "microcomputer", "cpu": 4, "mem": 7800, "gf": 12.5, "acc": "npu"}
    props = txt_properties(node_id, creds.cluster_id, 7370, headline, creds.certificate)
    assert all(len(k) + len(v) + 1 <= 255 for k, v in props.items())  # one TXT string each
    advert = parse_advert(f"{node_id}._epara._tcp.local.",
                          {k.encode(): v.encode() for k, v in props.items()},
                          ["10.0.0.2"], 7370, creds.cluster_id)
    assert advert is not None and advert.certificate == creds.certificate.encode()
    assert creds.trust.certificate_key(advert.certificate, node_id) == creds.node_public
    assert set(advert.headline) == set(headline)
    # An advert naming another node id than its certificate's gives no key to pin.
    forged = parse_advert("x._epara._tcp.local.",
                          {**{k.encode(): v.encode() for k, v in props.items()}, b"id": b"x"},
                          ["10.0.0.2"], 7370, creds.cluster_id)
    assert forged is not None and creds.trust.certificate_key(forged.certificate, "x") is None
