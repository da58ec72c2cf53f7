"""Analytical estimates: step times, a unit's latency and capacity, goodput under load.

These are deliberately simple closed forms (a roofline per step, a Kingman-style queue
per device): the scheduler evaluates them thousands of times per decision. Their
assumptions are listed in docs/epara-core.md; the simulator measures what they predict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from epara.node.leader.model import DeviceProfile, ServiceSpec, Unit

# Below this, a burst never queues behind more than a handful of requests; treating even a
# perfectly periodic stream as slightly variable keeps the estimate away from 100% use.
MIN_VARIABILITY = 0.05


@dataclass(frozen=True)
class StageCost:
    """Step time of one stage on one device:
    max(step_s + gflop * per_gflop_s, read_s) + fixed_s."""

    per_gflop_s: float  # seconds per GFLOP of the whole model's pass routed to this stage
    read_s: float  # reading this stage's weights once per step
    fixed_s: float
    step_s: float = 0.0  # compute a step costs whatever its batch (idle accelerator lanes)

    def time(self, gflop: float) -> float:
        return max(self.step_s + gflop * self.per_gflop_s, self.read_s) + self.fixed_s


def stage_cost(spec: ServiceSpec, device: DeviceProfile, first: int = 0,
               end: int | None = None) -> StageCost:
    """Cost model of layers [first, end) of ``spec`` on ``device`` (all layers by default).

    A measured batch-1 latency for the device's class, when the spec has one, rescales the
    roofline so that the whole model's first pass takes exactly the measured time. The
    device's ``batch_fixed`` share f of one pass's compute is paid once per step, the
    rest per pass, so b passes take t1 * (f + (1 - f) b) while compute-bound and a lone
    pass keeps its batch-1 time.
    """
    if spec.layers:
        end = len(spec.layers) if end is None else end
        share = sum(layer.compute_share for layer in spec.layers[first:end])
        weights = sum(layer.weight_mb for layer in spec.layers[first:end])
    else:
        share, weights = 1.0, spec.weights
    per_gflop = share / device.gflops
    read = weights / 1024 / device.mem_bandwidth_gbs
    # This device's own measurement first ("@" + its id), else its class's.
    measured = spec.measured_ms.get(f"@{device.id}", spec.measured_ms.get(device.device_class))
    if measured is not None:
        roofline = max(spec.gflop / device.gflops, spec.weights / 1024 /
                       device.mem_bandwidth_gbs)
        scale = max(0.0, measured / 1000 - spec.overhead_ms / 1000) / roofline \
            if roofline > 0 else 1.0
        per_gflop, read = per_gflop * scale, read * scale
    # One pass: a decode token for an LLM (a prefill already is a batch of 256 tokens).
    unit_gflop = spec.gflop_per_token if spec.is_llm else spec.gflop
    f = device.batch_fixed
    k = spec.time_scale
    return StageCost(k * per_gflop * (1 - f), k * read, k * spec.overhead_ms / 1000,
                     k * f * unit_gflop * per_gflop)


def node_work_s(spec: ServiceSpec, device: DeviceProfile) -> float:
    """A request's work around its passes on ``device`` (``ServiceSpec.work_ms``): this
    device's measurement, else its class's, else the fastest-scaled figure of another
    device at this one's speed; 0 before any node measured it."""
    work = spec.work_ms
    measured = work.get(f"@{device.id}", work.get(device.device_class))
    if measured is None and "*" in work and device.gflops > 0:
        measured = work["*"] / device.gflops
    return (measured or 0.0) / 1000


@dataclass(frozen=True)
class UnitPerf:
    """What a unit offers: a lone request's time, throughput at full batches, device use."""

    latency_s: float  # one typical request, alone, including transfers between stages
    first_pass_s: float  # time to the first result (prefill for an LLM)
    pass_s: float  # each further pass (an LLM token) at batch 1
    capacity_hz: float  # requests per second with full batches and the pipeline full
    full_latency_s: float  # one request when every step it joins carries a full batch
    stage_use: tuple[float, ...]  # per stage: busy seconds per request at full batches
    stage_step: tuple[float, ...] = ()  # per stage: its longest step (a full batch, with
    # a prefill joining for an LLM); a device runs one step at a time, so this is how
    # long other services' requests on that device may have to wait for it to end

    def steps(self, unit: Unit) -> dict[str, float]:
        """The longest step ``unit`` runs on each of its devices."""
        out: dict[str, float] = {}
        for stage, step in zip(unit.stages, self.stage_step, strict=True):
            out[stage.device] = max(out.get(stage.device, 0.0), step)
        return out

    def use(self, unit: Unit) -> dict[str, float]:
        """Busy seconds per request on each device of ``unit`` (a device may hold two
        stages). Kept per stage so one estimate serves every unit of the same shape."""
        out: dict[str, float] = {}
        for stage, busy in zip(unit.stages, self.stage_use, strict=True):
            out[stage.device] = out.get(stage.device, 0.0) + busy
        return out


def unit_perf(spec: ServiceSpec, unit: Unit, devices: Mapping[str, DeviceProfile],
              tokens: float | None = None) -> UnitPerf:
    """Latency and capacity of ``unit`` for requests of ``tokens`` output tokens."""
    tokens = spec.mean_output_tokens if tokens is None else tokens
    decode = tokens if spec.is_llm else 0.0
    batch = max(1, unit.max_batch)
    costs = []
    links = []
    for i, stage in enumerate(unit.stages):
        device = devices[stage.device]
        costs.append(stage_cost(spec, device, stage.first, stage.end or None))
        nxt = unit.stages[(i + 1) % len(unit.stages)]
        if len(unit.stages) > 1 and (i + 1 < len(unit.stages) or decode):
            out = spec.layers[stage.end - 1].out_mb if spec.layers and stage.end else 0.0
            links.append((device, out, nxt.device))
    def link_s(b: int) -> list[float]:
        return [dev.transfer_s(out * b) for dev, out, _ in links]
    # A pass goes through every stage in turn; an LLM's token returns to the head.
    first = sum(c.time(spec.gflop) for c in costs) + sum(link_s(1))
    per = sum(c.time(spec.gflop_per_token) for c in costs) + sum(link_s(1)) if decode else 0.0
    latency = first + decode * per
    full_first = sum(c.time(spec.gflop + (batch - 1) * spec.gflop_per_token if decode else
                            batch * spec.gflop) for c in costs) + sum(link_s(batch))
    full_per = sum(c.time(batch * spec.gflop_per_token) for c in costs) + \
        sum(link_s(batch)) if decode else 0.0
    full = full_first + decode * full_per
    # Throughput: each stage works on one micro-batch of `batch` passes while the others
    # work on theirs; with len(stages) micro-batches in flight the slowest resource (a
    # stage or a link) sets the pace, unless one round through all stages is slower still.
    gpt = spec.gflop_per_token if decode else spec.gflop
    cycles = [c.time(batch * gpt) for c in costs] + link_s(batch)
    round_trip = sum(cycles)
    cycle = max(max(cycles), round_trip / len(unit.stages))
    # Each request adds its first pass's extra compute to one step of each stage.
    extra = [max(0.0, c.time(spec.gflop) - c.time(0)) for c in costs] if decode else \
        [0.0 for _ in costs]
    passes = decode if decode else 1.0
    # The head device's work around the passes: in every request's latency, and busy
    # time of the head's cores that no batch shares.
    work = node_work_s(spec, devices[unit.stages[0].device])
    use = tuple(c.time(batch * gpt) * passes / batch + e + (work if i == 0 else 0.0)
                for i, (c, e) in enumerate(zip(costs, extra, strict=True)))
    per_request = max(cycle * passes / batch + max(extra), use[0])
    steps = tuple(c.time(spec.gflop + (batch - 1) * gpt) if decode else c.time(batch * gpt)
                  for c in costs)
    return UnitPerf(latency + work, first + work, per, 1.0 / per_request, full + work, use,
                    steps)


def latency_at_batch(spec: ServiceSpec, device: DeviceProfile, batch: int) -> float:
    """A request's time on one device when every step runs ``batch`` requests."""
    cost = stage_cost(spec, device)
    work = node_work_s(spec, device)
    if spec.is_llm:
        return work + cost.time(spec.gflop + (batch - 1) * spec.gflop_per_token) + \
            spec.mean_output_tokens * cost.time(batch * spec.gflop_per_token)
    return work + cost.time(batch * spec.gflop)


@lru_cache(maxsize=4096)
def _best_load(z: float) -> float:
    """Utilisation maximising rho * attainment(rho) for slack ``z`` (see ``attainment``)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):  # golden-section search: the product is unimodal in rho
        a = lo + (hi - lo) * 0.382
        b = lo + (hi - lo) * 0.618
        if a * _attain(a, z) < b * _attain(b, z):
            lo = a
        else:
            hi = b
    return (lo + hi) / 2


def _attain(rho: float, z: float) -> float:
    return max(0.0, 1.0 - rho * math.exp(-z * (1.0 - rho)))


def attainment(rho: float, slack_s: float, service_s: float, cv: float) -> float:
    """Fraction of requests whose queueing wait stays under ``slack_s``.

    Kingman's heavy-traffic wait for a G/D/1 queue, W = cv²/2 · rho/(1-rho) · S, with an
    exponential tail: P(wait > t) = rho · exp(-t · rho / W) = rho · exp(-z (1 - rho)),
    z = t / (cv²/2 · S). Batching and continuous batching fold into S = 1 / capacity.
    """
    if slack_s <= 0:
        return 0.0
    if rho <= 0:
        return 1.0
    if rho >= 1:
        return 0.0
    k = max(MIN_VARIABILITY, cv * cv / 2)
    return _attain(rho, slack_s / (k * service_s))


def admitted_load(slack_s: float, service_s: float, cv: float) -> float:
    """The utilisation a unit accepts before early refusal turns requests away."""
    if slack_s <= 0:
        return 0.0
    k = max(MIN_VARIABILITY, cv * cv / 2)
    return _best_load(_quantise(slack_s / (k * service_s)))


def _quantise(z: float) -> float:
    # Few distinct keys for the cache; the optimum moves slowly with z.
    return min(1e4, float(f"{z:.2g}"))


def unit_goodput(rate_hz: float, rho: float, slack_s: float, service_s: float,
                 cv: float) -> float:
    """Requests per second that meet their deadline when ``rate_hz`` is offered to a unit
    whose devices are at utilisation ``rho`` (all their units together).

    Early refusal means the unit never admits more than the load that maximises goodput:
    above that load, the excess is refused rather than allowed to make everything late.
    """
    if rate_hz <= 0 or slack_s <= 0:
        return 0.0
    k = max(MIN_VARIABILITY, cv * cv / 2)
    z = slack_s / (k * service_s)
    best = _best_load(_quantise(z))
    if rho <= best:
        return rate_hz * _attain(rho, z)
    return rate_hz * best / rho * _attain(best, z)
