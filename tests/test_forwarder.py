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

    def __init__(self, origin: Forwarder, peer: Forwarder, peer_plane: DataPlane) -> None:
        self.origin = origin
        self.peer = peer
        self.peer_plane = peer_plane

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
    peer_limits = limits.pop("peer", {})
    origin_plane = DataPlane(cluster_dir, "127.0.0.1")
    peer_plane = DataPlane(cluster_dir, "127.0.0.1", **peer_limits.pop("plane", {}))
    api = LocalApi(services, lambda: [], lambda: {})

    async def serve(message: dict[str, Any], reply: Callable[..., Any]) -> None:
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
        yield Pair(origin, peer, peer_plane)
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
