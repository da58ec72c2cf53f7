"""Placement rules of prior serving systems, as policies behind epara's one interface.

Each class stands for a real system and follows the rule that system documents, with
its own routing (``router``) and batching (the units' ``max_batch``). A policy sees only
what a real leader sees: the live devices, the demand the nodes observed (popularity is
learned online from it, never read from a trace) and the specs with the run times nodes
measured. The pure placement functions are tested directly (tests/test_leader_sim.py);
docs/epara-core.md lists each system's source.

Routers named here (the simulator implements them, node/leader/sim.py):
  ``least-connections``  fewest requests in flight, ties at random (Envoy/Istio
                         LEAST_REQUEST, what KServe's ingress uses);
  ``least-outstanding``  power of two random choices, the one with fewer outstanding
                         (Ray Serve's replica scheduler; Triton behind a load balancer);
  ``fastest-chain``      the unit with the least expected time from published speeds
                         and the requests it holds, never refusing (Petals' client);
  ``epara``              least expected completion, refusing what cannot meet its
                         deadline (node/leader/routing.py).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

from epara.node.leader.allocate import DEFAULT_BATCH
from epara.node.leader.estimate import unit_goodput, unit_perf
from epara.node.leader.model import (
    ClusterState,
    DeviceProfile,
    Placement,
    ServiceDemand,
    ServicePlan,
    ServiceSpec,
    Stage,
    Unit,
)
from epara.node.leader.partition import proportional_split
from epara.node.leader.scheduler import Decision

Plans = dict[str, list[Unit]]


def whole(spec: ServiceSpec, device: str, batch: int) -> Unit:
    """One replica of the whole model on ``device``."""
    return Unit(spec.name, (Stage(device, 0, len(spec.layers), spec.memory_mb),),
                max(1, batch))


def llm_batch(spec: ServiceSpec, other: int) -> int:
    """Every serving stack of today batches LLM decode continuously (vLLM, TGI, TensorRT-
    LLM behind Triton and KServe); ``other`` is the system's batch for everything else."""
    return spec.max_batch if spec.is_llm else max(1, min(other, spec.max_batch))


def _placement(current: Placement, units: Mapping[str, Sequence[Unit]], mode: str,
               reason: str) -> Placement:
    plans = {n: ServicePlan(n, "-", mode, tuple(u), reason)  # type: ignore[arg-type]
             for n, u in sorted(units.items()) if u}
    if plans == dict(current.plans):
        return current
    return Placement(current.version + 1, plans)


class LearnedPopularity:
    """Requests per second per service, learned online from observed demand (an EWMA
    over decisions; services never seen rank by name)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self.rate: dict[str, float] = {}

    def update(self, demand: Mapping[str, ServiceDemand],
               specs: Mapping[str, ServiceSpec]) -> dict[str, float]:
        for name in specs:
            seen = demand[name].rate_hz if name in demand else 0.0
            old = self.rate.get(name)
            self.rate[name] = seen if old is None else old + self.alpha * (seen - old)
        return dict(self.rate)


def _by_popularity(specs: Mapping[str, ServiceSpec],
                   popularity: Mapping[str, float]) -> list[str]:
    return sorted(specs, key=lambda n: (-popularity.get(n, 0.0), n))


class ReplacementClock:
    """When a periodic baseline re-places: every ``period_s``, when the live devices
    change, and as soon as the first demand has been observed (a placement made before
    any is a guess)."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.last = -math.inf
        self.devices: frozenset[str] = frozenset()
        self.informed = False

    def due(self, now: float, ids: frozenset[str],
            demand: Mapping[str, ServiceDemand]) -> bool:
        first = bool(demand) and not self.informed
        if now - self.last < self.period_s and ids == self.devices and not first:
            return False
        self.last, self.devices = now, ids
        self.informed = self.informed or bool(demand)
        return True


# --- Kubernetes / KServe ---------------------------------------------------------------

HPA_TARGET = 0.8  # KServe raw-deployment default: 80% CPU utilisation
HPA_TOLERANCE = 0.1  # the HPA ignores ratios within 10% of 1
HPA_SYNC_S = 15.0  # --horizontal-pod-autoscaler-sync-period
HPA_DOWN_WINDOW_S = 300.0  # scale-down stabilisation window


def hpa_desired(replicas: int, utilisation: float, max_replicas: int) -> int:
    """The HPA's rule: ceil(replicas * utilisation / target), skipped within tolerance."""
    if replicas <= 0:
        return 1
    ratio = utilisation / HPA_TARGET
    if abs(ratio - 1) <= HPA_TOLERANCE:
        return replicas
    return max(1, min(max_replicas, math.ceil(replicas * ratio)))


def bin_pack(spec: ServiceSpec, devices: Sequence[DeviceProfile], free: dict[str, float],
             exclude: set[str]) -> DeviceProfile | None:
    """Memory-only bin packing (the scheduler's MostAllocated scoring): the device with
    the least free memory that still fits the pod's request."""
    fits = [d for d in devices if d.id not in exclude and free[d.id] >= spec.memory_mb]
    return min(fits, key=lambda d: (free[d.id], d.id)) if fits else None


class KServePolicy:
    """Kubernetes/KServe: a Deployment per model starting at one replica, the horizontal
    pod autoscaler every 15 s on observed utilisation, pods bin-packed by memory request
    only, pods of a dead node re-created elsewhere, no request batching for non-LLM
    predictors (KServe's batcher is opt-in), least-connections routing."""

    mode = "replicas"

    def __init__(self, name: str = "kserve", router: str = "least-connections") -> None:
        self.name, self.router = name, router
        self.replicas: dict[str, int] = {}
        self.last_sync = -math.inf
        self.last_up: dict[str, float] = {}

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        devices = state.alive()
        profiles = {d.id: d for d in devices}
        alive = set(profiles)
        units = {n: [u for u in current.units_of(n) if set(u.devices) <= alive]
                 for n in specs}
        if now - self.last_sync >= HPA_SYNC_S:
            self.last_sync = now
            for name, spec in specs.items():
                have = units[name]
                n = self.replicas.get(name, 1)
                if have and name in demand:
                    busy = sum(1 / unit_perf(spec, u, profiles).capacity_hz for u in have)
                    util = demand[name].rate_hz * busy / len(have) / len(have)
                    want = hpa_desired(len(have), util, len(devices))
                    if want > n:
                        self.last_up[name] = now
                    elif want < n and now - self.last_up.get(name, -math.inf) < \
                            HPA_DOWN_WINDOW_S:
                        want = n  # stabilisation: no scale-down soon after a scale-up
                    n = want
                self.replicas[name] = n
        free = {d.id: d.mem_mb for d in devices}
        for unit in (u for us in units.values() for u in us):
            for s in unit.stages:
                free[s.device] -= s.memory_mb
        for name in sorted(specs, key=lambda n: (-specs[n].memory_mb, n)):
            spec, want = specs[name], self.replicas.setdefault(name, 1)
            while len(units[name]) > want:  # scale down: the newest pod goes
                for s in units[name].pop().stages:
                    free[s.device] += s.memory_mb
            while len(units[name]) < want:
                host = bin_pack(spec, devices, free, {u.head for u in units[name]})
                if host is None:
                    break  # Pending: no node has the memory
                free[host.id] -= spec.memory_mb
                units[name].append(whole(spec, host.id, llm_batch(spec, 1)))
        return _placement(current, units, self.mode, f"baseline {self.name}"), ()


# --- Triton / Ray Serve -----------------------------------------------------------------

TRITON_BATCH = 8  # one max_batch_size for every model (dynamic batching)
TRITON_REPLACE_S = 30.0  # re-placement period


def replicate_where_it_fits(specs: Mapping[str, ServiceSpec],
                            devices: Sequence[DeviceProfile],
                            popularity: Mapping[str, float], batch: int) -> Plans:
    """Rounds over the services, most popular first, each round giving every service
    one more replica on the device with the most free memory that holds it, until no
    model fits anywhere (Ray Serve's SPREAD placement of replicas; Triton's model
    repository loaded on every server with room). Memory is the only constraint."""
    free = {d.id: d.mem_mb for d in devices}
    units: Plans = {n: [] for n in specs}
    names = _by_popularity(specs, popularity)
    placed = True
    while placed:
        placed = False
        for name in names:
            spec = specs[name]
            hosts = {u.head for u in units[name]}
            fits = [d for d in devices if free[d.id] >= spec.memory_mb and d.id not in hosts]
            if not fits:
                continue
            d = max(fits, key=lambda d: (free[d.id], d.id))
            free[d.id] -= spec.memory_mb
            units[name].append(whole(spec, d.id, llm_batch(spec, batch)))
            placed = True
    return units


class TritonPolicy:
    """Triton / Ray Serve: replicas wherever memory allows, most popular models first,
    popularity learned online, re-placed every 30 s (and when a device is lost), one
    dynamic-batching max batch size for every model, least-outstanding routing."""

    mode = "replicas"

    def __init__(self, name: str = "triton", router: str = "least-outstanding") -> None:
        self.name, self.router = name, router
        self.popularity = LearnedPopularity()
        self.clock = ReplacementClock(TRITON_REPLACE_S)

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        popularity = self.popularity.update(demand, specs)
        devices = state.alive()
        ids = frozenset(d.id for d in devices)
        if not self.clock.due(now, ids, demand):
            return current, ()
        units = replicate_where_it_fits(specs, devices, popularity, TRITON_BATCH)
        return _placement(current, units, self.mode, f"baseline {self.name}"), ()


# --- AlpaServe ---------------------------------------------------------------------------

ALPA_GROUP_SIZES = (1, 2, 4)
ALPA_REPLACE_S = 30.0
ALPA_PRIOR_HZ = 1.0  # the rate assumed for a model before any demand is seen


def alpaserve_groups(devices: Sequence[DeviceProfile], size: int) -> list[list[DeviceProfile]]:
    """Devices cut into model-parallel groups of ``size`` in id order (like devices
    together: AlpaServe partitions a homogeneous cluster evenly)."""
    ordered = sorted(devices, key=lambda d: d.id)
    return [ordered[i:i + size] for i in range(0, len(ordered) - size + 1, size)]


def _even_stages(spec: ServiceSpec, group: Sequence[DeviceProfile],
                 free: Mapping[str, float]) -> tuple[Stage, ...] | None:
    """The model over ``group`` with an equal share of layers per member (AlpaServe's
    inter-operator parallelism); a model that cannot be split uses one member."""
    if not spec.layers or len(group) == 1:
        host = max(group, key=lambda d: (free[d.id], d.id))
        return (Stage(host.id, 0, len(spec.layers), spec.memory_mb),) \
            if free[host.id] >= spec.memory_mb else None
    n = len(spec.layers)
    k = min(len(group), n)
    stages = []
    for i, d in enumerate(group[:k]):
        first, end = n * i // k, n * (i + 1) // k
        mem = spec.stage_memory_mb(first, end)
        if mem > free[d.id]:
            return None
        stages.append(Stage(d.id, first, end, mem))
    return tuple(stages)


def alpaserve_placement(specs: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile],
                        rates: Mapping[str, float], cv: Mapping[str, float] | None = None,
                        batch: int = 1) -> Plans:
    """AlpaServe's greedy placement: for each group size, repeatedly add the (model,
    group) replica that raises the estimated SLO attainment (requests within SLO per
    second, statistical multiplexing of the group's load) the most, until nothing
    fits or helps; keep the group size whose placement scores best."""
    best: tuple[float, Plans] = (-1.0, {n: [] for n in specs})
    for size in ALPA_GROUP_SIZES:
        groups = alpaserve_groups(devices, size)
        if groups:
            score, units = _alpaserve_greedy(specs, devices, groups, rates, cv or {}, batch)
            if score > best[0]:
                best = (score, units)
    return best[1]


def _alpaserve_greedy(specs: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile],
                      groups: Sequence[Sequence[DeviceProfile]], rates: Mapping[str, float],
                      cv: Mapping[str, float], batch: int) -> tuple[float, Plans]:
    profiles = {d.id: d for d in devices}
    free = {d.id: d.mem_mb for d in devices}
    units: Plans = {n: [] for n in specs}
    where: dict[str, list[int]] = {n: [] for n in specs}
    on_group: list[list[str]] = [[] for _ in groups]
    load = [0.0] * len(groups)  # busy seconds per second of each group
    perfs: dict[tuple[str, ...], tuple[float, float]] = {}  # stage devices -> (cap, lat)

    def perf(unit: Unit) -> tuple[float, float]:
        key = (unit.service, *unit.devices)
        if key not in perfs:
            p = unit_perf(specs[unit.service], unit, profiles)
            perfs[key] = (p.capacity_hz, p.latency_s)
        return perfs[key]

    def served(name: str, options: Sequence[tuple[int, Unit]],
               group_load: Mapping[int, float]) -> float:
        if not options:
            return 0.0
        spec = specs[name]
        rate = rates.get(name, 0.0)
        caps = [perf(u) for _, u in options]
        total = sum(c for c, _ in caps)
        out = 0.0
        for (g, _), (cap, latency) in zip(options, caps, strict=True):
            slack = spec.deadline_ms() / 1000 - latency
            # AlpaServe's simulator drops what would miss its SLO, so an overloaded
            # group still serves what fits (unit_goodput's early refusal).
            out += unit_goodput(rate * cap / total, group_load.get(g, load[g]), slack,
                                1 / cap, cv.get(name, 1.0))
        return out

    def options_of(name: str) -> list[tuple[int, Unit]]:
        return list(zip(where[name], units[name], strict=True))

    def gain_of(name: str, g: int) -> tuple[float, Unit] | None:
        stages = _even_stages(specs[name], groups[g], free)
        if stages is None:
            return None
        unit = Unit(name, stages, llm_batch(specs[name], batch))
        mine = options_of(name)
        total = sum(perf(u)[0] for _, u in mine) + perf(unit)[0]
        # The model's rate spreads over its replicas by capacity: the group it joins
        # gets rate / total busy seconds per second more.
        trial = {g: load[g] + rates.get(name, 0.0) / total}
        gain = served(name, [*mine, (g, unit)], trial) - current[name]
        for other in on_group[g]:  # they now share the group: they lose some
            gain += served(other, options_of(other), trial) - current[other]
        return gain, unit

    # Lazy greedy: a candidate's gain only shrinks as others are placed (up to the
    # estimate's noise), so re-evaluate the best one and take it if it still leads.
    current = dict.fromkeys(specs, 0.0)
    heap: list[tuple[float, str, int]] = []
    for name in specs:
        for g in range(len(groups)):
            found = gain_of(name, g)
            if found is not None and found[0] > 1e-9:
                heap.append((-found[0], name, g))
    heapq.heapify(heap)
    score = 0.0
    while heap:
        _, name, g = heapq.heappop(heap)
        if g in where[name]:
            continue
        found = gain_of(name, g)
        if found is None or found[0] <= 1e-9:
            continue
        gain, unit = found
        if heap and gain < -heap[0][0] - 1e-9:
            heapq.heappush(heap, (-gain, name, g))
            continue
        units[name].append(unit)
        where[name].append(g)
        on_group[g].append(name)
        for s in unit.stages:
            free[s.device] -= s.memory_mb
        for gg in range(len(groups)):
            load[gg] = sum(rates.get(m, 0.0) / sum(perf(u)[0] for u in units[m])
                           for m in on_group[gg])
        for other in {m for gg in where[name] for m in on_group[gg]}:
            current[other] = served(other, options_of(other), {})
        score += gain
        for gg in range(len(groups)):  # a further replica of this model may help now
            if gg not in where[name]:
                again = gain_of(name, gg)
                if again is not None and again[0] > 1e-9:
                    heapq.heappush(heap, (-again[0], name, gg))
    return score, units


class AlpaServePolicy:
    """AlpaServe: devices partitioned into model-parallel groups; models placed greedily
    by estimated SLO attainment under the observed rates; re-placed every 30 s and on a
    device loss; no batching of non-LLM models; requests go to the group with the
    shortest queue."""

    mode = "pipeline_throughput"

    def __init__(self, name: str = "alpaserve", router: str = "least-connections") -> None:
        self.name, self.router = name, router
        self.popularity = LearnedPopularity()
        self.clock = ReplacementClock(ALPA_REPLACE_S)

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        learned = self.popularity.update(demand, specs)
        devices = state.alive()
        ids = frozenset(d.id for d in devices)
        if not self.clock.due(now, ids, demand):
            return current, ()
        rates = {n: learned.get(n) or ALPA_PRIOR_HZ for n in specs}
        cv = {n: d.cv for n, d in demand.items()}
        units = alpaserve_placement(specs, devices, rates, cv)
        return _placement(current, units, self.mode, f"baseline {self.name}"), ()


# --- exo ---------------------------------------------------------------------------------

def exo_ring(devices: Sequence[DeviceProfile]) -> list[DeviceProfile]:
    """exo's ring order: most memory first, then id."""
    return sorted(devices, key=lambda d: (-d.mem_mb, d.id))


def exo_placement(specs: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile],
                  popularity: Mapping[str, float]) -> Plans:
    """Every model over one ring of all devices, layers in proportion to each device's
    memory (RingMemoryWeightedPartitioningStrategy); models in popularity order while
    their shares fit. A model that cannot be split runs whole on the ring member with
    the most free memory. No batching."""
    ring = exo_ring(devices)
    free = {d.id: d.mem_mb for d in ring}
    units: Plans = {n: [] for n in specs}
    for name in _by_popularity(specs, popularity):
        spec = specs[name]
        if spec.layers:
            # Shares in proportion to total (not free) memory, as exo does.
            stages = proportional_split(spec, ring, {d.id: d.mem_mb for d in ring})
            if stages is not None and any(s.memory_mb > free[s.device] for s in stages):
                stages = None
        else:
            host = max(ring, key=lambda d: (free[d.id], d.id))
            stages = (Stage(host.id, 0, 0, spec.memory_mb),) \
                if free[host.id] >= spec.memory_mb else None
        if stages is None:
            continue
        for s in stages:
            free[s.device] -= s.memory_mb
        units[name].append(Unit(name, stages, 1))
    return units


class ExoPolicy:
    """exo: one ring of every device; each model sharded over it by memory; re-sharded
    when the ring's membership changes; one request at a time per shard."""

    mode = "pipeline_latency"

    def __init__(self, name: str = "exo", router: str = "least-connections") -> None:
        self.name, self.router = name, router
        self.popularity = LearnedPopularity()
        self.devices: frozenset[str] | None = None

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        popularity = self.popularity.update(demand, specs)
        devices = state.alive()
        ids = frozenset(d.id for d in devices)
        if ids == self.devices:
            return current, ()
        self.devices = ids
        units = exo_placement(specs, devices, popularity)
        return _placement(current, units, self.mode, f"baseline {self.name}"), ()


# --- Petals ------------------------------------------------------------------------------

PETALS_CHAINS = 8  # chains offered per model to the clients' routing


def _work(spec: ServiceSpec, rate: float) -> float:
    """GFLOP per second a model's demand asks for (prior: one request per second)."""
    return max(rate, 0.05) * (spec.gflop + spec.mean_output_tokens * spec.gflop_per_token)


def petals_servers(specs: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile],
                   popularity: Mapping[str, float]
                   ) -> dict[str, list[tuple[DeviceProfile, int, int]]]:
    """Petals' server-side balancing: in rounds, each device (fastest first) starts one
    more server, for the swarm whose demand is least covered by the throughput it
    already has; the server holds as many blocks as the device's free memory allows
    and takes the span whose weakest block has the least throughput. A model that
    cannot be split is one block. A device serves each swarm at most once."""
    servers: dict[str, list[tuple[DeviceProfile, int, int]]] = {n: [] for n in specs}
    blocks = {n: [0.0] * max(1, len(s.layers)) for n, s in specs.items()}
    need = {n: _work(s, popularity.get(n, 0.0)) for n, s in specs.items()}
    free = {d.id: d.mem_mb for d in devices}
    joined: dict[str, set[str]] = {d.id: set() for d in devices}
    started = True
    while started:
        started = False
        for d in sorted(devices, key=lambda d: (-d.gflops, d.id)):
            choice: tuple[tuple[bool, float, str], str, int] | None = None
            for name in sorted(specs):
                if name in joined[d.id]:
                    continue
                spec = specs[name]
                n = len(blocks[name])
                k = 0
                while k < n and (spec.stage_memory_mb(0, k + 1) if spec.layers
                                 else spec.memory_mb) <= free[d.id]:
                    k += 1
                if k == 0:
                    continue
                # Swarms that cannot serve yet come first, the neediest of them
                # first; then the least covered relative to its demand.
                weakest = min(blocks[name])
                key = (weakest > 0, weakest / need[name] if weakest else -need[name], name)
                if choice is None or key < choice[0]:
                    choice = (key, name, k)
            if choice is None:
                continue
            _, name, k = choice
            spec = specs[name]
            n = len(blocks[name])
            start = min(range(n - k + 1), key=lambda s: (min(blocks[name][s:s + k]),
                                                         sum(blocks[name][s:s + k]), s))
            for b in range(start, start + k):
                blocks[name][b] += d.gflops
            free[d.id] -= spec.stage_memory_mb(start, start + k) if spec.layers \
                else spec.memory_mb
            joined[d.id].add(name)
            servers[name].append((d, start, start + k))
            started = True
    return servers


def petals_chains(spec: ServiceSpec, servers: Sequence[tuple[DeviceProfile, int, int]],
                  chains: int = PETALS_CHAINS) -> list[Unit]:
    """Chains of servers covering every block, each greedily the fastest server for the
    next block among those used least so far (so chains spread over the swarm)."""
    n = max(1, len(spec.layers))
    used: dict[str, int] = {}
    held: set[str] = set()
    out: list[Unit] = []
    seen: set[tuple[str, ...]] = set()
    for _ in range(chains):
        stages = []
        b = 0
        while b < n:
            options = [s for s in servers if s[1] <= b < s[2]]
            if not options:
                return out
            d, _, end = min(options, key=lambda s: (used.get(s[0].id, 0), -s[0].gflops,
                                                    -s[2], s[0].id))
            mem = 0.0 if d.id in held else (spec.stage_memory_mb(b, end) if spec.layers
                                            else spec.memory_mb)
            held.add(d.id)
            stages.append(Stage(d.id, b if spec.layers else 0,
                                end if spec.layers else 0, mem))
            used[d.id] = used.get(d.id, 0) + 1
            b = end
        key = tuple(s.device for s in stages)
        if key in seen:
            break
        seen.add(key)
        out.append(Unit(spec.name, tuple(stages), llm_batch(spec, 1)))
    return out


class PetalsPolicy:
    """Petals: servers pick blocks to balance throughput across the swarm; clients pick
    the fastest chain of servers. Re-balanced every 30 s and on a device loss."""

    mode = "pipeline_throughput"

    def __init__(self, name: str = "petals", router: str = "fastest-chain") -> None:
        self.name, self.router = name, router
        self.popularity = LearnedPopularity()
        self.clock = ReplacementClock(TRITON_REPLACE_S)

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        popularity = self.popularity.update(demand, specs)
        devices = state.alive()
        ids = frozenset(d.id for d in devices)
        if not self.clock.due(now, ids, demand):
            return current, ()
        servers = petals_servers(specs, devices, popularity)
        units = {n: petals_chains(specs[n], servers[n]) for n in specs}
        return _placement(current, units, self.mode, f"baseline {self.name}"), ()


# --- the earlier simple baselines (kept for the real leader's comparisons) -----------------

def one_replica(specs: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile]) -> Plans:
    """One replica per service, largest models first, each on the fastest device with
    room, spreading ties."""
    free = {d.id: d.mem_mb for d in devices}
    count = dict.fromkeys(free, 0)
    units: Plans = {n: [] for n in specs}
    for spec in sorted(specs.values(), key=lambda s: (-s.memory_mb, s.name)):
        fits = [d for d in devices if free[d.id] >= spec.memory_mb]
        if not fits:
            continue
        d = min(fits, key=lambda d: (-d.gflops, count[d.id], d.id))
        free[d.id] -= spec.memory_mb
        count[d.id] += 1
        units[spec.name].append(whole(spec, d.id, min(spec.max_batch, DEFAULT_BATCH)))
    return units


def pipeline_groups(specs: Mapping[str, ServiceSpec], devices: Sequence[DeviceProfile],
                    popularity: Mapping[str, float], group: int = 4) -> Plans:
    """Every model split over a group of ``group`` devices, layers in proportion to free
    memory (llama.cpp RPC style); groups mix device kinds. Rounds over the services,
    most popular first, each giving every service one more pipeline on the group with
    the most free memory that holds it."""
    ordered = sorted(devices, key=lambda d: d.id)
    n_groups = max(1, len(ordered) // group)
    groups = [ordered[g::n_groups] for g in range(n_groups)]
    free = {d.id: d.mem_mb for d in ordered}
    used: dict[str, set[int]] = {n: set() for n in specs}
    units: Plans = {n: [] for n in specs}
    names = _by_popularity(specs, popularity)
    placed = True
    while placed:
        placed = False
        for name in names:
            spec = specs[name]
            for g in sorted((g for g in range(n_groups) if g not in used[name]),
                            key=lambda g: (-sum(free[d.id] for d in groups[g]), g)):
                members = groups[g]
                stages: tuple[Stage, ...] | None
                if spec.layers:
                    stages = proportional_split(spec, members, free)
                else:
                    room = max(members, key=lambda d: (free[d.id], d.id))
                    stages = (Stage(room.id, 0, 0, spec.memory_mb),) \
                        if free[room.id] >= spec.memory_mb else None
                if stages is None:
                    continue
                for s in stages:
                    free[s.device] -= s.memory_mb
                used[name].add(g)
                units[name].append(Unit(name, stages, min(spec.max_batch, DEFAULT_BATCH)))
                placed = True
                break
    return units


class SimpleBaseline:
    """``one-replica``, ``replicate-all`` (Triton-like, popularity from observed demand)
    and ``pipeline-all`` (exo-like groups of four): re-placed every decision from the
    live devices; the real leader's case-study baselines."""

    def __init__(self, name: str, router: str = "least-outstanding") -> None:
        self.name, self.router = name, router

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        devices = state.alive()
        popularity = {name: d.rate_hz for name, d in demand.items()}
        if self.name == "one-replica":
            units, mode = one_replica(specs, devices), "replicas"
        elif self.name == "replicate-all":
            units = replicate_where_it_fits(specs, devices, popularity, DEFAULT_BATCH)
            mode = "replicas"
        else:
            units, mode = pipeline_groups(specs, devices, popularity), "pipeline_throughput"
        return _placement(current, units, mode, f"baseline policy {self.name}"), ()


__all__ = ["AlpaServePolicy", "ExoPolicy", "KServePolicy", "PetalsPolicy", "SimpleBaseline",
           "TritonPolicy", "alpaserve_placement", "bin_pack", "exo_placement", "hpa_desired",
           "one_replica", "petals_chains", "petals_servers", "pipeline_groups",
           "replicate_where_it_fits", "whole"]
