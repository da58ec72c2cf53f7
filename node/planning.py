"""From what nodes know (manifests, capabilities, synced state) to the planner's values.

The leader's planning code (``epara.node.leader``) works on plain values: ServiceSpec,
DeviceProfile, ClusterState, Demand. These pure functions build them from a manifest
and from the cluster view, and map a planned stage (a range of the planner's layers)
back to the model's real cut positions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from epara.models.manifest import Manifest
from epara.node.leader.model import (
    ClusterState,
    DeviceProfile,
    DeviceState,
    Layer,
    ServiceDemand,
    ServiceSpec,
)

MB = 1_000_000
# Prompt length the planner assumes for an LLM's prefill when it has seen no traffic.
TYPICAL_PROMPT_TOKENS = 64
TYPICAL_OUTPUT_TOKENS = 48
# Requests ended in the nodes' windows below which a service's attainment is not reported
MIN_ATTAINMENT_SAMPLES = 10


@dataclass(frozen=True)
class CutMap:
    """The model's candidate cut positions; planner layer i spans positions
    [bounds[i], bounds[i + 1])."""

    bounds: tuple[int, ...]

    def positions(self, first: int, end: int) -> tuple[int, int]:
        return self.bounds[first], self.bounds[end]

    def cuts_for(self, stages: Sequence[tuple[int, int]]) -> list[int]:
        """Cut positions between consecutive planned stages [(first, end), ...]."""
        return [self.bounds[first] for first, _ in stages[1:]]


def cuttable(manifest: Manifest) -> bool:
    """Whether a node can build this model's pipeline stages at the cut positions its
    analysis lists (pure): an LLM from its layer ranges, an ONNX graph at node positions,
    a TorchScript encoder at layer boundaries (models/split.py). A TFLite flatbuffer
    cannot be cut on a device, so the leader must not plan a pipeline for it."""
    stages = manifest.extra.get("stages")
    if not isinstance(stages, Mapping) or not stages.get("cuts"):
        return False
    if manifest.task == "text-generation":
        return True
    splitters = {"onnx": "onnx-nodes", "torch": "bert-layers"}
    return splitters.get(manifest.backend, "") == stages.get("positions")


def catalogue_entry(manifest: Manifest) -> dict[str, Any]:
    """What a node tells the leader about a model it can load (in its state record)."""
    hints = manifest.hints
    entry: dict[str, Any] = {
        "mem": manifest.memory_mb, "task": manifest.task, "cat": hints.category,
        "slo": hints.slo_ms, "rate": hints.target_rate_hz,
        "batch": hints.max_batch if hints.batch_axis is not None
        or manifest.task == "text-generation" else 1,
    }
    stages = manifest.extra.get("stages")
    if isinstance(stages, Mapping) and stages.get("cuts"):
        entry["flops"] = float(stages.get("total_flops", 0))
        entry["wbytes"] = float(stages.get("total_weight_bytes", 0))
        entry["out"] = float(stages.get("output_bytes", 0))
        entry["end"] = int(stages.get("node_count", 0))
    # Cut positions only where stages can be built: without them the leader plans
    # replicas (allocate: "declares no layers to cut").
    if isinstance(stages, Mapping) and cuttable(manifest):
        # One row per candidate cut: position, activation bytes, FLOPs and weights before.
        entry["cuts"] = [[int(c["position"]), int(c["activation_bytes"]),
                          float(c["flops_before"]), float(c["weight_bytes_before"])]
                         for c in stages["cuts"]]
    return entry


def cut_map(entry: Mapping[str, Any]) -> CutMap | None:
    cuts = entry.get("cuts")
    if not cuts:
        return None
    return CutMap((0, *(int(c[0]) for c in cuts), int(entry["end"])))


def service_spec(name: str, entry: Mapping[str, Any],
                 measured_ms: Mapping[str, float] | None = None,
                 work_ms: Mapping[str, float] | None = None) -> ServiceSpec:
    """A ServiceSpec from a catalogue entry (see ``catalogue_entry``), calibrated by the
    run times (``measured_ms``) and node work (``measured_work_ms``) nodes measured."""
    is_llm = entry.get("task") == "text-generation"
    flops = float(entry.get("flops", 0.0))
    layers: tuple[Layer, ...] = ()
    cuts = entry.get("cuts") or []
    if cuts and flops > 0:
        rows = [[0, 0, 0.0, 0.0], *cuts,
                [int(entry["end"]), int(entry.get("out", 0)), flops,
                 float(entry.get("wbytes", 0.0))]]
        layers = tuple(
            Layer(weight_mb=max(0.0, (b[3] - a[3]) / MB),
                  compute_share=max(0.0, (b[2] - a[2]) / flops),
                  out_mb=b[1] / MB)
            for a, b in itertools.pairwise(rows))
    gflop = flops / 1e9
    return ServiceSpec(
        name=name,
        memory_mb=float(entry.get("mem", 0.0)),
        gflop=gflop * TYPICAL_PROMPT_TOKENS if is_llm else gflop,
        category=entry.get("cat", "latency"),
        slo_ms=float(entry.get("slo") or 1000.0),
        target_rate_hz=entry.get("rate"),
        gflop_per_token=gflop if is_llm else 0.0,
        mean_output_tokens=TYPICAL_OUTPUT_TOKENS if is_llm else 0.0,
        slo_ms_per_token=200.0 if is_llm else 0.0,
        max_batch=int(entry.get("batch") or 1),
        weight_mb=float(entry["wbytes"]) / MB if entry.get("wbytes") else None,
        layers=layers,
        measured_ms=dict(measured_ms or {}),
        work_ms=dict(work_ms or {}),
    )


def device_profile(node_id: str, capabilities: Mapping[str, Any] | None,
                   headline: Mapping[str, Any], state: Mapping[str, Any]) -> DeviceProfile:
    """A DeviceProfile from a member's capabilities (or its advert's headline) and state."""
    caps = capabilities or {}
    accelerators = caps.get("accelerators") or []
    kinds = sorted({a.get("kind", "") for a in accelerators if isinstance(a, Mapping)})
    budget = state.get("budget_mb")
    if budget is None:
        budget = state.get("mem_free_mb") or caps.get("mem_free_mb") or headline.get("mem", 0)
    return DeviceProfile(
        id=node_id,
        device_class=str(caps.get("device_class") or headline.get("cls") or "server"),
        gflops=float(caps.get("gflops") or headline.get("gf") or 1.0),
        mem_bandwidth_gbs=float(caps.get("mem_bandwidth_gbs") or 5.0),
        mem_mb=float(budget),
        accelerator=kinds[0] if kinds else "",
    )


def cluster_state(members: Iterable[Any], now: float) -> ClusterState:
    """ClusterState from the members of a cluster view (``peer.membership.Member``)."""
    devices = {}
    for member in members:
        state = member.state or {}
        services = state.get("services") or {}
        devices[member.node_id] = DeviceState(
            profile=device_profile(member.node_id, member.capabilities, member.headline,
                                   state),
            alive=member.status != "suspect",
            load=float(state.get("load") or 0.0),
            queues={name: int(s.get("queue") or 0) for name, s in services.items()},
            latency_ms={name: float(s["p50_ms"]) for name, s in services.items()
                        if s.get("p50_ms") is not None},
            busy=_share(state.get("cpu_busy")),
        )
    return ClusterState(devices, now)


def _share(value: Any) -> float | None:
    """A published share in [0, 1], or None for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    return None


def measured_ms(members: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Per service: each serving node's measured run time (key "@" + node id), and per
    device class the slowest among the nodes of that class that serve it (for nodes
    that have not run it yet: the estimate must hold on every such device)."""
    return _measured(members, "run_ms")


def measured_work_ms(members: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Per service: each serving node's work per request around the model run (key "@"
    + node id; per device class the slowest), and under "*" the largest of those times
    the node's speed (ms x GFLOP/s), from which a device that has not served the service
    yet is estimated (``estimate.node_work_s``)."""
    return _measured(members, "work_ms", normalised="*")


def _measured(members: Iterable[Any], key: str,
              normalised: str | None = None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for member in members:
        state = member.state or {}
        profile = device_profile(member.node_id, member.capabilities, member.headline, state)
        for name, record in (state.get("services") or {}).items():
            value = record.get(key)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                continue
            measured = out.setdefault(name, {})
            measured[f"@{member.node_id}"] = float(value)
            measured[profile.device_class] = max(measured.get(profile.device_class, 0.0),
                                                 float(value))
            if normalised is not None:
                measured[normalised] = max(measured.get(normalised, 0.0),
                                           float(value) * profile.gflops)
    return out


def demand(members: Iterable[Any]) -> dict[str, ServiceDemand]:
    """Demand per service over the nodes that received its requests: rates and burst
    rates add up (bursts on different nodes may coincide), the gaps' variability is
    the largest any node saw, and the SLO attainment is that of every request that
    ended in the nodes' windows (each counted by the node it entered at)."""
    rates: dict[str, float] = {}
    peaks: dict[str, float] = {}
    cvs: dict[str, float] = {}
    slos: dict[str, list[tuple[float, float]]] = {}  # (rate, median deadline) per node
    met: dict[str, int] = {}  # requests within their deadline, over the nodes' windows
    ended: dict[str, int] = {}
    for member in members:
        for name, seen in ((member.state or {}).get("demand") or {}).items():
            if isinstance(seen, int | float):  # a node from before bursts were reported
                seen = {"rate": seen, "peak": seen, "cv": 1.0}
            rate = float(seen["rate"])
            rates[name] = rates.get(name, 0.0) + rate
            peaks[name] = peaks.get(name, 0.0) + float(seen.get("peak", rate))
            cvs[name] = max(cvs.get(name, 0.0), float(seen.get("cv", 1.0)))
            if seen.get("slo_ms"):
                slos.setdefault(name, []).append((rate, float(seen["slo_ms"])))
            done = int(seen.get("ended") or 0)
            if done > 0:
                met[name] = met.get(name, 0) + min(done, int(seen.get("met") or 0))
                ended[name] = ended.get(name, 0) + done
    out = {}
    for name, rate in rates.items():
        weighted = slos.get(name)
        slo = sum(r * s for r, s in weighted) / sum(r for r, _ in weighted) \
            if weighted and sum(r for r, _ in weighted) > 0 else None
        # A handful of requests is no measurement: one late chat turn out of three is
        # not "33% below the estimate" (the correction would chase noise).
        attained = met.get(name, 0) / ended[name] \
            if ended.get(name, 0) >= MIN_ATTAINMENT_SAMPLES else None
        out[name] = ServiceDemand(rate, cvs[name], None, peaks[name], slo, attained)
    return out


def with_observed_slo(spec: ServiceSpec, demand: ServiceDemand | None) -> ServiceSpec:
    """``spec`` planned for the deadlines its requests actually carry (rate-weighted
    over the nodes), when they carry one: the manifest's SLO is the model author's
    guess, the clients' deadlines are what goodput counts. An LLM's time to first
    token and per-token budget scale together to the observed whole-answer deadline."""
    if demand is None or not demand.slo_ms:
        return spec
    factor = demand.slo_ms / spec.deadline_ms()
    return replace(spec, slo_ms=spec.slo_ms * factor,
                   slo_ms_per_token=spec.slo_ms_per_token * factor)


def catalogue(members: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Every model some member can load, and which members have it."""
    models: dict[str, dict[str, Any]] = {}
    for member in members:
        for name, entry in ((member.state or {}).get("catalogue") or {}).items():
            known = models.setdefault(name, {"entry": entry, "nodes": []})
            known["nodes"].append(member.node_id)
    return models
