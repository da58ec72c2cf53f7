"""Per-request routing (pure): where one request should go, or why it should not.

The node that receives a request calls ``route`` with the options its latest view of the
cluster offers (``targets_for`` builds them from the placement and the synced state):
a local replica, a peer replica, or the head of a pipeline. It picks the one with the
least expected completion time, refuses at once when none can meet the deadline (a late
answer is worth nothing and its compute delays others), and returns the rest, in order,
for retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epara.node.leader.estimate import unit_perf
from epara.node.leader.model import ClusterState, Placement, ServiceSpec


@dataclass(frozen=True)
class Target:
    unit: str  # the unit id (service@devices)
    device: str  # where the request goes first (the replica, or the pipeline's head)
    local: bool
    link_s: float  # getting the request there and the answer back (0 when local)
    wait_s: float  # queued work ahead of it
    service_s: float  # its own time once started

    @property
    def expected_s(self) -> float:
        return self.link_s + self.wait_s + self.service_s


@dataclass(frozen=True)
class Route:
    target: Target | None  # None: refused
    fallbacks: tuple[Target, ...]  # also within the deadline, best first, for retries
    reason: str

    @property
    def refused(self) -> bool:
        return self.target is None


def route(service: str, targets: Sequence[Target], budget_s: float | None,
          probe: bool = False) -> Route:
    """Least expected completion among ``targets``; refused when none fits ``budget_s``
    (the time left before the request's deadline; None: no deadline), unless ``probe``:
    then the best target takes it anyway. Estimates come from run times measured on
    requests served, so a service refused on an estimate that one slow run inflated
    would never be measured again; the caller lets a probe through now and then
    (``Router``, ``PROBE_INTERVAL_S``)."""
    if not targets:
        return Route(None, (), f"{service} is not placed on any live device")
    # Ties go to the local replica (no network), then to a stable order.
    ranked = sorted(targets, key=lambda t: (t.expected_s, not t.local, t.unit))
    best = ranked[0]
    if probe and budget_s is not None and best.expected_s > budget_s:
        return Route(best, (), f"probe: {best.unit} expects {best.expected_s * 1000:.0f} ms "
                     f"of a {budget_s * 1000:.0f} ms budget; measuring it again")
    if budget_s is not None and best.expected_s > budget_s:
        return Route(None, (), (
            f"{service}: no target can answer within {budget_s * 1000:.0f} ms; the best, "
            f"{best.unit}, expects {best.expected_s * 1000:.0f} ms (queue "
            f"{best.wait_s * 1000:.0f} ms, compute {best.service_s * 1000:.0f} ms, "
            f"network {best.link_s * 1000:.0f} ms)"))
    fallbacks = tuple(t for t in ranked[1:] if budget_s is None or t.expected_s <= budget_s)
    where = "local replica" if best.local else f"{best.device}"
    return Route(best, fallbacks, f"{where}: expected {best.expected_s * 1000:.0f} ms")


def targets_for(spec: ServiceSpec, placement: Placement, state: ClusterState, origin: str,
                tokens: float | None = None) -> tuple[Target, ...]:
    """Routing options for a request to ``spec`` arriving at ``origin``.

    Queue depths come from the synced state records; a unit's queue drains at its
    estimated capacity, so ``wait = queued / capacity``. Units on devices the state calls
    dead (or does not know) are skipped.
    """
    devices = {i: d.profile for i, d in state.devices.items()}
    out = []
    for unit in placement.units_of(spec.name):
        head = state.devices.get(unit.head)
        if head is None or not all(
                d in state.devices and state.devices[d].alive for d in unit.devices):
            continue
        perf = unit_perf(spec, unit, devices, tokens)
        queued = head.queues.get(spec.name, 0)
        local = unit.head == origin
        source = devices.get(origin, head.profile)
        link = 0.0 if local else source.transfer_s(spec.input_mb) + \
            head.profile.transfer_s(0.0)
        out.append(Target(unit.id, unit.head, local, link, queued / perf.capacity_hz,
                          perf.latency_s))
    return tuple(out)
