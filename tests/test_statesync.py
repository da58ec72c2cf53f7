"""State sync by version, digest and delta (peer/statesync.py), without a network.

The last test drives 1,000 simulated members through the same pure functions the
member process uses (publish, answer, membership.apply_heartbeat / with_state / stale),
with lost heartbeats and restarts, and checks that an observer converges to every
record while sending a small fraction of the bytes of full records per heartbeat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import cbor2

from epara.peer import membership, statesync
from epara.peer.membership import Heartbeat


def catalogue(n: int) -> dict:
    """Static cost rows, the bulk of a real node's record."""
    return {f"model-{i}": {"ms": [12.5, 20.1, 33.0, 61.2], "mem_mb": 180 + i, "batch": 4,
                           "stages": [[0, 6], [6, 12]]} for i in range(n)}


def test_publish_bumps_version_only_on_change() -> None:
    pub = statesync.publish(statesync.Published(), {"a": 1, "b": [1, 2]})
    assert pub.version == 1
    assert statesync.publish(pub, {"b": [1, 2], "a": 1}) is pub  # key order is not content
    assert statesync.publish(pub, {"a": 2, "b": [1, 2]}).version == 2


def test_delta_from_a_remembered_version_and_full_otherwise() -> None:
    pub = statesync.Published()
    records = [{"cat": catalogue(3), "q": i, "gone": 1} if i < 2 else {"cat": catalogue(3),
               "q": i} for i in range(12)]
    for record in records:
        pub = statesync.publish(pub, record)
    delta = statesync.answer(pub, pub.version - 1)
    assert delta["set"] == {"q": 11} and delta["rm"] == [] and "full" not in delta
    held = statesync.Held(pub.version - 1, records[-2], statesync.digest(records[-2]))
    assert statesync.apply_update(held, delta) == statesync.Held(pub.version, records[-1],
                                                                  pub.digest)
    # Older than the history: the full record.
    assert statesync.answer(pub, 1)["full"] == records[-1]
    assert statesync.answer(pub, None)["full"] == records[-1]
    assert set(statesync.answer(pub, pub.version)) == {"sv", "sd"}
    # A delta on the wrong base, a forged digest, a malformed update: not applied.
    assert statesync.apply_update(None, delta) is None
    assert statesync.apply_update(held, {**delta, "sd": b"\0" * 8}) is None
    assert statesync.apply_update(held, {**delta, "set": [1]}) is None
    assert statesync.apply_update(held, {"sv": "x", "sd": pub.digest}) is None


def test_removed_keys_travel_in_the_delta() -> None:
    pub = statesync.publish(statesync.Published(), {"a": 1, "b": 2})
    held = statesync.apply_update(None, statesync.answer(pub, None))
    pub = statesync.publish(pub, {"a": 1})
    update = statesync.answer(pub, held.version)
    assert update["rm"] == ["b"] and update["set"] == {}
    assert statesync.apply_update(held, update).record == {"a": 1}


@dataclass
class SimNode:
    node_id: str
    incarnation: int
    pub: statesync.Published
    seq: int = 0


CATALOGUE = catalogue(8)


def test_thousand_members_converge_with_deltas_and_lost_heartbeats() -> None:
    rng = random.Random(15)
    nodes = [SimNode(f"dev-{i:04d}", 1, statesync.Published()) for i in range(1000)]
    table: dict = {}
    sync_bytes = 0  # heartbeats plus state updates, as the observer receives them
    full_bytes = 0  # what the old scheme sent: the whole record in every heartbeat
    asked = answered = 0
    full_sizes: dict[bytes, int] = {}
    for tick in range(16):
        now = float(tick)
        last_round = tick >= 14  # no loss at the end: everything must converge
        counted = tick >= 4  # bytes after the first full records went out
        for node in nodes:
            if rng.random() < 0.002 and tick < 12:  # a restart: new incarnation, fresh state
                node.incarnation += 1
                node.pub, node.seq = statesync.Published(), 0
            record = {"catalogue": CATALOGUE, "_head": {"cls": "embedded"},
                      "demand": {"m": round(rng.random(), 3)} if rng.random() < 0.1 else
                      dict(node.pub.record.get("demand") or {}),
                      "ready": sorted(rng.sample(range(20), 3)) if rng.random() < 0.05
                      else list(node.pub.record.get("ready") or [])}
            before = node.pub.version
            node.pub = statesync.publish(node.pub, record)
            node.seq += 1
            beat = Heartbeat(node.node_id, node.incarnation, node.seq, "10.0.0.1", 7370, 1,
                             "dev-0000", 100, True, node.pub.version, node.pub.digest)
            wire = beat.to_wire()
            if node.pub.version != before:
                wire["su"] = statesync.answer(node.pub, before)
            if node.pub.digest not in full_sizes:
                full_sizes[node.pub.digest] = len(cbor2.dumps(node.pub.record))
            full_bytes += counted * (len(cbor2.dumps(beat.to_wire()))
                                     + full_sizes[node.pub.digest])
            if not last_round and rng.random() < 0.2:
                continue  # this heartbeat is lost
            sync_bytes += counted * len(cbor2.dumps(wire))
            parsed = Heartbeat.from_wire(wire)
            table, _ = membership.apply_heartbeat(table, parsed, now)
            if "su" in wire and not table[node.node_id].state_current:
                table, _ = membership.with_state(table, node.node_id, node.incarnation,
                                                 wire["su"])
        # The observer asks every member whose record it does not hold; owners answer.
        by_id = {n.node_id: n for n in nodes}
        for node_id in membership.stale(table):
            member = table[node_id]
            have = member.synced.version if member.synced is not None else None
            asked += 1
            if not last_round and rng.random() < 0.2:
                continue  # the request or its answer is lost
            owner = by_id[node_id]
            update = statesync.answer(owner.pub, have)
            sync_bytes += counted * len(cbor2.dumps(update))
            answered += 1
            table, applied = membership.with_state(table, node_id, owner.incarnation, update)
            assert applied, (node_id, have, owner.pub.version)
    assert membership.stale(table) == []
    for node in nodes:
        member = table[node.node_id]
        assert member.incarnation == node.incarnation
        assert member.synced is not None and member.synced.record == node.pub.record
        assert member.headline == {"cls": "embedded"} and "catalogue" in member.state
    assert asked > 1000 and answered > 1000  # lost updates and restarts were repaired
    # Static rows move once per member incarnation, not with every heartbeat.
    assert sync_bytes < full_bytes / 5, (sync_bytes, full_bytes)
