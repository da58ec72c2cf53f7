"""A node's life as a cluster member: placement, stages, and requests served by peers.

- Every node publishes, in its synced state record, the models it can load (catalogue),
  its data-plane port, its memory budget, the units it has ready, the demand it sees and
  the SLO attainment of the requests that entered through it.
- While it leads, ``PlacementPublisher`` (node/publisher.py) runs the placement policy
  every few seconds, on membership change and on a demand surge, and broadcasts the
  versioned placement (best effort, so it re-sends it periodically).
- Each node's executor here carries out the pure reconcile step's actions
  (node/reconcile.py): exactly the replicas (with the plan's batch), pipeline heads and
  stages the placement gives it, nothing else.
- A request for a model is routed by ``Router`` (node/router.py) from calibrated specs:
  the local replica, a peer replica (forwarded by node/forwarder.py, replies relayed
  back), or a pipeline's head; it is refused early when no target can meet its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epara.models.manifest import Manifest
from epara.node import planning, reconcile
from epara.node.dataplane import DataPlane, Endpoint
from epara.node.forwarder import Forwarder
from epara.node.generation import HOP_LIMIT_S, GenerationService
from epara.node.leader.demand import WINDOW_S, observe
from epara.node.leader.model import Placement, Unit
from epara.node.leader.policies import make_policy
from epara.node.leader.scheduler import SchedulerConfig
from epara.node.pipeline import (
    LlmStageAdapter,
    PipelineClient,
    PipelineSession,
    RemoteLlmChain,
    SessionStage,
    StageFailed,
    StageHost,
    StageRef,
)
from epara.node.publisher import PlacementPublisher
from epara.node.reconcile import Running, stage_key
from epara.node.router import NotPlaced, Router
from epara.node.service import ModelService, ServiceError
from epara.peer.member import ClusterMember

if TYPE_CHECKING:
    from epara.node.daemon import Node

log = logging.getLogger(__name__)

COLD_START_WAIT_S = 15.0  # how long a request waits for the leader to place its model
# "epara" is the state-aware scheduler; the others are the baseline strategies of the
# simulator, here so a real cluster can be measured under each of them.
Reply = Callable[[dict[str, Any]], Awaitable[None]]


class _LogStream:
    """Where a stage build's progress lines go: the node's log, not its stderr."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.info("%s", line.strip())
        return len(text)

    def flush(self) -> None:
        """Each line is logged as it is written."""


class RateMeter:
    """Arrivals per service over a sliding window, summarised for the demand record:
    rates, burstiness, and the deadlines requests actually carry."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._arrivals: dict[str, list[float]] = {}
        self._budgets: dict[str, list[tuple[float, float]]] = {}

    def hit(self, service: str, budget_ms: float | None = None) -> None:
        now = time.monotonic()
        self._arrivals.setdefault(service, []).append(now)
        if budget_ms is not None:
            self._budgets.setdefault(service, []).append((now, budget_ms))

    def rates(self) -> dict[str, dict[str, float]]:
        """Per service: mean rate, the rate its busy seconds reach, how variable the
        gaps between arrivals are (leader/demand.py), and the median deadline."""
        now = time.monotonic()
        out: dict[str, dict[str, float]] = {}
        for name, times in self._arrivals.items():
            times[:] = [t for t in times if t > now - self.window_s]
            seen = observe(times, now, self.window_s)
            if seen is None:
                continue
            out[name] = {"rate": round(seen.rate_hz, 3),
                         "peak": round(seen.peak_hz or seen.rate_hz, 3),
                         "cv": round(seen.cv, 3)}
            budgets = self._budgets.get(name, [])
            budgets[:] = [(t, b) for t, b in budgets if t > now - self.window_s]
            if budgets:
                out[name]["slo_ms"] = round(statistics.median(b for _, b in budgets), 1)
        return out


class ClusterRuntime:
    def __init__(self, node: Node, member: ClusterMember, credentials_dir: Path,
                 budget_mb: float | None = None,
                 config: SchedulerConfig | None = None, policy: str = "epara") -> None:
        # A real cluster's estimates start from a roofline: place what is demanded so
        # that it runs and is measured (SchedulerConfig.place_to_measure).
        self.policy = make_policy(policy, config or SchedulerConfig(place_to_measure=True))
        self.node = node
        self.member = member
        self.budget_mb = budget_mb
        self.dataplane = DataPlane(credentials_dir, member.host,
                                   server_key_for=self._data_server_key)
        self.stages = StageHost(self.dataplane, node.node_id)
        self.pipeline = PipelineClient(self.dataplane, node.node_id)
        self.placement = Placement()
        self.decisions: tuple[Any, ...] = ()
        self.demand = RateMeter()
        self.catalogue: dict[str, dict[str, Any]] = {}
        self.ready_units: set[str] = set()
        self._manifests: dict[str, tuple[Path, Manifest]] = {}
        self._placement_dirty = asyncio.Event()
        self._applied = False
        self._applied_version = -1
        self.publisher = PlacementPublisher(member, self.policy, lambda: self.placement,
                                            self._adopt)
        self._tasks: list[asyncio.Task[None]] = []
        self.forwarder = Forwarder(self.dataplane, node.node_id, self._serve_forwarded,
                                   self._endpoint)
        self._members: set[str] = set()
        self._loading: dict[str, asyncio.Lock] = {}
        self.router = Router(
            node.node_id, lambda: [m for m in self.member.view().members
                                   if m.status != "suspect"],
            lambda: self.placement, lambda: set(self.ready_units))

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        stored, _ = self.node.store.scan()
        for model in stored:
            if model.manifest.task == "stage":
                continue
            if self.node.config.models and model.manifest.name not in self.node.config.models:
                continue
            self._manifests[model.manifest.name] = (model.directory, model.manifest)
            self.catalogue[model.manifest.name] = planning.catalogue_entry(model.manifest)
        await self.dataplane.start()
        self.member.on_command("placement", self._on_placement)
        self.member.subscribe(self._on_view)
        self._tasks = [asyncio.create_task(self.publisher.run()),
                       asyncio.create_task(self._reconcile_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.stages.close()
        await self.dataplane.stop()

    def state(self) -> dict[str, Any]:
        """This node's part of the synced state record."""
        demand = self.demand.rates()
        # The SLO attainment of the requests that entered here, over the demand window:
        # what the leader compares with the estimate it planned by.
        for name, (met, ended) in self.node.requests.attainment(WINDOW_S).items():
            if name in demand:
                demand[name].update(met=met, ended=ended)
        return {"data_port": self.dataplane.port, "catalogue": self.catalogue,
                "ready": sorted(self.ready_units), "demand": demand,
                "budget_mb": self.budget_mb, "placement_version": self._applied_version}

    def status(self) -> dict[str, Any]:
        return {"placement": self.placement.to_dict(),
                "decisions": [d.__dict__ for d in self.decisions],
                "ready": sorted(self.ready_units), "stages": self.stages.ready(),
                # what runs here (node/reconcile.py), to compare with the placement
                "running": self.running().to_dict(),
                # on the leader: its correction of each service's time (policies.py)
                # and the attainment its estimates expect of the placement
                "time_scales": {name: round(k, 3) for name, k in
                                getattr(self.policy, "scales", {}).items()},
                "estimated_attainment": {
                    name: round(value, 4) for name, value in
                    getattr(self.policy, "estimates", {}).items()},
                "forwarding": {**self.forwarder.counts,
                               "in_flight": self.forwarder.in_flight(),
                               "dataplane_tasks": self.dataplane.running_tasks,
                               "dataplane_refused": self.dataplane.refused}}

    def _on_view(self, view: Any) -> None:
        members = {m.node_id for m in view.members}
        gone = self._members - members
        self._members = members
        if gone:
            self.pipeline.nodes_lost(gone)
            self.forwarder.nodes_lost(gone)
        self.publisher.wake.set()

    # --- the leader's publisher hands its placements here ---------------------------

    def _adopt(self, placement: Placement, decisions: tuple[Any, ...]) -> None:
        if decisions:
            self.decisions = decisions
        self.placement = placement
        self._placement_dirty.set()

    # --- every node: reconcile to the placement --------------------------------------

    async def _on_placement(self, body: dict[str, Any], sender: str, term: int) -> None:
        placement = Placement.from_dict(body)
        if placement.version < self.placement.version:
            return  # an older plan (re-sent, or from a deposed leader's last words)
        if placement != self.placement or not self._applied:
            self.placement = placement
            self._placement_dirty.set()

    async def _reconcile_loop(self) -> None:
        retry_s: float | None = None  # when actions failed: wait this long, then again
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._placement_dirty.wait(), retry_s)
            fresh = self._placement_dirty.is_set()
            self._placement_dirty.clear()
            placement = self.placement
            try:
                await self._reconcile(placement)
                self._applied = True
                self._applied_version = placement.version
            except Exception:  # keep reconciling later placements
                log.exception("reconciling placement v%d failed", placement.version)
            left = reconcile.plan(placement, self.node.node_id, self.running())
            retry_s = reconcile.retry_after(retry_s, fresh, converged=not left)
            if left:
                log.info("placement v%d: %d actions not done, retrying in %.0f s",
                         placement.version, len(left), retry_s)

    def running(self) -> Running:
        """What this node runs now, read back from its services and stages."""
        replicas: dict[str, int] = {}
        heads: dict[str, str] = {}
        head_batches: dict[str, int] = {}
        for name, service in self.node.services.items():
            batch = int(service.stats()["max_batch"])
            if service.head_key is not None:
                heads[name] = service.head_key
                head_batches[name] = batch
            else:
                replicas[name] = batch
        return Running(replicas, heads, frozenset(self.stages.stages), head_batches)

    async def _reconcile(self, placement: Placement) -> None:
        """Carry out the pure reconcile step's actions (node/reconcile.py), in order."""
        for action in reconcile.plan(placement, self.node.node_id, self.running()):
            match action:
                case reconcile.Unload(name):
                    service = self.node.services.pop(name)
                    await asyncio.to_thread(service.stop)
                    log.info("unloaded %s", name)
                case reconcile.CloseStage(key):
                    self.stages.remove(key)
                case reconcile.SetBatch(name, batch):
                    self.node.services[name].set_max_batch(batch)
                    log.info("%s: max batch %d", name, batch)
                case reconcile.Load(name, batch):
                    await self._load_replica(name)
                    if name in self.node.services:
                        self.node.services[name].set_max_batch(batch)
                case reconcile.OpenStage(key, name, first, end):
                    await self._load_stage(key, name, first, end)
                case reconcile.OpenHead(unit):
                    await self._load_head(unit)
        self.ready_units = {u.id for u in placement.units()
                            if self._unit_ready_here(u)}

    def _unit_ready_here(self, unit: Unit) -> bool:
        """This node's part of ``unit`` is loaded (the head also needs its peers)."""
        me = self.node.node_id
        for index, stage in enumerate(unit.stages):
            if stage.device != me:
                continue
            if index == 0 and unit.service not in self.node.services:
                return False
            if index > 0 and stage_key(unit.service, stage.first, stage.end) \
                    not in self.stages.stages:
                return False
        return True

    async def _load_replica(self, name: str) -> None:
        # One load per model at a time: a placement and a request may both ask for it.
        async with self._loading.setdefault(name, asyncio.Lock()):
            if name not in self.node.services:
                await self._load_replica_now(name)

    async def _load_replica_now(self, name: str) -> None:
        from epara.node.daemon import load_service

        known = self._manifests.get(name)
        if known is None:
            log.warning("placement gives %s to this node, which does not have it", name)
            return
        directory, manifest = known
        try:
            self.node.services[name] = await asyncio.to_thread(
                load_service, directory, manifest, self.node.config.threads)
            self.node.unavailable.pop(name, None)
            log.info("loaded %s", name)
        except Exception as exc:  # report and go on: the leader sees it is not ready
            self.node.unavailable[name] = str(exc)
            log.warning("cannot load %s: %s", name, exc)

    def _positions(self, name: str, first: int, end: int) -> tuple[int, int]:
        cuts = planning.cut_map(self.catalogue[name])
        if cuts is None:
            raise ValueError(f"{name} has no cut points")
        return cuts.positions(first, end)

    async def _llm_stage(self, name: str, first: int, end: int) -> Any:
        from epara.models.llm import LlmStage
        from epara.models.llm_graph import build_stages, load_config

        directory, _ = self._manifests[name]
        lo, hi = self._positions(name, first, end)
        layers = load_config(directory).layers
        cuts = [c for c in (lo, hi) if 0 < c < layers]
        paths = await asyncio.to_thread(build_stages, directory, cuts)
        path = next(p for p in paths if p.name.startswith(f"stage_{lo:02d}_{hi:02d}"))
        return await asyncio.to_thread(LlmStage, path, self.node.config.threads)

    async def _cut_session(self, name: str, first: int, end: int) -> tuple[Any, Manifest]:
        """The backend session of ``name``'s stage over the plan's layers [first, end),
        cut from this node's store (or the stage found there), and its manifest."""
        from epara.models.backends import get_backend
        from epara.models.manifest import load_manifest
        from epara.models.split import stage_of

        lo, hi = self._positions(name, first, end)
        directory = await asyncio.to_thread(stage_of, self.node.store, name, lo, hi,
                                            stream=_LogStream())
        manifest = load_manifest(directory)
        session = await asyncio.to_thread(get_backend(manifest.backend).load, directory,
                                          manifest, threads=self.node.config.threads)
        return session, manifest

    async def _load_stage(self, key: str, name: str, first: int, end: int) -> None:
        known = self._manifests.get(name)
        if known is None:
            log.warning("stage %s: placed here, but this node does not have %s", key, name)
            return
        try:
            if known[1].task == "text-generation":
                stage: Any = LlmStageAdapter(await self._llm_stage(name, first, end))
            else:
                session, manifest = await self._cut_session(name, first, end)
                stage = SessionStage(session, [s.name for s in manifest.inputs])
            self.stages.add(key, stage)
            log.info("loaded stage %s", key)
        except Exception as exc:  # e.g. a TFLite model with no stages: the unit stays
            log.warning("cannot load stage %s: %s", key, exc)  # not ready, the node runs

    async def _load_head(self, unit: Unit) -> None:
        known = self._manifests.get(unit.service)
        if known is None:
            log.warning("pipeline head %s: placed here, but this node does not have %s",
                        unit.id, unit.service)
            return
        try:
            if known[1].task == "text-generation":
                service: ModelService | GenerationService = await self._llm_head(unit)
            else:
                service = await self._session_head(unit)
        except Exception as exc:
            log.warning("cannot set up the pipeline head of %s: %s", unit.id, exc)
            return
        service.head_key = reconcile.head_key(unit)
        service.set_max_batch(unit.max_batch)  # the plan's batch for this unit
        self.node.services[unit.service] = service
        self.node.unavailable.pop(unit.service, None)
        log.info("pipeline head %s ready", unit.id)

    def _route(self, unit: Unit) -> list[StageRef]:
        """The stages after the head, where they run now (StageFailed for a node that
        is not in the cluster view)."""
        return [StageRef(s.device, self._endpoint(s.device),
                         stage_key(unit.service, s.first, s.end)) for s in unit.stages[1:]]

    async def _session_head(self, unit: Unit) -> ModelService:
        """A stateless model's pipeline head: the service a replica would be (same API,
        pre/post-processing, batching and admission), its session running stage 0 here
        and the rest of the route on the stages' nodes."""
        _, manifest = self._manifests[unit.service]
        head = unit.stages[0]
        local, stage_manifest = await self._cut_session(unit.service, head.first, head.end)
        session = PipelineSession(
            SessionStage(local, [s.name for s in stage_manifest.inputs]), self.pipeline,
            lambda: self._route(unit), [s.name for s in manifest.outputs],
            asyncio.get_running_loop(), f"pipeline:{unit.id}")
        return ModelService(manifest, session)

    async def _llm_head(self, unit: Unit) -> GenerationService:
        from epara.models.llm import LlmEngine

        directory, manifest = self._manifests[unit.service]
        head = unit.stages[0]
        local = await self._llm_stage(unit.service, head.first, head.end)
        rest = self._route(unit)
        lo, _ = self._positions(unit.service, unit.stages[1].first, unit.stages[1].end)
        _, hi = self._positions(unit.service, unit.stages[-1].first, unit.stages[-1].end)
        # Each pass waits until its sequences' deadlines (the service, made below
        # around the engine, knows them), never past HOP_LIMIT_S.
        services: list[GenerationService] = []

        def hop_timeout(seq_ids: Sequence[str]) -> float:
            return services[0].hop_timeout(seq_ids) if services else HOP_LIMIT_S

        chain = RemoteLlmChain(self.pipeline, rest, range(lo, hi),
                               asyncio.get_running_loop(), hop_timeout)
        engine = await asyncio.to_thread(LlmEngine, directory, manifest,
                                         self.node.config.threads, [local, chain])
        service = GenerationService(manifest, engine, target=f"pipeline:{unit.id}")
        services.append(service)
        return service

    def _data_server_key(self, endpoint: Endpoint) -> bytes | None:
        """Per-device identity: the key to pin when dialling a data endpoint, the one
        the control plane pinned for the node whose state record names that endpoint
        (this node's own for its own endpoint)."""
        if endpoint == self.dataplane.endpoint:
            return self.member.server_key(self.member.node_id)
        for member in self.member.view().members:
            if member.host == endpoint[0] and (member.state or {}).get("data_port") == \
                    endpoint[1]:
                return self.member.server_key(member.node_id)
        return None

    def _endpoint(self, node_id: str) -> Endpoint:
        member = self.member.view().member(node_id)
        if member is None or not (member.state or {}).get("data_port"):
            raise StageFailed(f"node {node_id} is not in the cluster view", node_id)
        return (member.host, int(member.state["data_port"]))

    # --- per request: route, forward, relay ------------------------------------------

    async def should_forward(self, name: str, deadline: float | None) -> str | None:
        """The peer to send a request for ``name`` to, None to serve it here; raises
        ServiceError when the cluster cannot serve it (in time).

        A model placed nowhere yet (a cold cluster) is served from this device's store
        when it fits here; otherwise the request waits, within its deadline, for the
        leader to place it (the demand it adds is what makes the leader do so)."""
        self.demand.hit(name, None if deadline is None
                        else (deadline - time.monotonic()) * 1000)
        end = time.monotonic() + COLD_START_WAIT_S
        if deadline is not None:
            end = min(end, deadline)
        while True:
            try:
                return await self._choose(name, deadline)
            except NotPlaced as exc:
                if time.monotonic() >= end:
                    raise ServiceError("unavailable", str(exc)) from None
                await asyncio.sleep(0.2)

    async def _choose(self, name: str, deadline: float | None) -> str | None:
        try:
            decision = self.router.choose(name, deadline, self.catalogue)
        except ServiceError as exc:
            if exc.code == "unknown_model" and name in self.node.services:
                return None
            raise
        if decision.target is None:
            if name in self.node.services:
                return None
            known = self._manifests.get(name)
            if known is not None and (self.budget_mb is None
                                      or known[1].memory_mb <= self.budget_mb):
                await self._load_replica(name)
                if name in self.node.services:
                    return None
            raise NotPlaced(decision.reason)
        return None if decision.target.local else decision.target.device

    async def wait_for_repair(self, deadline: float | None, longest: float = 5.0) -> None:
        """After a route failed: wait for the next placement (the leader drops units on
        dead devices on the membership change), at most ``longest`` or to the deadline."""
        version = self.placement.version
        end = time.monotonic() + longest
        if deadline is not None:
            end = min(end, deadline)
        while time.monotonic() < end and self.placement.version == version:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)  # let the new units report ready

    async def forward(self, node_id: str, message: dict[str, Any], reply: Reply,
                      deadline: float | None) -> None:
        """Send an API request to a peer and relay its replies (node/forwarder.py)."""
        try:
            await self.forwarder.forward(node_id, message, reply, deadline)
        except StageFailed as exc:  # the peer is not in the view (any more)
            raise ServiceError("unavailable", f"forwarding to {node_id} failed: {exc}") \
                from None

    async def _serve_forwarded(self, message: dict[str, Any], reply: Reply) -> None:
        from epara.node.api import Request

        await self.node.api._handle(Request(message), reply, {})
