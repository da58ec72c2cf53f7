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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from epara.node.leader.baselines import (
    AlpaServePolicy,
    ExoPolicy,
    KServePolicy,
    PetalsPolicy,
    SimpleBaseline,
    TritonPolicy,
)
from epara.node.leader.demand import WINDOW_S
from epara.node.leader.model import ClusterState, Placement, ServiceDemand, ServiceSpec
from epara.node.leader.scheduler import (
    Decision,
    SchedulerConfig,
    estimated_attainment,
    schedule,
)


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


@dataclass(frozen=True)
class CorrectionLaw:
    """How observed SLO attainment corrects the estimates (docs/epara-core.md).

    Per service the policy keeps a time scale k (every step takes k times what the
    measured run times and the cost model say). After each decision's observation
    window, with e the attainment the estimates expected of the placement in force and
    a the attainment the nodes measured:

    - |a - e| <= deadband: k stays (measurement noise is not a reason to move);
    - a < e: k *= exp(up * (e - a)), at most ``step`` times per decision;
    - a > e: k *= exp(-down * (a - e)), at least 1/``step`` times, with down < up: an
      optimistic estimate costs requests, a pessimistic one only spare capacity;
    - k stays within [lo, hi];
    - no update until the placement has been in force for ``settle_s`` (the window
      must have watched it, not its predecessor).
    """

    deadband: float = 0.05
    up: float = 1.5
    down: float = 0.5
    step: float = 2.0
    lo: float = 0.5
    hi: float = 8.0
    settle_s: float = WINDOW_S


def corrected_scale(scale: float, estimated: float, observed: float,
                    law: CorrectionLaw = CorrectionLaw()) -> float:
    """The next time scale of one service (pure; see ``CorrectionLaw``)."""
    error = observed - estimated
    if abs(error) <= law.deadband:
        return scale
    factor = math.exp(-law.up * error) if error < 0 else math.exp(-law.down * error)
    factor = min(law.step, max(1.0 / law.step, factor))
    return min(law.hi, max(law.lo, scale * factor))


class EparaPolicy:
    """The task-categorised allocator and state-aware scheduler (node/leader/scheduler.py),
    with its estimates corrected from observed attainment (``CorrectionLaw``)."""

    router = "epara"

    def __init__(self, config: SchedulerConfig | None = None,
                 name: str = "epara", law: CorrectionLaw | None = None) -> None:
        self.name = name
        self.config = config or SchedulerConfig()
        self.law = law or CorrectionLaw()
        self.scales: dict[str, float] = {}  # service -> time scale k
        # What the estimates expect of the placement in force, per demanded service
        self.estimates: dict[str, float] = {}
        self._in_force: tuple[int, float] = (-1, 0.0)  # (version, since when)

    def place(self, current: Placement, state: ClusterState,
              demand: Mapping[str, ServiceDemand], specs: Mapping[str, ServiceSpec],
              now: float) -> tuple[Placement, tuple[Decision, ...]]:
        if self._in_force[0] != current.version:
            self._in_force = (current.version, now)
        settled = now - self._in_force[1] >= self.law.settle_s
        for name, seen in demand.items():
            expected = self.estimates.get(name)
            if settled and expected is not None and seen.attained is not None:
                self.scales[name] = corrected_scale(self.scales.get(name, 1.0), expected,
                                                    seen.attained, self.law)
        corrected = {name: replace(spec, time_scale=self.scales.get(name, 1.0))
                     for name, spec in specs.items()}
        placement, decisions = schedule(current, state, dict(demand), corrected, now,
                                        self.config)
        self.estimates = estimated_attainment(placement, state, demand, corrected,
                                              self.config)
        if placement.version != current.version:
            self._in_force = (placement.version, now)
        return placement, decisions


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
