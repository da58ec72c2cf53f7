"""CurveZMQ admission, in one process with real sockets on loopback (no mDNS)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from epara.peer.capabilities import Capabilities
from epara.peer.member import ClusterMember, MemberConfig, query_status, request
from epara.peer.security import load_cluster_credentials
from epara.peer.transport import Transport, control_message

LOOP = ("127.0.0.1",)


def run_async(test: Callable[..., Coroutine[None, None, None]]) -> Callable[..., None]:
    """Run an async test on a fresh loop (no pytest-asyncio dependency needed)."""
    @functools.wraps(test)
    def wrapper(*args: object, **kwargs: object) -> None:
        asyncio.run(test(*args, **kwargs))
    return wrapper


def member(creds: Path, caps: Capabilities, node_id: str, **kw: object) -> ClusterMember:
    config = MemberConfig(node_id=node_id, interfaces=LOOP, mdns=False, capabilities=caps,
                          **kw)  # type: ignore[arg-type]
    return ClusterMember(config, creds, lambda: {"queue": {"svc": 1}, "util": 0.5})


async def until(predicate: Callable[[], bool], timeout: float = 8.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@run_async
async def test_seeded_members_join_elect_and_obey(cluster_dir: Path,
                                                  fixed_caps: Capabilities) -> None:
    a = member(cluster_dir, fixed_caps, "a", priority=500)
    await a.start()
    b = member(cluster_dir, fixed_caps, "b", seeds=(f"127.0.0.1:{a.port}",))
    await b.start()
    got: list[tuple[dict, str, int]] = []
    b.on_command("place", lambda body, sender, term: got.append((body, sender, term)))
    changes: list[tuple] = []
    b.subscribe(lambda view: changes.append(view.summary()))
    try:
        # a learns b from b's heartbeats alone: seeds need only point one way.
        await until(lambda: a.view().member_ids == ("a", "b") == b.view().member_ids)
        await until(lambda: a.view().leader_id == "a" == b.view().leader_id)
        term = a.view().term
        assert term >= 1 and a.view().is_leader
        assert b.view().member("a").state == {"queue": {"svc": 1}, "util": 0.5}
        # State records flow a few times a second (heartbeat every 0.2 s).
        seq = b.view().member("a").seq
        await asyncio.sleep(1.0)
        assert b.view().member("a").seq - seq >= 3
        await until(lambda: b.view().member("a").capabilities is not None)
        assert b.view().member("a").capabilities["cpu_cores"] == 2
        await a.broadcast_command("place", {"v": 1})
        await until(lambda: len(got) == 1)
        assert got == [({"v": 1}, "a", term)]
        assert changes[-1] == (("a", "b"), "a", term)
        with pytest.raises(RuntimeError, match="not the leader"):
            await b.broadcast_command("place", {})
        status = await query_status(cluster_dir, "127.0.0.1", b.port)
        assert status["leader"] == "a" and [m["node_id"] for m in status["members"]] == ["a", "b"]
    finally:
        await b.stop()
        await a.stop()


@run_async
async def test_wrong_credentials_cannot_join_command_or_read(
        cluster_dir: Path, other_cluster_dir: Path, fixed_caps: Capabilities) -> None:
    good = member(cluster_dir, fixed_caps, "good")
    await good.start()
    got: list[object] = []
    good.on_command("place", lambda body, sender, term: got.append(body))
    rogue = member(other_cluster_dir, fixed_caps, "rogue", seeds=(f"127.0.0.1:{good.port}",))
    await rogue.start()
    try:
        # Both end up leading only themselves: neither ever hears the other.
        await until(lambda: good.view().is_leader and rogue.view().is_leader)
        await rogue.broadcast_command("place", {"evil": True})
        await asyncio.sleep(1.0)
        assert good.view().member_ids == ("good",) and rogue.view().member_ids == ("rogue",)
        assert got == []
        # Its requests get no answer (CURVE refuses the handshake, so no error either).
        bad = Transport(load_cluster_credentials(other_cluster_dir))
        try:
            with pytest.raises(asyncio.TimeoutError):
                await request(bad, "127.0.0.1", good.port, "status", timeout=1.0)
        finally:
            bad.close()
        # Nor does a client without CURVE at all.
        ctx = zmq.asyncio.Context()
        plain = ctx.socket(zmq.DEALER)
        plain.connect(f"tcp://127.0.0.1:{good.port}")
        await plain.send(control_message("status"))
        assert await plain.poll(1000) == 0
        ctx.destroy(linger=0)
        # The right key still gets an answer from the same node.
        assert (await query_status(cluster_dir, "127.0.0.1", good.port))["self"] == "good"
    finally:
        await rogue.stop()
        await good.stop()


@run_async
async def test_member_never_sends_state_to_an_impostor_server(
        cluster_dir: Path, other_cluster_dir: Path, fixed_caps: Capabilities) -> None:
    """A listener without the cluster secret, seeded into a member, receives nothing;
    a listener holding it receives the member's heartbeats (the control case)."""
    impostor = Transport(load_cluster_credentials(other_cluster_dir))
    genuine = Transport(load_cluster_credentials(cluster_dir))
    impostor.start()
    genuine.start()
    bad_sock, bad_port = impostor.bind_router("127.0.0.1", 0)
    good_sock, good_port = genuine.bind_router("127.0.0.1", 0)
    m = member(cluster_dir, fixed_caps, "m",
               seeds=(f"127.0.0.1:{bad_port}", f"127.0.0.1:{good_port}"))
    await m.start()
    try:
        assert await good_sock.poll(3000) != 0
        assert await bad_sock.poll(1000) == 0
    finally:
        await m.stop()
        impostor.close()
        genuine.close()
