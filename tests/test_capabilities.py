"""The capability probe's speeds under load (peer/capabilities.py): the pure decisions of
when to measure again and what to keep, and the per-boot cache that applies them.

The incident these guard against: a probe taken at load 35 on 2 cores recorded 2.1
GFLOP/s where the quiet machine measures ~141, and the node advertised a tenth of its
speed until reboot."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from epara.peer import capabilities as caps
from epara.peer.capabilities import (
    QUIET_LOAD_PER_CORE,
    REPROBE_AFTER_S,
    SpeedSample,
    best_speed,
    record_outdated,
    speed_probe_due,
)
from epara.peer.member import ClusterMember, MemberConfig

T0 = 1_800_000_000.0
LOADED = SpeedSample(gflops=2.1, mem_bandwidth_gbs=1.0, load_per_core=17.5, measured_at=T0)
QUIET = SpeedSample(gflops=141.0, mem_bandwidth_gbs=7.7, load_per_core=0.2, measured_at=T0)


def test_a_quiet_measurement_stands_for_the_boot() -> None:
    assert speed_probe_due(None, 30.0, T0)  # never measured: measure, whatever the load
    assert not speed_probe_due(QUIET, 0.0, T0 + 10 * REPROBE_AFTER_S)
    edge = SpeedSample(100.0, 5.0, QUIET_LOAD_PER_CORE, T0)
    assert not speed_probe_due(edge, 0.0, T0 + 10 * REPROBE_AFTER_S)


def test_a_loaded_measurement_is_repeated_once_quieter_and_not_too_often() -> None:
    later = T0 + REPROBE_AFTER_S
    assert not speed_probe_due(LOADED, 0.1, T0 + REPROBE_AFTER_S / 2)  # paced
    assert speed_probe_due(LOADED, 0.1, later)  # quieter now: worth measuring
    assert speed_probe_due(LOADED, 17.0, later)
    assert not speed_probe_due(LOADED, 17.5, later)  # as busy as then: it would tell nothing
    assert not speed_probe_due(LOADED, 40.0, later)
    assert speed_probe_due(LOADED, 0.1, T0 - 3600)  # the clock stepped back: not paced


def test_the_best_speed_is_kept_with_the_quietest_load_and_the_latest_time() -> None:
    assert best_speed(None, LOADED) == LOADED
    recovered = best_speed(LOADED, QUIET)
    assert recovered.gflops == 141.0 and recovered.mem_bandwidth_gbs == 7.7
    assert recovered.quiet and not speed_probe_due(recovered, 0.0, T0 + 3600)
    # A slower measurement later (the machine busy again) never lowers the figure, but
    # it paces the next attempt.
    busy_again = SpeedSample(3.0, 0.9, 12.0, T0 + 500)
    kept = best_speed(recovered, busy_again)
    assert (kept.gflops, kept.load_per_core, kept.measured_at) == (141.0, 0.2, T0 + 500)
    # Partly quieter: a better figure, still not settled, next time only if quieter still.
    partly = best_speed(LOADED, SpeedSample(30.0, 3.0, 3.0, T0 + 120))
    assert partly.gflops == 30.0 and not partly.quiet
    assert not speed_probe_due(partly, 3.0, T0 + 120 + REPROBE_AFTER_S)
    assert speed_probe_due(partly, 0.3, T0 + 120 + REPROBE_AFTER_S)


def test_speed_records_are_validated() -> None:
    assert SpeedSample.from_json(QUIET.to_json()) == QUIET
    for bad in (None, [], {"gflops": 1.0}, {**QUIET.to_json(), "gflops": "fast"},
                {**QUIET.to_json(), "gflops": float("nan")},
                {**QUIET.to_json(), "load_per_core": -1}):
        assert SpeedSample.from_json(bad) is None


def test_a_peer_record_is_outdated_when_its_headline_moved() -> None:
    assert not record_outdated({"gflops": 141.04}, {"gf": 141.0})
    assert record_outdated({"gflops": 2.1}, {"gf": 141.0})
    assert not record_outdated({"gflops": 2.1}, {})  # an old node's record: nothing to go by
    assert not record_outdated(None, {"gf": 1.0})
    assert not record_outdated({"gflops": 2.1}, {"gf": "x"})


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The measured side of the probe replaced by a scripted machine: its load now, and
    what a benchmark would measure (the real benchmarks are exercised elsewhere)."""
    state: dict[str, object] = {"load": 0.1, "next": QUIET, "measured": 0}

    def measure() -> SpeedSample:
        state["measured"] = int(state["measured"]) + 1  # type: ignore[call-overload]
        return state["next"]  # type: ignore[return-value]

    monkeypatch.setattr(caps, "measure_speed", measure)
    monkeypatch.setattr(caps, "load_per_core", lambda: state["load"])
    monkeypatch.setattr(caps, "probe_runtimes", lambda: ())
    monkeypatch.setattr(caps, "cuda_devices", lambda: ())
    monkeypatch.setattr(caps, "cpu_quota", lambda: None)
    return state


def age_cache(cache_dir: Path, seconds: float) -> None:
    """Make the cached speed ``seconds`` older (as if that much time had passed)."""
    path = cache_dir / f"capabilities-{caps.boot_id()}.json"
    data = json.loads(path.read_text())
    data["speed"]["measured_at"] -= seconds
    path.write_text(json.dumps(data))


def test_a_probe_cached_under_load_does_not_pin_the_speed_for_the_boot(
        tmp_path: Path, machine: dict[str, object]) -> None:
    now = time.time()
    machine.update(load=17.5, next=replace(LOADED, measured_at=now))
    assert caps.probe(tmp_path).gflops == 2.1  # measured at load 35 on 2 cores
    machine.update(load=0.1)
    assert caps.probe(tmp_path).gflops == 2.1 and machine["measured"] == 1  # paced
    # A minute on, the machine is quiet: the next probe (a restart, or the member's
    # periodic check) measures again and keeps the better figure.
    age_cache(tmp_path, REPROBE_AFTER_S)
    machine.update(next=replace(QUIET, measured_at=now))
    recovered = caps.probe(tmp_path)
    assert recovered.gflops == 141.0 and machine["measured"] == 2
    assert SpeedSample.from_json(recovered.extra["speed"]).quiet  # type: ignore[union-attr]
    # Settled: busy again later, no more measuring, and the figure stays.
    age_cache(tmp_path, 10 * REPROBE_AFTER_S)
    machine.update(load=20.0, next=replace(LOADED, measured_at=now))
    assert caps.probe(tmp_path).gflops == 141.0 and machine["measured"] == 2
    cache = json.loads(next(tmp_path.glob("capabilities-*.json")).read_text())
    assert cache["speed"]["gflops"] == 141.0 and cache["speed"]["load_per_core"] == 0.2


def test_a_cache_from_before_load_was_recorded_is_measured_again(
        tmp_path: Path, machine: dict[str, object]) -> None:
    (tmp_path / f"capabilities-{caps.boot_id()}.json").write_text(json.dumps(
        {"cache_version": 1, "gflops": 2.1, "mem_bandwidth_gbs": 1.0, "runtimes": [],
         "accelerators": []}))
    assert caps.probe(tmp_path).gflops == 141.0 and machine["measured"] == 1


def test_the_real_measurement_records_the_load_it_ran_under() -> None:
    sample = caps.measure_speed()
    assert sample.gflops > 0 and sample.mem_bandwidth_gbs > 0
    assert sample.load_per_core >= 0 and abs(sample.measured_at - time.time()) < 60


def test_a_running_member_remeasures_and_publishes_the_better_speed(
        tmp_path: Path, machine: dict[str, object]) -> None:
    """The member's heartbeat check: a speed probed under load is measured again in a
    thread once the machine is quieter, and the next state record's headline carries it
    (peers refetch the record when their copy no longer matches: record_outdated)."""
    now = time.time()
    machine.update(load=17.5, next=replace(LOADED, measured_at=now))
    member = ClusterMember(MemberConfig(node_id="m", cache_dir=tmp_path,
                                        device_class="embedded"), tmp_path, lambda: {})
    member.capabilities = caps.probe(tmp_path)
    assert member.capabilities.headline()["gf"] == 2.1

    async def heartbeats() -> None:
        member._refresh_speed()  # loaded as when measured, and too soon: nothing to do
        await asyncio.sleep(0.05)
        assert machine["measured"] == 1
        age_cache(tmp_path, REPROBE_AFTER_S)
        member.capabilities = caps.probe(tmp_path)  # a cache as old as the member's
        machine.update(load=0.1, next=replace(QUIET, measured_at=now))
        member._refresh_speed()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not member._remeasuring:
                break

    asyncio.run(heartbeats())
    assert machine["measured"] == 2
    headline = member.capabilities.headline()
    assert headline["gf"] == 141.0 and headline["cls"] == "embedded"  # override kept
    assert record_outdated({"gflops": 2.1}, headline)
