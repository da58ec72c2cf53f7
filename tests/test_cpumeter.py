"""The node's CPU meter (node/cpumeter.py) and the background load the scheduler takes
from it (scheduler.background_load): pure, driven by fake clocks and plain values."""

from __future__ import annotations

from dataclasses import replace

from epara.node.cpumeter import MIN_SPAN_S, CpuMeter
from epara.node.leader.model import (
    ClusterState,
    DeviceState,
    Placement,
    ServiceDemand,
    ServicePlan,
    Stage,
    Unit,
)
from epara.node.leader.scheduler import SchedulerConfig, background_load, schedule
from epara.node.leader.workloads import TEMPLATES, fleet


class Clocks:
    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0
        self.jiffies = (1000.0, 9000.0)  # busy, idle


def test_under_a_quota_the_meter_reads_process_cpu_over_the_allowance() -> None:
    c = Clocks()
    meter = CpuMeter(0.5, clock=lambda: c.wall, process_clock=lambda: c.cpu)
    assert meter.busy() is None  # one sample spans nothing
    c.wall += MIN_SPAN_S / 2
    c.cpu += 0.1
    assert meter.busy() is None  # too short a span to say
    c.wall += 1.5
    c.cpu += 0.5  # 0.6 CPU-s in 2 s of a 0.5-CPU allowance: 60%
    assert abs(meter.busy() - 0.6) < 1e-9
    for _ in range(20):  # the window follows the present: now fully busy
        c.wall += 0.5
        c.cpu += 0.5 * 0.5
    assert abs(meter.busy() - 1.0) < 1e-9


def test_without_a_quota_the_meter_reads_the_whole_machine() -> None:
    c = Clocks()
    meter = CpuMeter(None, clock=lambda: c.wall, machine=lambda: c.jiffies)
    assert meter.busy() is None
    c.wall += 2.0
    c.jiffies = (c.jiffies[0] + 150, c.jiffies[1] + 50)  # 75% busy, other programs too
    assert abs(meter.busy() - 0.75) < 1e-9
    unreadable = CpuMeter(None, clock=lambda: c.wall, machine=lambda: None)
    assert unreadable.busy() is None


def _state(devices: list, busy: dict[str, float | None]) -> ClusterState:
    return ClusterState({d.id: DeviceState(d, busy=busy.get(d.id)) for d in devices})


def test_work_the_estimates_do_not_explain_is_background_load() -> None:
    devices = fleet(2, (("jetson", 1.0),))
    spec = replace(TEMPLATES["detect"], name="detect")
    unit = Unit("detect", (Stage(devices[0].id, 0, len(spec.layers), spec.memory_mb),), 1)
    placed = Placement(1, {"detect": ServicePlan("detect", "", "replicas", (unit,), "")})
    demand = {"detect": ServiceDemand(2.0, 1.0)}
    config = SchedulerConfig()
    explained = background_load(placed, _state(devices, {}), demand, {"detect": spec},
                                config)
    assert explained == {}  # nothing measured: nothing assumed
    busy = {devices[0].id: 0.95, devices[1].id: 0.05}
    found = background_load(placed, _state(devices, busy), demand, {"detect": spec}, config)
    assert set(found) == {devices[0].id}
    assert 0.5 < found[devices[0].id] <= config.max_background
    # Within the dead band of what the estimates explain: noise, no background.
    quiet = background_load(placed, _state(devices, {devices[0].id: 0.08}), demand,
                            {"detect": spec}, config)
    assert quiet == {}


def test_a_new_service_goes_to_the_device_that_is_not_busy_with_unseen_work() -> None:
    devices = fleet(2, (("jetson", 1.0),))
    spec = replace(TEMPLATES["detect"], name="detect")
    demand = {"detect": ServiceDemand(5.0, 1.0)}
    config = SchedulerConfig(headroom=0)
    for hog in (devices[0].id, devices[1].id):
        other = next(d.id for d in devices if d.id != hog)
        placed, _ = schedule(Placement(), _state(devices, {hog: 0.9, other: 0.0}), demand,
                             {"detect": spec}, 0.0, config)
        assert [u.head for u in placed.units_of("detect")] == [other]
