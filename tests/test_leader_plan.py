"""Categorisation, allocation and the partitioner (pure functions of plain values)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from epara.models.manifest import Manifest, TensorSpec
from epara.node import planning
from epara.node.leader.allocate import (
    DEFAULT_BATCH,
    allocate,
    categorise,
    choose_batch,
    uniform_allocation,
)
from epara.node.leader.estimate import stage_cost, unit_perf
from epara.node.leader.model import (
    DeviceProfile,
    Layer,
    ServiceDemand,
    ServiceSpec,
    Stage,
    Unit,
)
from epara.node.leader.partition import partition, plan_value, proportional_split
from epara.node.leader.workloads import DEVICE_KINDS, TEMPLATES

SERVER, JETSON, PI = (DEVICE_KINDS[k] for k in ("server", "jetson", "pi"))


def test_a_steady_stream_is_frequency_sensitive_whatever_the_hint() -> None:
    cat = categorise(TEMPLATES["classify"], [JETSON], ServiceDemand(30.0, cv=0.1))
    assert cat.request == "frequency" and "steady stream" in cat.reason


def test_random_requests_keep_the_latency_hint() -> None:
    cat = categorise(TEMPLATES["classify"], [JETSON], ServiceDemand(30.0, cv=1.0))
    assert cat.label == "latency/single"
    assert "100 ms deadline" in cat.reason


def test_a_frequency_hint_makes_a_stream() -> None:
    cat = categorise(TEMPLATES["seg-stream"], [JETSON], None)
    assert cat.label == "frequency/single" and "15 Hz" in cat.reason


def test_too_big_for_any_device_is_multi_device() -> None:
    cat = categorise(TEMPLATES["chat-32b"], [SERVER, JETSON], None)
    assert cat.service == "multi" and "needs 22000 MB" in cat.reason


def test_too_slow_on_every_device_is_multi_device() -> None:
    # A 28.6 GFLOP YOLOv8s takes ~480 ms on a Pi 5: over its 300 ms SLO.
    cat = categorise(TEMPLATES["det-stream"], [PI], None)
    assert cat.service == "multi" and "over the 300 ms SLO" in cat.reason
    assert categorise(TEMPLATES["det-stream"], [PI, JETSON], None).service == "single"


def test_allocator_maps_each_category_to_its_mode_with_a_reason() -> None:
    devices = [SERVER, JETSON, PI]
    cases = {
        "classify": "replicas", "seg-stream": "data_parallel", "chat-32b": "pipeline_latency"}
    for name, mode in cases.items():
        spec = TEMPLATES[name]
        got = allocate(spec, categorise(spec, devices, None), devices)
        assert got.mode == mode, (name, got)
        assert got.reason
    stream = TEMPLATES["chat-32b"]
    frequency = categorise(stream, devices, ServiceDemand(5.0, cv=0.1))
    assert allocate(stream, frequency, devices).mode == "pipeline_throughput"
    assert uniform_allocation(stream).mode == "replicas"


def _batch(name: str, device: DeviceProfile, categorised: bool = True) -> int:
    spec = TEMPLATES[name]
    alloc = allocate(spec, categorise(spec, [device], None), [device]) if categorised \
        else uniform_allocation(spec)
    stages = (Stage(device.id, 0, len(spec.layers), spec.memory_mb),)
    return choose_batch(spec, alloc, lambda b: unit_perf(spec, Unit(spec.name, stages, b),
                                                         {device.id: device}))


def test_batch_follows_the_category_and_the_device() -> None:
    # Latency-sensitive on a Pi: every step is compute-bound, a batch only adds latency.
    assert _batch("embed", PI) < DEFAULT_BATCH
    # A stream on a GPU batches deeply (throughput), on a CPU hardly at all.
    assert _batch("seg-stream", SERVER) > DEFAULT_BATCH
    assert _batch("seg-stream", PI) <= 2
    # Categorisation off: the one fixed limit everywhere.
    assert _batch("embed", PI, False) == _batch("seg-stream", SERVER, False) == DEFAULT_BATCH


def test_a_batch_step_costs_t1_times_fixed_plus_linear_share() -> None:
    spec = TEMPLATES["detect"]
    for device in (SERVER, JETSON, PI):
        cost = stage_cost(spec, device)
        t1 = cost.time(spec.gflop) - cost.fixed_s
        t8 = cost.time(8 * spec.gflop) - cost.fixed_s
        f = device.batch_fixed
        assert abs(t8 - t1 * (f + (1 - f) * 8)) < 1e-12
    # A GPU gains several times its throughput from batching, a CPU a few percent.
    gain = {d.id: 8 * (stage_cost(spec, d).time(spec.gflop)) /
            stage_cost(spec, d).time(8 * spec.gflop) for d in (SERVER, PI)}
    assert gain["server"] > 2.5 and gain["pi"] < 1.1


def _device(i: int, gflops: float, mem: float, mbps: float = 1000.0) -> DeviceProfile:
    return DeviceProfile(f"d{i}", "embedded", gflops, gflops / 50, mem, "", mbps, 0.5)


def _brute(spec: ServiceSpec, devices: list[DeviceProfile], objective: str,
           batch: int) -> float | None:
    n = len(spec.layers)
    best = None
    for k in range(1, len(devices) + 1):
        for order in itertools.permutations(devices, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                stages = [(d, bounds[i], bounds[i + 1]) for i, d in enumerate(order)]
                if any(spec.stage_memory_mb(a, e) > d.mem_mb + 1e-9 for d, a, e in stages):
                    continue
                value = plan_value(spec, stages, objective, batch)  # type: ignore[arg-type]
                best = value if best is None else min(best, value)
    return best


@settings(max_examples=60, deadline=None)
@given(layers=st.lists(st.tuples(st.floats(10, 500), st.floats(0.01, 2.0)), min_size=1,
                       max_size=5),
       speeds=st.lists(st.tuples(st.sampled_from([20.0, 200.0, 2000.0]),
                                 st.floats(100, 1500)), min_size=1, max_size=3),
       objective=st.sampled_from(["throughput", "latency"]))
def test_partitioner_matches_brute_force(layers: list[tuple[float, float]],
                                         speeds: list[tuple[float, float]],
                                         objective: str) -> None:
    total = sum(w for w, _ in layers)
    spec = ServiceSpec("m", memory_mb=total * 1.2, weight_mb=total, gflop=40.0, max_batch=4,
                       layers=tuple(Layer(w, 1 / len(layers), out) for w, out in layers))
    devices = [_device(i, g, m) for i, (g, m) in enumerate(speeds)]
    plan = partition(spec, devices, {d.id: d.mem_mb for d in devices},
                     objective, 4)  # type: ignore[arg-type]
    expected = _brute(spec, devices, objective, 4)
    if expected is None:
        assert plan is None
        return
    assert plan is not None
    assert abs(plan.value_s - expected) <= 1e-9 * max(1.0, expected)
    by_id = {d.id: d for d in devices}
    for stage in plan.stages:
        assert stage.memory_mb <= by_id[stage.device].mem_mb + 1e-9
    assert plan.stages[0].first == 0 and plan.stages[-1].end == len(layers)


def test_partitioner_leaves_out_a_device_that_would_slow_the_pipeline() -> None:
    spec = ServiceSpec("m", memory_mb=1000, gflop=50.0, layers=tuple(
        Layer(100, 0.1, 1.0) for _ in range(10)))
    fast, slow = _device(0, 2000.0, 4000), _device(1, 20.0, 4000)
    plan = partition(spec, [slow, fast], {"d0": 4000, "d1": 4000}, "latency")
    assert plan is not None
    assert [s.device for s in plan.stages] == ["d0"]
    assert plan.left_out == ("d1",) and "left out d1" in plan.reason


def test_partitioner_splits_when_memory_forces_it() -> None:
    spec = ServiceSpec("m", memory_mb=3000, gflop=50.0, layers=tuple(
        Layer(300, 0.1, 0.5) for _ in range(10)))
    devices = [_device(i, 2000.0, 1600) for i in range(3)]
    plan = partition(spec, devices, {d.id: d.mem_mb for d in devices}, "throughput", 4)
    assert plan is not None and len(plan.stages) >= 2
    assert all(s.memory_mb <= 1600 for s in plan.stages)
    assert partition(spec, devices[:1], {"d0": 1600}, "throughput") is None


def test_proportional_split_follows_memory() -> None:
    spec = ServiceSpec("m", memory_mb=1000, gflop=50.0, layers=tuple(
        Layer(100, 0.1, 0.5) for _ in range(10)))
    devices = [_device(0, 20.0, 3000), _device(1, 2000.0, 1000)]
    stages = proportional_split(spec, devices, {"d0": 3000, "d1": 1000})
    assert stages is not None
    assert [(s.device, s.first, s.end) for s in stages] == [("d0", 0, 8), ("d1", 8, 10)]


def _manifest_with_cuts(backend: str, positions: str) -> Manifest:
    """A 300 MB model whose manifest lists one candidate cut (as models/split.py records)."""
    analysis = {"format": 1, "positions": positions, "node_count": 10,
                "total_flops": 2e9, "total_weight_bytes": 4e6, "output_bytes": 4096,
                "cuts": [{"position": 5, "activation_bytes": 65536, "flops_before": 1e9,
                          "weight_bytes_before": 2e6}]}
    spec = TensorSpec("x", "float32", (1, 3, 256, 256))
    return Manifest("seg", "segmentation", backend, {"model": f"m.{backend}"}, (spec,),
                    (spec,), 300.0, extra={"stages": analysis})


def test_only_models_a_node_can_cut_are_planned_as_pipelines() -> None:
    small = [replace(PI, id="a", mem_mb=200.0), replace(PI, id="b", mem_mb=200.0)]
    modes = {}
    for backend, positions in (("onnx", "onnx-nodes"), ("tflite", "onnx-nodes"),
                               ("tflite", "tflite-ops")):
        manifest = _manifest_with_cuts(backend, positions)
        entry = planning.catalogue_entry(manifest)
        assert planning.cuttable(manifest) == ("cuts" in entry)
        spec = planning.service_spec("seg", entry)
        category = categorise(spec, small, None)
        assert category.service == "multi"  # 300 MB fits neither 200 MB device
        modes[backend, positions] = allocate(spec, category, small).mode
    assert modes["onnx", "onnx-nodes"] == "pipeline_latency"
    # A TFLite flatbuffer cannot be cut on a device, whatever its manifest claims.
    assert modes["tflite", "onnx-nodes"] == modes["tflite", "tflite-ops"] == "replicas"


def test_node_work_adds_to_latency_and_caps_capacity_on_the_head() -> None:
    """A request's work around the model (decoding, masks) is on the head device: in
    its latency, and busy time no batch shares, so capacity is at most 1 / (run + work)."""
    spec = TEMPLATES["detect"]
    unit = Unit(spec.name, (Stage(PI.id, 0, 0, spec.memory_mb),), max_batch=8)
    bare = unit_perf(spec, unit, {PI.id: PI})
    busy = ServiceSpec(**{**spec.__dict__, "work_ms": {f"@{PI.id}": 40.0}})
    worked = unit_perf(busy, unit, {PI.id: PI})
    assert abs(worked.latency_s - (bare.latency_s + 0.040)) < 1e-12
    assert abs(1 / worked.capacity_hz - (1 / bare.capacity_hz + 0.040)) < 1e-12
    assert worked.use(unit)[PI.id] == bare.use(unit)[PI.id] + 0.040


def test_node_work_on_a_device_that_never_served_scales_with_its_speed() -> None:
    from epara.node.leader.estimate import node_work_s

    spec = ServiceSpec(**{**TEMPLATES["detect"].__dict__,
                          "work_ms": {"@other": 10.0, "*": 10.0 * SERVER.gflops}})
    assert abs(node_work_s(spec, PI) - 0.010 * SERVER.gflops / PI.gflops) < 1e-12
    assert node_work_s(TEMPLATES["detect"], PI) == 0.0  # nothing measured: nothing added


def test_measured_work_is_keyed_by_node_class_and_speed() -> None:
    from types import SimpleNamespace

    from epara.node import planning

    def member(node_id: str, cls: str, gflops: float, work: object) -> SimpleNamespace:
        return SimpleNamespace(node_id=node_id, capabilities={"device_class": cls,
                                                              "gflops": gflops},
                               headline={}, state={"services": {"seg": {"work_ms": work}}})

    got = planning.measured_work_ms([member("a", "pi", 2.0, 30.0),
                                     member("b", "pi", 4.0, 20.0),
                                     member("c", "server", 50.0, float("nan")),
                                     member("d", "server", 50.0, None)])
    assert got == {"seg": {"@a": 30.0, "@b": 20.0, "pi": 30.0, "*": 80.0}}
