"""Leader election as a pure function of (my election state, what my peers claim, time).

See docs/election.md for the algorithm, its guarantees and its limits. In short: every
heartbeat carries the sender's term and whom it follows; the node that follows itself
is a *claimant*. Among visible claimants the one with the highest (term, priority, id)
wins and every other claimant steps down. With no visible claimant, and once no member
still follows a leader it cannot hear, the top eligible member by (priority, id) claims
a term one above every term it has seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

_CLASS_WEIGHT = {"server": 3, "embedded": 2, "microcomputer": 1}


@dataclass(frozen=True)
class ElectionState:
    term: int = 0
    leader: str | None = None
    started_at: float = 0.0  # monotonic; no claims during the startup grace
    leaderless_since: float | None = None


@dataclass(frozen=True)
class Candidate:
    """One alive member as election input (self included)."""

    node_id: str
    term: int
    leader: str | None
    priority: int
    eligible: bool

    @property
    def claims(self) -> bool:
        return self.leader == self.node_id


@dataclass(frozen=True)
class Timing:
    startup_grace: float = 2.0  # listen before claiming: an existing leader is adopted
    leaderless_timeout: float = 3.0  # then claim even if a better candidate stays silent


def leadership_priority(headline: Mapping[str, Any], power_source: str = "unknown",
                        battery_percent: int | None = None) -> int:
    """Higher leads first: device class, then compute speed; a device on battery is
    last among eligible nodes because leading costs it power and it may vanish."""
    weight = _CLASS_WEIGHT.get(str(headline.get("cls", "")), 0)
    if power_source == "battery":
        weight = 0
    speed = min(99, int(4 * math.log2(1 + max(0.0, float(headline.get("gf", 0) or 0)))))
    return weight * 100 + speed


def claim_key(c: Candidate) -> tuple[int, int, str]:
    return (c.term, c.priority, c.node_id)


def decide(self_id: str, state: ElectionState, candidates: Iterable[Candidate],
           now: float, timing: Timing = Timing()) -> ElectionState:
    """Next election state for ``self_id``. ``candidates`` are the alive members, self
    included (self's entry reflects ``state``)."""
    alive = list(candidates)
    me = next((c for c in alive if c.node_id == self_id), None)
    max_term = max([state.term, *(c.term for c in alive)])
    claims = [c for c in alive if c.claims]
    if claims:
        best = max(claims, key=claim_key)
        if best.node_id == self_id:
            rival = [c for c in alive if c.term > state.term and c.leader not in (None, self_id)]
            if rival:
                # A member follows another leader in a later term (one I cannot hear yet,
                # e.g. right after a partition heals): that leadership is newer, so step
                # down and wait to hear it, rather than usurp it with a bigger term.
                return replace(state, term=max_term, leader=None, leaderless_since=now)
            # Still the leader. A higher term from a member that follows me (it saw a
            # leader now gone) would make it ignore my commands: move past that term.
            term = state.term if state.term >= max_term else max_term + 1
            return replace(state, term=term, leader=self_id, leaderless_since=None)
        # Follow the best claimant, never lowering my own term (commands from a leader
        # with a lower term are ignored until it moves past my term; it will, above).
        return replace(state, term=max(state.term, best.term), leader=best.node_id,
                       leaderless_since=None)
    since = state.leaderless_since if state.leaderless_since is not None else now
    waiting = replace(state, leader=None, leaderless_since=since)
    if me is None or not me.eligible or now - state.started_at < timing.startup_grace:
        return waiting
    if now - since >= timing.leaderless_timeout:
        # Whoever should have claimed has not (or its claim cannot reach me): claim,
        # and let the merge rule settle it if others did the same.
        return replace(state, term=max_term + 1, leader=self_id, leaderless_since=None)
    # Members still following a leader I cannot hear: either it just died and they
    # have not noticed yet (a few heartbeats), or it is alive and its claim is on the
    # way (a healed partition). Either way, claiming now would make a second leader.
    hidden_leader = any(c.leader not in (None, self_id) for c in alive if c.node_id != self_id)
    top = max((c for c in alive if c.eligible), key=lambda c: (c.priority, c.node_id))
    if top.node_id == self_id and not hidden_leader:
        return replace(state, term=max_term + 1, leader=self_id, leaderless_since=None)
    return waiting


def accept_command(state: ElectionState, sender: str, term: int) -> bool:
    """A command counts only from the leader I follow, in my current term or later.

    The leader's heartbeats travel on the same connection before its commands, so by the
    time a command arrives the receiver has already folded the claim that makes the
    sender its leader.
    """
    return sender == state.leader and term >= state.term
