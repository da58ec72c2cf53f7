"""Per-request routing on a node, from calibrated specs.

``Router.choose`` turns the latest cluster view into the target of one request: the
local replica, a peer (the node forwards), or none yet (``NotPlaced``: the runtime's cold
start serves it from this device's store or waits for the leader). Its estimates start
from the same figures the scheduler plans with: the run times nodes measure as they run
now (``planning.measured_ms``, and their work around the model:
``planning.measured_work_ms``), not the uncalibrated roofline. Not the leader's time
correction (policies.CorrectionLaw): a refusal it caused would be observed as a miss and
raise it further. The view is rebuilt at most every ``ROUTING_VIEW_S``: state records
change a few times a second, so rebuilding them for every request would only cost time
on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from epara.node import planning
from epara.node.leader.model import ClusterState, Placement, ServiceSpec
from epara.node.leader.routing import Route, route, targets_for
from epara.node.service import ServiceError

ROUTING_VIEW_S = 0.05  # how stale the routing snapshot of the cluster may be
# A service every request of which the estimates refuse still gets one request through
# this often (per node), so that its run time is measured again (routing.route): else
# one slow run, under a passing contention, could refuse it for good.
PROBE_INTERVAL_S = 1.0


class NotPlaced(Exception):
    """No ready unit of the service anywhere (yet)."""


def ready_part(placement: Placement, ready_on: Mapping[str, Iterable[str]]) -> Placement:
    """``placement`` cut down to the units every one of whose nodes reports them ready
    (pure): requests only go to pipelines whose stages are all loaded."""
    ready = {node: set(units) for node, units in ready_on.items()}
    return Placement(placement.version, {
        name: replace(plan, units=tuple(
            u for u in plan.units if all(u.id in ready.get(d, ()) for d in u.devices)))
        for name, plan in placement.plans.items()})


@dataclass(frozen=True)
class RoutingView:
    members: list[Any]
    placement: Placement  # its ready part
    state: ClusterState
    measured: Mapping[str, Mapping[str, float]]  # service -> planning.measured_ms
    work: Mapping[str, Mapping[str, float]]  # service -> planning.measured_work_ms

    def spec(self, name: str, entry: Mapping[str, Any]) -> ServiceSpec:
        """The service as the scheduler sees it: calibrated by measured run times and
        node work."""
        return planning.service_spec(name, entry, self.measured.get(name),
                                     self.work.get(name))

    def entry(self, name: str, local: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The model's catalogue entry, from this node's catalogue or a member's."""
        return local.get(name) or next(
            ((m.state or {}).get("catalogue", {}).get(name) for m in self.members
             if name in ((m.state or {}).get("catalogue") or {})), None)


class Router:
    """Routes requests arriving at node ``me`` (see the module docstring)."""

    def __init__(self, me: str, members: Callable[[], list[Any]],
                 placement: Callable[[], Placement],
                 ready_here: Callable[[], set[str]]) -> None:
        self.me = me
        self.members = members  # the live members of the cluster view
        self.placement = placement
        self.ready_here = ready_here
        self._cache: tuple[int, float, RoutingView] | None = None
        self._probed: dict[str, float] = {}  # service -> when a refused one last went

    def view(self) -> RoutingView:
        now = time.monotonic()
        version = self.placement().version
        if self._cache is not None and self._cache[0] == version and \
                now - self._cache[1] < ROUTING_VIEW_S:
            return self._cache[2]
        members = self.members()
        ready_on = {m.node_id: (m.state or {}).get("ready") or () for m in members}
        ready_on[self.me] = self.ready_here()
        view = RoutingView(members, ready_part(self.placement(), ready_on),
                           planning.cluster_state(members, time.time()),
                           planning.measured_ms(members),
                           planning.measured_work_ms(members))
        self._cache = (version, now, view)
        return view

    def choose(self, name: str, deadline: float | None,
               catalogue: Mapping[str, Any]) -> Route:
        """Where a request for ``name`` goes. Raises ServiceError("unknown_model") when
        no member has such a model, ServiceError("deadline_unmeetable") when units exist
        but none can answer in time; returns a refused Route (no target) when no unit of
        it is ready anywhere."""
        view = self.view()
        entry = view.entry(name, catalogue)
        if entry is None:
            raise ServiceError("unknown_model", f"no node of the cluster has a model "
                               f"named {name!r}")
        targets = targets_for(view.spec(name, entry), view.placement, view.state, self.me)
        now = time.monotonic()
        budget = None if deadline is None else max(0.0, deadline - now)
        decision = route(name, targets, budget)
        if decision.target is None and targets:
            if now - self._probed.get(name, -PROBE_INTERVAL_S) < PROBE_INTERVAL_S:
                raise ServiceError("deadline_unmeetable", decision.reason)
            self._probed[name] = now
            decision = route(name, targets, budget, probe=True)
        return decision
