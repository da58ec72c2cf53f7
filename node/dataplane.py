"""Node-to-node data plane: CurveZMQ messages of a CBOR header plus raw tensor frames.

Every node binds one ROUTER (its data port, advertised in its synced state record) and
opens one DEALER per peer it sends to. Messages are one-way; the header's ``kind`` picks
the handler and ``req`` correlates answers. Source routing keeps stages stateless about
plans: a pipeline message carries the rest of its route, so each stage forwards to the
next and the last one answers the origin directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from epara.peer import wire
from epara.peer.security import load_cluster_credentials
from epara.peer.transport import Transport

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
Handler = Callable[[dict[str, Any], dict[str, np.ndarray]], Awaitable[None]]


class DataPlane:
    def __init__(self, credentials_dir: Path, host: str, port: int = 0) -> None:
        self._credentials = load_cluster_credentials(credentials_dir)
        self.host = host
        self.port = port
        self._transport: Transport | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[Endpoint, zmq.asyncio.Socket] = {}
        self._handlers: dict[str, Handler] = {}
        self._receiver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> Endpoint:
        return (self.host, self.port)

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    async def start(self) -> int:
        self._transport = Transport(self._credentials)
        self._transport.start()
        self._router, self.port = self._transport.bind_router(self.host, self.port)
        # Activations are large: a deep queue would only hide a stalled stage.
        self._router.setsockopt(zmq.RCVHWM, 256)
        self._receiver = asyncio.create_task(self._receive())
        return self.port

    async def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        for task in list(self._tasks):
            task.cancel()
        for sock in self._dealers.values():
            sock.close(linger=0)
        self._dealers.clear()
        if self._router is not None:
            self._router.close(linger=0)
        if self._transport is not None:
            self._transport.close()

    def send(self, endpoint: Endpoint, header: Mapping[str, Any],
             tensors: Mapping[str, np.ndarray] | None = None, compress: str = "none") -> bool:
        """Queue one message; False when the peer is not (yet) connected or is backed up.

        A DEALER with ZMQ_IMMEDIATE refuses messages for a peer whose CURVE handshake has
        not completed, so a dead or impostor node never gets tensors queued for it.
        """
        assert self._transport is not None, "start() first"
        sock = self._dealers.get(endpoint)
        if sock is None:
            sock = self._transport.connect_dealer(*endpoint)
            sock.setsockopt(zmq.SNDHWM, 256)
            self._dealers[endpoint] = sock
        frames = wire.pack(header, tensors or {}, compress)
        # The synchronous base-class send: with NOBLOCK it completes or raises at once.
        # Once the first part is accepted, ZeroMQ accepts the rest of the multipart.
        try:
            for frame in frames[:-1]:
                zmq.Socket.send(sock, frame, zmq.NOBLOCK | zmq.SNDMORE, copy=False)
            zmq.Socket.send(sock, frames[-1], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    async def send_when_connected(self, endpoint: Endpoint, header: Mapping[str, Any],
                                  tensors: Mapping[str, np.ndarray] | None = None,
                                  compress: str = "none", timeout: float = 2.0) -> bool:
        """Like ``send``, retrying while a fresh connection completes its handshake."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if self.send(endpoint, header, tensors, compress):
                return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.005)

    def forget(self, endpoint: Endpoint) -> None:
        """Drop the connection to a peer that left the cluster."""
        sock = self._dealers.pop(endpoint, None)
        if sock is not None:
            sock.close(linger=0)

    async def _receive(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart(copy=False)
            try:
                header, tensors = wire.unpack(frames[1:])  # frames[0]: the sender's identity
            except wire.WireError as exc:
                log.warning("dropped a malformed data-plane message: %s", exc)
                continue
            handler = self._handlers.get(str(header.get("kind")))
            if handler is None:
                log.warning("no handler for data-plane message kind %r", header.get("kind"))
                continue
            task = asyncio.create_task(self._run(handler, header, tensors))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(handler: Handler, header: dict[str, Any],
                   tensors: dict[str, np.ndarray]) -> None:
        try:
            await handler(header, tensors)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad message must not stop the receiver
            log.exception("data-plane handler for %r failed", header.get("kind"))
