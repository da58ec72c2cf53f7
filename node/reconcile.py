"""A node's reconcile step (pure): the published placement and what runs here -> actions.

In the style of exo's ``worker/plan.py``: ``desired(placement, me)`` is the
configuration this node must run (replicas with their batch, pipeline heads, the stages
it hosts for other nodes' pipelines), ``plan(desired, running)`` the actions that turn
what runs into it, ordered so memory is freed before it is taken: unload, close stages,
set batches, load replicas, open stages, open heads. The runtime's executor carries
them out one by one and reads back what runs (``ClusterRuntime.running``), so a failed
action is simply planned again: on the next placement, or after ``retry_after``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epara.node.leader.model import Placement, Unit

RETRY_FIRST_S = 2.0  # a placement not fully applied is tried again after this long,
RETRY_LONGEST_S = 60.0  # doubling up to this (a model that cannot load here logs rarely)


def retry_after(previous_s: float | None, fresh: bool, converged: bool) -> float | None:
    """Seconds until the executor tries a placement again (None: only on a new one).

    A failed action (a stage whose node is not in the view yet, a load that failed) is
    planned again, first soon, then less and less often while the same placement keeps
    failing; a new placement starts the schedule afresh."""
    if converged:
        return None
    if fresh or previous_s is None:
        return RETRY_FIRST_S
    return min(previous_s * 2, RETRY_LONGEST_S)


def stage_key(service: str, first: int, end: int) -> str:
    """How a hosted stage is named on the data plane (and in ``Running.stages``)."""
    return f"{service}#{first}-{end}"


def head_key(unit: Unit) -> str:
    """What a pipeline head runs: its unit and every stage's range. The same devices cut
    at other ranges are another pipeline (the head's own stage and its route change)."""
    return f"{unit.id}#{','.join(f'{s.first}-{s.end}' for s in unit.stages)}"


@dataclass(frozen=True)
class Running:
    """A node's serving configuration: what runs, or what should."""

    replicas: Mapping[str, int] = field(default_factory=dict)  # service -> max batch
    heads: Mapping[str, str] = field(default_factory=dict)  # service -> head_key(unit)
    stages: frozenset[str] = frozenset()  # stage keys hosted for pipelines
    head_batches: Mapping[str, int] = field(default_factory=dict)  # service -> max batch

    def to_dict(self) -> dict[str, Any]:
        return {"replicas": dict(sorted(self.replicas.items())),
                "heads": dict(sorted(self.heads.items())), "stages": sorted(self.stages),
                "head_batches": dict(sorted(self.head_batches.items()))}


@dataclass(frozen=True)
class Unload:
    service: str  # a replica or a pipeline head


@dataclass(frozen=True)
class CloseStage:
    key: str


@dataclass(frozen=True)
class SetBatch:
    service: str
    batch: int


@dataclass(frozen=True)
class Load:
    service: str
    batch: int


@dataclass(frozen=True)
class OpenStage:
    key: str
    service: str
    first: int
    end: int


@dataclass(frozen=True)
class OpenHead:
    unit: Unit


Action = Unload | CloseStage | SetBatch | Load | OpenStage | OpenHead


def desired(placement: Placement, me: str) -> Running:
    """What ``placement`` asks node ``me`` to run."""
    replicas: dict[str, int] = {}
    heads: dict[str, str] = {}
    head_batches: dict[str, int] = {}
    stages: set[str] = set()
    for unit in placement.units():
        if unit.head == me:
            if unit.is_pipeline:
                heads[unit.service] = head_key(unit)
                head_batches[unit.service] = max(1, unit.max_batch)
            else:
                replicas[unit.service] = max(1, unit.max_batch)
        if unit.is_pipeline:
            stages |= {stage_key(unit.service, s.first, s.end)
                       for s in unit.stages[1:] if s.device == me}
    return Running(replicas, heads, frozenset(stages), head_batches)


def plan(placement: Placement, me: str, running: Running) -> list[Action]:
    """The actions that make ``running`` what ``placement`` asks of node ``me``."""
    want = desired(placement, me)
    units = {head_key(u): u for u in placement.units() if u.is_pipeline}
    actions: list[Action] = []
    # A service slot holds either a replica or a pipeline head: one that changes kind
    # or unit is unloaded first.
    for name in sorted(set(running.replicas) | set(running.heads)):
        keep = (name in running.replicas and name in want.replicas) or (
            name in running.heads and running.heads[name] == want.heads.get(name))
        if not keep:
            actions.append(Unload(name))
    actions += [CloseStage(key) for key in sorted(running.stages - want.stages)]
    for name, batch in sorted(want.replicas.items()):
        if name in running.replicas and running.replicas[name] != batch:
            actions.append(SetBatch(name, batch))
    for name, batch in sorted(want.head_batches.items()):  # a kept head's new batch
        if running.heads.get(name) == want.heads[name] and \
                running.head_batches.get(name) != batch:
            actions.append(SetBatch(name, batch))
    actions += [Load(name, batch) for name, batch in sorted(want.replicas.items())
                if name not in running.replicas]
    for key in sorted(want.stages - running.stages):
        service, span = key.rsplit("#", 1)
        first, end = (int(x) for x in span.split("-"))
        actions.append(OpenStage(key, service, first, end))
    actions += [OpenHead(units[key]) for name, key in sorted(want.heads.items())
                if running.heads.get(name) != key]
    return actions


def apply(running: Running, action: Action) -> Running:
    """``running`` after ``action`` succeeded (what an executor that did it would read
    back): the fold a test checks ``plan`` with."""
    replicas = dict(running.replicas)
    heads = dict(running.heads)
    head_batches = dict(running.head_batches)
    stages = set(running.stages)
    match action:
        case Unload(service):
            replicas.pop(service, None)
            heads.pop(service, None)
            head_batches.pop(service, None)
        case CloseStage(key):
            stages.discard(key)
        case SetBatch(service, batch) if service in heads:
            head_batches[service] = batch
        case SetBatch(service, batch) | Load(service, batch):
            replicas[service] = batch
        case OpenStage(key, _, _, _):
            stages.add(key)
        case OpenHead(unit):
            heads[unit.service] = head_key(unit)
            head_batches[unit.service] = max(1, unit.max_batch)
    return Running(replicas, heads, frozenset(stages), head_batches)
