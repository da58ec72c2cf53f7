"""Python client for a node's local socket API (docs/local-api.md).

    from epara.node.client import Client
    with Client() as node:
        print(node.models())
        outputs = node.infer("text-det", {"x": image}, deadline_ms=500)
        for piece in node.generate("smollm2-135m", "The capital of France is"):
            print(piece.text, end="", flush=True)

One request at a time per client (use one client per thread); the protocol allows more.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from epara.node.api import default_socket_path
from epara.peer import wire
from epara.peer.wire import PROTOCOL_VERSION


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


class Client:
    def __init__(self, socket_path: Path | str | None = None, timeout: float | None = 300.0,
                 max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

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
        payload = wire.frame(wire.encode({"v": PROTOCOL_VERSION, "id": request_id, **request}))
        sock = self._connect()
        try:
            sock.sendall(payload)
        except OSError as exc:
            self.close()
            raise NodeUnreachable(f"connection to {self.socket_path} lost: {exc}") from None
        return request_id

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
            return wire.decode(_read_exactly(sock, length))
        except (OSError, EOFError) as exc:
            self.close()
            raise NodeUnreachable(f"connection to {self.socket_path} lost: {exc}") from None


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
