"""Categorisation and the allocator: which kind of service this is, and so which parallel
mode serves it (pure).

Request level: latency-sensitive (each request has its own tight deadline) or
frequency-sensitive (a steady stream at a target rate, where throughput and batching
matter more than any one request). Service level: single-device (it fits and meets its
SLO on one device at hand) or multi-device (it has to be split to fit or to be fast
enough). The allocator maps the four combinations to modes, each with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from epara.node.leader.estimate import UnitPerf, latency_at_batch, node_work_s, stage_cost
from epara.node.leader.model import (
    DeviceProfile,
    Mode,
    RequestCategory,
    ServiceCategory,
    ServiceDemand,
    ServiceSpec,
)
from epara.node.leader.partition import Objective

# Inter-arrival variability below this (and a rate worth batching) reads as a stream:
# cameras and sensors send frames on a clock, people send requests at random (cv ~1).
STEADY_CV = 0.5
STREAM_MIN_HZ = 1.0
# A latency-sensitive request may spend at most this share of its deadline computing,
# leaving the rest for queueing and the network: it caps the batch such services run.
LATENCY_BATCH_SHARE = 0.5
# A stream's frame may spend up to this share of its deadline inside a full batch; the
# batch grows while doubling it still buys at least STREAM_BATCH_GAIN more throughput.
STREAM_BATCH_SHARE = 0.5
STREAM_BATCH_GAIN = 1.05
# One batch limit for every model and device, as a serving system configured once
# (Triton-style dynamic batching with a fixed max batch size): what the baselines and
# the ablation run.
DEFAULT_BATCH = 8

# How a unit's batch limit is chosen once its devices are known: the allocation's own
# limit as is, the largest keeping a request within its deadline share, or the one that
# buys throughput within a stream frame's deadline share.
BatchRule = Literal["fixed", "latency", "throughput"]


@dataclass(frozen=True)
class Category:
    request: RequestCategory
    service: ServiceCategory
    reason: str

    @property
    def label(self) -> str:
        return f"{self.request}/{self.service}"


@dataclass(frozen=True)
class Allocation:
    mode: Mode
    max_batch: int  # the limit, or for adaptive rules the largest batch considered
    objective: Objective | None  # for pipelines: what the partitioner minimises
    reason: str
    batch_rule: BatchRule = "fixed"


def _fits(spec: ServiceSpec, device: DeviceProfile) -> bool:
    return spec.memory_mb <= device.mem_mb


def best_single_latency(spec: ServiceSpec,
                        devices: Sequence[DeviceProfile]) -> tuple[DeviceProfile, float] | None:
    """The device where a lone request finishes soonest, among those it fits on."""
    options = [(latency_at_batch(spec, d, 1), d.id, d) for d in devices if _fits(spec, d)]
    if not options:
        return None
    latency, _, device = min(options)
    return device, latency


def categorise(spec: ServiceSpec, devices: Sequence[DeviceProfile],
               demand: ServiceDemand | None) -> Category:
    """Classify ``spec`` from its hints, its observed traffic and the devices at hand."""
    if demand is not None and demand.rate_hz >= STREAM_MIN_HZ and demand.cv < STEADY_CV:
        request: RequestCategory = "frequency"
        why = (f"frequency-sensitive: a steady stream ({demand.rate_hz:.1f} req/s, "
               f"inter-arrival cv {demand.cv:.2f})")
    elif spec.category == "frequency" or spec.target_rate_hz:
        request = "frequency"
        rate = f" at {spec.target_rate_hz:g} Hz" if spec.target_rate_hz else ""
        why = f"frequency-sensitive: the manifest asks for a stream{rate}"
    else:
        request = "latency"
        why = f"latency-sensitive: each request has a {spec.deadline_ms():.0f} ms deadline"
    deadline = spec.deadline_ms() / 1000
    best = best_single_latency(spec, devices)
    if best is None:
        largest = max((d.mem_mb for d in devices), default=0.0)
        return Category(request, "multi", f"{why}; multi-device: needs {spec.memory_mb:.0f} "
                        f"MB, the largest device offers {largest:.0f} MB")
    device, latency = best
    if latency > deadline:
        return Category(request, "multi", f"{why}; multi-device: its fastest single device "
                        f"({device.id}) takes {latency * 1000:.0f} ms, over the "
                        f"{deadline * 1000:.0f} ms SLO")
    if request == "frequency" and spec.target_rate_hz:
        cost = stage_cost(spec, device)
        rate = spec.max_batch / (cost.time(spec.max_batch * spec.gflop)
                                 + spec.max_batch * node_work_s(spec, device))
        if rate < spec.target_rate_hz:
            return Category(request, "multi", f"{why}; multi-device: one {device.id} "
                            f"sustains {rate:.1f} Hz, under the {spec.target_rate_hz:g} Hz "
                            f"target")
    return Category(request, "single", f"{why}; single-device: fits {device.id} and takes "
                    f"{latency * 1000:.0f} ms of its {deadline * 1000:.0f} ms SLO")


def choose_batch(spec: ServiceSpec, allocation: Allocation,
                 perf_at: Callable[[int], UnitPerf]) -> int:
    """The batch limit of one unit, from ``perf_at(batch)`` (its estimates at a batch).

    Both rules double the batch while the doubled one still adds ``STREAM_BATCH_GAIN``
    to capacity (accelerators batch deeply, CPUs with no gain stay at 1) and keeps a
    request at full batches within a share of its deadline: ``LATENCY_BATCH_SHARE``
    (latency rule) or ``STREAM_BATCH_SHARE`` (throughput rule, streams).
    """
    if allocation.batch_rule == "fixed":
        return allocation.max_batch
    share = LATENCY_BATCH_SHARE if allocation.batch_rule == "latency" else STREAM_BATCH_SHARE
    budget = spec.deadline_ms() / 1000 * share
    batch = 1
    perf = perf_at(1)
    while batch * 2 <= allocation.max_batch:
        bigger = perf_at(batch * 2)
        if bigger.full_latency_s > budget:
            break
        if bigger.capacity_hz < perf.capacity_hz * STREAM_BATCH_GAIN:
            # No throughput for it (a CPU already uses every core on one input): a
            # bigger batch would only make each step, and what waits behind it, longer.
            break
        batch, perf = batch * 2, bigger
    return batch


def allocate(spec: ServiceSpec, category: Category,
             devices: Sequence[DeviceProfile]) -> Allocation:
    """The parallel mode for a category, with how its batch is chosen and why."""
    if category.service == "multi":
        if not spec.layers:
            return Allocation("replicas", spec.max_batch, None,
                              "replicas: needs more than one device but its manifest "
                              "declares no layers to cut, so it runs where it fits best",
                              "latency")
        if category.request == "frequency":
            return Allocation("pipeline_throughput", spec.max_batch, "throughput",
                              "pipeline, micro-batched: stages cut to minimise the slowest "
                              "stage, for rate", "throughput")
        return Allocation("pipeline_latency", spec.max_batch, "latency",
                          "pipeline over the fewest fast devices: stages cut to minimise "
                          "one request's end-to-end time; batch kept within "
                          f"{LATENCY_BATCH_SHARE:.0%} of the SLO", "latency")
    if category.request == "frequency":
        return Allocation("data_parallel", spec.max_batch, None,
                          "data-parallel replicas with dynamic batching sized per device "
                          "(deep on accelerators, shallow on CPUs), load spread by "
                          "expected completion", "throughput")
    return Allocation("replicas", spec.max_batch, None,
                      f"replicas with least-expected-completion routing, batch per device "
                      f"kept within {LATENCY_BATCH_SHARE:.0%} of the SLO", "latency")


def uniform_allocation(spec: ServiceSpec) -> Allocation:
    """Categorisation switched off (the ablation): one mode for every service, replicas
    with the one fixed batch limit, no pipelines."""
    return Allocation("replicas", min(spec.max_batch, DEFAULT_BATCH), None,
                      f"categorisation off: replicas with batch {DEFAULT_BATCH} for every "
                      f"service")
