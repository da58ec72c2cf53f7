"""The live membership view as plain values, folded by pure functions.

Each node sends a heartbeat (its id, incarnation, sequence number, control endpoint,
election claim and a small state record) to every peer it knows, a few times a second.
``apply_heartbeat`` folds one into the member table, ``expire`` marks silent members
suspect and then removes them, ``make_view`` produces the immutable ``ClusterView`` the
rest of the node reads. No I/O here: the same functions drive tests and simulators.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

ALIVE = "alive"
SUSPECT = "suspect"
LEADER = "leader"
FOLLOWER = "follower"


@dataclass(frozen=True)
class Heartbeat:
    """What a node says about itself; also its wire form (``to_wire``/``from_wire``)."""

    node_id: str
    incarnation: int  # grows on every start: a restarted node is a new incarnation
    seq: int  # grows on every heartbeat within one incarnation
    host: str
    port: int
    term: int
    leader: str | None  # whom the sender follows (itself when it leads)
    priority: int
    eligible: bool  # False for never_lead nodes
    state: Mapping[str, Any] = field(default_factory=dict)
    headline: Mapping[str, Any] = field(default_factory=dict)

    @property
    def claims_leadership(self) -> bool:
        return self.leader == self.node_id

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.node_id, "inc": self.incarnation, "seq": self.seq,
                "host": self.host, "port": self.port, "term": self.term,
                "leader": self.leader, "prio": self.priority, "elig": self.eligible,
                "state": dict(self.state), "head": dict(self.headline)}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Heartbeat:
        """Parse a received heartbeat; raise ValueError on a malformed one."""
        try:
            hb = cls(node_id=str(msg["id"]), incarnation=int(msg["inc"]), seq=int(msg["seq"]),
                     host=str(msg["host"]), port=int(msg["port"]), term=int(msg["term"]),
                     leader=None if msg.get("leader") is None else str(msg["leader"]),
                     priority=int(msg["prio"]), eligible=bool(msg["elig"]),
                     state=dict(msg.get("state") or {}), headline=dict(msg.get("head") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed heartbeat: {exc}") from None
        if not hb.node_id or not 0 < hb.port < 65536:
            raise ValueError("malformed heartbeat: empty id or bad port")
        return hb


@dataclass(frozen=True)
class Member:
    """One node as this node sees it. ``state`` and ``capabilities`` are read-only."""

    node_id: str
    host: str
    port: int
    incarnation: int
    seq: int
    term: int
    leader: str | None
    priority: int
    eligible: bool
    state: Mapping[str, Any]
    headline: Mapping[str, Any]
    first_seen: float  # local monotonic clock, this incarnation
    last_seen: float
    status: str = ALIVE
    capabilities: Mapping[str, Any] | None = None  # fetched over the control port
    role: str = FOLLOWER  # as this node believes (filled in by make_view)

    @property
    def claims_leadership(self) -> bool:
        return self.leader == self.node_id

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "host": self.host, "port": self.port,
                "incarnation": self.incarnation, "term": self.term, "role": self.role,
                "status": self.status, "priority": self.priority, "eligible": self.eligible,
                "state": dict(self.state), "headline": dict(self.headline),
                "capabilities": None if self.capabilities is None else dict(self.capabilities)}


Members = Mapping[str, Member]


def apply_heartbeat(members: Members, hb: Heartbeat, now: float) -> tuple[dict[str, Member], bool]:
    """Fold one heartbeat in; returns (new table, whether it was news rather than stale).

    An older incarnation is a message from a process that has since restarted (or a
    delayed packet): ignored. A newer incarnation replaces the member entirely, dropping
    the previous incarnation's capabilities and state. Within one incarnation only a
    higher sequence number counts, so reordered or duplicated heartbeats change nothing.
    """
    old = members.get(hb.node_id)
    if old is not None:
        if hb.incarnation < old.incarnation:
            return dict(members), False
        if hb.incarnation == old.incarnation and hb.seq <= old.seq:
            return dict(members), False
    same = old is not None and old.incarnation == hb.incarnation
    member = Member(
        node_id=hb.node_id, host=hb.host, port=hb.port, incarnation=hb.incarnation,
        seq=hb.seq, term=hb.term, leader=hb.leader, priority=hb.priority,
        eligible=hb.eligible, state=hb.state, headline=hb.headline,
        first_seen=old.first_seen if same and old is not None else now,
        last_seen=now, status=ALIVE,
        capabilities=old.capabilities if same and old is not None else None)
    table = dict(members)
    table[hb.node_id] = member
    return table, True


def expire(members: Members, now: float, suspect_after: float,
           remove_after: float) -> tuple[dict[str, Member], list[str]]:
    """Mark members silent for ``suspect_after`` suspect; drop those silent for
    ``remove_after``. Returns (new table, removed ids)."""
    table: dict[str, Member] = {}
    removed: list[str] = []
    for node_id, member in members.items():
        silent = now - member.last_seen
        if silent >= remove_after:
            removed.append(node_id)
            continue
        status = SUSPECT if silent >= suspect_after else ALIVE
        table[node_id] = member if member.status == status else replace(member, status=status)
    return table, removed


def with_capabilities(members: Members, node_id: str, incarnation: int,
                      capabilities: Mapping[str, Any]) -> dict[str, Member]:
    """Attach a fetched capability record, unless the member has since restarted."""
    table = dict(members)
    member = table.get(node_id)
    if member is not None and member.incarnation == incarnation:
        table[node_id] = replace(member, capabilities=capabilities)
    return table


@dataclass(frozen=True)
class ClusterView:
    """An immutable snapshot: who is here, who leads, in which term."""

    self_id: str
    members: tuple[Member, ...]  # sorted by node id, self included
    leader_id: str | None
    term: int

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.node_id == node_id), None)

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.self_id

    def summary(self) -> tuple[tuple[str, ...], str | None, int]:
        """What subscribers are told about: membership, leader, term (not state churn)."""
        return self.member_ids, self.leader_id, self.term

    def to_dict(self) -> dict[str, Any]:
        return {"self": self.self_id, "leader": self.leader_id, "term": self.term,
                "members": [m.to_dict() for m in self.members]}


def make_view(self_id: str, members: Iterable[Member], leader_id: str | None,
              term: int) -> ClusterView:
    ordered = tuple(
        replace(m, role=LEADER if m.node_id == leader_id else FOLLOWER)
        for m in sorted(members, key=lambda m: m.node_id))
    return ClusterView(self_id=self_id, members=ordered, leader_id=leader_id, term=term)


def view_from_dict(data: Mapping[str, Any]) -> ClusterView:
    """Rebuild a view from ``to_dict`` output (as a ``status`` reply carries it)."""
    members = tuple(
        Member(node_id=m["node_id"], host=m["host"], port=m["port"],
               incarnation=m["incarnation"], seq=0, term=m["term"], leader=None,
               priority=m["priority"], eligible=m["eligible"], state=m["state"],
               headline=m["headline"], first_seen=0.0, last_seen=0.0, status=m["status"],
               capabilities=m["capabilities"], role=m["role"])
        for m in data["members"])
    return ClusterView(self_id=data["self"], members=members, leader_id=data["leader"],
                       term=data["term"])
