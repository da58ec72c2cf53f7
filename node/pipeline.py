"""Pipelines of model stages across nodes, over the data plane.

A *stage* is a consecutive part of a model loaded on one node (an LLM layer range that
keeps its own KV cache per sequence, or a cut of an ONNX graph). The origin of a request
sends the first stage a ``forward`` message carrying the rest of the route; each stage
runs, then forwards its outputs to the next stage; the last stage sends a ``result`` to
the origin. Stages overlap naturally: while stage 1 works on one micro-batch, stage 0
already runs the next.

The origin keeps what it needs to replay (for an LLM: the prompt and the tokens so far),
so a dead stage costs a replay on a repaired route, never a wrong or duplicate answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from epara.models.backends import Session
from epara.node.dataplane import DataPlane, Endpoint
from epara.node.generation import pass_timeout
from epara.node.service import ServiceError

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage of a route did not answer: dead, stalled, unloaded, or it raised."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


@dataclass(frozen=True)
class StageRef:
    """Where one stage runs: the node, its data endpoint, and the stage's key there."""

    node_id: str
    endpoint: Endpoint
    key: str

    def to_wire(self) -> list[Any]:
        return [self.node_id, self.endpoint[0], self.endpoint[1], self.key]

    @staticmethod
    def from_wire(value: Sequence[Any]) -> StageRef:
        node_id, host, port, key = value
        return StageRef(str(node_id), (str(host), int(port)), str(key))


class Stage(Protocol):
    """What a node can run as a pipeline stage."""

    def run(self, header: Mapping[str, Any],
            tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def drop(self, seq_id: str) -> None: ...


class LlmStageAdapter:
    """An ``LlmStage`` (layer range with per-sequence KV cache) as a pipeline stage.

    A sequence's cache is freed when its head drops it (the sequence ended) or, if the
    head never does (it died), once the sequence has not run for ``idle_seconds``:
    ``StageHost`` calls ``expire`` periodically. A head that comes back after that gets
    an error for the lost cache and replays, never a wrong answer."""

    def __init__(self, stage: Any, idle_seconds: float = 30.0) -> None:
        self.stage = stage
        self.idle_seconds = idle_seconds

    def expire(self) -> None:
        for seq_id in self.stage.expire(self.idle_seconds):
            log.info("freed the cache of idle sequence %s (its head is gone)", seq_id)

    def run(self, header: Mapping[str, Any],
            tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seq_ids = [str(s) for s in header["seq_ids"]]
        return {"x": self.stage.forward(seq_ids, tensors["x"], tensors["positions"]),
                "positions": tensors["positions"]}

    def drop(self, seq_id: str) -> None:
        self.stage.drop(seq_id)


class SessionStage:
    """A cut of a stateless model (a backend session): outputs feed the next stage by name.

    Tensors that a later stage needs but this one does not take (skip connections that
    jump over it) pass through."""

    def __init__(self, session: Any, input_names: Sequence[str]) -> None:
        self.session = session
        self.input_names = frozenset(input_names)

    def run(self, header: Mapping[str, Any],
            tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run({k: v for k, v in tensors.items() if k in self.input_names})
        passing = {k: v for k, v in tensors.items() if k not in self.input_names}
        return {**passing, **outputs}

    def drop(self, seq_id: str) -> None:
        """Stateless: nothing kept per sequence."""


class PipelineSession(Session):
    """A stateless model served as a pipeline, seen from its head: the first stage runs
    here, the rest of the route on other nodes through ``PipelineClient``.

    To a ``ModelService`` it is a session like any other, so a request to a pipeline gets
    the same validation, batching, admission and pre/post-processing as one to a replica
    of the whole model. ``run_by`` is called from the service's worker thread; the data
    plane lives on the node's event loop, so the remote part hops onto the loop and waits
    no longer than the batch's deadline (``HOP_LIMIT_S`` without one). A broken route
    fails the batch with ``stage_failed``, which the API answers by waiting for the
    leader's repair and replaying the request while its deadline allows."""

    def __init__(self, first: SessionStage, client: PipelineClient,
                 route: Callable[[], Sequence[StageRef]], outputs: Sequence[str],
                 loop: asyncio.AbstractEventLoop, target: str) -> None:
        self.first = first
        self.client = client
        self.route = route  # resolved per run: a stage's node may move to another port
        self.outputs = tuple(outputs)
        self.target = target
        self._loop = loop

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_by(inputs, None)

    def run_by(self, inputs: Mapping[str, np.ndarray],
               deadline: float | None) -> dict[str, np.ndarray]:
        tensors = self.first.run({}, inputs)
        timeout = pass_timeout([deadline], time.monotonic())

        async def remote() -> dict[str, np.ndarray]:
            # On the loop, which owns the cluster view the route is resolved from.
            return await self.client.run(self.route(), tensors, timeout)

        try:
            future = asyncio.run_coroutine_threadsafe(remote(), self._loop)
            try:
                # The client's own timeout ends the wait; this one only guards a loop
                # that has stopped.
                result = future.result(timeout + 5.0)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise StageFailed(f"no result within {timeout:.2f} s from the pipeline") \
                    from None
        except StageFailed as exc:
            raise ServiceError("stage_failed", f"pipeline {self.target}: {exc}") from None
        missing = [name for name in self.outputs if name not in result]
        if missing:
            raise ServiceError("stage_failed", f"pipeline {self.target}: its last stage "
                               f"returned no {', '.join(missing)}")
        return {name: result[name] for name in self.outputs}

    def close(self) -> None:
        self.first.session.close()


class StageHost:
    """The stages loaded on this node. Each runs on its own worker thread (a runtime
    session is used by one thread at a time), in arrival order."""

    def __init__(self, dataplane: DataPlane, node_id: str) -> None:
        self.dataplane = dataplane
        self.node_id = node_id
        self.stages: dict[str, Stage] = {}
        self.on_run: Callable[[str, float], None] | None = None  # (stage key, seconds)
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._sweeper: asyncio.Task[None] | None = None
        dataplane.on("forward", self._on_forward, refuse=self._refuse)
        dataplane.on("drop", self._on_drop)

    def add(self, key: str, stage: Stage) -> None:
        self.stages[key] = stage
        self._executors[key] = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"stage-{key}")
        if hasattr(stage, "expire") and self._sweeper is None:
            try:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            except RuntimeError:  # no event loop (a synchronous caller): no sweeping
                log.warning("stage %s: no event loop, idle sequences are not expired", key)

    async def _sweep(self, period: float = 1.0) -> None:
        """Free per-sequence state that no head will ever drop (stages' ``expire``)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            for key, stage in list(self.stages.items()):
                expire = getattr(stage, "expire", None)
                if expire is not None and key in self._executors:
                    try:  # on the stage's own thread: it may be mid-forward
                        await loop.run_in_executor(self._executors[key], expire)
                    except Exception:
                        log.warning("expiring idle sequences of %s failed", key,
                                    exc_info=True)

    def remove(self, key: str) -> None:
        self.stages.pop(key, None)
        executor = self._executors.pop(key, None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> list[str]:
        return sorted(self.stages)

    def close(self) -> None:
        for key in list(self.stages):
            self.remove(key)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _on_forward(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        origin = (str(header["origin"][0]), int(header["origin"][1]))
        key = str(header["stage"])
        stage = self.stages.get(key)
        if stage is None:
            await self._fail(origin, header, f"stage {key} is not loaded on {self.node_id}")
            return
        loop = asyncio.get_running_loop()
        try:
            started = time.monotonic()
            outputs = await loop.run_in_executor(self._executors[key], stage.run, header,
                                                 tensors)
            if self.on_run is not None:
                self.on_run(key, time.monotonic() - started)
        except Exception as exc:  # report to the origin, which replays or fails cleanly
            log.warning("stage %s failed: %s", key, exc)
            await self._fail(origin, header, f"stage {key} on {self.node_id}: {exc}")
            return
        route = [StageRef.from_wire(r) for r in header.get("route", [])]
        compress = str(header.get("compress", "none"))
        if route:
            forward = {**header, "stage": route[0].key,
                       "route": [r.to_wire() for r in route[1:]]}
            if not await self.dataplane.send_when_connected(route[0].endpoint, forward,
                                                            outputs, compress):
                await self._fail(origin, header, f"next stage {route[0].key} on "
                           f"{route[0].node_id} is unreachable", route[0].node_id)
            return
        result = {"kind": "result", "req": header["req"]}
        if not await self.dataplane.send_when_connected(origin, result, outputs):
            log.warning("origin %s:%d of %s is unreachable", *origin, header["req"])

    async def _refuse(self, header: dict[str, Any], reason: str) -> None:
        """Every data-plane task slot is taken: fail this pass at once (the origin
        replays it or gives up) rather than queue it without bound."""
        with contextlib.suppress(KeyError, TypeError, ValueError):
            origin = (str(header["origin"][0]), int(header["origin"][1]))
            self.dataplane.send(origin, {"kind": "error", "req": header["req"],
                                         "message": f"{self.node_id}: {reason}",
                                         "node": self.node_id})

    async def _fail(self, origin: Endpoint, header: Mapping[str, Any], message: str,
                    node: str | None = None) -> None:
        await self.dataplane.send_when_connected(
            origin, {"kind": "error", "req": header["req"], "message": message,
                     "node": node or self.node_id})

    async def _on_drop(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        stage = self.stages.get(str(header["stage"]))
        if stage is not None:
            executor = self._executors[str(header["stage"])]
            # Through the stage's own thread: it may be mid-forward on this sequence.
            await asyncio.get_running_loop().run_in_executor(executor, stage.drop,
                                                             str(header["seq_id"]))


class PipelineClient:
    """The origin's side: send work down a route and wait for its result."""

    def __init__(self, dataplane: DataPlane, node_id: str) -> None:
        self.dataplane = dataplane
        self.node_id = node_id
        self._pending: dict[str, tuple[asyncio.Future[dict[str, np.ndarray]],
                                       tuple[str, ...]]] = {}
        self._ids = itertools.count()
        self._prefix = f"{node_id}-{os.getpid()}-"
        # Answers only wake a waiting request: they never wait for a task slot.
        dataplane.on("result", self._on_result, inline=True)
        dataplane.on("error", self._on_error, inline=True)

    async def run(self, route: Sequence[StageRef], tensors: Mapping[str, np.ndarray],
                  timeout: float, compress: str = "none",
                  **header: Any) -> dict[str, np.ndarray]:
        """Run ``tensors`` through every stage of ``route``; StageFailed on any fault."""
        if not route:
            raise ValueError("a route needs at least one stage")
        req = f"{self._prefix}{next(self._ids)}"
        future: asyncio.Future[dict[str, np.ndarray]] = \
            asyncio.get_running_loop().create_future()
        self._pending[req] = (future, tuple(r.node_id for r in route))
        message = {**header, "kind": "forward", "req": req, "stage": route[0].key,
                   "origin": list(self.dataplane.endpoint), "compress": compress,
                   "route": [r.to_wire() for r in route[1:]]}
        try:
            if not await self.dataplane.send_when_connected(route[0].endpoint, message,
                                                            tensors, compress,
                                                            timeout=min(timeout, 2.0)):
                raise StageFailed(f"first stage {route[0].key} on {route[0].node_id} is "
                                  "unreachable", route[0].node_id)
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                raise StageFailed(f"no result within {timeout:.2f} s from the route "
                                  f"{' -> '.join(r.node_id for r in route)}") from None
        finally:
            self._pending.pop(req, None)

    def drop(self, route: Sequence[StageRef], seq_id: str) -> None:
        for ref in route:
            self.dataplane.send(ref.endpoint, {"kind": "drop", "stage": ref.key,
                                               "seq_id": seq_id})

    def nodes_lost(self, gone: set[str]) -> None:
        """Fail at once every request whose route crosses a node that left the cluster,
        instead of waiting for its timeout."""
        for req, (future, nodes) in list(self._pending.items()):
            lost = gone.intersection(nodes)
            if lost and not future.done():
                future.set_exception(StageFailed(
                    f"node {', '.join(sorted(lost))} left the cluster mid-request",
                    sorted(lost)[0]))
                self._pending.pop(req, None)

    async def _on_result(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        entry = self._pending.get(str(header.get("req")))
        if entry is not None and not entry[0].done():
            entry[0].set_result(tensors)

    async def _on_error(self, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        entry = self._pending.get(str(header.get("req")))
        if entry is not None and not entry[0].done():
            entry[0].set_exception(StageFailed(str(header.get("message")),
                                               header.get("node")))


class RemoteLlmChain:
    """A chain of remote LLM stages that ``LlmEngine`` drives like its local stages.

    The engine calls ``forward`` from its worker thread; the data plane lives on the
    node's event loop, so each call hops onto the loop and waits for the result."""

    def __init__(self, client: PipelineClient, route: Sequence[StageRef], layers: range,
                 loop: asyncio.AbstractEventLoop,
                 timeout: Callable[[Sequence[str]], float],
                 compress: str = "none") -> None:
        self.client = client
        self.route = tuple(route)
        self.layers = layers
        self.first = layers.start == 0
        self._loop = loop
        self._timeout = timeout
        self._compress = compress

    def forward(self, seq_ids: Sequence[str], inputs: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
        return self.submit(seq_ids, inputs, positions).result(self._timeout(seq_ids) + 5)

    def submit(self, seq_ids: Sequence[str], inputs: np.ndarray,
               positions: np.ndarray) -> concurrent.futures.Future[np.ndarray]:
        """Start a pass down the route; the future holds the last stage's output. The
        pass waits no longer than ``timeout(seq_ids)``: the sequences' own deadlines."""
        timeout = self._timeout(seq_ids)

        async def run() -> np.ndarray:
            result = await self.client.run(self.route, {"x": inputs, "positions": positions},
                                           timeout, self._compress, seq_ids=list(seq_ids))
            return result["x"]

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def drop(self, seq_id: str) -> None:
        self._loop.call_soon_threadsafe(self.client.drop, self.route, seq_id)
