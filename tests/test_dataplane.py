"""The node-to-node data plane: tensors as raw frames over CurveZMQ, credentials enforced."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from epara.node.dataplane import DataPlane


async def _exchange(sender_creds: Path, receiver_creds: Path,
                    tensors: dict[str, np.ndarray], compress: str = "none",
                    timeout: float = 3.0) -> tuple[bool, dict | None]:
    receiver = DataPlane(receiver_creds, "127.0.0.1")
    sender = DataPlane(sender_creds, "127.0.0.1")
    got: asyncio.Future[tuple[dict, dict]] = asyncio.get_running_loop().create_future()

    async def on_data(header: dict, received: dict) -> None:
        if not got.done():
            got.set_result((header, {k: v.copy() for k, v in received.items()}))

    receiver.on("data", on_data)
    await receiver.start()
    await sender.start()
    try:
        sent = await sender.send_when_connected(receiver.endpoint, {"kind": "data", "req": "r1"},
                                                tensors, compress, timeout=timeout)
        try:
            header, received = await asyncio.wait_for(got, timeout)
        except asyncio.TimeoutError:
            return sent, None
        return sent, {"header": header, "tensors": received}
    finally:
        await sender.stop()
        await receiver.stop()


def test_tensors_arrive_intact(cluster_dir: Path) -> None:
    tensors = {"hidden": np.random.default_rng(0).random((2, 7, 576), dtype=np.float32),
               "ids": np.arange(10, dtype=np.int64).reshape(2, 5),
               "empty": np.zeros((0, 3), np.float32)}
    sent, result = asyncio.run(_exchange(cluster_dir, cluster_dir, tensors))
    assert sent and result is not None
    assert result["header"] == {"kind": "data", "req": "r1"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(result["tensors"][name], value)
        assert result["tensors"][name].dtype == value.dtype


def test_fp16_compression_is_close_and_restores_the_dtype(cluster_dir: Path) -> None:
    hidden = np.random.default_rng(1).standard_normal((4, 576)).astype(np.float32)
    _, result = asyncio.run(_exchange(cluster_dir, cluster_dir, {"h": hidden}, "fp16"))
    assert result is not None
    assert result["tensors"]["h"].dtype == np.float32
    np.testing.assert_allclose(result["tensors"]["h"], hidden, rtol=2e-3, atol=2e-3)


def test_a_node_without_the_cluster_key_cannot_send_tensors(
        cluster_dir: Path, other_cluster_dir: Path) -> None:
    sent, result = asyncio.run(_exchange(other_cluster_dir, cluster_dir,
                                         {"x": np.ones(4, np.float32)}, timeout=1.5))
    assert not sent and result is None


def test_a_node_never_sends_tensors_to_a_server_without_the_key(
        cluster_dir: Path, other_cluster_dir: Path) -> None:
    # The impostor listens with another cluster's key: our DEALER never completes the
    # handshake, so nothing is queued for it.
    sent, result = asyncio.run(_exchange(cluster_dir, other_cluster_dir,
                                         {"x": np.ones(4, np.float32)}, timeout=1.5))
    assert not sent and result is None


@pytest.mark.parametrize("bad", [[b"\xff"], [b"\xa1\x64kind\x64data", b"extra"]])
def test_malformed_messages_are_dropped_and_the_receiver_goes_on(cluster_dir: Path,
                                                                 bad: list[bytes]) -> None:
    import zmq

    async def run() -> dict | None:
        receiver = DataPlane(cluster_dir, "127.0.0.1")
        sender = DataPlane(cluster_dir, "127.0.0.1")
        got: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

        async def on_data(header: dict, tensors: dict) -> None:
            got.set_result(header)

        receiver.on("data", on_data)
        await receiver.start()
        await sender.start()
        try:
            assert await sender.send_when_connected(receiver.endpoint, {"kind": "warmup"})
            sock, _ = sender._dealers[receiver.endpoint]
            zmq.Socket.send_multipart(sock, bad)
            sender.send(receiver.endpoint, {"kind": "data", "req": "after"})
            return await asyncio.wait_for(got, 3)
        finally:
            await sender.stop()
            await receiver.stop()

    assert asyncio.run(run()) == {"kind": "data", "req": "after"}
