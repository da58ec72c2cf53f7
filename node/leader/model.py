"""The planning vocabulary: devices, services, demand, placements, cluster state.

Every type here is a frozen dataclass. Mapping fields are read, never mutated, by the
functions of this package; a decision is always a new value. That is what lets the same
code run on the leader (fed from the synced cluster view) and inside the simulator (fed
from simulated devices) without either knowing about the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

RequestCategory = Literal["latency", "frequency"]
ServiceCategory = Literal["single", "multi"]
Mode = Literal["replicas", "data_parallel", "pipeline_throughput", "pipeline_latency"]
MODES: tuple[Mode, ...] = ("replicas", "data_parallel", "pipeline_throughput",
                           "pipeline_latency")


@dataclass(frozen=True)
class DeviceProfile:
    """What one device can do, as the planner needs it (all effective, not peak, speeds)."""

    id: str
    device_class: str  # "server" | "embedded" | "microcomputer" (peer/capabilities.py)
    gflops: float  # sustained GFLOP/s of the device's best target
    mem_bandwidth_gbs: float  # GB/s: memory-bound steps (LLM decode) read all weights
    mem_mb: float  # memory the node may give to models
    accelerator: str = ""  # "cuda", "jetson", "npu" or ""
    link_mbps: float = 1000.0  # network link, megabits per second
    link_latency_ms: float = 0.5  # one way, to a typical peer
    # Share of a batch-1 compute step that a larger batch does not add to: a step of b
    # passes takes t1 * (f + (1 - f) * b). GPUs leave most of their cores idle on one
    # small input (f ~0.6-0.8, so batching multiplies throughput); a CPU runtime already
    # spreads one input over every core (f ~0.05, batching adds little).
    batch_fixed: float = 0.0

    def profile_key(self) -> tuple[Any, ...]:
        """Devices with equal keys are interchangeable for planning (same speed and size)."""
        return (self.device_class, self.gflops, self.mem_bandwidth_gbs, self.mem_mb,
                self.accelerator, self.link_mbps, self.link_latency_ms, self.batch_fixed)

    def transfer_s(self, mb: float) -> float:
        """Seconds to move ``mb`` megabytes off this device to a peer."""
        return self.link_latency_ms / 1000 + mb * 8 / self.link_mbps


@dataclass(frozen=True)
class Layer:
    """One block of a splittable model; stages are contiguous ranges of these."""

    weight_mb: float
    compute_share: float  # this layer's fraction of one pass's FLOPs
    out_mb: float  # activation that crosses a cut after this layer, per request per pass


@dataclass(frozen=True)
class ServiceSpec:
    """A model served by the cluster, with the costs the planner estimates from.

    A request is one pass through the model (vision, embeddings) or, for an LLM, one
    prefill pass plus one pass per output token. A step runs a batch of passes; its time
    is a roofline: the larger of compute (FLOPs / device speed) and weight reads (weights
    / memory bandwidth), plus a fixed overhead. So batching helps exactly where weight
    reads dominate (LLM decode, GPUs) and little where compute does (CPUs on vision).
    """

    name: str
    memory_mb: float  # weights plus working memory (activations, KV cache) on one device
    gflop: float  # first pass of a request (the prefill for an LLM)
    category: RequestCategory = "latency"  # the manifest's hint
    slo_ms: float = 1000.0  # default per-request deadline (a request may carry its own)
    target_rate_hz: float | None = None  # frequency-sensitive: the stream rate it must keep
    gflop_per_token: float = 0.0  # LLM: each decode pass
    mean_output_tokens: float = 0.0  # LLM: typical output length, for planning
    slo_ms_per_token: float = 0.0  # LLM: deadline grows with the answer's length
    max_batch: int = 1
    overhead_ms: float = 0.5  # per step: kernel launches, runtime dispatch
    input_mb: float = 0.0  # request payload sent to a remote replica
    weight_mb: float | None = None  # None: equal to memory_mb
    layers: tuple[Layer, ...] = ()  # empty: the model cannot be split into stages
    # batch-1 pass measured per device class, or per device under "@" + its id
    measured_ms: Mapping[str, float] = field(default_factory=dict)
    # a request's work on its unit's head device around the passes (decoding an image,
    # making its mask): measured per device ("@" + id), per class, and under "*" as
    # ms x GFLOP/s for devices that have not served it yet. It does not batch.
    work_ms: Mapping[str, float] = field(default_factory=dict)
    # Every step takes this many times the cost model's (and the measurement's) time: the
    # leader's correction from observed SLO attainment (policies.py, docs/epara-core.md)
    time_scale: float = 1.0

    @property
    def weights(self) -> float:
        return self.memory_mb if self.weight_mb is None else self.weight_mb

    @property
    def is_llm(self) -> bool:
        return self.gflop_per_token > 0

    @property
    def passes(self) -> float:
        """Passes of a typical request: the prefill plus one per output token."""
        return 1 + (self.mean_output_tokens if self.is_llm else 0)

    def deadline_ms(self, output_tokens: float | None = None) -> float:
        tokens = self.mean_output_tokens if output_tokens is None else output_tokens
        return self.slo_ms + self.slo_ms_per_token * tokens

    def stage_memory_mb(self, first: int, end: int) -> float:
        """Memory of layers [first, end): their weights plus a proportional share of the
        working memory (activations and KV cache scale with the layers a stage holds)."""
        if not self.layers:
            return self.memory_mb
        weights = sum(layer.weight_mb for layer in self.layers[first:end])
        share = sum(layer.compute_share for layer in self.layers[first:end])
        return weights + max(0.0, self.memory_mb - self.weights) * share


@dataclass(frozen=True)
class ServiceDemand:
    rate_hz: float  # observed requests per second
    cv: float = 1.0  # coefficient of variation of inter-arrival gaps: 1 Poisson, <0.5 steady
    mean_output_tokens: float | None = None  # LLM: observed, overrides the spec's guess
    peak_hz: float | None = None  # the rate its busy seconds reach (leader/demand.py)
    slo_ms: float | None = None  # the deadline its requests carry (median), if they do
    # Fraction of the window's finished requests that met their deadline, as the nodes
    # measured it (None: nothing finished yet). The policy compares it with its own
    # estimate and corrects itself; the simulator's leader fills it the same way.
    attained: float | None = None

    @property
    def load_hz(self) -> float:
        """The rate to size capacity for: the bursts', not the average second's."""
        return max(self.rate_hz, self.peak_hz or 0.0)


Demand = Mapping[str, ServiceDemand]


@dataclass(frozen=True)
class Stage:
    device: str
    first: int  # first layer (0 for a whole-model replica)
    end: int  # one past the last layer (0 for a model without a layer list)
    memory_mb: float


@dataclass(frozen=True)
class Unit:
    """One serving instance: a replica (one stage) or a pipeline (several stages)."""

    service: str
    stages: tuple[Stage, ...]
    max_batch: int = 1

    @property
    def id(self) -> str:
        return f"{self.service}@{'+'.join(s.device for s in self.stages)}"

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def head(self) -> str:
        return self.stages[0].device

    @property
    def is_pipeline(self) -> bool:
        return len(self.stages) > 1


@dataclass(frozen=True)
class ServicePlan:
    service: str
    category: str  # e.g. "latency/single"
    mode: Mode
    units: tuple[Unit, ...]
    reason: str  # why this category, mode and placement, for `epara plan`


@dataclass(frozen=True)
class Placement:
    """The leader's desired placement; published with its version, folded by reconcilers."""

    version: int = 0
    plans: Mapping[str, ServicePlan] = field(default_factory=dict)

    def units(self) -> Iterator[Unit]:
        for name in sorted(self.plans):
            yield from self.plans[name].units

    def units_of(self, service: str) -> tuple[Unit, ...]:
        plan = self.plans.get(service)
        return () if plan is None else plan.units

    def memory_used(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for unit in self.units():
            for stage in unit.stages:
                used[stage.device] = used.get(stage.device, 0.0) + stage.memory_mb
        return used

    def to_dict(self) -> dict[str, Any]:
        """Wire form (plain CBOR/JSON types) for broadcasting and `epara plan --json`."""
        return {"version": self.version, "services": [
            {"service": p.service, "category": p.category, "mode": p.mode,
             "reason": p.reason,
             "units": [{"max_batch": u.max_batch,
                        "stages": [[s.device, s.first, s.end, s.memory_mb]
                                   for s in u.stages]} for u in p.units]}
            for _, p in sorted(self.plans.items())]}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Placement:
        plans = {}
        for p in data["services"]:
            units = tuple(
                Unit(p["service"], tuple(Stage(str(d), int(a), int(b), float(m))
                                         for d, a, b, m in u["stages"]), int(u["max_batch"]))
                for u in p["units"])
            plans[p["service"]] = ServicePlan(p["service"], p["category"], p["mode"], units,
                                              p["reason"])
        return Placement(int(data["version"]), plans)


@dataclass(frozen=True)
class DeviceState:
    """One device as the synced state record describes it."""

    profile: DeviceProfile
    alive: bool = True
    load: float = 0.0  # utilisation 0..1
    queues: Mapping[str, int] = field(default_factory=dict)  # service -> requests queued
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # service -> recent p50
    # The share of its CPUs the device measured busy (node/cpumeter.py), None unknown
    busy: float | None = None


@dataclass(frozen=True)
class ClusterState:
    devices: Mapping[str, DeviceState]
    time: float = 0.0

    def alive(self) -> list[DeviceProfile]:
        return [d.profile for _, d in sorted(self.devices.items()) if d.alive]

    def with_device(self, state: DeviceState) -> ClusterState:
        devices = dict(self.devices)
        devices[state.profile.id] = state
        return replace(self, devices=devices)
