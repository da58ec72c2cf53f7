"""The node's pure reconcile step (node/reconcile.py): placement + what runs -> actions."""

from __future__ import annotations

import functools

from epara.node import reconcile
from epara.node.leader.model import Placement, ServicePlan, Stage, Unit
from epara.node.reconcile import Running


def _placement(version: int, *units: Unit) -> Placement:
    plans: dict[str, list[Unit]] = {}
    for unit in units:
        plans.setdefault(unit.service, []).append(unit)
    return Placement(version, {name: ServicePlan(name, "latency/single", "replicas",
                                                 tuple(us), "test")
                               for name, us in plans.items()})


def _replica(service: str, device: str, batch: int = 1) -> Unit:
    return Unit(service, (Stage(device, 0, 0, 100.0),), batch)


LLM_PIPELINE = Unit("llm", (Stage("a", 0, 2, 300.0), Stage("b", 2, 4, 300.0)), 4)


def _run(placement: Placement, me: str, running: Running) -> Running:
    return functools.reduce(reconcile.apply, reconcile.plan(placement, me, running), running)


def test_what_runs_after_the_actions_is_exactly_the_plan() -> None:
    first = _placement(1, _replica("seg", "a", 8), _replica("seg", "b", 2), LLM_PIPELINE)
    second = _placement(2, _replica("seg", "b", 4), _replica("det", "a"),
                        Unit("llm", (Stage("b", 0, 3, 400.0), Stage("a", 3, 4, 200.0)), 2))
    for me in ("a", "b", "c"):
        running = Running()
        for placement in (first, second, Placement(3)):
            running = _run(placement, me, running)
            assert running == reconcile.desired(placement, me), (me, placement.version)
            # Reconciled: nothing more to do.
            assert reconcile.plan(placement, me, running) == []


def test_the_plans_batch_is_applied_without_a_reload() -> None:
    running = Running({"seg": 8})
    actions = reconcile.plan(_placement(2, _replica("seg", "a", 2)), "a", running)
    assert actions == [reconcile.SetBatch("seg", 2)]


def test_memory_is_freed_before_it_is_taken() -> None:
    running = Running({"seg": 1}, {}, frozenset({"llm#2-4"}))
    actions = reconcile.plan(_placement(2, _replica("det", "b"), LLM_PIPELINE), "b",
                             Running({"seg": 1}))
    assert actions[0] == reconcile.Unload("seg")
    actions = reconcile.plan(_placement(2, _replica("det", "b")), "b", running)
    assert actions[:2] == [reconcile.Unload("seg"), reconcile.CloseStage("llm#2-4")]
    assert actions[-1] == reconcile.Load("det", 1)


def test_a_replica_that_becomes_a_pipeline_head_is_unloaded_first() -> None:
    actions = reconcile.plan(_placement(2, LLM_PIPELINE), "a", Running({"llm": 4}))
    assert actions == [reconcile.Unload("llm"), reconcile.OpenHead(LLM_PIPELINE)]
    assert reconcile.desired(_placement(2, LLM_PIPELINE), "b").stages == {"llm#2-4"}


def test_a_pipeline_recut_on_the_same_devices_reopens_its_head_and_stages() -> None:
    """Same devices, other stage ranges: the head's own stage and its route change, so
    the head is opened again (the unit id alone would keep the old cut running)."""
    recut = Unit("llm", (Stage("a", 0, 3, 400.0), Stage("b", 3, 4, 200.0)), 4)
    assert recut.id == LLM_PIPELINE.id
    head = _run(_placement(1, LLM_PIPELINE), "a", Running())
    assert head.heads == {"llm": "llm@a+b#0-2,2-4"}
    assert reconcile.plan(_placement(2, recut), "a", head) == [
        reconcile.Unload("llm"), reconcile.OpenHead(recut)]
    stage = _run(_placement(1, LLM_PIPELINE), "b", Running())
    assert reconcile.plan(_placement(2, recut), "b", stage) == [
        reconcile.CloseStage("llm#2-4"), reconcile.OpenStage("llm#3-4", "llm", 3, 4)]


def test_a_placement_not_fully_applied_is_retried_less_and_less_often() -> None:
    waits = [reconcile.retry_after(None, True, False)]
    for _ in range(8):
        waits.append(reconcile.retry_after(waits[-1], False, False))
    assert waits[0] == reconcile.RETRY_FIRST_S
    assert waits == sorted(waits) and waits[-1] == reconcile.RETRY_LONGEST_S
    # A new placement starts afresh; a converged one waits for the next placement.
    assert reconcile.retry_after(reconcile.RETRY_LONGEST_S, True, False) == \
        reconcile.RETRY_FIRST_S
    assert reconcile.retry_after(8.0, False, True) is None


def test_a_heads_new_batch_is_applied_without_reopening_it() -> None:
    head = _run(_placement(1, LLM_PIPELINE), "a", Running())
    assert head.head_batches == {"llm": 4}
    smaller = Unit("llm", LLM_PIPELINE.stages, 2)
    assert reconcile.plan(_placement(2, smaller), "a", head) == [
        reconcile.SetBatch("llm", 2)]
    assert _run(_placement(2, smaller), "a", head) == \
        reconcile.desired(_placement(2, smaller), "a")
