"""Forwarded API requests between two real data planes (CurveZMQ over loopback), served by
a real LocalApi with real ONNX models: the one tensor form, deadlines that bound every
wait, failed sends, per-peer bounds, and work cancelled when nobody waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epara.models.manifest import load_manifest
from epara.node.api import LocalApi, Request
from epara.node.daemon import load_service
from epara.node.dataplane import DataPlane
from epara.node.forwarder import Forwarder
from epara.node.service import ModelService, ServiceError

from .helpers import make_add_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelService]:
    store = tmp_path_factory.mktemp("fwd-store")
    services: dict[str, ModelService] = {}
    for name, kwargs in (("add", {}), ("slow", {"matmul_size": 384})):
        directory = make_add_model(store, name, batch=None, **kwargs)
        service = load_service(directory, load_manifest(directory), 1)
        assert isinstance(service, ModelService)
        services[name] = service
    yield services
    for service in services.values():
        service.stop()


class Pair:
    """An origin and a serving peer, each a data plane with a Forwarder."""

    def __init__(self, origin: Forwarder, peer: Forwarder, peer_plane: DataPlane,
                 seen: list[dict[str, Any]]) -> None:
        self.origin = origin
        self.peer = peer
        self.peer_plane = peer_plane
        self.seen = seen

    async def call(self, message: dict[str, Any], deadline_s: float | None = None,
                   ) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []

        async def reply(answer: dict[str, Any]) -> None:
            replies.append(answer)

        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        await self.origin.forward("peer", message, reply, deadline)
        return replies


@contextlib.asynccontextmanager
async def pair(cluster_dir: Path, services: dict[str, ModelService], **limits: Any,
               ) -> AsyncIterator[Pair]:
    seen: list[dict[str, Any]] = []  # what the peer was asked to serve
    peer_limits = limits.pop("peer", {})
    origin_plane = DataPlane(cluster_dir, "127.0.0.1")
    peer_plane = DataPlane(cluster_dir, "127.0.0.1", **peer_limits.pop("plane", {}))
    api = LocalApi(services, lambda: [], lambda: {})

    async def serve(message: dict[str, Any], reply: Callable[..., Any]) -> None:
        seen.append(message)
        await api._handle(Request(message), reply, {})

    async def nothing(message: dict[str, Any], reply: Callable[..., Any]) -> None:
        raise AssertionError("the origin serves nothing here")

    peer = Forwarder(peer_plane, "peer", serve, lambda _: origin_plane.endpoint,
                     **peer_limits)
    await origin_plane.start()
    await peer_plane.start()
    endpoints = {"peer": peer_plane.endpoint, "nobody": ("127.0.0.1", 9)}
    origin = Forwarder(origin_plane, "origin", nothing, endpoints.__getitem__, **limits)
    try:
        yield Pair(origin, peer, peer_plane, seen)
    finally:
        await origin_plane.stop()
        await peer_plane.stop()


def _infer(model: str, x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"id": 7, "op": "infer", "model": model, "inputs": {"x": x}, **extra}


def test_a_forwarded_request_and_its_reply_keep_their_tensors(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> list[dict[str, Any]]:
        async with pair(cluster_dir, models) as p:
            x = np.random.default_rng(0).random((65536, 4), dtype=np.float32)  # 1 MiB
            return [x, *await p.call(_infer("add", x), deadline_s=30)]

    x, answer = asyncio.run(run())
    assert answer["ok"] and answer["id"] == 7 and answer["served_by"] == "peer"
    np.testing.assert_array_equal(answer["outputs"]["y"], x + 1)


def test_the_peer_gets_the_remaining_budget_as_its_deadline(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> dict[str, Any]:
        async with pair(cluster_dir, models) as p:
            # The client asked for 60 s when the request arrived; 2 s are left now.
            await p.call(_infer("add", np.ones((1, 4), np.float32), deadline_ms=60000),
                         deadline_s=2.0)
            return p.seen[-1]

    served = asyncio.run(run())
    assert 0 < served["deadline_ms"] <= 2000 and served["forwarded"] is True


def test_a_peer_that_stops_answering_fails_the_request_at_its_deadline(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> tuple[ServiceError, float, float]:
        async with pair(cluster_dir, models, idle_s=60) as p:
            await p.call(_infer("add", np.ones((1, 4), np.float32)))  # connected, working
            assert p.peer_plane._receiver is not None
            p.peer_plane._receiver.cancel()  # the peer still holds its socket, reads nothing
            started = time.monotonic()
            with pytest.raises(ServiceError) as info:
                await p.call(_infer("add", np.ones((1, 4), np.float32)), deadline_s=0.4)
            return info.value, time.monotonic() - started, p.origin.idle_s

    error, elapsed, idle = asyncio.run(run())
    assert error.code == "deadline_exceeded", error
    assert elapsed < idle / 2  # bounded by the request's deadline, not by the idle bound


def test_without_a_deadline_a_silent_peer_fails_after_the_idle_bound(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> ServiceError:
        async with pair(cluster_dir, models, idle_s=0.3) as p:
            assert p.peer_plane._receiver is not None
            p.peer_plane._receiver.cancel()
            with pytest.raises(ServiceError) as info:
                await p.call(_infer("add", np.ones((1, 4), np.float32)))
            return info.value

    error = asyncio.run(run())
    assert error.code == "unavailable" and "no reply" in str(error)


def test_a_failed_send_fails_the_request_at_once_with_a_clear_error(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> tuple[ServiceError, dict[str, int]]:
        async with pair(cluster_dir, models, send_timeout_s=0.2, idle_s=60) as p:
            with pytest.raises(ServiceError) as info:
                await p.origin.forward("nobody", _infer("add", np.ones((1, 4), np.float32)),
                                       _unused_reply, time.monotonic() + 30)
            return info.value, p.origin.counts

    error, counts = asyncio.run(run())
    assert error.code == "unavailable" and "send was refused" in str(error)
    assert counts["send_failed"] == 1


async def _unused_reply(answer: dict[str, Any]) -> None:
    raise AssertionError(f"no reply expected, got {answer}")


def _four_slow_calls(cluster_dir: Path, models: dict[str, ModelService],
                     **limits: Any) -> list[Any]:
    async def run() -> list[Any]:
        async with pair(cluster_dir, models, **limits) as p:
            x = np.ones((1, 4), np.float32)
            return await asyncio.gather(
                *(p.call(_infer("slow", x), deadline_s=60) for _ in range(4)),
                return_exceptions=True)

    return asyncio.run(run())  # one loop per pair, as in a node


def test_requests_past_the_per_peer_bound_are_overloaded(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    origin_side = _four_slow_calls(cluster_dir, models, max_per_peer=2,
                                   peer={"max_per_peer": 100})
    refused = [r for r in origin_side if isinstance(r, ServiceError)]
    assert [e.code for e in refused] == ["overloaded", "overloaded"]
    served = [r for r in origin_side if isinstance(r, list)]
    assert len(served) == 2 and all(r[0]["ok"] for r in served)
    # The serving side's own bound, per origin, when the origin allows more than it.
    serving_side = _four_slow_calls(cluster_dir, models, max_per_peer=100,
                                    peer={"max_per_peer": 2})
    codes = sorted("ok" if r[0]["ok"] else r[0]["error"]["code"] for r in serving_side)
    assert codes == ["ok", "ok", "overloaded", "overloaded"]


def test_a_full_data_plane_refuses_work_with_overloaded(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> tuple[list[Any], int]:
        async with pair(cluster_dir, models, peer={"plane": {"max_tasks": 1}}) as p:
            x = np.ones((1, 4), np.float32)
            results = await asyncio.gather(
                *(p.call(_infer("slow", x), deadline_s=60) for _ in range(3)))
            return results, p.peer_plane.refused

    results, refused = asyncio.run(run())
    codes = sorted("ok" if r[0]["ok"] else r[0]["error"]["code"] for r in results)
    assert codes == ["ok", "overloaded", "overloaded"] and refused == 2


def test_work_nobody_waits_for_is_cancelled_on_the_peer(
        cluster_dir: Path, models: dict[str, ModelService]) -> None:
    async def run() -> dict[str, int]:
        async with pair(cluster_dir, models) as p:
            x = np.ones((1, 4), np.float32)
            await p.call(_infer("slow", x))  # served: 1
            background = [asyncio.create_task(p.call(_infer("slow", x))) for _ in range(2)]
            abandoned = asyncio.create_task(p.call(_infer("slow", x)))
            while len(p.peer._serving) < 3:  # all three queued on the peer
                await asyncio.sleep(0.005)
            abandoned.cancel()  # its client went away: the origin sends api_cancel
            with contextlib.suppress(asyncio.CancelledError):
                await abandoned
            await asyncio.gather(*background)  # served: 3
            while p.peer._serving:
                await asyncio.sleep(0.005)
            return dict(p.peer.counts)

    counts = asyncio.run(run())
    assert counts["served"] == 3  # the abandoned request never ran to completion


# --- the frame form itself ---------------------------------------------------------------


def test_pack_message_moves_every_tensor_and_byte_string_out_of_the_header() -> None:
    from epara.peer import wire

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    message = {"id": 1, "op": "segment", "image": b"\x89PNG" * 1000,
               "inputs": {"x": x, "mask": np.array([True, False])}, "n": [1, 2]}
    frames = wire.pack_message({"kind": "api", "req": "r"}, message)
    assert len(frames) == 4 and len(frames[0]) < 400  # the header holds no tensor bytes
    header, back = wire.unpack_message([bytes(f) for f in frames])
    assert header == {"kind": "api", "req": "r"}
    np.testing.assert_array_equal(back["inputs"]["x"], x)
    np.testing.assert_array_equal(back["inputs"]["mask"], [1, 0])
    assert back["image"] == message["image"] and back["n"] == [1, 2]
    # The sender's frame is the array's own memory: no copy on the way out.
    assert any(np.shares_memory(np.frombuffer(f, np.uint8), x) for f in frames[1:])


@pytest.mark.parametrize("places", [
    [{"path": []}], [{"path": ["nowhere", "x"]}], [{"path": [True]}], ["x"], {"a": 1},
])
def test_unpack_message_refuses_bad_places(places: Any) -> None:
    from epara.peer import wire

    frames = wire.pack({"kind": "api", "msg": {"id": 1}, "places": places},
                       {"0": np.ones(2, np.float32)})
    with pytest.raises(wire.WireError):
        wire.unpack_message([bytes(f) for f in frames])


# --- two real node processes: forwarding, then a peer that stops answering ---------------


def test_a_node_forwards_to_its_peer_and_a_frozen_peer_costs_only_the_deadline(
        tmp_path: Path, cluster_dir: Path) -> None:
    """Node b has no model; node a serves `add`. A request to b is forwarded to a and
    relayed back. Then a is frozen (SIGSTOP: its sockets stay open, it answers nothing):
    a request to b with a 1.5 s deadline ends with a clear error by about then, not after
    the old fixed 120 s forwarding timeout."""
    import os
    import signal

    from epara.node.client import Client, EparaError

    from .helpers import start_node, stop_node, wait_for_socket, wait_until

    make_add_model(tmp_path / "store-a", "add", batch=None)
    (tmp_path / "store-b").mkdir()
    socks = {name: tmp_path / name / "node.sock" for name in ("a", "b")}
    processes = {name: start_node(tmp_path / f"store-{name}", socks[name], "--cluster",
                                  str(cluster_dir), "--node-id", name, "--interface",
                                  "127.0.0.1", "--port", "0") for name in socks}
    x = np.ones((1, 4), np.float32)
    try:
        for name, process in processes.items():
            wait_for_socket(socks[name], process)

        def forwarded() -> bool:
            try:
                with Client(socks["b"], timeout=10) as client:
                    answer = client._call({"op": "infer", "model": "add", "inputs": {"x": x},
                                           "deadline_ms": 5000})
            except EparaError:
                return False  # not placed or not ready yet
            np.testing.assert_array_equal(answer["outputs"]["y"], x + 1)
            return answer.get("served_by") == "a"

        wait_until(forwarded, 60, "b to forward `add` to a")
        os.kill(processes["a"].pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with Client(socks["b"], timeout=60) as client, pytest.raises(EparaError) as info:
                client._call({"op": "infer", "model": "add", "inputs": {"x": x},
                              "deadline_ms": 1500})
            elapsed = time.monotonic() - started
        finally:
            os.kill(processes["a"].pid, signal.SIGCONT)
        # Either the wait ran into the deadline, or membership had already marked the
        # frozen peer dead and b knows no other node with the model: both end quickly.
        assert info.value.code in ("deadline_exceeded", "unavailable", "unknown_model"), \
            info.value
        assert elapsed < 30  # bounded by the deadline (1.5 s), not by a fixed 120 s
    finally:
        for process in processes.values():
            stop_node(process)


def test_a_remote_llm_pass_waits_only_until_its_sequences_deadlines() -> None:
    """Stage hops of an LLM pipeline are bounded by the requests' own deadlines (the
    latest in the batch), not a fixed 30 s; without a deadline, the fixed limit."""
    from epara.node.generation import HOP_LIMIT_S, MIN_HOP_S, pass_timeout

    assert pass_timeout([100.5, 101.0], now=100.0) == pytest.approx(1.0)
    assert pass_timeout([100.5, None], now=100.0) == HOP_LIMIT_S
    assert pass_timeout([], now=100.0) == HOP_LIMIT_S
    assert pass_timeout([99.0], now=100.0) == MIN_HOP_S  # already late: fail fast
    assert pass_timeout([1000.0], now=100.0) == HOP_LIMIT_S
