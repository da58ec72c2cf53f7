"""Placement policies: one interface for epara and every baseline.

A policy turns what a leader knows — the current placement, the cluster state that nodes
publish, the demand they observe and the service specs (with measured run times) — into
the next desired placement. The real leader (``epara node --placement-policy``) and the
simulator hold the same policy objects, so a comparison changes only the policy.

A policy may keep state between decisions (an autoscaler's history, popularity learned
online), so each leader or simulated run makes its own object with ``make_policy``. It
never sees anything a real leader could not: no trace, no ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from epara.node.leader.model import ClusterState, Placement, ServiceDemand, ServiceSpec
from epara.node.leader.scheduler import Decision, SchedulerConfig, schedule


class PlacementPolicy(Protocol):
    """``place`` is called once per scheduling period (and on a demand surge)."""

    name: str

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        """The next desired placement (``current`` itself when nothing changes, so the
        version moves only on change) and the decisions that lead to it."""
        ...


class EparaPolicy:
    """The task-categorised allocator and state-aware scheduler (node/leader/scheduler.py)."""

    def __init__(self, config: SchedulerConfig | None = None,
                 name: str = "epara") -> None:
        self.name = name
        self.config = config or SchedulerConfig()

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        return schedule(current, state, dict(demand), specs, now, self.config)


class _StaticBaseline:
    """A baseline whose placement is a function of the live devices and the popularity
    observed so far (never the trace's): re-placed every period, so it follows a device
    loss like the system it stands for would."""

    def __init__(self, name: str) -> None:
        self.name = name

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        from epara.node.leader import sim

        devices = state.alive()
        popularity = {name: d.rate_hz for name, d in demand.items()}
        if self.name == "one-replica":
            fresh = sim.one_replica_placement(specs, devices)
        elif self.name == "replicate-all":
            fresh = sim.replicate_all_placement(specs, devices, popularity)
        else:
            fresh = sim.pipeline_all_placement(specs, devices, popularity=popularity)
        reason = f"baseline policy {self.name}"
        plans = {name: replace(plan, category="-", reason=reason)
                 for name, plan in fresh.plans.items()}
        if plans == dict(current.plans):
            return current, ()
        return Placement(current.version + 1, plans), ()


POLICIES: dict[str, Callable[[SchedulerConfig | None], PlacementPolicy]] = {
    "epara": lambda config: EparaPolicy(config),
    "one-replica": lambda config: _StaticBaseline("one-replica"),
    "replicate-all": lambda config: _StaticBaseline("replicate-all"),
    "pipeline-all": lambda config: _StaticBaseline("pipeline-all"),
}


def make_policy(name: str, config: SchedulerConfig | None = None) -> PlacementPolicy:
    """A fresh policy object; ValueError names the known policies."""
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; "
                         f"one of {', '.join(POLICIES)}") from None
