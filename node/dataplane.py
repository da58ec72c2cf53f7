"""Node-to-node data plane: CurveZMQ messages of a CBOR header plus raw tensor frames.

Every node binds one ROUTER (its data port, advertised in its synced state record) and
opens one DEALER per peer it sends to. Messages are one-way; the header's ``kind`` picks
the handler and ``req`` correlates answers. Source routing keeps stages stateless about
plans: a pipeline message carries the rest of its route, so each stage forwards to the
next and the last one answers the origin directly.

Keys: with per-device identity the ROUTER's CURVE server key is the device's own, and
a DEALER pins the key ``server_key_for(endpoint)`` names (the runtime maps a data
endpoint to its node and asks the control plane for the key it pinned from that
node's certificate); an endpoint with no known key is not dialled (``send`` fails).

Bounds: the ROUTER and every DEALER have a high-water mark, so a stalled peer makes
``send`` fail at once rather than queue without limit. Work handlers (a forwarded
request, a stage's input) run as tasks, at most ``max_tasks`` at a time; past that a
message is refused through its kind's ``refuse`` callback (which answers its origin)
instead of starting one more task. Answer handlers (``inline=True``: results, errors,
replies) only wake a waiting request, so they run in the receive loop itself and never
wait for a slot: a full node still hears the answers that free its slots.
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
Refuse = Callable[[dict[str, Any], str], Awaitable[None]]  # (header, reason)
ServerKeyFor = Callable[[Endpoint], "bytes | None"]
DEFAULT_MAX_TASKS = 512
HIGH_WATER_MARK = 256  # messages queued per socket before sends fail


class _Route:
    def __init__(self, handler: Handler, inline: bool, refuse: Refuse | None) -> None:
        self.handler = handler
        self.inline = inline
        self.refuse = refuse


class DataPlane:
    def __init__(self, credentials_dir: Path, host: str, port: int = 0,
                 max_tasks: int = DEFAULT_MAX_TASKS,
                 server_key_for: ServerKeyFor | None = None) -> None:
        self._credentials = load_cluster_credentials(credentials_dir)
        if self._credentials.per_device and server_key_for is None:
            raise ValueError("per-device identity: the data plane needs server_key_for")
        self._server_key_for = server_key_for
        self.host = host
        self.port = port
        self._transport: Transport | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[Endpoint, tuple[zmq.asyncio.Socket, bytes | None]] = {}
        self._routes: dict[str, _Route] = {}
        self._receiver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.max_tasks = max_tasks
        self.refused = 0  # work messages refused because every task slot was taken

    @property
    def endpoint(self) -> Endpoint:
        return (self.host, self.port)

    @property
    def running_tasks(self) -> int:
        return len(self._tasks)

    def on(self, kind: str, handler: Handler, inline: bool = False,
           refuse: Refuse | None = None) -> None:
        """Handle messages of ``kind``. ``inline``: an answer that only wakes a waiter
        (awaited in the receive loop, must not block). ``refuse``: called instead of the
        handler when every task slot is taken (else the message is dropped with a
        warning)."""
        self._routes[kind] = _Route(handler, inline, refuse)

    async def start(self) -> int:
        self._transport = Transport(self._credentials)
        self._transport.start()
        self._router, self.port = self._transport.bind_router(self.host, self.port)
        # Activations are large: a deep queue would only hide a stalled stage.
        self._router.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        self._receiver = asyncio.create_task(self._receive())
        return self.port

    async def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver
        for task in list(self._tasks):
            task.cancel()
        for sock, _ in self._dealers.values():
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
        return self.send_frames(endpoint, wire.pack(header, tensors or {}, compress))

    def send_frames(self, endpoint: Endpoint, frames: list[Any]) -> bool:
        """Queue frames already packed (``wire.pack`` / ``wire.pack_message``); False
        when the peer is not connected or is backed up."""
        assert self._transport is not None, "start() first"
        key = None
        if self._credentials.per_device:
            assert self._server_key_for is not None
            key = self._server_key_for(endpoint)
            if key is None:
                return False  # no certified key for it (yet): never dial unpinned
        dealer = self._dealers.get(endpoint)
        if dealer is not None and dealer[1] != key:  # another device at that address now
            dealer[0].close(linger=0)
            dealer = None
        if dealer is None:
            dealer = (self._transport.connect_dealer(*endpoint, key), key)
            dealer[0].setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            self._dealers[endpoint] = dealer
        sock = dealer[0]
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
        return await self.send_frames_when_connected(
            endpoint, wire.pack(header, tensors or {}, compress), timeout)

    async def send_frames_when_connected(self, endpoint: Endpoint, frames: list[Any],
                                         timeout: float = 2.0) -> bool:
        """``send_frames``, retrying for up to ``timeout`` seconds while a fresh
        connection completes its handshake or a backed-up peer drains."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            if self.send_frames(endpoint, frames):
                return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.005)

    def forget(self, endpoint: Endpoint) -> None:
        """Drop the connection to a peer that left the cluster."""
        dealer = self._dealers.pop(endpoint, None)
        if dealer is not None:
            dealer[0].close(linger=0)

    async def _receive(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart(copy=False)
            try:
                header = wire.decode(bytes(frames[1].buffer)) if len(frames) > 1 else None
                if header is None:
                    raise wire.WireError("bad_frame", "no header frame")
                route = self._routes.get(str(header.get("kind")))
                if route is None:
                    log.warning("no handler for data-plane message kind %r",
                                header.get("kind"))
                    continue
                tensors = wire.unpack_tensors(header, frames[2:])  # [0]: sender's identity
            except wire.WireError as exc:
                log.warning("dropped a malformed data-plane message: %s", exc)
                continue
            if route.inline:
                await self._run(route.handler, header, tensors)
            elif len(self._tasks) >= self.max_tasks:
                self.refused += 1
                if route.refuse is not None:
                    await self._run(route.refuse, header,
                                    f"node busy: {len(self._tasks)} data-plane tasks running")
                else:
                    log.warning("dropped a %r message: every task slot is taken",
                                header.get("kind"))
            else:
                task = asyncio.create_task(self._run(route.handler, header, tensors))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(handler: Callable[[dict[str, Any], Any], Awaitable[None]],
                   header: dict[str, Any], argument: Any) -> None:
        try:
            await handler(header, argument)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad message must not stop the receiver
            log.exception("data-plane handler for %r failed", header.get("kind"))
