"""The node's HTTP endpoint on localhost: an OpenAI-compatible chat API for its LLM
services, Prometheus metrics, and the operator's dashboard. Specified in docs/http.md.

A small HTTP/1.1 server on asyncio streams (keep-alive, Content-Length request bodies,
chunked responses for streams), so the core needs no web framework. Every chat request
becomes a local-API ``generate`` request handled by ``LocalApi._handle``, exactly as one
from the Unix socket: cluster routing, forwarding and replay apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from epara.node.api import Request

if TYPE_CHECKING:
    from epara.node.daemon import Node
    from epara.node.metrics import PrometheusExporter

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection with no next request is closed
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 421: "Misdirected Request",
           500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 504: "Gateway Timeout"}
# Local-API error codes as HTTP statuses. Both deadline codes are 504: whether the node
# refused at once or ran out of time, the client's deadline could not be met.
STATUS_OF_CODE = {"bad_request": 400, "bad_input": 400, "unsupported": 400,
                  "unknown_model": 404, "overloaded": 503, "unavailable": 503,
                  "deadline_unmeetable": 504, "deadline_exceeded": 504}
TEXT_GENERATION = "text-generation"


@dataclass(frozen=True)
class HttpLimits:
    """The endpoint's bounds (``epara node --http-max-connections``, ``--http-max-body-kb``,
    ``--http-request-timeout``; docs/http.md). Worst case held in bodies:
    ``max_connections * max_body_bytes``, hence the ranges."""

    max_connections: int = 64  # open at once; more get 503 and are closed
    max_body_bytes: int = 1024 * 1024  # a chat request is text: 1 MiB is plenty
    request_timeout_s: float = 10.0  # from a request's first byte to its whole body

    def __post_init__(self) -> None:
        for name, flag, scale, low, high in LIMIT_RANGES:
            number = getattr(self, name)
            whole = name != "request_timeout_s"
            kinds = (int,) if whole else (int, float)
            if isinstance(number, bool) or not isinstance(number, kinds) \
                    or not math.isfinite(number) or not low <= number <= high:
                given = number / scale if scale != 1 and isinstance(number, (int, float)) \
                    else number
                raise ValueError(f"{flag} must be {'a whole number' if whole else 'a number'} "
                                 f"from {low / scale:g} to {high / scale:g}, not {given!r}")

    def to_json(self) -> dict[str, Any]:
        return {"max_connections": self.max_connections,
                "max_body_bytes": self.max_body_bytes,
                "request_timeout_s": self.request_timeout_s}


# (field, its `epara node` flag, the flag's unit in the field's, lowest, highest). A
# connection holds a socket and a task (1024 descriptors is the usual soft limit); a body
# is read whole into memory; a request that takes an hour to arrive is an attack.
LIMIT_RANGES: tuple[tuple[str, str, int, float, float], ...] = (
    ("max_connections", "--http-max-connections", 1, 1, 4096),
    ("max_body_bytes", "--http-max-body-kb", 1024, 1024, 256 * 1024 * 1024),
    ("request_timeout_s", "--http-request-timeout", 1, 0.1, 3600.0),
)


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(authority: str) -> str:
    """The host part of a ``Host`` header or URL authority (``[::1]:80`` -> ``::1``)."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    if authority.count(":") == 1:
        authority = authority.partition(":")[0]
    return authority.rstrip(".")


def host_allowed(authority: str, listen_host: str, own_names: frozenset[str]) -> bool:
    """Whether a ``Host`` header names this listener, not a name an attacker's DNS points
    at it (DNS rebinding). Loopback listeners: loopback literals and ``localhost`` only.
    Others: any IP literal (a rebinding page's origin is a name, never the literal) and
    this machine's own names (hostname, hostname.local, configured extras)."""
    name = _host_name(authority)
    if not name:
        return False
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = \
            ipaddress.ip_address(name)
    except ValueError:
        address = None
    if is_loopback(listen_host):
        return name == "localhost" or (address is not None and address.is_loopback)
    return address is not None or name == "localhost" or name in own_names


def origin_allowed(origin: str | None, authority: str) -> bool:
    """A request with ``Origin`` (browsers send it on cross-site and on posts) must come
    from a page served by this very listener: same scheme-less authority as ``Host``."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and \
        parts.netloc.lower() == authority.strip().lower()


def own_host_names(extra: tuple[str, ...] = ()) -> frozenset[str]:
    hostname = socket.gethostname().lower()
    return frozenset({hostname, f"{hostname}.local", *(n.lower().rstrip(".") for n in extra)})


def load_or_create_token(path: Path) -> str:
    """The bearer token in ``path``; a new random one (file mode 0600) if it is absent."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24) + "\n")
    token = path.read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"{path} must hold one token of at least 16 characters")
    return token


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class HttpServer:
    def __init__(self, node: Node, host: str, port: int,
                 exporter: PrometheusExporter | None, *, token: str | None = None,
                 limits: HttpLimits = HttpLimits(), allowed_hosts: tuple[str, ...] = ()) -> None:
        if token is None and not is_loopback(host):
            raise ValueError(f"HTTP on {host} (not loopback) needs a bearer token "
                             "(--http-token-file)")
        self.node = node
        self.host = host
        self.port = port
        self.exporter = exporter
        self.token = token
        self.limits = limits
        self._own_names = own_host_names(allowed_hosts)
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count()
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when 0 was asked

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()  # idle keep-alive connections would hold wait_closed forever
        if self._server is not None:
            await self._server.wait_closed()

    # --- connections --------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.limits.max_connections:
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await _send_json(writer, 503, _error_body(
                    "overloaded", f"over {self.limits.max_connections} open connections"),
                    keep_alive=False)
                # Read what the client already sent (briefly, bounded): closing on unread
                # bytes resets the connection and can destroy the answer in flight.
                await asyncio.wait_for(reader.read(MAX_HEAD_BYTES), 0.5)
            writer.close()
            return
        self._connections.add(task)
        try:
            while True:
                try:
                    first = await asyncio.wait_for(reader.read(1), IDLE_TIMEOUT_S)
                    if not first:
                        return
                    try:
                        request = await asyncio.wait_for(_read_request(
                            reader, first, self._admit, self.limits.max_body_bytes),
                            self.limits.request_timeout_s)
                    except asyncio.TimeoutError:
                        raise HttpError(408, "request_timeout", "the request was not sent "
                                        f"within {self.limits.request_timeout_s:g} s") from None
                except HttpError as exc:
                    await _send_json(writer, exc.status, _error_body(exc.code, str(exc)),
                                     keep_alive=False, headers=exc.headers)
                    return
                if request is None:
                    return
                if not await self._respond(request, reader, writer) or not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away or idled out: nothing to answer
        except asyncio.CancelledError:
            pass  # the node is stopping
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()

    def _admit(self, method: str, path: str, headers: dict[str, str]) -> None:
        """Refuse, before its body is read, a request this listener must not serve."""
        authority = headers.get("host")
        if authority is None or not host_allowed(authority, self.host, self._own_names):
            raise HttpError(421, "bad_host", f"Host {authority!r} does not name this node "
                            "(DNS rebinding protection; use its IP address)")
        if not origin_allowed(headers.get("origin"), authority):
            raise HttpError(403, "cross_origin", f"requests from origin "
                            f"{headers.get('origin')!r} are not allowed")
        if self.token is None or (method, path.split("?", 1)[0]) == ("GET", "/"):
            return  # the dashboard's page is static; its data calls carry the token
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.token.encode()):
            raise HttpError(401, "unauthorized", "this node needs 'Authorization: Bearer "
                            "<token>' (the token is in the node's --http-token-file)",
                            {"WWW-Authenticate": "Bearer"})

    async def _respond(self, request: HttpRequest, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        try:
            route = (request.method, request.path.split("?", 1)[0])
            if route == ("POST", "/v1/chat/completions"):
                return await self._chat(request, reader, writer)
            if route == ("GET", "/"):
                page = resources.files("epara.node").joinpath("dashboard.html").read_bytes()
                await _send(writer, 200, page, "text/html; charset=utf-8", request.keep_alive)
            elif route == ("GET", "/api/status"):
                await _send_json(writer, 200, self.node.status(), request.keep_alive)
            elif route == ("GET", "/metrics"):
                if self.exporter is None:
                    raise HttpError(501, "metrics_unavailable", "prometheus-client is not "
                                    "installed on this node (pip install 'epara[metrics]')")
                body, content_type = self.exporter.render()
                await _send(writer, 200, body, content_type, request.keep_alive)
            elif route == ("GET", "/v1/models"):
                await _send_json(writer, 200, {"object": "list", "data": self._models()},
                                 request.keep_alive)
            elif route[0] == "GET" and route[1].startswith("/v1/models/"):
                name = route[1].removeprefix("/v1/models/")
                model = next((m for m in self._models() if m["id"] == name), None)
                if model is None:
                    raise HttpError(404, "unknown_model", f"no text-generation model named "
                                    f"{name!r} in the cluster")
                await _send_json(writer, 200, model, request.keep_alive)
            elif route[1] in ("/", "/api/status", "/metrics", "/v1/models",
                              "/v1/chat/completions"):
                raise HttpError(405, "method_not_allowed", f"{request.method} is not allowed "
                                f"on {route[1]}")
            else:
                raise HttpError(404, "not_found", f"no endpoint {route[1]}")
        except HttpError as exc:
            await _send_json(writer, exc.status, _error_body(exc.code, str(exc)),
                             request.keep_alive)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug in one request must not take the node down
            log.exception("HTTP %s %s failed", request.method, request.path)
            await _send_json(writer, 500, _error_body("internal", f"internal error: {exc}"),
                             keep_alive=False)
            return False
        return True

    def _models(self) -> list[dict[str, Any]]:
        """The cluster's text-generation models: served here, or loadable by any member
        (the catalogue each publishes), so a cold model is listed before it is placed."""
        names = {m["name"] for m in self.node.describe_models()
                 if m["task"] == TEXT_GENERATION}
        runtime = self.node.runtime
        if runtime is not None:
            catalogues = [runtime.catalogue] + [
                (m.state or {}).get("catalogue") or {} for m in runtime.member.view().members]
            names |= {name for catalogue in catalogues for name, entry in catalogue.items()
                      if entry.get("task") == TEXT_GENERATION}
        created = int(self.node.started)
        return [{"id": name, "object": "model", "created": created, "owned_by": "epara"}
                for name in sorted(names)]

    # --- chat completions ---------------------------------------------------------------

    async def _chat(self, request: HttpRequest, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> bool:
        body = _json_body(request.body)
        message = _generate_request(body, f"http-{next(self._ids)}")
        stream = body.get("stream") is True
        include_usage = stream and isinstance(body.get("stream_options"), dict) \
            and body["stream_options"].get("include_usage") is True
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        handling = asyncio.create_task(self.node.api._handle(
            Request(message, source="http"), replies.put, {}))
        # A client that hangs up must stop its generation (as a closed socket does), so
        # the connection is watched for EOF while the request runs.
        watch = asyncio.create_task(reader.read(1))
        chat = _Chat(f"chatcmpl-{uuid.uuid4().hex[:24]}", message["model"], int(time.time()))
        headers_sent = False
        try:
            while True:
                getting = asyncio.create_task(replies.get())
                done, _ = await asyncio.wait({getting, watch},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()
                    if not watch.result():
                        return False  # EOF: the finally clause stops the generation
                    # Pipelined bytes of a next request: not supported; close after this one.
                    request.keep_alive = False
                    watch = asyncio.create_task(asyncio.Event().wait())
                    continue
                answer = getting.result()
                if not answer.get("ok"):
                    error = answer.get("error") or {}
                    code = str(error.get("code"))
                    body_error = _error_body(code, str(error.get("message")))
                    if headers_sent:  # mid-stream: OpenAI's clients raise on this event
                        await _send_chunk(writer, _sse(body_error))
                        await _send_chunk(writer, b"")
                    else:
                        await _send_json(writer, STATUS_OF_CODE.get(code, 500), body_error,
                                         request.keep_alive)
                    return True
                event = answer.get("event")
                if not stream:
                    if event == "token":
                        chat.text.append(str(answer.get("text", "")))
                    elif event == "done":
                        await _send_json(writer, 200, chat.completion(answer),
                                         request.keep_alive)
                        return True
                    continue
                if not headers_sent:
                    await _send_head(writer, 200, "text/event-stream", request.keep_alive,
                                     {"Cache-Control": "no-cache",
                                      "Transfer-Encoding": "chunked"})
                    headers_sent = True
                    await _send_chunk(writer, _sse(chat.chunk({"role": "assistant",
                                                               "content": ""})))
                if event == "token":
                    await _send_chunk(writer, _sse(chat.chunk({"content": answer["text"]})))
                elif event == "done":
                    await _send_chunk(writer, _sse(chat.chunk(
                        {}, _finish_reason(answer.get("finish_reason")))))
                    if include_usage:
                        await _send_chunk(writer, _sse(chat.usage_chunk(answer)))
                    await _send_chunk(writer, b"data: [DONE]\n\n")
                    await _send_chunk(writer, b"")
                    return True
        finally:
            watch.cancel()
            if not handling.done():
                handling.cancel()  # cancels the generation in its service
            with contextlib.suppress(asyncio.CancelledError):
                await handling


@dataclass
class _Chat:
    """One chat completion's identity and the text gathered for a non-streamed answer."""

    id: str
    model: str
    created: int
    text: list[str] = field(default_factory=list)

    def completion(self, done: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "logprobs": None,
                             "message": {"role": "assistant", "content": "".join(self.text)},
                             "finish_reason": _finish_reason(done.get("finish_reason"))}],
                "usage": _usage(done)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]}

    def usage_chunk(self, done: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": _usage(done)}


def _usage(done: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage from the generate op's ``done`` event (prompt tokens: the chat as
    the model's template renders it, tokenized)."""
    usage = done.get("usage") or {}
    completion = int(usage.get("completion_tokens", 0))
    prompt = int(usage.get("prompt_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(reason: Any) -> str:
    # OpenAI knows "stop" and "length"; a cancelled generation ended early, like a stop.
    return "length" if reason == "length" else "stop"


def _generate_request(body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """An OpenAI chat-completions body as a local-API ``generate`` request."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError(400, "bad_request", "'model' must be a model name")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise HttpError(400, "bad_request", "'messages' must be a non-empty array")
    messages = [_message(m) for m in raw_messages]
    if body.get("n", 1) != 1:
        raise HttpError(400, "bad_request", "only n = 1 is supported")
    if not isinstance(body.get("stream", False), bool):
        raise HttpError(400, "bad_request", "'stream' must be a boolean")
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    checks: list[tuple[str, Any, type | tuple[type, ...]]] = [
        ("max_tokens", max_tokens, int), ("temperature", body.get("temperature"), (int, float)),
        ("top_p", body.get("top_p"), (int, float)), ("seed", body.get("seed"), int)]
    for name, value, kind in checks:
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise HttpError(400, "bad_request", f"'{name}' has the wrong type")
        params[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise HttpError(400, "bad_request", "'stop' must be a string or an array of them")
        params["stop"] = stop
    message: dict[str, Any] = {"id": request_id, "op": "generate", "model": model,
                               "messages": messages, "params": params}
    # Not in OpenAI's API: an epara deadline (send it with the client's extra_body).
    if body.get("deadline_ms") is not None:
        message["deadline_ms"] = body["deadline_ms"]
    return message


def _message(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
        raise HttpError(400, "bad_request", "each message needs a string 'role'")
    content = raw.get("content")
    if isinstance(content, list):  # content parts: only text ones can be served
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise HttpError(400, "bad_request", "only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise HttpError(400, "bad_request", "message 'content' must be text")
    # OpenAI's newer name for the system role; chat templates know only "system".
    role = "system" if raw["role"] == "developer" else raw["role"]
    return {"role": role, "content": content}


# --- HTTP/1.1 framing ------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader, first: bytes,
                        admit: Any, max_body_bytes: int) -> HttpRequest | None:
    """The request whose first byte was ``first``; None when it is only blank bytes
    before EOF. ``admit(method, path, headers)`` may refuse it before its body is read."""
    try:
        head = first + await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not (first + exc.partial).strip():
            return None
        raise HttpError(400, "bad_request", "incomplete request head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(413, "too_large", "request head over 64 KiB") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "bad_request", "malformed request line")
    method, path, version = parts
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "bad_request", "malformed header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(411, "length_required", "send the body with Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad_request", "malformed Content-Length") from None
    admit(method, path, headers)
    if length < 0 or length > max_body_bytes:
        raise HttpError(413, "too_large", f"bodies are limited to {max_body_bytes} bytes")
    body = await reader.readexactly(length) if length else b""
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
    return HttpRequest(method, path, headers, body, keep_alive)


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "bad_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "the body must be a JSON object")
    return body


def _error_body(code: str, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if STATUS_OF_CODE.get(code, 500) < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _send_head(writer: asyncio.StreamWriter, status: int, content_type: str,
                     keep_alive: bool, extra: dict[str, str]) -> None:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}",
             *(f"{k}: {v}" for k, v in extra.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
                keep_alive: bool, headers: dict[str, str] | None = None) -> None:
    await _send_head(writer, status, content_type, keep_alive,
                     {"Content-Length": str(len(body)), **(headers or {})})
    writer.write(body)
    await writer.drain()


async def _send_json(writer: asyncio.StreamWriter, status: int, data: Any,
                     keep_alive: bool, headers: dict[str, str] | None = None) -> None:
    # default=str: status records may hold values JSON has no type for (paths, tuples).
    body = json.dumps(data, default=str).encode()
    await _send(writer, status, body, "application/json", keep_alive, headers)


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One chunk of a chunked body; empty data is the last chunk."""
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()
