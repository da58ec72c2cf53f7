"""The local socket API: length-prefixed CBOR requests on a Unix domain socket.

Each connection may have many requests in flight; replies carry the request's ``id`` and
may arrive in any order. A fault in one request (or one frame) is answered with an error
and never stops the node or the other connections. The protocol is specified in
docs/local-api.md; keep the two in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from epara.models import imaging
from epara.node.generation import GenerationService
from epara.node.localsock import LocalSocketServer, SocketLimits
from epara.node.service import InferResult, ModelService, ServiceError
from epara.peer import wire
from epara.peer.wire import WireError

log = logging.getLogger(__name__)

Reply = Callable[[dict[str, Any]], Awaitable[None]]
SEGMENTATION_TASKS = ("segmentation", "text-detection")
ROUTED_OPS = ("infer", "segment", "generate")
RETRYABLE = ("stage_failed", "unavailable")  # a route broke: another may serve
MAX_REPLAYS = 3
MAX_DEADLINE_MS = 86_400_000.0  # one day: anything longer is a mistake, not a deadline
MAX_TOKENS_LIMIT = 1 << 20
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def checked_number(name: str, value: Any, low: float, high: float) -> Any:
    """``value`` if it is a finite number in [low, high], else ``bad_request``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServiceError("bad_request", f"{name} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ServiceError("bad_request", f"{name} must be a finite number, got {value}")
    if not low <= value <= high:
        raise ServiceError("bad_request", f"{name} must be in [{low:g}, {high:g}], got "
                           f"{value}")
    return value


def default_socket_path() -> Path:
    """``$EPARA_SOCKET``, else ``$XDG_RUNTIME_DIR/epara/node.sock``, else /tmp/epara-UID/."""
    if os.environ.get("EPARA_SOCKET"):
        return Path(os.environ["EPARA_SOCKET"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "epara" / "node.sock"
    return Path(f"/tmp/epara-{os.getuid()}") / "node.sock"


class Request:
    """One decoded request, with the checks every operation shares."""

    def __init__(self, message: Mapping[str, Any], source: str | None = None) -> None:
        self.message = message
        raw_id = message.get("id")
        self.id = raw_id if wire.valid_id(raw_id) else None
        self.id_error = raw_id is not None and self.id is None
        self.received = time.monotonic()
        self.cancelled = False  # set by a `cancel` op naming this request
        # Forwarded by a peer: serve it here, never forward it again.
        self.forwarded = message.get("forwarded") is True
        # Where it came from, for the metrics: the local socket, the HTTP endpoint or a peer.
        self.source = source or ("peer" if self.forwarded else "socket")
        self._on_cancel: list[Callable[[], None]] = []

    def on_cancel(self, callback: Callable[[], None]) -> None:
        self._on_cancel.append(callback)

    def cancel(self) -> None:
        self.cancelled = True
        for callback in self._on_cancel:
            callback()

    def field(self, name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        value = self.message.get(name)
        if value is None:
            if required:
                raise ServiceError("bad_request", f"field {name!r} is required")
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ServiceError("bad_request", f"field {name!r} has the wrong type "
                               f"({type(value).__name__})")
        return value

    def number(self, name: str, low: float, high: float, required: bool = False,
               integer: bool = False) -> Any:
        """A numeric field, finite and within [low, high] (NaN, infinities and values
        out of range are ``bad_request``: one request's bad number must never reach a
        computation it shares with others)."""
        value = self.field(name, int if integer else (int, float), required)
        return None if value is None else checked_number(name, value, low, high)

    def deadline(self) -> float | None:
        budget = self.number("deadline_ms", 0, MAX_DEADLINE_MS)
        if budget is None:
            return None
        if budget <= 0:
            raise ServiceError("bad_request", "deadline_ms must be positive")
        return self.received + budget / 1000


@dataclass(frozen=True)
class Finished:
    """How one model request (infer, segment, generate) ended, as this node's API saw it."""

    model: str
    source: str  # "socket", "http" or "peer"
    error: str | None  # the error code it ended with; None when it succeeded
    elapsed_s: float
    first_token_s: float | None  # a generation's time to its first token
    deadline_met: bool  # True also when it had no deadline


class _Tracker:
    """Wraps a request's reply callback to see how the request ends, for ``observer``."""

    def __init__(self, request: Request, reply: Reply) -> None:
        self.request = request
        self.inner = reply
        self.model: str | None = None  # set once the op is known to be a model request
        self.error: str | None = None
        self.ended = False
        self.first_token: float | None = None

    async def reply(self, answer: dict[str, Any]) -> None:
        if not answer.get("ok"):
            self.error = str((answer.get("error") or {}).get("code"))
            self.ended = True
        elif answer.get("event") == "token" and self.first_token is None:
            self.first_token = time.monotonic()
        elif answer.get("event") in (None, "done"):
            self.ended = True
            if answer.get("finish_reason") == "cancelled":
                self.error = "cancelled"
        await self.inner(answer)

    def finished(self) -> Finished | None:
        if self.model is None:
            return None
        now = time.monotonic()
        budget = self.request.message.get("deadline_ms")
        deadline = (self.request.received + budget / 1000
                    if isinstance(budget, (int, float)) and not isinstance(budget, bool)
                    else None)
        # Ended without a final reply: its task was cancelled (the client went away).
        error = self.error if self.ended else "cancelled"
        received = self.request.received
        return Finished(self.model, self.request.source, error, now - received,
                        None if self.first_token is None else self.first_token - received,
                        deadline is None or now <= deadline)


class LocalApi:
    """Routes requests to the node's services. The node owns the services' lifecycle."""

    def __init__(self, services: Mapping[str, ModelService | GenerationService],
                 describe_models: Callable[[], list[dict[str, Any]]],
                 status: Callable[[], dict[str, Any]],
                 limits: SocketLimits | None = None) -> None:
        self.services = services
        self.describe_models = describe_models
        self.status = status
        self.limits = limits or SocketLimits()
        self.router: Any = None  # the node's ClusterRuntime, when it is in a cluster
        # Told how every model request ended (the node's request counters and metrics).
        self.observer: Callable[[Finished], None] | None = None
        self._server = LocalSocketServer(self._serve, self.limits)
        self._socket_path: Path | None = None

    @property
    def connections(self) -> int:
        return len(self._server.connections)

    @property
    def buffered_bytes(self) -> int:
        """What the local socket's connections hold in read and write buffers now."""
        return self._server.buffered

    async def start(self, socket_path: Path, group: int | None = None) -> None:
        """Listen on ``socket_path``; only the owner (and ``group``, if given) may connect."""
        socket_path = Path(socket_path)
        directory = socket_path.parent
        directory.mkdir(parents=True, exist_ok=True)
        # The directory's mode is the access control: connect() needs search permission.
        os.chmod(directory, 0o750 if group is not None else 0o700)
        if group is not None:
            os.chown(directory, -1, group)
        await self._remove_stale(socket_path)
        old_umask = os.umask(0o177 if group is None else 0o117)
        try:
            self._server.listen(socket_path)
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(socket_path, -1, group)
        self._socket_path = socket_path

    async def _remove_stale(self, path: Path) -> None:
        if not path.exists() and not path.is_symlink():
            return
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
        try:
            _, writer = await asyncio.open_unix_connection(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # left behind by a node that died
            return
        writer.close()
        raise RuntimeError(f"another node is already serving on {path}")

    async def stop(self) -> None:
        self._server.close()
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()

    def _serve(self, message: dict[str, Any], reply: Reply,
               inflight: dict[Any, Request]) -> Awaitable[None]:
        """A request decoded by a local socket connection."""
        request = Request(message)
        if request.id is not None:
            inflight[request.id] = request
        return self._handle(request, reply, inflight)

    async def _handle(self, request: Request, reply: Reply,
                      inflight: dict[Any, Request]) -> None:
        tracker = _Tracker(request, reply)
        reply = tracker.reply
        try:
            if request.id_error:
                raise ServiceError("bad_request", "field 'id' must be text or an integer "
                                   "that fits in 64 bits")
            op = request.field("op", str)
            if op == "cancel":
                await self._op_cancel(request, reply, inflight)
                return
            handler = self._handlers().get(op)
            if handler is None:
                raise ServiceError("unknown_op", f"unknown op {op!r}; this node serves "
                                   f"cancel, {', '.join(sorted(self._handlers()))}")
            if op in ROUTED_OPS:
                model = request.message.get("model")
                tracker.model = model if isinstance(model, str) else "(none)"
            deadline = request.deadline()  # validated for every op
            if op in ROUTED_OPS and self.router is not None and not request.forwarded:
                await self._routed(request, handler, reply, deadline)
                return
            await handler(request, reply)
        except ServiceError as exc:
            await _safe_reply(reply, _error(request.id, exc.code, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in one request must not take the node down
            log.exception("request %r failed", request.id)
            await _safe_reply(reply, _error(request.id, "internal", f"internal error: {exc}"))
        finally:
            if inflight.get(request.id) is request:
                del inflight[request.id]
            finished = tracker.finished()
            if finished is not None and self.observer is not None:
                self.observer(finished)

    async def _routed(self, request: Request, handler: Callable[[Request, Reply],
                                                              Awaitable[None]],
                      reply: Reply, deadline: float | None) -> None:
        """Serve here or on the peer the routing policy picks. A generation whose route
        fails mid-stream is replayed on a repaired route from the tokens the client has
        already seen (the origin keeps them), so the stream goes on without a repeat."""
        assert self.router is not None
        name = request.field("model", str)
        seen: list[int] = []
        message = dict(request.message)

        async def relay(answer: dict[str, Any]) -> None:
            if answer.get("event") == "token":
                seen.append(int(answer["token"]))
            elif answer.get("event") == "done":
                answer = {**answer, "usage": {**answer.get("usage", {}),
                                              "completion_tokens": len(seen)}}
            await reply(answer)

        for attempt in itertools.count():
            try:
                peer = await self.router.should_forward(name, deadline)
                if peer is not None:
                    await self.router.forward(peer, message, relay, deadline)
                else:
                    # The same Request object: a `cancel` naming it still reaches the
                    # attempt that is running now.
                    request.message = message
                    await handler(request, relay)
                return
            except ServiceError as exc:
                retry = exc.code in RETRYABLE and attempt < MAX_REPLAYS
                if not retry or (deadline is not None and time.monotonic() >= deadline):
                    raise
                log.info("request %r failed after %d tokens (%s); replaying", request.id,
                         len(seen), exc)
                await self.router.wait_for_repair(deadline)
                message = {**request.message, "resume_tokens": list(seen)}

    def _handlers(self) -> dict[str, Callable[[Request, Reply], Awaitable[None]]]:
        return {"models": self._op_models, "status": self._op_status, "infer": self._op_infer,
                "segment": self._op_segment, "generate": self._op_generate,
                "ping": self._op_ping}

    def _service(self, request: Request) -> ModelService | GenerationService:
        name = request.field("model", str)
        service = self.services.get(name)
        if service is None:
            raise ServiceError("unknown_model", f"no model named {name!r} is served here; "
                               f"served: {', '.join(sorted(self.services)) or 'none'}")
        return service

    async def _op_cancel(self, request: Request, reply: Reply,
                         inflight: dict[Any, Request]) -> None:
        target_id = request.message.get("target")
        if not wire.valid_id(target_id):
            raise ServiceError("bad_request", "field 'target' must be the id of a request "
                               "on this connection")
        target = inflight.get(target_id)
        if target is not None and target is not request:
            target.cancel()
        await reply({"id": request.id, "ok": True, "cancelled": target is not None})

    async def _op_ping(self, request: Request, reply: Reply) -> None:
        await reply({"id": request.id, "ok": True})

    async def _op_models(self, request: Request, reply: Reply) -> None:
        await reply({"id": request.id, "ok": True, "models": self.describe_models()})

    async def _op_status(self, request: Request, reply: Reply) -> None:
        await reply({"id": request.id, "ok": True, "status": self.status()})

    async def _op_infer(self, request: Request, reply: Reply) -> None:
        service = self._service(request)
        if not isinstance(service, ModelService):
            raise ServiceError("unsupported", f"model {service.manifest.name} generates text: "
                               "use the generate op")
        inputs = request.field("inputs", dict)
        result = await _await_result(request, service.submit(inputs, request.deadline()))
        await reply({"id": request.id, "ok": True, "outputs": result.outputs,
                     "timing": {"queue_ms": round(result.queue_ms, 3),
                                "compute_ms": round(result.compute_ms, 3),
                                "batch": result.batch}})

    async def _op_segment(self, request: Request, reply: Reply) -> None:
        service = self._service(request)
        manifest = service.manifest
        if not isinstance(service, ModelService) or manifest.task not in SEGMENTATION_TASKS:
            raise ServiceError("unsupported", f"model {manifest.name} ({manifest.task}) does "
                               "not segment images: use the infer op")
        image = request.message.get("image")
        if not isinstance(image, (bytes, np.ndarray)):
            raise ServiceError("bad_request", "field 'image' must be encoded image bytes or a "
                               "uint8 [H, W, 3] tensor")
        if (image.size if isinstance(image, np.ndarray) else len(image)) == 0:
            raise ServiceError("bad_input", "field 'image' is empty")
        threshold = request.number("threshold", 0.0, 1.0)
        if threshold is None:
            threshold = float(manifest.extra.get("threshold", 0.5))
        want_overlay = request.message.get("overlay") is True
        spec = manifest.inputs[0]

        def decode() -> tuple[np.ndarray, np.ndarray, float]:
            started = time.thread_time()
            rgb = imaging.decode_image(image)
            tensor = imaging.preprocess(rgb, manifest.extra, spec.dtype)
            return rgb, tensor, time.thread_time() - started

        def finish(outputs: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], float]:
            started = time.thread_time()
            probabilities = imaging.probability_map(outputs[manifest.outputs[0].name],
                                                    manifest.extra)
            mask = imaging.mask_for_image(probabilities, rgb.shape[:2], threshold)
            answer: dict[str, Any] = {
                "mask": mask, "coverage": round(float(np.count_nonzero(mask)) / mask.size, 6)}
            if want_overlay:
                answer["overlay_png"] = imaging.encode_png(imaging.overlay(rgb, mask))
            return answer, time.thread_time() - started

        try:
            # Decoding and resizing take milliseconds: keep them off the event loop.
            rgb, tensor, before = await asyncio.to_thread(decode)
        except imaging.ImageError as exc:
            raise ServiceError("bad_input", str(exc)) from None
        # Admission keeps room for the mask still to be made after the run.
        deadline = request.deadline()
        after_s = service.node_work.after_s
        if deadline is not None and after_s is not None:
            deadline -= after_s
        result = await _await_result(request, service.submit({spec.name: tensor}, deadline))
        answer, after = await asyncio.to_thread(finish, result.outputs)
        # CPU time, not wall time: under load the wall time of this work grows with
        # everything else on the cores, and the leader models that queueing itself.
        service.node_work.record(before, after)
        await reply({"id": request.id, "ok": True, **answer,
                     "timing": {"queue_ms": round(result.queue_ms, 3),
                                "compute_ms": round(result.compute_ms, 3),
                                "batch": result.batch}})

    async def _op_generate(self, request: Request, reply: Reply) -> None:
        service = self._service(request)
        if not isinstance(service, GenerationService):
            raise ServiceError("unsupported", f"model {service.manifest.name} does not "
                               "generate text: use the infer op")
        params = _generation_params(request)
        prompt = request.field("prompt", str, required=False)
        messages = request.field("messages", list, required=False)
        if messages is not None and not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ServiceError("bad_request", "messages must be maps with string role and "
                               "content")
        resume = request.field("resume_tokens", list, required=False) or []
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in resume):
            raise ServiceError("bad_request", "resume_tokens must be token ids")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        seq_id = service.submit(prompt, messages, params, request.deadline(),
                                lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                resume=resume)
        request.on_cancel(lambda: service.cancel(seq_id))  # ends with finish "cancelled"
        finish_reason = "cancelled"
        tokens = 0
        try:
            while True:
                event = await events.get()
                if event is None:
                    break
                if isinstance(event, ServiceError):
                    raise event
                if event.finish_reason == "error":  # this sequence failed alone
                    raise ServiceError("inference_failed", event.text or "generation failed")
                if event.finish_reason is not None:
                    finish_reason = event.finish_reason
                # The end-of-sequence token (or the one completing a stop string) is not
                # output: only a final event that still carries text is streamed.
                if event.token_id < 0 or (event.finish_reason is not None
                                          and not event.text):
                    continue
                tokens += 1
                await reply({"id": request.id, "ok": True, "event": "token",
                             "token": event.token_id, "text": event.text})
        except asyncio.CancelledError:
            service.cancel(seq_id)
            raise
        elapsed = time.monotonic() - request.received
        usage: dict[str, Any] = {"completion_tokens": tokens,
                                 "elapsed_ms": round(elapsed * 1000, 3)}
        prompt_tokens = await asyncio.to_thread(service.prompt_tokens, prompt, messages)
        if prompt_tokens is not None:
            usage["prompt_tokens"] = prompt_tokens
        await reply({"id": request.id, "ok": True, "event": "done",
                     "finish_reason": finish_reason, "usage": usage})


async def _await_result(request: Request, future: Future[InferResult]) -> InferResult:
    """Wait for a queued job; a `cancel` op or a closed connection withdraws it."""
    request.on_cancel(future.cancel)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        if request.cancelled and not _task_being_cancelled():
            raise ServiceError("cancelled", "cancelled by the client") from None
        raise


def _task_being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (its client left). A helper, so
    no frame the CancelledError's traceback keeps holds the task: that cycle would keep
    the request's inputs (maybe a client's shared memory) alive until a GC pass."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _generation_params(request: Request) -> Any:
    from epara.models.llm import GenerationParams  # the LLM extra may be absent

    raw = request.message.get("params") or {}
    if not isinstance(raw, dict):
        raise ServiceError("bad_request", "params must be a map")
    # name -> (type, lowest, highest): every number finite and in range, because one
    # sequence's NaN temperature would poison the decode step it shares with others.
    ranges: dict[str, tuple[type | tuple[type, ...], float, float]] = {
        "max_tokens": (int, 1, MAX_TOKENS_LIMIT), "temperature": ((int, float), 0.0,
                                                                  MAX_TEMPERATURE),
        "top_p": ((int, float), 0.0, 1.0), "top_k": (int, 0, 2**31 - 1),
        "seed": (int, 0, 2**64 - 1)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "stop":
            if not isinstance(value, list) or len(value) > MAX_STOP_STRINGS or not all(
                    isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value):
                raise ServiceError("bad_request", f"stop must be a list of at most "
                                   f"{MAX_STOP_STRINGS} non-empty strings of at most "
                                   f"{MAX_STOP_CHARS} characters")
            values[name] = tuple(value)
            continue
        known = ranges.get(name)
        if known is None:
            raise ServiceError("bad_request", f"unknown generation parameter {name!r}; "
                               f"known: {', '.join([*ranges, 'stop'])}")
        kind, low, high = known
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ServiceError("bad_request", f"generation parameter {name!r} has the wrong "
                               "type")
        values[name] = checked_number(f"params.{name}", value, low, high)
    if values.get("top_p", 1.0) == 0:
        raise ServiceError("bad_request", "params.top_p must be in (0, 1]")
    return GenerationParams(**values)


def _error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


async def _safe_reply(reply: Reply, message: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, OSError, WireError):
        await reply(message)
