"""The live membership view as plain values, folded by pure functions.

Each node sends a heartbeat (its id, incarnation, sequence number, control endpoint,
election claim, and the version and digest of its state record) to every peer it knows,
a few times a second. The record itself moves only when it changes (statesync.py);
``with_state`` attaches what arrived.
``apply_heartbeat`` folds one into the member table, ``expire`` marks silent members
suspect and then removes them, ``make_view`` produces the immutable ``ClusterView`` the
rest of the node reads. No I/O here: the same functions drive tests and simulators.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import statesync

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
    state_version: int = 0  # of the sender's state record (statesync.py)
    state_digest: bytes = statesync.EMPTY_DIGEST
    interval: float = 0.2  # seconds between the sender's heartbeats (scales with size)

    @property
    def claims_leadership(self) -> bool:
        return self.leader == self.node_id

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.node_id, "inc": self.incarnation, "seq": self.seq,
                "host": self.host, "port": self.port, "term": self.term,
                "leader": self.leader, "prio": self.priority, "elig": self.eligible,
                "sv": self.state_version, "sd": self.state_digest,
                "ivl": round(self.interval * 1000)}

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> Heartbeat:
        """Parse a received heartbeat; raise ValueError on a malformed one."""
        try:
            version, fingerprint = statesync.parse_announcement(msg)
            hb = cls(node_id=str(msg["id"]), incarnation=int(msg["inc"]), seq=int(msg["seq"]),
                     host=str(msg["host"]), port=int(msg["port"]), term=int(msg["term"]),
                     leader=None if msg.get("leader") is None else str(msg["leader"]),
                     priority=int(msg["prio"]), eligible=bool(msg["elig"]),
                     state_version=version, state_digest=fingerprint,
                     interval=int(msg["ivl"]) / 1000)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed heartbeat: {exc}") from None
        if not hb.node_id or not 0 < hb.port < 65536:
            raise ValueError("malformed heartbeat: empty id or bad port")
        if not 0.01 <= hb.interval <= 60.0:
            raise ValueError(f"malformed heartbeat: interval {hb.interval} s out of range")
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
    # What the member announces of its record, and what this node holds of it.
    state_version: int = 0
    state_digest: bytes = statesync.EMPTY_DIGEST
    synced: statesync.Held | None = None
    interval: float = 0.2

    @property
    def state_current(self) -> bool:
        return statesync.is_current(self.synced, self.state_version, self.state_digest)

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
    kept = old if same and old is not None else None
    member = Member(
        node_id=hb.node_id, host=hb.host, port=hb.port, incarnation=hb.incarnation,
        seq=hb.seq, term=hb.term, leader=hb.leader, priority=hb.priority,
        eligible=hb.eligible, state=kept.state if kept else {},
        headline=kept.headline if kept else {},
        first_seen=kept.first_seen if kept else now, last_seen=now, status=ALIVE,
        capabilities=kept.capabilities if kept else None,
        state_version=hb.state_version, state_digest=hb.state_digest,
        synced=kept.synced if kept else None, interval=hb.interval)
    table = dict(members)
    table[hb.node_id] = member
    return table, True


def expire(members: Members, now: float, suspect_after: float, remove_after: float,
           base_interval: float | None = None) -> tuple[dict[str, Member], list[str]]:
    """Mark members silent for ``suspect_after`` suspect; drop those silent for
    ``remove_after``. Returns (new table, removed ids).

    With ``base_interval`` (the heartbeat interval the two bounds were set for), a
    member that announces a longer interval (a large cluster) gets bounds scaled by
    the same factor: silence is counted in its heartbeats, not in seconds."""
    table: dict[str, Member] = {}
    removed: list[str] = []
    for node_id, member in members.items():
        silent = now - member.last_seen
        scale = max(1.0, member.interval / base_interval) if base_interval else 1.0
        if silent >= remove_after * scale:
            removed.append(node_id)
            continue
        status = SUSPECT if silent >= suspect_after * scale else ALIVE
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


def with_state(members: Members, node_id: str, incarnation: int,
               update: Mapping[str, Any]) -> tuple[dict[str, Member], bool]:
    """Fold a state update (statesync.answer) from ``node_id`` into its entry.

    Returns (new table, applied). Not applied: unknown member, another incarnation,
    or an update that does not fit what is held (the caller fetches the full record).
    Reserved keys of the record: ``_head`` (the capability headline) and ``_peers``
    (control endpoints the owner knows, gossiped so seeds are transitive).
    """
    table = dict(members)
    member = table.get(node_id)
    if member is None or member.incarnation != incarnation:
        return table, False
    held = statesync.apply_update(member.synced, update)
    if held is None:
        table[node_id] = replace(member, synced=None)
        return table, False
    if held is member.synced:
        return table, True
    record = dict(held.record)
    head = record.pop("_head", None)
    record.pop("_peers", None)
    record.pop("_rev", None)
    table[node_id] = replace(member, synced=held, state=record,
                             headline=head if isinstance(head, Mapping) else {})
    return table, True


def stale(members: Members) -> list[str]:
    """Members whose announced record this node does not hold (to fetch)."""
    return [m.node_id for m in members.values() if not m.state_current]


def heartbeat_interval(base: float, peers: int, max_per_s: float) -> float:
    """Seconds between my heartbeats: ``base``, stretched so that sending one to each
    of ``peers`` stays within ``max_per_s`` messages a second (large clusters)."""
    return max(base, peers / max_per_s) if max_per_s > 0 else base


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
