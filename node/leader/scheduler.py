"""The state-aware scheduler: a greedy marginal-gain search for a better placement (pure).

``schedule(current, state, demand, services, now)`` starts from the current placement,
drops what sits on dead devices, then repeatedly adds the candidate with the largest
estimated goodput gain (requests meeting their SLO per second): a replica of a service on
a device, or a pipeline plan over a device set. Gains count the effect on every service
sharing the chosen device, and a new unit's gain is charged its model-load time over the
planning horizon, so nothing moves unless it pays for its move. Lazy greedy: candidates
sit in a heap keyed by their last known gain (an upper bound when gains diminish, as
they do for replicas of one service) and are re-evaluated only when they reach the top.

Devices with equal profiles are interchangeable, so candidates are (service, profile
group) pairs and the group picks its least-loaded device that fits: 200 services over
1,000 devices of a few kinds make about a thousand candidates, not two hundred thousand.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from epara.node.leader.allocate import (
    Allocation,
    Category,
    allocate,
    categorise,
    choose_batch,
    uniform_allocation,
)
from epara.node.leader.estimate import UnitPerf, admitted_load, unit_goodput, unit_perf
from epara.node.leader.model import (
    ClusterState,
    Demand,
    DeviceProfile,
    Placement,
    ServiceDemand,
    ServicePlan,
    ServiceSpec,
    Stage,
    Unit,
)
from epara.node.leader.partition import Partition, partition

NO_DEMAND = ServiceDemand(0.0)


@dataclass(frozen=True)
class SchedulerConfig:
    horizon_s: float = 60.0  # a move must pay for its load time within this
    load_mb_per_s: float = 200.0  # reading weights from local storage into memory
    load_fixed_s: float = 0.5  # runtime start, session creation
    min_gain_hz: float = 0.01  # below this a change is noise, not worth a version
    # A replica removed to relieve a shared device must gain at least this share of the
    # demand of the services it touches: estimates move a little with every measurement,
    # and a removal on a hair's gain is added back by the next decision (churn, each
    # time paying a load and the requests caught in it).
    remove_min_share: float = 0.05
    categorise: bool = True  # False: one mode for every service (the ablation)
    max_units_per_service: int = 256
    pipeline_pool: int = 8  # devices offered to the partitioner per candidate
    max_stages: int = 4
    max_cuts: int = 16  # cut points the partitioner considers (evenly spaced)
    standby: bool = True  # keep one replica of an idle service where memory is free
    sweeps: int = 3  # greedy passes at most per decision
    headroom: int = 4  # spare-memory replicas added at most per service and decision
    headroom_factor: float = 4.0  # ... while its units offer less than this x its bursts
    headroom_min_units: int = 2  # ... or it has fewer units than this
    # Give a demanded service left without a unit its quickest one anyway, so it runs and
    # is measured: for a leader whose estimates start uncalibrated (a real cluster's
    # roofline can be 10x off for an LLM on a CPU); off where the cost model is the
    # truth, since there a unit the estimates reject only takes memory.
    place_to_measure: bool = False
    # A device measured busier than the estimates explain (by more than this share) has
    # the rest taken as background load: work nobody planned (relays, the API itself,
    # other applications on its cores), at most ``max_background`` of it.
    background_dead_band: float = 0.1
    max_background: float = 0.9


@dataclass(frozen=True)
class Decision:
    action: str  # "add" | "remove" | "drop" | "standby"
    unit: str
    gain_hz: float  # estimated goodput change (requests meeting SLO per second)
    reason: str


@dataclass
class _Live:
    """A unit in the placement being built, with its estimates."""

    unit: Unit
    perf: UnitPerf
    slack_s: float  # deadline minus a lone request's time: what queueing may take
    use: dict[str, float]  # device -> busy seconds per request
    steps: dict[str, float]  # device -> its longest step there
    rate_hz: float = 0.0  # share of its service's demand routed here


@dataclass
class _Service:
    spec: ServiceSpec
    demand: ServiceDemand
    category: Category
    allocation: Allocation
    units: list[_Live] = field(default_factory=list)
    contrib: dict[str, float] = field(default_factory=dict)  # device -> utilisation
    goodput: float = 0.0


def load_time_s(unit: Unit, config: SchedulerConfig) -> float:
    """A new unit serves only after every stage has read its weights (in parallel)."""
    return config.load_fixed_s + max(s.memory_mb for s in unit.stages) / config.load_mb_per_s


class _Planner:
    """The working state of one ``schedule`` call (never escapes it)."""

    def __init__(self, state: ClusterState, demand: Demand,
                 services: Mapping[str, ServiceSpec], config: SchedulerConfig,
                 background: Mapping[str, float] | None = None) -> None:
        self.config = config
        self.devices: dict[str, DeviceProfile] = {p.id: p for p in state.alive()}
        self.background = {d: (background or {}).get(d, 0.0) for d in self.devices}
        self.groups: dict[tuple[Any, ...], list[str]] = {}
        for d in self.devices.values():
            self.groups.setdefault(d.profile_key(), []).append(d.id)
        self.reps = [self.devices[ids[0]] for ids in self.groups.values()]
        self.free = {d.id: d.mem_mb for d in self.devices.values()}
        self.util = dict(self.background)
        self.hosted: dict[str, set[str]] = {d: set() for d in self.devices}
        # device -> service -> the longest step that service's units run there
        self.steps: dict[str, dict[str, float]] = {d: {} for d in self.devices}
        # device -> its two longest steps of different services, (step, service):
        # the longest one another service waits for is one of these
        self.top_steps: dict[str, list[tuple[float, str]]] = {d: [] for d in self.devices}
        self.version = dict.fromkeys(self.devices, 0)
        self.heaps: dict[tuple[Any, ...], list[tuple[float, float, str, int]]] = {}
        self.perf_cache: dict[tuple[Any, ...], UnitPerf] = {}
        self.batch_cache: dict[tuple[Any, ...], int] = {}
        self.pipeline_cache: dict[tuple[Any, ...], Partition | None] = {}
        self.services: dict[str, _Service] = {}
        for name in sorted(services):
            spec = services[name]
            d = demand.get(name, NO_DEMAND)
            if d.mean_output_tokens is not None and spec.is_llm:
                spec = _with_tokens(spec, d.mean_output_tokens)
            category = categorise(spec, self.reps, d)
            allocation = allocate(spec, category, self.reps) if config.categorise \
                else uniform_allocation(spec)
            self.services[name] = _Service(spec, d, category, allocation)
        for key, ids in self.groups.items():
            self.heaps[key] = [self._entry(i) for i in sorted(ids)]
            heapq.heapify(self.heaps[key])

    # --- estimates ---------------------------------------------------------------

    def perf(self, spec: ServiceSpec, unit: Unit) -> UnitPerf:
        key = (spec.name, spec.mean_output_tokens, spec.time_scale, unit.max_batch,
               tuple((self.devices[s.device].profile_key(), s.first, s.end,
                      s.device if f"@{s.device}" in spec.measured_ms
                      or f"@{s.device}" in spec.work_ms else None)
                     for s in unit.stages))
        perf = self.perf_cache.get(key)
        if perf is None:
            perf = unit_perf(spec, unit, self.devices)
            self.perf_cache[key] = perf
        return perf

    def live(self, svc: _Service, unit: Unit) -> _Live:
        perf = self.perf(svc.spec, unit)
        slack = self._slack(svc.spec, unit, perf)
        return _Live(unit, perf, slack, perf.use(unit), perf.steps(unit))

    def _slack(self, spec: ServiceSpec, unit: Unit, perf: UnitPerf) -> float:
        head = self.devices[unit.head]
        network = 2 * head.transfer_s(spec.input_mb)  # request in, answer out
        return spec.deadline_ms() / 1000 - perf.latency_s - network

    def alone_slack(self, svc: _Service, unit: Unit) -> float:
        """Slack of a lone request by the measured times, without the leader's
        correction: that corrects for the load the estimates miss (policies.py), and a
        unit is not too slow for its SLO because its service is overloaded."""
        spec = replace(svc.spec, time_scale=1.0)
        return self._slack(spec, unit, self.perf(spec, unit))

    def blocking(self, svc: _Service, unit: _Live) -> float:
        """How long a request of ``svc`` may wait for another service's step to end on
        one of ``unit``'s devices (steps are not preempted)."""
        return max((self.device_blocking(svc.spec.name, d) for d in unit.use), default=0.0)

    def device_blocking(self, service: str, device: str) -> float:
        """The longest step another service runs on ``device``."""
        for step, owner in self.top_steps[device]:
            if owner != service:
                return step
        return 0.0

    def set_step(self, device: str, service: str, step: float | None) -> None:
        """Record (None: forget) the longest step ``service`` runs on ``device``."""
        steps = self.steps[device]
        if step is None:
            steps.pop(service, None)
        else:
            steps[service] = step
        self.top_steps[device] = sorted(((v, k) for k, v in steps.items()),
                                        reverse=True)[:2]

    def evaluate(self, svc: _Service, units: list[_Live],
                 shift: Mapping[str, float] | None = None
                 ) -> tuple[float, dict[str, float], list[float]]:
        """Goodput of ``svc`` over ``units``: returns (goodput, its utilisation per
        device, rate per unit). Demand splits over units that can meet the deadline in
        proportion to capacity, as least-expected-completion routing tends to."""
        slack = [u.slack_s - self.blocking(svc, u) for u in units]
        feasible = [u.perf.capacity_hz if z > 0 else 0.0 for u, z in zip(units, slack,
                                                                           strict=True)]
        total = sum(feasible)
        # Sized for the bursts (load_hz), valued at the mean: what fails in a burst
        # fails for the share of requests that arrive in bursts.
        load = svc.demand.load_hz
        rates = [load * c / total if total else 0.0 for c in feasible]
        contrib: dict[str, float] = {}
        # Early refusal caps what a unit takes on: beyond that, requests are turned away
        # instead of loading the device for its neighbours.
        admitted = [min(r, admitted_load(z, 1.0 / u.perf.capacity_hz, svc.demand.cv)
                        * u.perf.capacity_hz) if r > 0 else 0.0
                    for u, r, z in zip(units, rates, slack, strict=True)]
        for u, a in zip(units, admitted, strict=True):
            for d, busy in u.use.items():
                contrib[d] = contrib.get(d, 0.0) + a * busy
        goodput = 0.0
        for u, r, z in zip(units, admitted, slack, strict=True):
            if r <= 0:
                continue
            rho = max(self.util[d] - svc.contrib.get(d, 0.0) + (shift or {}).get(d, 0.0)
                      + contrib[d] for d in u.use)
            goodput += unit_goodput(r, rho, z, 1.0 / u.perf.capacity_hz, svc.demand.cv)
        if load > 0:
            goodput *= svc.demand.rate_hz / load
        return goodput, contrib, rates

    def gain(self, svc: _Service, candidate: _Live) -> float:
        """Total goodput change if ``candidate`` joins ``svc``, neighbours included."""
        new, contrib, _ = self.evaluate(svc, [*svc.units, candidate])
        gain = new - svc.goodput
        shift = {d: contrib.get(d, 0.0) - svc.contrib.get(d, 0.0)
                 for d in candidate.unit.devices}
        # Its steps also block the neighbours while they run.
        saved = {d: self.steps[d].get(svc.spec.name) for d in candidate.steps}
        for d, step in candidate.steps.items():
            self.set_step(d, svc.spec.name, max(step, saved[d] or 0.0))
        try:
            for name in sorted({n for d in candidate.unit.devices for n in self.hosted[d]}):
                if name != svc.spec.name:
                    other = self.services[name]
                    gain += self.evaluate(other, other.units, shift)[0] - other.goodput
        finally:
            for d, step in saved.items():
                self.set_step(d, svc.spec.name, step)
        return gain

    # --- device choice -------------------------------------------------------------

    def thrift(self, key: tuple[Any, ...] | None) -> float:
        """Ordering weight: equal gains go to slower devices first (at most 2% apart),
        keeping fast devices for the services only they can serve."""
        if key is None:
            return 1.0
        fastest = max(r.gflops for r in self.reps)
        return 1.0 - 0.02 * self.devices[self.groups[key][0]].gflops / fastest

    def _entry(self, device: str) -> tuple[float, float, str, int]:
        return (round(self.util[device], 2), -self.free[device], device,
                self.version[device])

    def _touch(self, device: str) -> None:
        self.version[device] += 1
        heapq.heappush(self.heaps[self.devices[device].profile_key()], self._entry(device))

    def pick(self, key: tuple[Any, ...], memory_mb: float, count: int = 1,
             exclude: frozenset[str] = frozenset()) -> list[str]:
        """Up to ``count`` least-loaded devices of a group with ``memory_mb`` free."""
        heap = self.heaps[key]
        found: list[str] = []
        aside = []
        while heap and len(found) < count:
            entry = heapq.heappop(heap)
            _, _, device, version = entry
            if version != self.version[device]:
                continue  # superseded by a newer entry for the same device
            aside.append(entry)
            if self.free[device] >= memory_mb and device not in exclude:
                found.append(device)
        for entry in aside:
            heapq.heappush(heap, entry)
        return found

    # --- changes -------------------------------------------------------------------

    def commit(self, svc: _Service, units: list[_Live]) -> None:
        """Make ``units`` the service's units and refresh every estimate they touch."""
        old_devices = set(svc.contrib)
        for u in svc.units:
            for s in u.unit.stages:
                self.free[s.device] += s.memory_mb
                self.hosted[s.device].discard(svc.spec.name)
        for u in units:
            for s in u.unit.stages:
                self.free[s.device] -= s.memory_mb
                self.hosted[s.device].add(svc.spec.name)
        for d in {d for u in svc.units for d in u.steps}:
            self.set_step(d, svc.spec.name, None)
        for u in units:
            for d, step in u.steps.items():
                self.set_step(d, svc.spec.name,
                              max(step, self.steps[d].get(svc.spec.name, 0.0)))
        goodput, contrib, rates = self.evaluate(svc, units)
        for d in old_devices | set(contrib):
            self.util[d] += contrib.get(d, 0.0) - svc.contrib.get(d, 0.0)
        svc.units, svc.contrib, svc.goodput = units, contrib, goodput
        for u, r in zip(units, rates, strict=True):
            u.rate_hz = r
        touched = old_devices | set(contrib) | {s.device for u in units for s in u.unit.stages}
        for name in sorted({n for d in touched for n in self.hosted[d]} - {svc.spec.name}):
            other = self.services[name]
            other.goodput = self.evaluate(other, other.units)[0]
        for d in sorted(touched):
            self._touch(d)

    def batched(self, svc: _Service, stages: tuple[Stage, ...]) -> Unit:
        """A unit over ``stages`` with the batch its allocation's rule picks there (the
        same for every device set of the same profiles)."""
        key = (svc.spec.name, svc.spec.mean_output_tokens,
               tuple((self.devices[s.device].profile_key(), s.first, s.end,
                      s.device if f"@{s.device}" in svc.spec.measured_ms else None)
                     for s in stages))
        batch = self.batch_cache.get(key)
        if batch is None:
            batch = choose_batch(svc.spec, svc.allocation, lambda b: self.perf(
                svc.spec, Unit(svc.spec.name, stages, b)))
            self.batch_cache[key] = batch
        return Unit(svc.spec.name, stages, batch)

    def replica(self, svc: _Service, key: tuple[Any, ...]) -> _Live | None:
        # One replica of a service per device: a second would share the first's
        # device time, and nodes load each model once (a unit is service@device).
        hosting = frozenset(d for u in svc.units for d in u.unit.devices)
        devices = self.pick(key, svc.spec.memory_mb, count=3, exclude=hosting)
        if not devices:
            return None
        # Of the least-loaded few, the one whose other services' steps block it least.
        device = min(devices, key=lambda d: self.device_blocking(svc.spec.name, d))
        return self.live(svc, self.batched(svc, (Stage(
            device, 0, len(svc.spec.layers), svc.spec.memory_mb),)))

    def pipeline(self, svc: _Service) -> tuple[_Live, str] | None:
        """A pipeline over a pool of the fastest lightly loaded devices with room."""
        objective = svc.allocation.objective or "latency"
        smallest = min(svc.spec.stage_memory_mb(i, i + 1) for i in range(len(svc.spec.layers)))
        pool: list[DeviceProfile] = []
        per_group = max(1, self.config.pipeline_pool // 2)
        for rep in sorted(self.reps, key=lambda r: (-r.gflops, r.id)):
            room = self.config.pipeline_pool - len(pool)
            if room <= 0:
                break
            # The roomiest devices: stages are big, and devices with all their memory
            # free look alike to the partitioner (one group), which keeps it fast.
            ids = sorted((i for i in self.groups[rep.profile_key()]
                          if self.free[i] >= smallest),
                         key=lambda i: (-self.free[i], round(self.util[i], 2), i))
            pool += [self.devices[i] for i in ids[:min(room, per_group)]]
        # The same model over the same pool with the same free memory gives the same
        # plan (the partitioner reads neither the name nor the answer length):
        # fine-tunes of one base model share it, and later sweeps often offer exactly
        # the pool an earlier one did.
        key = (repr(replace(svc.spec, name="", mean_output_tokens=0.0)), objective,
               svc.allocation.max_batch,
               tuple((d.id, self.free[d.id]) for d in pool))
        if key in self.pipeline_cache:
            plan = self.pipeline_cache[key]
        else:
            plan = partition(svc.spec, pool, self.free, objective, svc.allocation.max_batch,
                             self.config.max_stages, self.config.max_cuts, memory_steps=64)
            self.pipeline_cache[key] = plan
        if plan is None:
            return None
        return self.live(svc, self.batched(svc, plan.stages)), plan.reason

    def candidate(self, svc: _Service, key: tuple[Any, ...] | None
                  ) -> tuple[_Live, str] | None:
        if key is None:
            return self.pipeline(svc)
        live = self.replica(svc, key)
        return None if live is None else (live, "")


def _with_tokens(spec: ServiceSpec, tokens: float) -> ServiceSpec:
    return replace(spec, mean_output_tokens=tokens)


def schedule(current: Placement, state: ClusterState, demand: Demand,
             services: Mapping[str, ServiceSpec], now: float,
             config: SchedulerConfig | None = None
             ) -> tuple[Placement, tuple[Decision, ...]]:
    """The next desired placement and the decisions that lead from ``current`` to it."""
    config = config or SchedulerConfig()
    p = _Planner(state, demand, services, config,
                 background_load(current, state, demand, services, config))
    decisions: list[Decision] = []
    # Keep what still stands; what touched a lost device (or a retired service) goes.
    # A standby (a unit of a service with no demand) is set aside, not kept: it must not
    # hold memory that a demanded service could use; it returns to its place at the end
    # if that place is still free.
    idle: dict[str, Unit] = {}
    for unit in current.units():
        svc = p.services.get(unit.service)
        lost = [d for d in unit.devices if d not in p.devices]
        if svc is None or lost:
            why = f"device {', '.join(lost)} is gone" if lost else "service retired"
            decisions.append(Decision("drop", unit.id, 0.0, why))
            continue
        if svc.demand.rate_hz <= 0:
            idle.setdefault(svc.spec.name, unit)
            continue
        p.commit(svc, [*svc.units, p.live(svc, unit)])
    # Units that cannot meet their SLO only take memory and routing attempts. But a
    # service keeps its fastest unit when every unit looks doomed: the estimate may
    # rest on run times measured under a passing overload, and with nothing loaded no
    # node would measure it again (routing still refuses what cannot make it).
    for svc in p.services.values():
        doomed = [u for u in svc.units if p.alone_slack(svc, u.unit) <= 0]
        if doomed and len(doomed) == len(svc.units):
            doomed.remove(min(doomed, key=lambda u: (u.perf.latency_s, u.unit.id)))
        if doomed:
            for u in doomed:
                alone = svc.spec.deadline_ms() / 1000 - p.alone_slack(svc, u.unit)
                decisions.append(Decision("remove", u.unit.id, 0.0,
                                          f"cannot meet the {svc.spec.deadline_ms():.0f} ms "
                                          f"SLO (alone it takes {alone * 1000:.0f} ms)"))
            p.commit(svc, [u for u in svc.units if u not in doomed])
    # Lazy greedy sweeps until one adds nothing: interactions between services on shared
    # devices make gains not strictly diminishing, so one sweep can leave a gain behind.
    for _ in range(config.sweeps):
        if not _sweep(p, config, decisions):
            break
    if config.place_to_measure:
        _first_units(p, decisions)
    if config.headroom:
        _headroom(p, config, decisions)
    # After the headroom: a spare replica that later additions made a burden goes now,
    # not in the next decision (which would then add it back: churn).
    _prune(p, config, decisions)
    if config.standby:
        _standby(p, idle, decisions)
    for name, unit in sorted(idle.items()):
        if not p.services[name].units:
            decisions.append(Decision("remove", unit.id, 0.0,
                                      "no recent demand and its memory went to demand"))
    # A unit added and removed within this decision never existed for anyone else.
    added = {d.unit for d in decisions if d.action in ("add", "standby")}
    undone = added & {d.unit for d in decisions if d.action == "remove"}
    net = [d for d in decisions if d.unit not in undone or d.action == "drop"]
    return _placement(current, p), tuple(net)


def background_load(current: Placement, state: ClusterState, demand: Demand,
                    services: Mapping[str, ServiceSpec],
                    config: SchedulerConfig) -> dict[str, float]:
    """Per device, the busy share it measured beyond what the estimates explain for the
    placement in force (pure): what ``_Planner`` starts each device's utilisation at.

    Estimated against the estimates alone, never against themselves plus a background
    found before, so a correction cannot feed itself; beyond a dead band (noise), and
    capped (a device is never given up as full of work nobody can see)."""
    measured = {d: s.busy for d, s in state.devices.items() if s.alive and s.busy is not None}
    if not measured:
        return {}
    p = _Planner(state, demand, services, config)
    for unit in current.units():
        svc = p.services.get(unit.service)
        if svc is None or any(d not in p.devices for d in unit.devices) \
                or svc.demand.rate_hz <= 0:
            continue
        p.commit(svc, [*svc.units, p.live(svc, unit)])
    out = {}
    for device, busy in measured.items():
        excess = busy - p.util.get(device, 0.0)
        if excess > config.background_dead_band:
            out[device] = min(config.max_background, excess)
    return out


def _first_units(p: _Planner, decisions: list[Decision]) -> None:
    """A demanded service the sweeps left without a unit (no candidate's estimated gain
    cleared the bar) gets the quickest one that fits and meets its deadline alone: its
    requests would otherwise be
    refused, or served by a node's cold-start load that the next reconcile unloads, and
    with nothing running no node would measure it and correct the estimate."""
    for svc in p.services.values():
        if svc.units or svc.demand.rate_hz <= 0:
            continue
        keys: list[tuple[Any, ...] | None] = [r.profile_key() for r in p.reps
                                              if r.mem_mb >= svc.spec.memory_mb]
        if svc.allocation.mode.startswith("pipeline"):
            keys.append(None)
        # Only where it can meet the deadline alone: one that cannot would hold memory
        # for nothing (the estimate may be wrong, but then so may any other).
        found = [f[0] for key in keys
                 if (f := p.candidate(svc, key)) is not None and f[0].slack_s > 0]
        if not found:
            continue
        best = min(found, key=lambda u: (u.perf.latency_s, u.unit.id))
        p.commit(svc, [best])
        decisions.append(Decision("add", best.unit.id, 0.0,
                                  "its first unit: nothing else would serve (or measure) "
                                  "it"))


def _standby(p: _Planner, idle: Mapping[str, Unit], decisions: list[Decision]) -> None:
    """One replica of each idle service where memory is left: in its previous place when
    that still has room (no reload), else where its first requests will be served well
    (``cold_start_choice``)."""
    for svc in p.services.values():
        if svc.units or svc.demand.rate_hz > 0:
            continue
        before = idle.get(svc.spec.name)
        if before is not None and all(
                p.free[s.device] >= s.memory_mb for s in before.stages):
            # Any mode: a unit that stays costs no reload, and a service whose demand
            # blinks (an LLM's few requests) would otherwise be loaded and unloaded.
            p.commit(svc, [p.live(svc, before)])
            continue
        if svc.allocation.mode.startswith("pipeline"):
            continue
        found = [f[0] for rep in p.reps
                 if (f := p.candidate(svc, rep.profile_key())) is not None]
        chosen = cold_start_choice(svc.spec, [(f, f.perf) for f in found])
        if chosen is not None:
            p.commit(svc, [chosen])
            decisions.append(Decision("standby", chosen.unit.id, 0.0,
                                      "no recent demand: one replica kept ready"))


def cold_start_choice(spec: ServiceSpec, options: list[tuple[Any, UnitPerf]]) -> Any | None:
    """Where a service with no demand yet waits for its first requests (pure).

    A latency-sensitive service goes to the option that answers one request soonest; a
    stream to an option whose capacity sustains its target rate (the quickest of those),
    else the one with the most capacity. Options that cannot meet the deadline alone are
    left out. Never "the slowest that fits" by default: the first seconds of a stream
    or a user's first request are served by this choice."""
    deadline_s = spec.deadline_ms() / 1000
    fit = [(o, perf) for o, perf in options if perf.latency_s < deadline_s]
    if not fit:
        return None
    if spec.category == "frequency" and spec.target_rate_hz:
        rate = spec.target_rate_hz
        sustains = [(o, perf) for o, perf in fit if perf.capacity_hz >= rate]
        if not sustains:
            return max(fit, key=lambda x: x[1].capacity_hz)[0]
        fit = sustains
    return min(fit, key=lambda x: x[1].latency_s)[0]


def estimated_attainment(placement: Placement, state: ClusterState, demand: Demand,
                         services: Mapping[str, ServiceSpec],
                         config: SchedulerConfig | None = None) -> dict[str, float]:
    """Per demanded service, the share of its requests the estimates expect ``placement``
    to serve within their deadline (goodput over rate): what observed attainment is
    compared with (policies.py). With the background load the placement's devices
    measured, as the scheduler estimates with it."""
    config = config or SchedulerConfig()
    p = _Planner(state, demand, services, config,
                 background_load(placement, state, demand, services, config))
    for name, svc in p.services.items():
        units = [u for u in placement.units_of(name) if all(d in p.devices for d in u.devices)]
        if units:
            p.commit(svc, [p.live(svc, u) for u in units])
    return {name: min(1.0, svc.goodput / svc.demand.rate_hz)
            for name, svc in p.services.items() if svc.demand.rate_hz > 0}


def _sweep(p: _Planner, config: SchedulerConfig, decisions: list[Decision]) -> int:
    """One lazy-greedy pass over (service, device group) candidates (None stands for a
    pipeline); returns how many units it added."""
    added = 0
    heap: list[tuple[float, int, str, tuple[Any, ...] | None]] = []
    order = 0
    for name, svc in p.services.items():
        if svc.demand.rate_hz <= 0:
            continue
        keys: list[tuple[Any, ...] | None] = []
        if svc.allocation.mode.startswith("pipeline"):
            keys.append(None)
        keys += [r.profile_key() for r in p.reps if r.mem_mb >= svc.spec.memory_mb]
        for key in keys:
            found = p.candidate(svc, key)
            if found is None:
                continue
            g = p.gain(svc, found[0])
            if g > config.min_gain_hz:
                heap.append((-g * p.thrift(key), order, name, key))
                order += 1
    heapq.heapify(heap)
    while heap:
        _, _, name, key = heapq.heappop(heap)
        svc = p.services[name]
        if len(svc.units) >= config.max_units_per_service:
            continue
        found = p.candidate(svc, key)
        if found is None:
            continue
        live, why = found
        # A move pays for its load time within the horizon, except a service's first
        # unit: nothing else will ever serve it, so waiting cannot be cheaper (a 20 GB
        # model may take longer than the horizon to load and must still be placed).
        charge = 1.0 if not svc.units else max(
            0.0, 1 - load_time_s(live.unit, config) / config.horizon_s)
        g = p.gain(svc, live) * charge
        if g <= config.min_gain_hz:
            continue  # gains only shrink as the placement grows: drop it for good
        if heap and g * p.thrift(key) < -heap[0][0]:
            # Stale: let the better one go first.
            heapq.heappush(heap, (-g * p.thrift(key), order, name, key))
            order += 1
            continue
        p.commit(svc, [*svc.units, live])
        added += 1
        gained = (f"+{g:.2f} req/s within SLO, net of "
                  f"{load_time_s(live.unit, config):.1f} s loading")
        decisions.append(Decision("add", live.unit.id, g,
                                  f"{gained}; {why}" if why else gained))
        heapq.heappush(heap, (-g * p.thrift(key), order, name, key))  # one more of it?
        order += 1
    return added


def _headroom(p: _Planner, config: SchedulerConfig, decisions: list[Decision]) -> None:
    """Spend memory the greedy left free on spare replicas of the busiest services.

    The estimates size each service for its observed bursts; arrivals can still outrun
    them (a burst longer than the window, a diurnal rise between two decisions), and
    memory left empty serves nobody. Rounds over the services whose units offer less
    than ``headroom_factor`` times their burst rate, the most loaded first, each adding
    at most one replica per round where it meets its SLO and costs its neighbours
    nothing by the estimates; routing sends work there only when it is the quickest
    place to finish. Once a service has that much capacity, later decisions add none.
    """
    def short(svc: _Service) -> float:
        """Above 1 while the service wants more: capacity for its bursts times the
        factor, and (demand seen only for moments, as at a cold start, says little)
        at least ``headroom_min_units`` units where memory allows."""
        capacity = sum(u.perf.capacity_hz for u in svc.units if u.slack_s > 0)
        wanted = config.headroom_factor * svc.demand.load_hz / capacity if capacity else 0.0
        return max(wanted, config.headroom_min_units / len(svc.units))

    for _ in range(config.headroom):
        busy = sorted((svc for svc in p.services.values()
                       if svc.units and svc.demand.rate_hz > 0 and short(svc) > 1
                       and not svc.allocation.mode.startswith("pipeline")),
                      key=lambda s: (-short(s), s.spec.name))
        for svc in busy:
            if len(svc.units) >= config.max_units_per_service:
                continue
            best: tuple[float, _Live] | None = None
            for rep in p.reps:
                if rep.mem_mb < svc.spec.memory_mb:
                    continue
                found = p.replica(svc, rep.profile_key())
                if found is None or found.slack_s <= 0 or \
                        load_time_s(found.unit, config) >= config.horizon_s:
                    continue  # useless, or it could not load before the horizon ends
                g = p.gain(svc, found)
                if g >= 0 and (best is None or g > best[0]):
                    best = (g, found)
            if best is None:
                continue
            p.commit(svc, [*svc.units, best[1]])
            decisions.append(Decision("add", best[1].unit.id, best[0],
                                      "spare memory: headroom for bursts"))


def worth_removing(gain_hz: float, touched_hz: float, config: SchedulerConfig) -> bool:
    """Whether removing a replica that gains ``gain_hz`` (requests within SLO a second,
    over the services on its devices, whose demand adds up to ``touched_hz``) is worth a
    new placement: beyond noise, and beyond the dead band ``remove_min_share``."""
    return gain_hz > max(config.min_gain_hz, config.remove_min_share * touched_hz)


def _prune(p: _Planner, config: SchedulerConfig, decisions: list[Decision]) -> None:
    """Remove replicas whose removal raises goodput (they crowd a shared device more
    than they serve), keeping at least one unit per service."""
    for svc in p.services.values():
        for live in sorted(svc.units, key=lambda u: u.unit.id):
            if len(svc.units) < 2:
                break
            rest = [u for u in svc.units if u is not live]
            new, contrib, _ = p.evaluate(svc, rest)
            gain = new - svc.goodput
            # Its load moves to the service's other units: count every device it moves to.
            moved = set(contrib) | set(svc.contrib)
            shift = {d: contrib.get(d, 0.0) - svc.contrib.get(d, 0.0) for d in moved}
            touched = svc.demand.rate_hz
            for name in sorted({n for d in moved for n in p.hosted[d]}):
                if name != svc.spec.name:
                    other = p.services[name]
                    gain += p.evaluate(other, other.units, shift)[0] - other.goodput
                    touched += other.demand.rate_hz
            if worth_removing(gain, touched, config):
                p.commit(svc, rest)
                decisions.append(Decision("remove", live.unit.id, gain,
                                          f"+{gain:.2f} req/s within SLO elsewhere: it "
                                          f"crowds a shared device more than it serves"))


def _placement(current: Placement, p: _Planner) -> Placement:
    plans = {}
    for name, svc in p.services.items():
        units = tuple(sorted((u.unit for u in svc.units), key=lambda u: u.id))
        plans[name] = ServicePlan(name, svc.category.label, svc.allocation.mode, units,
                                  _explain(p, svc))
    same = sorted((u.id, u.max_batch) for u in current.units()) == \
        sorted((u.id, u.max_batch) for plan in plans.values() for u in plan.units)
    return Placement(current.version if same else current.version + 1, plans)


def _explain(p: _Planner, svc: _Service) -> str:
    parts = [svc.category.reason, svc.allocation.reason]
    if not svc.units:
        parts.append("not placed: " + ("no recent demand and no free memory"
                                       if svc.demand.rate_hz <= 0 else
                                       "no device (or device set) can meet its SLO with "
                                       "the memory left"))
        return "; ".join(parts)
    where = ", ".join(u.unit.id.split("@", 1)[1] for u in svc.units[:6])
    more = f" and {len(svc.units) - 6} more" if len(svc.units) > 6 else ""
    parts.append(f"{len(svc.units)} unit(s) on {where}{more} for "
                 f"{svc.demand.rate_hz:.2f} req/s (estimated {svc.goodput:.2f} req/s "
                 f"within SLO)")
    shared = sorted({d for u in svc.units for d in u.unit.devices
                     if len(p.hosted[d]) > 1})
    if shared:
        others = max(len(p.hosted[d]) - 1 for d in shared)
        parts.append(f"shares {len(shared)} device(s) with up to {others} other "
                     f"service(s)")
    return "; ".join(parts)
