"""Python client for a node's local socket API (docs/local-api.md).

    from epara.node.client import Client
    with Client() as node:
        print(node.models())
        outputs = node.infer("text-det", {"x": image}, deadline_ms=500)
        for piece in node.generate("smollm2-135m", "The capital of France is"):
            print(piece.text, end="", flush=True)

One request at a time per client (use one client per thread); the protocol allows more.

With ``shared_memory=True`` (the default) tensors of 64 KiB and more travel through two
memfd regions this client attaches to its connection (docs/local-api.md, "Shared
memory"): inputs are copied into one, the node writes large outputs into the other, and
only references cross the socket. Results are copied out, so they stay valid after the
next call. If the node refuses the regions, the client falls back to inline tensors.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import logging
import mmap
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from epara.node.api import default_socket_path
from epara.node.localsock import SHARED_ALIGN, SHARED_MIN_BYTES
from epara.peer import wire
from epara.peer.wire import PROTOCOL_VERSION, WireError

log = logging.getLogger(__name__)
INPUT_SLOT, REPLY_SLOT = 0, 1
MIN_AREA_BYTES = 4 * 1024 * 1024
TENSOR_OPS = ("infer", "segment")  # the operations whose replies carry tensors


class EparaError(Exception):
    """The node answered with an error. ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NodeUnreachable(EparaError):
    def __init__(self, message: str) -> None:
        super().__init__("unreachable", message)


@dataclass(frozen=True)
class Token:
    token: int
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str
    usage: dict[str, Any]


class _SharedArea:
    """A memfd this client made, sealed against shrinking (the node requires it), mapped
    here and, once attached, in the node. The client owns it: closing unmaps it here."""

    def __init__(self, slot: int, size: int) -> None:
        fd = os.memfd_create(f"epara-client-{slot}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            mapping = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            raise
        self.fd: int | None = fd
        self.slot = slot
        self.size = size
        self.memory = np.frombuffer(mapping, dtype=np.uint8)
        self.cursor = 0

    def release_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def place(self, value: np.ndarray) -> cbor2.CBORTag | None:
        """Copy a large tensor in at the cursor; the request then carries a reference."""
        if value.nbytes < SHARED_MIN_BYTES or value.dtype.name not in wire.SUPPORTED_DTYPES:
            return None
        size = value.nbytes
        if self.cursor + size > self.size:
            return None
        offset = self.cursor
        target = self.memory[offset:offset + size].view(value.dtype).reshape(value.shape)
        np.copyto(target, value)
        self.cursor = offset + _aligned(size)
        return wire.shared_tensor(value, [self.slot, offset, size])

    def read(self, reference: object) -> np.ndarray:
        """A reference in a reply → a copy of those bytes (valid after the next call)."""
        if not (isinstance(reference, (list, tuple)) and len(reference) == 3
                and all(isinstance(v, int) for v in reference)):
            raise WireError("bad_frame", f"bad shared-memory reference {reference!r}")
        slot, offset, length = reference
        if slot != self.slot or offset < 0 or length < 0 or offset + length > self.size:
            raise WireError("bad_frame", f"reference {reference!r} is outside the reply area")
        return self.memory[offset:offset + length].copy()


def _aligned(size: int) -> int:
    return -(-size // SHARED_ALIGN) * SHARED_ALIGN


def _large_bytes(value: Any) -> int:
    """Room the large tensors in a message need in a shared area (aligned)."""
    if isinstance(value, np.ndarray):
        return _aligned(value.nbytes) if value.nbytes >= SHARED_MIN_BYTES else 0
    if isinstance(value, Mapping):
        return sum(_large_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_large_bytes(v) for v in value)
    return 0


class Client:
    def __init__(self, socket_path: Path | str | None = None, timeout: float | None = 300.0,
                 max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
                 shared_memory: bool = True) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self.shared_memory = shared_memory
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # Attached to the current connection (a new connection attaches afresh).
        self._areas: dict[int, _SharedArea] = {}
        self._reply_area_wanted = MIN_AREA_BYTES

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for area in self._areas.values():
            area.release_fd()
        self._areas.clear()  # unmapped here once no result still views it

    # --- operations ----------------------------------------------------------------

    def ping(self) -> None:
        self._call({"op": "ping"})

    def models(self) -> list[dict[str, Any]]:
        return self._call({"op": "models"})["models"]

    def status(self) -> dict[str, Any]:
        return self._call({"op": "status"})["status"]

    def infer(self, model: str, inputs: Mapping[str, np.ndarray],
              deadline_ms: float | None = None) -> dict[str, np.ndarray]:
        return self.infer_timed(model, inputs, deadline_ms)[0]

    def infer_timed(self, model: str, inputs: Mapping[str, np.ndarray],
                    deadline_ms: float | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Like ``infer``, also returning the node's timing (queue_ms, compute_ms, batch)."""
        request: dict[str, Any] = {"op": "infer", "model": model, "inputs": dict(inputs)}
        if deadline_ms is not None:
            request["deadline_ms"] = deadline_ms
        reply = self._call(request)
        return reply["outputs"], reply.get("timing", {})

    def segment(self, model: str, image: bytes | np.ndarray, overlay: bool = False,
                threshold: float | None = None, deadline_ms: float | None = None
                ) -> dict[str, Any]:
        """Segment an encoded image (or uint8 [H, W, 3] RGB); returns ``mask`` (uint8 0/255
        at the image's size), ``coverage``, ``timing`` and, if asked, ``overlay_png``."""
        request: dict[str, Any] = {"op": "segment", "model": model, "image": image,
                                   "overlay": overlay}
        if threshold is not None:
            request["threshold"] = threshold
        if deadline_ms is not None:
            request["deadline_ms"] = deadline_ms
        return self._call(request)

    def generate(self, model: str, prompt: str | None = None,
                 messages: list[dict[str, str]] | None = None, deadline_ms: float | None = None,
                 **params: Any) -> Iterator[Token | Done]:
        """Stream the generated pieces; the last item is a ``Done``.

        Leaving the loop early closes the connection, which cancels the generation.
        """
        request: dict[str, Any] = {"op": "generate", "model": model, "params": params}
        if prompt is not None:
            request["prompt"] = prompt
        if messages is not None:
            request["messages"] = messages
        if deadline_ms is not None:
            request["deadline_ms"] = deadline_ms
        with self._lock:
            request_id = self._send(request)
            finished = False
            try:
                while True:
                    reply = self._receive(request_id)
                    if reply.get("event") == "done":
                        finished = True
                        yield Done(reply["finish_reason"], reply.get("usage", {}))
                        return
                    yield Token(reply["token"], reply["text"])
            finally:
                if not finished:
                    self.close()  # the node cancels the sequence when its client leaves

    # --- framing -------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            # Room for a whole image-sized tensor: sendall returns without waiting on
            # the node's event loop, and replies arrive in fewer reads.
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise NodeUnreachable(f"no node at {self.socket_path} ({exc.strerror}); "
                                      "start one with `epara node`") from None
            self._sock = sock
        return self._sock

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._receive(self._send(request))

    def _send(self, request: dict[str, Any]) -> int:
        request_id = next(self._ids)
        message = {"v": PROTOCOL_VERSION, "id": request_id, **request}
        place = None
        if self.shared_memory and request.get("op") in TENSOR_OPS:
            need = _large_bytes(request)
            inputs = self._area(INPUT_SLOT, need) if need else None
            if inputs is not None:
                inputs.cursor = 0
                place = inputs.place
            replies = self._area(REPLY_SLOT, self._reply_area_wanted)
            if replies is not None:
                message["shm_reply"] = [REPLY_SLOT, 0, replies.size]
        payload = wire.frame(wire.encode(message, place))
        self._send_bytes(payload)
        return request_id

    def _send_bytes(self, payload: bytes, fds: list[int] | None = None) -> None:
        sock = self._connect()
        try:
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = sock.sendmsg([payload], rights)
                if sent < len(payload):
                    sock.sendall(payload[sent:])
            else:
                sock.sendall(payload)
        except OSError as exc:
            self.close()
            raise NodeUnreachable(f"connection to {self.socket_path} lost: {exc}") from None

    def _area(self, slot: int, size: int) -> _SharedArea | None:
        """The attached area for ``slot``, at least ``size`` bytes (made and attached on
        first use or when too small), or None when the node will not take one."""
        area = self._areas.get(slot)
        if area is not None and area.size >= size:
            return area
        if not self.shared_memory:
            return None
        size = max(MIN_AREA_BYTES, 1 << (size - 1).bit_length())
        try:
            area = _SharedArea(slot, size)
        except (OSError, AttributeError) as exc:  # AttributeError: no memfd (not Linux)
            log.info("no shared memory (%s): tensors go inline", exc)
            self.shared_memory = False
            return None
        request_id = next(self._ids)
        attach = {"v": PROTOCOL_VERSION, "id": request_id, "op": "shm_attach", "slot": slot,
                  "size": size}
        try:
            assert area.fd is not None
            self._send_bytes(wire.frame(wire.encode(attach)), [area.fd])
            self._receive(request_id)
        except EparaError as exc:
            if isinstance(exc, NodeUnreachable):
                raise
            log.info("the node refused shared memory (%s): tensors go inline", exc)
            self.shared_memory = False
            return None
        finally:
            area.release_fd()  # the node has its own mapping now
        self._areas[slot] = area
        return area

    def _resolve(self, reference: object) -> np.ndarray:
        area = self._areas.get(REPLY_SLOT)
        if area is None:
            raise WireError("bad_frame", "a shared reference arrived with no reply area")
        return area.read(reference)

    def _receive(self, request_id: int) -> dict[str, Any]:
        while True:
            reply = self._read_message()
            if reply.get("id") in (request_id, None):
                break
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise EparaError(error.get("code", "unknown"), error.get("message", ""))
        return reply

    def _read_message(self) -> dict[str, Any]:
        sock = self._connect()
        try:
            length = wire.parse_frame_length(_read_exactly(sock, wire.FRAME_HEADER.size),
                                             self.max_frame_bytes)
            message = wire.decode(_read_exactly(sock, length), resolve=self._resolve)
        except (OSError, EOFError) as exc:
            self.close()
            raise NodeUnreachable(f"connection to {self.socket_path} lost: {exc}") from None
        if self._areas:
            # Outputs too large for the reply area came inline: make room for next time.
            inline = _large_bytes(message)
            if inline > self._reply_area_wanted:
                self._reply_area_wanted = inline
        return message


def _read_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        n = sock.recv_into(view[received:])
        if n == 0:
            raise EOFError("the node closed the connection")
        received += n
    return buffer
