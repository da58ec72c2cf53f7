"""The simulator (a ground truth the planner cannot see), the prior systems' placement
rules, and the goodput search. Small fleets only: whether epara wins is a benchmark
question (bench/goodput_sim.py), not a test."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest

from epara.node.cli import main
from epara.node.lab.goodput import K_MAX, K_MIN, BenchConfig, run, search
from epara.node.leader.baselines import (
    KServePolicy,
    TritonPolicy,
    alpaserve_placement,
    bin_pack,
    exo_placement,
    hpa_desired,
    petals_chains,
    petals_servers,
    replicate_where_it_fits,
)
from epara.node.leader.estimate import stage_cost
from epara.node.leader.model import (
    ClusterState,
    DeviceState,
    Placement,
    ServiceDemand,
    ServicePlan,
    ServiceSpec,
    Stage,
    Unit,
)
from epara.node.leader.policies import POLICIES, make_policy
from epara.node.leader.scheduler import Decision
from epara.node.leader.sim import (
    OUTCOMES,
    SimConfig,
    error_factor,
    least_connections_router,
    simulate,
)
from epara.node.leader.workloads import (
    DEVICE_KINDS,
    TEMPLATES,
    Request,
    WorkloadShape,
    catalogue,
    fleet,
    generate,
    read_trace,
    write_trace,
)

DEVICES = tuple(fleet(8, (("jetson", 0.25), ("pi", 0.75))))
SERVICES = catalogue(8, 5, (("chat-1b", 0.3), ("classify", 0.4), ("detect", 0.3)))
REQUESTS = tuple(generate(SERVICES, WorkloadShape(duration_s=30, rate_hz=40, streams=0), 5,
                          len(DEVICES)))


class Fixed:
    """A policy that always wants one placement, and records what it was shown."""

    def __init__(self, units: Mapping[str, tuple[Unit, ...]], router: str = "epara") -> None:
        self.name, self.router = "fixed", router
        self.plans = {n: ServicePlan(n, "-", "replicas", u, "") for n, u in units.items()}
        self.seen: list[tuple[float, dict[str, ServiceDemand], Mapping[str, ServiceSpec]]] = []

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        self.seen.append((now, dict(demand), specs))
        if dict(current.plans).keys() == self.plans.keys():
            return current, ()
        return Placement(current.version + 1, self.plans), ()


def _one(service: str, device: str, batch: int = 1) -> Unit:
    return Unit(service, (Stage(device, 0, 0, 10.0),), batch)


# --- the engine -----------------------------------------------------------------------

def test_every_request_is_accounted_once_under_every_policy() -> None:
    config = SimConfig(fail_at_s=8.0, fail=(DEVICES[0].id,), warmup_s=4.0)
    requests = [r for r in REQUESTS if r.t < 14.0]
    measured = sum(1 for r in requests if r.t >= config.warmup_s)
    for system in POLICIES:
        result = simulate(system, requests, SERVICES, DEVICES, config)
        assert result.accounted == result.total == len(requests), system
        assert set(result.counts) == set(OUTCOMES)
        assert sum(result.counts.values()) == measured, system


def test_simulation_is_deterministic_per_seed() -> None:
    a = simulate("epara", REQUESTS, SERVICES, DEVICES, SimConfig(seed=3))
    b = simulate("epara", REQUESTS, SERVICES, DEVICES, SimConfig(seed=3))
    assert (a.counts, a.timeline) == (b.counts, b.timeline)


def test_error_factors_are_seeded_lognormal_per_device_and_model() -> None:
    draws = [error_factor(7, f"pi-{i}", "m", 0.3) for i in range(400)]
    assert error_factor(7, "pi-1", "m", 0.3) == draws[1]
    assert error_factor(8, "pi-1", "m", 0.3) != draws[1]
    logs = [math.log(x) for x in draws]
    mean = sum(logs) / len(logs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
    assert abs(mean) < 0.06 and 0.25 < sd < 0.35


def _contention(kind: str) -> dict[str, int]:
    """Two models on one device, one request each at t=0, deadline 1.5x a lone run."""
    device = DEVICE_KINDS[kind]
    spec = TEMPLATES["detect"]
    solo = stage_cost(spec, device).time(spec.gflop)
    services = {n: ServiceSpec(n, memory_mb=10, gflop=spec.gflop, slo_ms=solo * 1500,
                               overhead_ms=spec.overhead_ms) for n in ("a", "b")}
    requests = [Request(0.0, "a", solo * 1500, origin=0), Request(0.0, "b", solo * 1500,
                                                                  origin=0)]
    policy = Fixed({n: (_one(n, device.id),) for n in services})
    result = simulate(policy, requests, services, [device],
                      SimConfig(warmup_s=0.0, error_sigma=0.0, jitter_sigma=0.0))
    return dict(result.counts)


def test_a_cpu_shares_its_cores_and_an_accelerator_runs_one_step_at_a_time() -> None:
    # Processor sharing: both finish at twice a lone run, both late.
    assert _contention("pi")["late"] == 2
    # One after the other: the first in time, the second late.
    gpu = _contention("server")
    assert (gpu["good"], gpu["late"]) == (1, 1)


def test_the_leader_sees_published_measurements_and_attainment_never_the_truth() -> None:
    device = DEVICE_KINDS["jetson"]
    spec = replace_name(TEMPLATES["classify"], "c")
    requests = [Request(0.05 * i, "c", 100.0, origin=0) for i in range(400)]
    policy = Fixed({"c": (_one("c", device.id, 8),)})
    simulate(policy, requests, {"c": spec}, [device],
             SimConfig(warmup_s=0.0, error_sigma=0.3, jitter_sigma=0.0, seed=4))
    first, *_, last = policy.seen
    assert first[2]["c"].measured_ms == {}  # nothing measured yet at t=0
    assert "c" not in first[1] or first[1]["c"].attained is None
    truth = error_factor(4, device.id, "c", 0.3)
    nominal_ms = stage_cost(spec, device).time(spec.gflop) * 1000
    published = last[2]["c"].measured_ms[f"@{device.id}"]
    assert published == pytest.approx(truth * nominal_ms, rel=0.05)
    assert last[1]["c"].attained == pytest.approx(1.0)


def replace_name(spec: ServiceSpec, name: str) -> ServiceSpec:
    from dataclasses import replace
    return replace(spec, name=name)


def test_measurement_shrinks_the_estimation_error() -> None:
    result = simulate("epara", REQUESTS, SERVICES, DEVICES, SimConfig(seed=2))
    e = result.estimation
    assert e.pairs > 0
    assert e.measured_median < e.prior_median


def test_least_connections_breaks_ties_at_random_not_by_name() -> None:
    import random
    sim = SimpleNamespace(rng=random.Random(1))
    pi = SimpleNamespace(live=0, waiting=(), name="a-pi")
    t4 = SimpleNamespace(live=0, waiting=(), name="b-t4")
    chosen = {least_connections_router(sim, 0, [pi, t4]).name  # type: ignore[arg-type]
              for _ in range(20)}
    assert chosen == {"a-pi", "b-t4"}
    t4.live = 3
    assert least_connections_router(sim, 0, [pi, t4]) is pi  # type: ignore[arg-type]


def test_trace_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    write_trace(path, REQUESTS[:50])
    back = read_trace(path)
    assert [(r.service, r.output_tokens, r.origin) for r in back] == \
        [(r.service, r.output_tokens, r.origin) for r in REQUESTS[:50]]
    assert all(abs(a.t - b.t) < 1e-5 for a, b in zip(back, REQUESTS[:50], strict=True))


def test_a_trace_naming_an_unknown_service_is_one_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    path = tmp_path / "trace.jsonl"
    write_trace(path, [Request(0.0, "no-such-model", 100.0)])
    with pytest.raises(SystemExit) as exc:
        main(["bench", "goodput", "--trace", str(path)])
    message = str(exc.value)
    assert "no-such-model" in message and "\n" not in message
    with pytest.raises(ValueError, match="unknown service"):
        simulate("epara", [Request(0.0, "no-such-model", 100.0)], SERVICES, DEVICES)


# --- the prior systems' placement rules --------------------------------------------------

def test_hpa_follows_the_ratio_to_its_target_outside_its_tolerance() -> None:
    assert hpa_desired(2, 0.8, 10) == 2  # at target
    assert hpa_desired(2, 0.85, 10) == 2  # within 10%
    assert hpa_desired(2, 1.6, 10) == 4
    assert hpa_desired(4, 0.2, 10) == 1
    assert hpa_desired(2, 8.0, 5) == 5  # capped


def test_bin_packing_takes_the_fullest_device_that_fits_by_memory_only() -> None:
    devices = [DEVICE_KINDS["server"], DEVICE_KINDS["pi"]]
    spec = TEMPLATES["detect"]
    free = {"server": 10000.0, "pi": 100.0}
    assert bin_pack(spec, devices, free, set()).id == "pi"  # type: ignore[union-attr]
    free["pi"] = 50.0
    assert bin_pack(spec, devices, free, set()).id == "server"  # type: ignore[union-attr]
    assert bin_pack(spec, devices, free, {"server"}) is None


def _state(devices: list, dead: tuple[str, ...] = ()) -> ClusterState:
    return ClusterState({d.id: DeviceState(d, alive=d.id not in dead) for d in devices})


def test_kserve_starts_at_one_replica_scales_on_utilisation_and_reschedules() -> None:
    devices = fleet(4, (("pi", 1.0),))
    specs = {"d": replace_name(TEMPLATES["detect"], "d")}
    policy = KServePolicy()
    placement, _ = policy.place(Placement(), _state(devices), {}, specs, 0.0)
    (unit,) = placement.units_of("d")
    assert unit.max_batch == 1
    # Observed load far beyond one Pi: the autoscaler adds replicas at its next sync.
    busy = {"d": ServiceDemand(40.0)}
    placement, _ = policy.place(placement, _state(devices), busy, specs, 5.0)
    assert len(placement.units_of("d")) == 1  # not yet: the HPA syncs every 15 s
    placement, _ = policy.place(placement, _state(devices), busy, specs, 15.0)
    assert len(placement.units_of("d")) == 4
    # A node dies: its pod is re-created elsewhere... if there is an elsewhere.
    victim = placement.units_of("d")[0].head
    placement, _ = policy.place(placement, _state(devices, (victim,)), busy, specs, 16.0)
    assert victim not in {u.head for u in placement.units_of("d")}
    assert len(placement.units_of("d")) == 3


def test_replicate_where_it_fits_is_popularity_ordered_and_memory_bound() -> None:
    devices = fleet(2, (("pi4g", 1.0),))  # 2,800 MB each
    specs = {n: replace_name(TEMPLATES["chat-1b"], n) for n in ("a", "b")}  # 1,300 MB
    units = replicate_where_it_fits(specs, devices, {"b": 5.0, "a": 1.0}, 8)
    assert [len(units["a"]), len(units["b"])] == [2, 2]
    one = fleet(1, (("pi4g", 1.0),))
    units = replicate_where_it_fits(specs, one, {"b": 5.0, "a": 1.0}, 8)
    assert [len(units["a"]), len(units["b"])] == [1, 1]
    small = replicate_where_it_fits({"a": specs["a"], "b": replace_name(
        TEMPLATES["chat-3b"], "b")}, one, {"b": 5.0}, 8)
    assert len(small["b"]) == 1 and not small["a"]  # the popular one got the room


def test_triton_learns_popularity_online() -> None:
    devices = fleet(1, (("pi4g", 1.0),))
    specs = {"a": replace_name(TEMPLATES["chat-3b"], "a"),
             "b": replace_name(TEMPLATES["chat-3b"], "b")}  # one fits, not two
    policy = TritonPolicy()
    placement, _ = policy.place(Placement(), _state(devices), {}, specs, 0.0)
    assert list(placement.plans) == ["a"]  # nothing observed: by name
    placement, _ = policy.place(placement, _state(devices), {"b": ServiceDemand(3.0)},
                                specs, 5.0)
    assert list(placement.plans) == ["b"]  # the first demand seen re-places at once
    assert all(u.max_batch == 8 for u in placement.units())


def test_alpaserve_gives_the_busy_model_more_groups() -> None:
    devices = fleet(6, (("jetson", 1.0),))
    specs = {"hot": replace_name(TEMPLATES["detect"], "hot"),
             "cold": replace_name(TEMPLATES["detect"], "cold")}
    units = alpaserve_placement(specs, devices, {"hot": 600.0, "cold": 5.0})
    assert len(units["hot"]) > len(units["cold"]) >= 1
    used: dict[str, float] = {}
    for u in (u for us in units.values() for u in us):
        for s in u.stages:
            used[s.device] = used.get(s.device, 0.0) + s.memory_mb
    assert all(used[d.id] <= d.mem_mb for d in devices if d.id in used)


def test_exo_splits_each_model_over_the_ring_by_memory() -> None:
    devices = [DEVICE_KINDS["jetson"], DEVICE_KINDS["pi4g"]]  # 13,000 and 2,800 MB
    spec = replace_name(TEMPLATES["chat-8b"], "m")
    units = exo_placement({"m": spec}, devices, {})
    (unit,) = units["m"]
    assert unit.devices == ("jetson", "pi4g") and unit.max_batch == 1
    layers = [s.end - s.first for s in unit.stages]
    assert sum(layers) == len(spec.layers)
    assert layers[0] / sum(layers) == pytest.approx(13000 / 15800, abs=0.05)


def test_petals_balances_blocks_and_chains_cover_them_in_order() -> None:
    devices = fleet(4, (("nano", 1.0),))  # 6,000 MB each
    spec = replace_name(TEMPLATES["chat-14b"], "m")  # 10,500 MB: two nanos per copy
    servers = petals_servers({"m": spec}, devices, {"m": 1.0})["m"]
    cover = [0] * len(spec.layers)
    for _, first, end in servers:
        for b in range(first, end):
            cover[b] += 1
    # 4 servers x 27 blocks over 48: every block has the floor of the average, 2.
    assert min(cover) == sum(cover) // len(cover) == 2
    chains = petals_chains(spec, servers)
    assert chains
    for chain in chains:
        assert chain.stages[0].first == 0 and chain.stages[-1].end == len(spec.layers)
        assert all(a.end == b.first for a, b in zip(chain.stages, chain.stages[1:],
                                                     strict=False))


def test_every_policy_name_makes_a_fresh_policy() -> None:
    for name in POLICIES:
        policy = make_policy(name)
        assert policy.name == name and policy.router
        assert make_policy(name) is not policy
    for name in ("epara", "one-replica", "replicate-all", "pipeline-all"):
        assert name in POLICIES
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("nope")


# --- the goodput search and report ---------------------------------------------------------

def test_search_finds_the_highest_load_that_attains() -> None:
    for edge in range(K_MIN, K_MAX + 1):
        calls: list[int] = []

        def attains(k: int, edge: int = edge, calls: list[int] = calls) -> bool:
            calls.append(k)
            return k <= edge

        assert search(attains) == edge
        assert len(calls) <= 8
    assert search(lambda k: False) is None
    assert search(lambda k: True) == K_MAX


def test_the_report_carries_the_headline_ratios() -> None:
    trace = [r for r in generate(catalogue(6, 1), WorkloadShape(duration_s=8, rate_hz=6,
                                                                streams=0), 1, 4)]
    report = run(BenchConfig(systems=("epara", "epara-no-categories", "kserve"), jobs=1),
                 trace, devices=4, services=6)
    for key in ("goodput_ratio_vs_best_prior", "min_ratio_any_workload",
                "ratio_vs_best_baseline"):
        assert key in report
    row = report["mixes"]["trace"]["seeds"]["1"]["systems"]["kserve"]
    assert {"goodput90_hz", "goodput99_hz", "x1", "curve"} <= set(row)
