"""Placement policies: one interface for epara and every baseline.

A policy turns what a leader knows — the current placement, the cluster state that nodes
publish, the demand they observe (with the SLO attainment they measured) and the service
specs (with measured run times) — into the next desired placement. The real leader
(``epara node --placement-policy``) and the simulator hold the same policy objects, so a
comparison changes only the policy.

A policy may keep state between decisions (an autoscaler's history, popularity learned
online), so each leader or simulated run makes its own object with ``make_policy``. It
never sees anything a real leader could not: no trace, no ground truth. ``router`` names
how the system it stands for routes requests among its units (node/leader/baselines.py
lists the routers); the simulator honours it, the real node always routes with epara's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

from epara.node.leader.baselines import (
    AlpaServePolicy,
    ExoPolicy,
    KServePolicy,
    PetalsPolicy,
    SimpleBaseline,
    TritonPolicy,
)
from epara.node.leader.model import ClusterState, Placement, ServiceDemand, ServiceSpec
from epara.node.leader.scheduler import Decision, SchedulerConfig, schedule


class PlacementPolicy(Protocol):
    """``place`` is called once per scheduling period (and on a demand surge)."""

    name: str
    router: str

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        """The next desired placement (``current`` itself when nothing changes, so the
        version moves only on change) and the decisions that lead to it."""
        ...


class EparaPolicy:
    """The task-categorised allocator and state-aware scheduler (node/leader/scheduler.py)."""

    router = "epara"

    def __init__(self, config: SchedulerConfig | None = None,
                 name: str = "epara") -> None:
        self.name = name
        self.config = config or SchedulerConfig()

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        return schedule(current, state, dict(demand), specs, now, self.config)


PolicyFactory = Callable[[SchedulerConfig | None], PlacementPolicy]
# Prior systems (node/leader/baselines.py); each also runs with epara's router
# ("NAME+epara-router") so that placement alone can be compared.
PRIOR_SYSTEMS = ("kserve", "triton", "alpaserve", "exo", "petals")
_PRIOR: dict[str, Callable[[str, str | None], PlacementPolicy]] = {
    "kserve": lambda n, r: KServePolicy(n, r or "least-connections"),
    "triton": lambda n, r: TritonPolicy(n, r or "least-outstanding"),
    "alpaserve": lambda n, r: AlpaServePolicy(n, r or "least-connections"),
    "exo": lambda n, r: ExoPolicy(n, r or "least-connections"),
    "petals": lambda n, r: PetalsPolicy(n, r or "fastest-chain"),
}
ROUTED = "+epara-router"


def _ablation(config: SchedulerConfig | None) -> PlacementPolicy:
    return EparaPolicy(replace(config or SchedulerConfig(), categorise=False),
                       "epara-no-categories")


POLICIES: dict[str, PolicyFactory] = {
    "epara": lambda config: EparaPolicy(config),
    "epara-no-categories": _ablation,
    "one-replica": lambda config: SimpleBaseline("one-replica"),
    "replicate-all": lambda config: SimpleBaseline("replicate-all"),
    "pipeline-all": lambda config: SimpleBaseline("pipeline-all"),
    **{name: (lambda config, name=name: _PRIOR[name](name, None)) for name in PRIOR_SYSTEMS},
    **{name + ROUTED: (lambda config, name=name: _PRIOR[name](name + ROUTED, "epara"))
       for name in PRIOR_SYSTEMS},
}


def make_policy(name: str, config: SchedulerConfig | None = None) -> PlacementPolicy:
    """A fresh policy object; ValueError names the known policies."""
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; "
                         f"one of {', '.join(POLICIES)}") from None
