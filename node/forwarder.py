"""Forwarding API requests to a peer's replica, and serving the ones peers forward here.

Both directions use the data plane's one tensor form (``wire.pack_message``): the request
or reply map travels as a CBOR header and every tensor or byte string in it as its own
raw frame, so a 1 MB input crosses a hop without being copied into or out of CBOR.

The origin (``forward``):
- refuses at once (``overloaded``) past ``max_per_peer`` requests in flight to one peer;
- sends the peer the request's *remaining* budget as its ``deadline_ms``, so the peer's
  queueing and run are bounded by the same deadline;
- bounds every wait by the deadline (``deadline_exceeded``) or, for a request without
  one, by ``idle_s`` without a reply (``unavailable``, which the API may replay);
- a send that fails (peer unreachable or backed up) fails the request at once;
- when it stops waiting for any reason (deadline, client gone), it tells the peer to
  drop the request (``api_cancel``), so no work is left running for nobody.

The serving side (``kind: "api"``): at most ``max_per_peer`` requests from one origin at
a time (past that: an ``overloaded`` reply); a reply that cannot be sent cancels the
request's work at once (the generation stops, the queued job is withdrawn).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from epara.node.dataplane import DataPlane, Endpoint
from epara.node.service import ServiceError
from epara.peer import wire

log = logging.getLogger(__name__)

Reply = Callable[[dict[str, Any]], Awaitable[None]]
Serve = Callable[[dict[str, Any], Reply], Awaitable[None]]  # (request message, reply)

MAX_IN_FLIGHT_PER_PEER = 64  # forwarded requests per peer, each direction
IDLE_S = 60.0  # a request without a deadline fails after this long without a reply
SEND_TIMEOUT_S = 1.0  # how long a send may wait for a fresh connection's handshake
MAX_PENDING_REFUSALS = 1024  # refusals waiting to be sent (each for SEND_TIMEOUT_S at most)


class _PeerGone(Exception):
    """The peer left the cluster while a request forwarded to it was in flight."""


class Forwarder:
    """Both ends of forwarded API requests over one data plane."""

    def __init__(self, dataplane: DataPlane, node_id: str, serve: Serve,
                 endpoint_of: Callable[[str], Endpoint],
                 max_per_peer: int = MAX_IN_FLIGHT_PER_PEER, idle_s: float = IDLE_S,
                 send_timeout_s: float = SEND_TIMEOUT_S) -> None:
        self.dataplane = dataplane
        self.node_id = node_id
        self.serve = serve
        self.endpoint_of = endpoint_of
        self.max_per_peer = max_per_peer
        self.idle_s = idle_s
        self.send_timeout_s = send_timeout_s
        self.counts = {"forwarded": 0, "overloaded": 0, "send_failed": 0,
                       "deadline_exceeded": 0, "served": 0, "refused": 0,
                       "reply_failed": 0}
        # origin side: req -> (replies, peer node id)
        self._pending: dict[str, tuple[asyncio.Queue[Any], str]] = {}
        self._per_peer: Counter[str] = Counter()
        self._ids = itertools.count()
        self._prefix = f"{node_id}-{os.getpid()}-"
        # serving side: (origin, req) -> the task serving it
        self._serving: dict[tuple[Endpoint, str], asyncio.Task[Any]] = {}
        self._per_origin: Counter[Endpoint] = Counter()
        self._refusals: set[asyncio.Task[bool]] = set()
        dataplane.on("api", self._on_api, refuse=self._refuse)
        dataplane.on("api_reply", self._on_api_reply, inline=True)
        dataplane.on("api_cancel", self._on_api_cancel, inline=True)

    def in_flight(self) -> dict[str, int]:
        """Requests forwarded from here and not yet answered, per peer node id."""
        return {peer: n for peer, n in self._per_peer.items() if n}

    # --- the origin ---------------------------------------------------------------------

    async def forward(self, node_id: str, message: dict[str, Any], reply: Reply,
                      deadline: float | None) -> None:
        """Send an API request to ``node_id`` and relay its replies (one, or a token
        stream) through ``reply``; ServiceError on every failure."""
        if self._per_peer[node_id] >= self.max_per_peer:
            self.counts["overloaded"] += 1
            raise ServiceError("overloaded", f"{self._per_peer[node_id]} requests already "
                               f"in flight to {node_id} (at most {self.max_per_peer})")
        outgoing = {**message, "forwarded": True}
        if deadline is not None:
            outgoing["deadline_ms"] = self._remaining(deadline, node_id) * 1000
        req = f"{self._prefix}{next(self._ids)}"
        replies: asyncio.Queue[Any] = asyncio.Queue()
        endpoint = self.endpoint_of(node_id)
        frames = wire.pack_message({"kind": "api", "req": req,
                                    "origin": list(self.dataplane.endpoint)}, outgoing)
        self._pending[req] = (replies, node_id)
        self._per_peer[node_id] += 1
        finished = False
        try:
            timeout = self.send_timeout_s if deadline is None \
                else min(self.send_timeout_s, self._remaining(deadline, node_id))
            if not await self.dataplane.send_frames_when_connected(endpoint, frames, timeout):
                self.counts["send_failed"] += 1
                finished = True  # nothing reached the peer: nothing to cancel there
                raise ServiceError("unavailable", f"forwarding to {node_id} failed: the "
                                   "send was refused (peer unreachable or backed up)")
            self.counts["forwarded"] += 1
            while True:
                item = await self._next_reply(replies, node_id, deadline)
                error = item.get("error") or {}
                if not item.get("ok") and error.get("code") in ("stage_failed", "unavailable"):
                    # The peer's route broke: let the origin replay it (it knows what the
                    # client has already seen), rather than relay the failure.
                    finished = True
                    raise ServiceError(error["code"], f"on {node_id}: {error.get('message')}")
                finished = not item.get("ok") or item.get("event") in (None, "done")
                await reply({**item, "id": message.get("id"), "served_by": node_id})
                if finished:
                    return
        finally:
            self._pending.pop(req, None)
            self._per_peer[node_id] -= 1
            if not self._per_peer[node_id]:
                del self._per_peer[node_id]
            if not finished:  # deadline, idle, client gone: stop the peer's work too
                self.dataplane.send(endpoint, {"kind": "api_cancel", "req": req})

    def _remaining(self, deadline: float, node_id: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            self.counts["deadline_exceeded"] += 1
            raise ServiceError("deadline_exceeded", f"the deadline passed before {node_id} "
                               "answered")
        return left

    async def _next_reply(self, replies: asyncio.Queue[Any], node_id: str,
                          deadline: float | None) -> dict[str, Any]:
        wait = self.idle_s if deadline is None \
            else min(self.idle_s, self._remaining(deadline, node_id))
        try:
            item = await asyncio.wait_for(replies.get(), wait)
        except asyncio.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                self.counts["deadline_exceeded"] += 1
                raise ServiceError("deadline_exceeded", f"no reply from {node_id} before "
                                   "the deadline") from None
            raise ServiceError("unavailable", f"no reply from {node_id} for "
                               f"{wait:.1f} s") from None
        if isinstance(item, _PeerGone):
            raise ServiceError("unavailable", f"forwarding to {node_id} failed: {item}")
        return item

    def nodes_lost(self, gone: set[str]) -> None:
        """Fail at once the requests in flight to nodes that left the cluster."""
        for replies, node_id in list(self._pending.values()):
            if node_id in gone:
                replies.put_nowait(_PeerGone(f"node {node_id} left the cluster"))

    async def _on_api_reply(self, header: dict[str, Any], tensors: dict[str, Any]) -> None:
        entry = self._pending.get(str(header.get("req")))
        if entry is not None:
            entry[0].put_nowait(wire.restore_message(header, tensors))

    # --- the serving side -------------------------------------------------------------

    @staticmethod
    def _origin(header: dict[str, Any]) -> Endpoint:
        host, port = header["origin"]
        return (str(host), int(port))

    async def _refuse(self, header: dict[str, Any], reason: str) -> None:
        self.counts["refused"] += 1
        await self._answer_error(header, "overloaded", reason)

    async def _answer_error(self, header: dict[str, Any], code: str, reason: str) -> None:
        """Answer a refused request. In the background: the connection back to its origin
        may still be in its handshake, and the receive loop must not wait for it."""
        try:
            origin = self._origin(header)
        except (KeyError, TypeError, ValueError):
            return
        if len(self._refusals) >= MAX_PENDING_REFUSALS:
            log.warning("dropped a refusal to %s:%d: too many pending", *origin)
            return
        message = {"v": wire.PROTOCOL_VERSION, "ok": False,
                   "error": {"code": code, "message": f"{self.node_id}: {reason}"}}
        frames = wire.pack_message({"kind": "api_reply", "req": header.get("req")}, message)
        task = asyncio.create_task(self.dataplane.send_frames_when_connected(
            origin, frames, self.send_timeout_s))
        self._refusals.add(task)
        task.add_done_callback(self._refusals.discard)

    async def _on_api(self, header: dict[str, Any], tensors: dict[str, Any]) -> None:
        origin = self._origin(header)
        req = str(header["req"])
        if self._per_origin[origin] >= self.max_per_peer:
            await self._refuse(header, f"{self._per_origin[origin]} requests from "
                               f"{origin[0]}:{origin[1]} already in flight")
            return
        message = wire.restore_message(header, tensors)
        received = time.monotonic()
        budget = message.get("deadline_ms")
        deadline = received + budget / 1000 if isinstance(budget, (int, float)) \
            and not isinstance(budget, bool) and math.isfinite(budget) and budget > 0 \
            else None
        task = asyncio.current_task()
        assert task is not None

        async def reply(answer: dict[str, Any]) -> None:
            frames = wire.pack_message({"kind": "api_reply", "req": req},
                                       {"v": wire.PROTOCOL_VERSION, **answer})
            timeout = self.send_timeout_s if deadline is None \
                else max(0.0, min(self.send_timeout_s, deadline - time.monotonic()))
            if not await self.dataplane.send_frames_when_connected(origin, frames, timeout):
                # The origin cannot hear us: stop the work now rather than finish it
                # for nobody (a generation stops, a queued job is withdrawn).
                self.counts["reply_failed"] += 1
                log.warning("reply to %s:%d for %s could not be sent; cancelling it",
                            *origin, req)
                task.cancel()
                raise asyncio.CancelledError

        self._serving[(origin, req)] = task
        self._per_origin[origin] += 1
        try:
            await self.serve({**message, "forwarded": True}, reply)
            self.counts["served"] += 1
        finally:
            self._serving.pop((origin, req), None)
            self._per_origin[origin] -= 1
            if not self._per_origin[origin]:
                del self._per_origin[origin]

    async def _on_api_cancel(self, header: dict[str, Any], tensors: dict[str, Any]) -> None:
        # Request ids carry the origin's node id and pid, so they name one request.
        for (origin, req), task in list(self._serving.items()):
            if req == str(header.get("req")):
                log.info("origin %s:%d cancelled %s", *origin, req)
                task.cancel()
