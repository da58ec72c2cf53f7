"""A discrete-event simulator of an edge cluster, with a ground truth the planner cannot see.

What runs (the truth):
  * each (device, model) pair runs at the cost model's step time (estimate.stage_cost)
    times its own error factor, lognormal with sigma ``SimConfig.error_sigma``, seeded;
    each request adds its own jitter (lognormal, ``jitter_sigma``);
  * an accelerator runs one step at a time (the stage whose oldest request has the
    earliest deadline goes next); a CPU device runs the steps of every unit it holds at
    once on its cores, so co-located units slow each other in proportion to their load
    (processor sharing);
  * units admit up to ``max_batch`` requests per stage (continuous batching for LLMs:
    sequences join and leave between steps); requests hop between pipeline stages over
    links; devices can die mid-run.

What the simulated leader sees (what a real leader sees): every ``publish_s`` the nodes
publish the run times they measured (per device and model, an EWMA of observed step time
over the cost model's, so contention and the error factor are in it), their queues and
utilisation, and per service the SLO attainment of the requests that finished within
the demand window; the leader reads that record ``lag_s`` later. Its placement policy
(node/leader/policies.py) is called every ``period_s`` on it; the specs it gets carry
the published run times as per-device ``measured_ms``. It never sees the truth.

Routing: each policy names its router (node/leader/baselines.py lists them). Routers see
each unit's requests in flight now (a node's router reads the synced queues) and the
unit's speed as the leader's view estimates it, never the truth.

Simplified (docs/epara-core.md): links have no contention, a dead device is noticed only
after ``detect_s``, removed units release their memory at once.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from epara.node.leader.demand import WINDOW_S, observe
from epara.node.leader.estimate import StageCost, UnitPerf, stage_cost, unit_perf
from epara.node.leader.model import (
    ClusterState,
    DeviceProfile,
    DeviceState,
    Placement,
    ServiceDemand,
    ServicePlan,
    ServiceSpec,
    Unit,
)
from epara.node.leader.partition import link_s
from epara.node.leader.policies import PlacementPolicy, make_policy
from epara.node.leader.routing import Target, route
from epara.node.leader.scheduler import SchedulerConfig, load_time_s
from epara.node.leader.workloads import Request

OUTCOMES = ("good", "late", "refused", "expired", "lost")
# Event kinds, in the order ties at one instant are processed.
_FAIL, _DETECT, _PUBLISH, _DECIDE, _ARRIVE, _ADMIT, _STEP, _HOP = range(8)


@dataclass(frozen=True)
class SimConfig:
    period_s: float = 5.0  # the leader's decision period (every policy)
    warmup_s: float = 10.0  # arrivals before this are served but not measured
    detect_s: float = 1.5  # a dead device drops out of views after this (remove_after)
    fail_at_s: float | None = None  # kill devices at this time
    fail: tuple[str, ...] = ()  # ids of the devices that die
    window_s: float = 2.0  # goodput timeline resolution
    error_sigma: float = 0.3  # per (device, model) run-time error of the cost model
    jitter_sigma: float = 0.1  # per request
    publish_s: float = 1.0  # nodes publish their measurements this often
    lag_s: float = 0.5  # ... and the leader reads them this much later
    measure_alpha: float = 0.2  # EWMA weight of one observed step
    seed: int = 0  # ground truth (error factors, jitter) and random tie-breaks


@dataclass(frozen=True)
class Estimation:
    """How far the planner's run times were from the truth, over the (device, model)
    pairs that ran: |estimate / actual - 1|, median and 90th percentile, for the cost
    model alone (before any measurement) and for the last published measurement.
    ``actual`` is the mean observed step time over the cost model's, contention in."""

    pairs: int
    prior_median: float
    prior_p90: float
    measured_median: float
    measured_p90: float


@dataclass(frozen=True)
class SimResult:
    system: str
    counts: Mapping[str, int]  # outcome -> requests measured (arrived after warm-up)
    total: int  # every request in the trace, measured or not
    accounted: int  # requests that reached an outcome (must equal total)
    goodput_hz: float
    attainment: float
    timeline: tuple[float, ...]  # goodput per window, over the whole run
    schedule_ms: tuple[float, ...]  # wall time of each placement decision
    units: int  # units in the final placement
    estimation: Estimation


def error_factor(seed: int, device: str, service: str, sigma: float) -> float:
    """The truth's multiplier on the cost model for one (device, model) pair: seeded by
    the names, so every system in a comparison meets the same world."""
    digest = hashlib.blake2b(f"{seed}|{device}|{service}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big")).lognormvariate(0.0, sigma)


class _Stage:
    __slots__ = ("cost", "device", "error", "index", "queue", "unit")

    def __init__(self, unit: _Unit, index: int, device: _Device, cost: StageCost,
                 error: float) -> None:
        self.unit, self.index, self.device, self.cost = unit, index, device, cost
        self.error = error
        self.queue: deque[int] = deque()


class _Unit:
    __slots__ = ("broken", "hops", "limit", "live", "perf", "ready_at", "retired", "spec",
                 "stages", "unit", "waiting")

    def __init__(self, unit: Unit, spec: ServiceSpec, sim: _Sim, ready_at: float) -> None:
        self.unit, self.spec, self.ready_at = unit, spec, ready_at
        profiles = sim.profiles
        self.stages = [
            _Stage(self, i, sim.devices[s.device],
                   stage_cost(spec, profiles[s.device], s.first, s.end or None),
                   sim.error(s.device, spec.name))
            for i, s in enumerate(unit.stages)]
        # Transfer after stage i (to i+1, or back to the head for the next LLM token).
        self.hops = []
        for i, s in enumerate(unit.stages):
            nxt = unit.stages[(i + 1) % len(unit.stages)]
            out = spec.layers[s.end - 1].out_mb if spec.layers and s.end else 0.0
            self.hops.append(link_s(profiles[s.device], profiles[nxt.device], out))
        self.limit = max(1, unit.max_batch) * len(unit.stages)
        self.live = 0  # admitted requests not yet finished
        self.waiting: deque[int] = deque()
        self.broken = False
        self.retired = False
        self.perf: UnitPerf | None = None  # the leader's estimate (sim.view_perf)


class _Step:
    __slots__ = ("batch", "nominal_s", "remaining", "stage", "started")

    def __init__(self, stage: _Stage, batch: list[int], work: float, nominal: float,
                 now: float) -> None:
        self.stage, self.batch, self.remaining = stage, batch, work
        self.nominal_s, self.started = nominal, now


class _Device:
    __slots__ = ("alive", "busy_s", "concurrent", "last", "profile", "running", "stages",
                 "starting", "version")

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.alive = True
        # A CPU runtime already spreads one input over every core, so units run side by
        # side and share the cores; an accelerator runs one kernel stream at a time.
        self.concurrent = not profile.accelerator
        self.version = 0  # bumps on every change: older completion events are void
        self.stages: list[_Stage] = []
        self.running: list[_Step] = []
        self.last = 0.0  # when ``remaining`` was last brought up to date
        self.busy_s = 0.0
        self.starting = False


class _Sim:
    def __init__(self, requests: Sequence[Request], services: Mapping[str, ServiceSpec],
                 devices: Sequence[DeviceProfile], config: SimConfig,
                 policy: PlacementPolicy) -> None:
        self.requests = requests
        self.services = services
        self.profiles = {d.id: d for d in devices}
        self.device_ids = [d.id for d in devices]
        self.devices = {d.id: _Device(d) for d in devices}
        self.config = config
        self.policy = policy
        self.rng = random.Random(config.seed * 7919 + 1)
        jitter = random.Random(config.seed * 104729 + 3)
        n = len(requests)
        self.jitter = [jitter.lognormvariate(0.0, config.jitter_sigma)
                       if config.jitter_sigma > 0 else 1.0 for _ in range(n)]
        self.outcome: list[str | None] = [None] * n
        self.passes = [0] * n  # passes done
        self.needed = [1 + r.output_tokens for r in requests]
        self.deadline = [r.t + r.slo_ms / 1000 for r in requests]
        self.unit_of: list[_Unit | None] = [None] * n
        self.units: dict[str, list[_Unit]] = {name: [] for name in services}
        self.events: list[tuple[float, int, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.known_dead: set[str] = set()
        self.errors: dict[tuple[str, str], float] = {}
        # What nodes measure: per (device, service), EWMA of observed / cost-model step
        # time, and the run totals (for the estimation report).
        self.ratio: dict[tuple[str, str], float] = {}
        self.observed: dict[tuple[str, str], list[float]] = {}
        self.finished: dict[str, deque[tuple[float, bool]]] = {n: deque() for n in services}
        self.records: deque[tuple[float, dict[str, Any]]] = deque()
        self.view_specs: Mapping[str, ServiceSpec] = services

    # --- ground truth ---------------------------------------------------------------

    def error(self, device: str, service: str) -> float:
        key = (device, service)
        if key not in self.errors:
            self.errors[key] = error_factor(self.config.seed, device, service,
                                            self.config.error_sigma) \
                if self.config.error_sigma > 0 else 1.0
        return self.errors[key]

    # --- events ---------------------------------------------------------------------

    def push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, kind, payload))

    def end(self, rid: int, outcome: str) -> None:
        if self.outcome[rid] is not None:
            raise AssertionError(f"request {rid} accounted twice")
        self.outcome[rid] = outcome
        self.finished[self.requests[rid].service].append((self.now, outcome == "good"))

    # --- placement ------------------------------------------------------------------

    def install(self, placement: Placement, loading: bool) -> None:
        """Make ``placement`` the serving set: new units load (unless at start), units
        no longer wanted stop taking requests and drain what they hold."""
        wanted = {u.id: u for u in placement.units()}
        for name, units in self.units.items():
            keep = []
            for u in units:
                if u.unit.id in wanted and wanted[u.unit.id].max_batch == u.unit.max_batch:
                    keep.append(u)
                    del wanted[u.unit.id]
                else:
                    self._retire(u)
            self.units[name] = keep
        for unit in wanted.values():
            if unit.service not in self.services or \
                    any(not self.devices[d].alive for d in unit.devices):
                continue
            spec = self.services[unit.service]
            ready = self.now + (load_time_s(unit, SchedulerConfig()) if loading else 0.0)
            u = _Unit(unit, spec, self, ready)
            for st in u.stages:
                st.device.stages.append(st)
            self.units[unit.service].append(u)

    def _drop_stage(self, st: _Stage) -> None:
        if not st.queue and st in st.device.stages and \
                not any(step.stage is st for step in st.device.running):
            st.device.stages.remove(st)

    def _retire(self, u: _Unit) -> None:
        u.retired = True
        for st in u.stages:  # drained stages leave now; the others when they drain
            self._drop_stage(st)
        # Waiting requests have not started: send them on through the router again.
        while u.waiting:
            rid = u.waiting.popleft()
            self.unit_of[rid] = None
            self.push(self.now, _ARRIVE, rid)

    # --- request path -----------------------------------------------------------------

    def arrive(self, rid: int) -> None:
        req = self.requests[rid]
        units = [u for u in self.units.get(req.service, ())
                 if u.ready_at <= self.now and not u.broken and not u.retired
                 and not any(st.device.profile.id in self.known_dead for st in u.stages)]
        target = ROUTERS[self.policy.router](self, rid, units)
        if target is None:
            self.end(rid, "refused")
            return
        self.unit_of[rid] = target
        origin = self.origin(rid)
        head = target.stages[0].device.profile
        delay = 0.0 if origin.id == head.id else \
            link_s(origin, head, req.input_size or target.spec.input_mb)
        self.push(self.now + delay, _ADMIT, rid)

    def origin(self, rid: int) -> DeviceProfile:
        o = self.requests[rid].origin
        return self.profiles[self.device_ids[o % len(self.device_ids)]] if o >= 0 else \
            self.profiles[self.device_ids[rid % len(self.device_ids)]]

    def admit(self, rid: int) -> None:
        u = self.unit_of[rid]
        assert u is not None
        if u.broken or not u.stages[0].device.alive:
            self.end(rid, "lost")
            return
        if u.live < u.limit:
            u.live += 1
            self.enqueue(u.stages[0], rid)
        else:
            u.waiting.append(rid)

    def release(self, u: _Unit) -> None:
        u.live -= 1
        while u.waiting and u.live < u.limit:
            rid = u.waiting.popleft()
            if self.now > self.deadline[rid]:
                self.end(rid, "expired")
                continue
            u.live += 1
            self.enqueue(u.stages[0], rid)

    def enqueue(self, st: _Stage, rid: int) -> None:
        if not st.device.alive or st.unit.broken:
            self.end(rid, "lost")
            return
        if st not in st.device.stages:  # a retired unit still draining its requests
            st.device.stages.append(st)
        st.queue.append(rid)
        if not st.device.starting:
            self.start(st.device)

    # --- devices: processor sharing (CPU) or one step at a time (accelerator) ----------

    def _advance(self, dev: _Device) -> None:
        n = len(dev.running)
        if n:
            elapsed = self.now - dev.last
            dev.busy_s += elapsed
            for step in dev.running:
                step.remaining -= elapsed / n
        dev.last = self.now

    def _reschedule(self, dev: _Device) -> None:
        dev.version += 1
        if dev.running:
            n = len(dev.running)
            soonest = min(step.remaining for step in dev.running)
            self.push(self.now + max(0.0, soonest) * n, _STEP, (dev, dev.version))

    def start(self, dev: _Device) -> None:
        """Start what may start: on an accelerator the next step if idle, on a CPU one
        step for every stage with queued work that is not already running one."""
        if not dev.alive:
            return
        self._advance(dev)
        dev.starting = True
        try:
            while dev.concurrent or not dev.running:
                busy = {id(step.stage) for step in dev.running}
                best = None
                best_deadline = math.inf
                for st in dev.stages:
                    if st.queue and id(st) not in busy and \
                            self.deadline[st.queue[0]] < best_deadline:
                        best, best_deadline = st, self.deadline[st.queue[0]]
                if best is None:
                    break
                batch: list[int] = []
                gflop = 0.0
                spec = best.unit.spec
                while best.queue and len(batch) < best.unit.unit.max_batch:
                    rid = best.queue.popleft()
                    if self.now > self.deadline[rid]:
                        self.end(rid, "expired")  # nobody waits for it: do not run it
                        self.release(best.unit)
                        continue
                    batch.append(rid)
                    gflop += spec.gflop if self.passes[rid] == 0 else spec.gflop_per_token
                if not batch:
                    continue
                nominal = best.cost.time(gflop)
                jitter = sum(self.jitter[r] for r in batch) / len(batch)
                dev.running.append(_Step(best, batch, nominal * best.error * jitter,
                                         nominal, self.now))
        finally:
            dev.starting = False
        self._reschedule(dev)

    def step_done(self, dev: _Device, version: int) -> None:
        if version != dev.version or not dev.alive:
            return
        self._advance(dev)
        done = [s for s in dev.running if s.remaining <= 1e-9]
        dev.running = [s for s in dev.running if s.remaining > 1e-9]
        dev.starting = True
        try:
            for step in done:
                self._finish(step)
        finally:
            dev.starting = False
        self.start(dev)

    def _finish(self, step: _Step) -> None:
        st, batch = step.stage, step.batch
        u = st.unit
        key = (st.device.profile.id, u.spec.name)
        ratio = (self.now - step.started) / step.nominal_s if step.nominal_s > 0 else 1.0
        old = self.ratio.get(key)
        alpha = self.config.measure_alpha
        self.ratio[key] = ratio if old is None else old + alpha * (ratio - old)
        totals = self.observed.setdefault(key, [0.0, 0.0])
        totals[0] += self.now - step.started
        totals[1] += step.nominal_s
        last = st.index == len(u.stages) - 1
        for rid in batch:
            if not last:
                self.push(self.now + u.hops[st.index], _HOP, (u.stages[st.index + 1], rid))
                continue
            self.passes[rid] += 1
            if self.passes[rid] >= self.needed[rid]:
                self.end(rid, "good" if self.now <= self.deadline[rid] else "late")
                self.release(u)
            elif len(u.stages) == 1:
                st.queue.append(rid)  # continuous batching: joins the next step
            else:
                self.push(self.now + u.hops[st.index], _HOP, (u.stages[0], rid))
        if u.retired:
            self._drop_stage(st)

    def fail(self, ids: Sequence[str]) -> None:
        for i in ids:
            dev = self.devices[i]
            dev.alive = False
            dev.version += 1
            for step in dev.running:
                for rid in step.batch:
                    self.end(rid, "lost")
            dev.running = []
            for st in dev.stages:
                st.unit.broken = True
        for units in self.units.values():
            for u in units:
                if u.broken:
                    for st in u.stages:
                        while st.queue:
                            self.end(st.queue.popleft(), "lost")
                    while u.waiting:
                        self.end(u.waiting.popleft(), "lost")

    # --- what the nodes publish and the leader reads ------------------------------------

    def publish(self) -> None:
        """The nodes' record at this instant; the leader reads it ``lag_s`` later."""
        window = WINDOW_S
        attained: dict[str, float] = {}
        for name, done in self.finished.items():
            while done and done[0][0] <= self.now - window:
                done.popleft()
            if done:
                attained[name] = sum(1 for _, good in done if good) / len(done)
        states = {}
        for i, dev in self.devices.items():
            self._advance(dev)
            queues: dict[str, int] = {}
            for st in dev.stages:
                queues[st.unit.spec.name] = queues.get(st.unit.spec.name, 0) + len(st.queue)
            load = min(1.0, dev.busy_s / self.config.publish_s)
            dev.busy_s = 0.0
            states[i] = DeviceState(dev.profile, alive=dev.alive, load=load, queues=queues)
        self.records.append((self.now + self.config.lag_s, {
            "states": states, "attained": attained, "ratio": dict(self.ratio)}))

    def record(self) -> dict[str, Any] | None:
        """The latest record the leader has received by now."""
        while len(self.records) > 1 and self.records[1][0] <= self.now:
            self.records.popleft()
        if self.records and self.records[0][0] <= self.now:
            return self.records[0][1]
        return None

    def view(self, record: dict[str, Any] | None) -> tuple[ClusterState, Mapping[str, ServiceSpec]]:
        """Cluster state and specs as the leader knows them from ``record``: the
        published run times become per-device measurements."""
        if record is None:
            states = {i: DeviceState(d.profile) for i, d in self.devices.items()}
            return ClusterState(states, self.now), self.services
        states = {i: replace(s, alive=i not in self.known_dead)
                  for i, s in record["states"].items()}
        measured: dict[str, dict[str, float]] = {}
        for (device, service), ratio in record["ratio"].items():
            spec = self.services[service]
            nominal = stage_cost(spec, self.profiles[device]).time(spec.gflop)
            measured.setdefault(service, dict(spec.measured_ms))[f"@{device}"] = \
                ratio * nominal * 1000
        specs = {n: replace(s, measured_ms=measured[n]) if n in measured else s
                 for n, s in self.services.items()}
        return ClusterState(states, self.now), specs

    def view_perf(self, u: _Unit) -> UnitPerf:
        if u.perf is None:
            u.perf = unit_perf(self.view_specs[u.spec.name], u.unit, self.profiles)
        return u.perf

    def current_placement(self, version: int) -> Placement:
        plans = {}
        for name, units in self.units.items():
            live = tuple(u.unit for u in units if not u.broken)
            if live:
                plans[name] = ServicePlan(name, "", "replicas", live, "")
        return Placement(version, plans)

    def estimation(self) -> Estimation:
        prior, measured = [], []
        for key, (actual_s, nominal_s) in self.observed.items():
            if nominal_s <= 0 or actual_s <= 0:
                continue
            actual = actual_s / nominal_s
            prior.append(abs(1.0 / actual - 1))
            measured.append(abs(self.ratio.get(key, 1.0) / actual - 1))
        return Estimation(len(prior), _quantile(prior, 0.5), _quantile(prior, 0.9),
                          _quantile(measured, 0.5), _quantile(measured, 0.9))


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- routers ----------------------------------------------------------------------------

def _outstanding(u: _Unit) -> int:
    return u.live + len(u.waiting)


def _expected(sim: _Sim, rid: int, u: _Unit) -> Target:
    req = sim.requests[rid]
    origin = sim.origin(rid)
    head = u.stages[0].device
    link = 0.0 if origin.id == head.profile.id else \
        link_s(origin, head.profile, req.input_size or u.spec.input_mb) + \
        link_s(head.profile, origin, 0.0)
    perf = sim.view_perf(u)
    tokens = req.output_tokens if u.spec.is_llm else 0.0
    service = perf.first_pass_s + tokens * perf.pass_s
    backlog = max(0, _outstanding(u) + 1 - u.limit)
    wait = backlog / perf.capacity_hz
    return Target(u.unit.id, head.profile.id, link == 0.0, link, wait, service)


def epara_router(sim: _Sim, rid: int, units: list[_Unit]) -> _Unit | None:
    """Least expected completion; refuses what cannot meet its deadline."""
    req = sim.requests[rid]
    by_id = {u.unit.id: u for u in units}
    decision = route(req.service, [_expected(sim, rid, u) for u in units],
                     sim.deadline[rid] - sim.now)
    return None if decision.target is None else by_id[decision.target.unit]


def least_connections_router(sim: _Sim, rid: int, units: list[_Unit]) -> _Unit | None:
    """Fewest requests in flight; ties at random (not by id: an idle Pi must not win
    over an idle T4 because of its name)."""
    if not units:
        return None
    fewest = min(_outstanding(u) for u in units)
    return sim.rng.choice([u for u in units if _outstanding(u) == fewest])


def least_outstanding_router(sim: _Sim, rid: int, units: list[_Unit]) -> _Unit | None:
    """Power of two random choices, the one with fewer outstanding (Ray Serve)."""
    if len(units) <= 1:
        return units[0] if units else None
    a, b = sim.rng.sample(units, 2)
    if _outstanding(a) == _outstanding(b):
        return a
    return a if _outstanding(a) < _outstanding(b) else b


def fastest_chain_router(sim: _Sim, rid: int, units: list[_Unit]) -> _Unit | None:
    """The chain with the least expected time from published speeds and the requests
    it already holds; never refuses (Petals' client)."""
    if not units:
        return None
    return min(units, key=lambda u: (_expected(sim, rid, u).expected_s, sim.rng.random()))


ROUTERS = {"epara": epara_router, "least-connections": least_connections_router,
           "least-outstanding": least_outstanding_router,
           "fastest-chain": fastest_chain_router}


# --- the run --------------------------------------------------------------------------------

def simulate(system: str | PlacementPolicy, requests: Sequence[Request],
             services: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile],
             config: SimConfig | None = None,
             scheduler: SchedulerConfig | None = None) -> SimResult:
    """Run ``requests`` through a placement policy (a name from policies.POLICIES or a
    policy object); deterministic for a given ``config.seed``."""
    config = config or SimConfig()
    policy = make_policy(system, scheduler) if isinstance(system, str) else system
    unknown = sorted({r.service for r in requests} - set(services))
    if unknown:
        raise ValueError(f"trace names unknown service(s) {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}; known: the catalogue's "
                         f"{len(services)} services")
    sim = _Sim(requests, services, devices, config, policy)
    duration = max((r.t for r in requests), default=0.0)
    for rid in range(len(requests)):
        sim.push(requests[rid].t, _ARRIVE, rid)
    if config.fail_at_s is not None and config.fail:
        sim.push(config.fail_at_s, _FAIL, None)
        sim.push(config.fail_at_s + config.detect_s, _DETECT, None)
    placement = Placement()
    decisions_ms: list[float] = []
    # Demand as the leader sees it: arrivals per service over the last window.
    seen: dict[str, list[float]] = {n: [] for n in services}
    tokens: dict[str, list[int]] = {n: [] for n in services}
    counted = bytearray(len(requests))
    sim.push(0.0, _DECIDE, None)
    sim.push(config.publish_s, _PUBLISH, None)
    while sim.events:
        t, kind, _, _, payload = heapq.heappop(sim.events)
        sim.now = t
        if kind == _ARRIVE:
            req = requests[payload]
            if not counted[payload]:  # a first arrival, not a reroute
                counted[payload] = 1
                seen[req.service].append(t)
                if req.output_tokens:
                    tokens[req.service].append(req.output_tokens)
            sim.arrive(payload)
        elif kind == _ADMIT:
            sim.admit(payload)
        elif kind == _STEP:
            sim.step_done(*payload)
        elif kind == _HOP:
            st, rid = payload
            sim.enqueue(st, rid)
        elif kind == _FAIL:
            sim.fail(config.fail)
        elif kind == _DETECT:
            sim.known_dead.update(config.fail)
        elif kind == _PUBLISH:
            sim.publish()
            if t + config.publish_s <= duration:
                sim.push(t + config.publish_s, _PUBLISH, None)
        elif kind == _DECIDE:
            record = sim.record()
            demand = _demand(seen, tokens, t, WINDOW_S)
            if record is not None:
                demand = {n: replace(d, attained=record["attained"].get(n))
                          for n, d in demand.items()}
            state, specs = sim.view(record)
            sim.view_specs = specs
            for units in sim.units.values():
                for u in units:
                    u.perf = None
            started = time.perf_counter()
            placement, _ = policy.place(sim.current_placement(placement.version), state,
                                        demand, specs, t)
            decisions_ms.append((time.perf_counter() - started) * 1000)
            # During the warm-up the cluster is taken to have run this traffic before:
            # what it places then is loaded already. Afterwards a new unit serves only
            # once its weights are read.
            sim.install(placement, loading=t > 0 and t >= config.warmup_s)
            if t + config.period_s <= duration:
                sim.push(t + config.period_s, _DECIDE, None)
    return _result(policy.name, sim, requests, config, duration, decisions_ms,
                   sum(len(u) for u in sim.units.values()))


def demand_of(requests: Sequence[Request], start: float, end: float
              ) -> dict[str, ServiceDemand]:
    """Observed demand over [start, end) of a trace, as the leader would measure it."""
    seen: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for r in requests:
        if start <= r.t < end:
            seen.setdefault(r.service, []).append(r.t)
            tokens.setdefault(r.service, [])
            if r.output_tokens:
                tokens[r.service].append(r.output_tokens)
    return _demand(seen, tokens, end, end - start)


def _demand(seen: dict[str, list[float]], tokens: dict[str, list[int]], now: float,
            window_s: float) -> dict[str, ServiceDemand]:
    """What the leader would observe: ``observe`` over each service's recent arrivals
    (older ones are dropped from ``seen`` as they leave the window)."""
    out = {}
    for name, times in seen.items():
        seen[name] = [t for t in times if t > now - window_s]
        observed = observe(seen[name], now, window_s, tokens[name])
        tokens[name] = tokens[name][-200:]
        if observed is not None:
            out[name] = observed
    return out


def _result(system: str, sim: _Sim, requests: Sequence[Request], config: SimConfig,
            duration: float, decisions_ms: list[float], units: int) -> SimResult:
    counts = dict.fromkeys(OUTCOMES, 0)
    accounted = 0
    windows = [0.0] * (int(duration / config.window_s) + 1)
    for rid, r in enumerate(requests):
        outcome = sim.outcome[rid]
        if outcome is None:
            continue
        accounted += 1
        if r.t >= config.warmup_s:
            counts[outcome] += 1
        if outcome == "good":
            windows[min(len(windows) - 1, int(r.t / config.window_s))] += 1
    measured = sum(counts.values())
    span = max(1e-9, duration - config.warmup_s)
    attained = counts["good"] / measured if measured else 0.0
    return SimResult(system, counts, len(requests), accounted, counts["good"] / span,
                     attained,
                     tuple(w / config.window_s for w in windows), tuple(decisions_ms),
                     units, sim.estimation())
