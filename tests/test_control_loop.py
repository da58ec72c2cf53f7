"""The leader's loop from measurement to decision: observed attainment corrects the
estimates (policies.CorrectionLaw), cold start (scheduler.cold_start_choice) and the
nodes' demand records (planning.demand). Pure: no processes, no sockets."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from epara.node import planning
from epara.node.leader.model import (
    ClusterState,
    DeviceProfile,
    DeviceState,
    Placement,
    ServiceDemand,
    ServiceSpec,
)
from epara.node.leader.policies import CorrectionLaw, EparaPolicy, corrected_scale
from epara.node.leader.scheduler import SchedulerConfig, estimated_attainment, schedule

# A server-, a Jetson- and a Pi-class host, as on the emulated bed.
DEVICES = (
    DeviceProfile("pi", "microcomputer", 4.0, 4.0, 1024),
    DeviceProfile("server", "server", 40.0, 20.0, 4096),
    DeviceProfile("jetson", "embedded", 15.0, 10.0, 2048),
)
STATE = ClusterState({d.id: DeviceState(d) for d in DEVICES})
CHAT = ServiceSpec("chat", 300.0, 0.4, "latency", slo_ms=300.0)
CAMERA = ServiceSpec("camera", 50.0, 0.2, "frequency", slo_ms=150.0, target_rate_hz=30.0)
SPECS = {"chat": CHAT, "camera": CAMERA}


def test_correction_law_moves_toward_the_observation_with_damping() -> None:
    law = CorrectionLaw()
    assert corrected_scale(1.0, 0.9, 0.88, law) == 1.0  # inside the dead band
    up = corrected_scale(1.0, 0.9, 0.3, law)
    assert 1.0 < up <= law.step  # optimistic estimate: slower, at most one step
    down = corrected_scale(2.0, 0.5, 0.9, law)
    assert 2.0 / law.step <= down < 2.0
    # Asymmetric: an equal error downward moves less than upward.
    assert corrected_scale(1.0, 0.5, 0.8, law) > 1 / corrected_scale(1.0, 0.8, 0.5, law)
    assert corrected_scale(law.hi, 1.0, 0.0, law) == law.hi
    assert corrected_scale(law.lo, 0.0, 1.0, law) == law.lo


def test_cold_start_puts_a_latency_service_on_the_fastest_device() -> None:
    placement, decisions = schedule(Placement(), STATE, {}, {"chat": CHAT}, 0.0)
    (unit,) = placement.units_of("chat")
    assert unit.head == "server"
    assert [d.action for d in decisions] == ["standby"]


def test_cold_start_puts_a_stream_where_its_rate_is_sustained() -> None:
    # The Pi cannot keep 30 fps of a 0.2 GFLOP model; the Jetson-class host can.
    placement, _ = schedule(Placement(), STATE, {}, {"camera": CAMERA}, 0.0)
    (unit,) = placement.units_of("camera")
    assert unit.head != "pi"


def _world_attainment(placement: Placement, demand: dict[str, ServiceDemand],
                      truth: float) -> dict[str, float]:
    """What the nodes would measure when every step really takes ``truth`` times the
    measured run time (a neighbour the measurements missed)."""
    real = {n: replace(s, time_scale=truth) for n, s in SPECS.items()}
    return estimated_attainment(placement, STATE, demand, real)


def test_the_loop_converges_without_flapping_and_estimates_match_measurement() -> None:
    policy = EparaPolicy()
    base = {"chat": ServiceDemand(6.0, 1.0), "camera": ServiceDemand(30.0, 0.1)}
    placement = Placement()
    history = []
    now = 0.0
    observed: dict[str, float] = {}
    for _ in range(10):
        demand = {n: replace(d, attained=observed.get(n)) for n, d in base.items()}
        placement, _ = policy.place(placement, STATE, demand, SPECS, now)
        history.append(sorted((u.id, u.max_batch) for u in placement.units()))
        observed = _world_attainment(placement, base, truth=3.0)
        now += 6.0  # longer than the settle time: every decision sees a new window
    # Settled: the last decisions keep one placement (no A B A B).
    assert history[-1] == history[-2] == history[-3]
    for a, b, c in zip(history, history[1:], history[2:], strict=False):
        assert not (a == c and a != b), "flapped between two placements"
    for name, measured in observed.items():
        assert abs(policy.estimates[name] - measured) <= 0.10, name
    assert policy.scales["camera"] > 1.5  # it learned the steps are slower


def test_a_service_below_its_target_gets_capacity_in_the_next_decision() -> None:
    policy = EparaPolicy()
    demand = {"chat": ServiceDemand(8.0, 1.0), "camera": ServiceDemand(30.0, 0.1)}
    first, _ = policy.place(Placement(), STATE, demand, SPECS, 0.0)
    assert policy.estimates["camera"] > 0.9
    low = {**demand, "camera": replace(demand["camera"], attained=0.3)}
    second, decisions = policy.place(first, STATE, low, SPECS, 10.0)
    before = sum(1 for _ in first.units_of("camera"))
    after = sum(1 for _ in second.units_of("camera"))
    assert after > before, decisions
    assert policy.scales["camera"] > 1.0


def test_nodes_demand_records_aggregate_into_attainment() -> None:
    members = [
        SimpleNamespace(state={"demand": {"chat": {"rate": 2.0, "peak": 3.0, "cv": 1.0,
                                                   "met": 9, "ended": 10}}}),
        SimpleNamespace(state={"demand": {"chat": {"rate": 1.0, "peak": 1.0, "cv": 0.5,
                                                   "met": 5, "ended": 10},
                                          "camera": {"rate": 10.0, "peak": 10.0,
                                                     "cv": 0.1}}}),
    ]
    seen = planning.demand(members)
    assert seen["chat"].attained == 0.7
    assert seen["chat"].rate_hz == 3.0
    assert seen["camera"].attained is None  # nothing ended there yet
    few = [SimpleNamespace(state={"demand": {"chat": {"rate": 0.5, "met": 1, "ended": 3}}})]
    assert planning.demand(few)["chat"].attained is None  # too few to say


def test_a_demanded_service_is_placed_to_be_measured_when_asked() -> None:
    # A trickle of demand whose estimated gain stays under the bar: by default left
    # unplaced; a real leader (place_to_measure) gives it its quickest unit anyway, so a
    # node runs it and measures what the roofline only guessed.
    slow = replace(CHAT, slo_ms=200.0, gflop=0.9)
    trickle = {"chat": ServiceDemand(0.002, 1.0)}
    plain, _ = schedule(Placement(), STATE, trickle, {"chat": slow}, 0.0)
    assert not plain.units_of("chat")
    measured, decisions = schedule(Placement(), STATE, trickle, {"chat": slow}, 0.0,
                                   SchedulerConfig(place_to_measure=True))
    (unit,) = measured.units_of("chat")
    assert unit.head == "server"
    assert "first unit" in decisions[0].reason


def test_the_surge_trigger_fires_when_a_burst_rate_doubles() -> None:
    from epara.node.publisher import SURGE_MIN_HZ, surged

    planned = {"camera": 10.0}
    assert not surged({"camera": ServiceDemand(15.0, 0.1, peak_hz=18.0)}, planned)
    assert surged({"camera": ServiceDemand(15.0, 0.1, peak_hz=25.0)}, planned)
    # A stream that just started: nothing was planned for it.
    assert surged({"chat": ServiceDemand(SURGE_MIN_HZ, 1.0)}, planned)
    # A trickle never triggers a decision of its own.
    assert not surged({"chat": ServiceDemand(SURGE_MIN_HZ / 2, 1.0)}, planned)


def test_the_router_sends_requests_only_to_units_ready_on_all_their_nodes() -> None:
    from epara.node.leader.model import ServicePlan, Stage, Unit
    from epara.node.router import ready_part

    pipe = Unit("llm", (Stage("a", 0, 2, 1.0), Stage("b", 2, 4, 1.0)))
    single = Unit("llm", (Stage("c", 0, 4, 2.0),))
    placement = Placement(3, {"llm": ServicePlan("llm", "latency/multi", "replicas",
                                                 (pipe, single), "")})
    half = ready_part(placement, {"a": [pipe.id], "b": [], "c": [single.id]})
    assert half.units_of("llm") == (single,) and half.version == 3
    whole = ready_part(placement, {"a": [pipe.id], "b": [pipe.id], "c": []})
    assert whole.units_of("llm") == (pipe,)
