"""The leader's publisher: when to decide, the decision's inputs, and broadcasting it.

While this node holds the leader term it runs the placement policy (node/leader/
policies.py) every ``SCHEDULE_PERIOD_S``, on a membership change, and sooner when demand
surges (``surged``), from what the members publish (``planning``: catalogue, measured run
times, demand with its observed attainment), and broadcasts the versioned placement,
again while a member lags or every ``REBROADCAST_S`` (commands are best effort). The
placement itself lives with the runtime (``current`` / ``adopt``), which also folds the
placements other leaders send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from epara.node import planning
from epara.node.leader.model import Placement, ServiceDemand
from epara.node.leader.policies import PlacementPolicy
from epara.peer.member import ClusterMember, NotLeader

log = logging.getLogger(__name__)

SCHEDULE_PERIOD_S = 3.0  # re-plan at least this often (and on membership change)
# ... and sooner, at most once per SURGE_MIN_GAP_S, when a service's burst rate grew
# SURGE_FACTOR-fold since the last decision (and is at least SURGE_MIN_HZ)
SURGE_MIN_GAP_S = 0.5
SURGE_FACTOR = 2.0
SURGE_MIN_HZ = 1.0
TICK_S = 0.5  # how often the leader checks that every member applied its placement
REBROADCAST_S = 5.0


def surged(demand: Mapping[str, ServiceDemand], planned_load: Mapping[str, float]) -> bool:
    """Some service's burst rate more than doubled since the last decision (pure): a
    stream that just started should not wait a whole period for its replicas."""
    return any(seen.load_hz >= SURGE_MIN_HZ
               and seen.load_hz > SURGE_FACTOR * planned_load.get(name, 0.0)
               for name, seen in demand.items())


class PlacementPublisher:
    """Decides and broadcasts placements while this node leads."""

    def __init__(self, member: ClusterMember, policy: PlacementPolicy,
                 current: Callable[[], Placement],
                 adopt: Callable[[Placement, tuple[Any, ...]], None]) -> None:
        self.member = member
        self.policy = policy
        self.current = current
        self.adopt = adopt
        self.wake = asyncio.Event()  # a membership change: decide now
        self._last_broadcast = 0.0
        self._planned_load: dict[str, float] = {}  # burst rates the last decision used

    async def run(self) -> None:
        last_run = 0.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            woken = self.wake.is_set()
            self.wake.clear()
            view = self.member.view()
            if not view.is_leader:
                continue
            try:
                now = time.monotonic()
                live = [m for m in view.members if m.status != "suspect"]
                if woken or now - last_run >= SCHEDULE_PERIOD_S or (
                        now - last_run >= SURGE_MIN_GAP_S
                        and surged(planning.demand(live), self._planned_load)):
                    last_run = now
                    await self.schedule_once(view)
                elif self._lagging(view) or now - self._last_broadcast > REBROADCAST_S:
                    await self.broadcast()
            except NotLeader:
                continue
            except Exception:  # a planning bug must not stop the leader's loop
                log.exception("scheduling failed")

    def _lagging(self, view: Any) -> bool:
        """Some live member has not applied the current placement (commands are best
        effort: one sent before a follower adopted this leader's term is ignored)."""
        version = self.current().version
        return any((m.state or {}).get("placement_version", -1) < version
                   for m in view.members if m.status != "suspect" and m.state)

    async def schedule_once(self, view: Any) -> None:
        members = [m for m in view.members if m.status != "suspect"]
        models = planning.catalogue(members)
        measured = planning.measured_ms(members)
        work = planning.measured_work_ms(members)
        demand = planning.demand(members)
        self._planned_load = {name: d.load_hz for name, d in demand.items()}
        specs = {name: planning.with_observed_slo(
                     planning.service_spec(name, known["entry"], measured.get(name),
                                           work.get(name)),
                     demand.get(name))
                 for name, known in models.items()}
        state = planning.cluster_state(members, time.time())
        current = self.current()
        placement, decisions = await asyncio.to_thread(
            self.policy.place, current, state, demand, specs, time.time())
        if placement.version != current.version:
            if decisions:
                log.info("placement v%d: %s", placement.version,
                         "; ".join(f"{d.action} {d.unit} ({d.reason})" for d in decisions))
            self.adopt(placement, decisions)
            await self.broadcast()
        elif self._lagging(view) or time.monotonic() - self._last_broadcast > REBROADCAST_S:
            await self.broadcast()

    async def broadcast(self) -> None:
        await self.member.broadcast_command("placement", self.current().to_dict())
        self._last_broadcast = time.monotonic()
