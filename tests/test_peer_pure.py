"""Pure functions of the peer layer: view folding, election decisions, adverts, keys."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epara.peer import election, membership, statesync
from epara.peer.capabilities import Accelerator, classify_device
from epara.peer.discovery import MAX_TXT_BYTES, parse_advert, txt_properties
from epara.peer.election import Candidate, ElectionState, Timing, accept_command, decide
from epara.peer.membership import Heartbeat, apply_heartbeat, expire, make_view
from epara.peer.security import (
    CredentialsError,
    cluster_fingerprint,
    create_cluster_credentials,
    load_cluster_credentials,
)
from epara.peer.wire import PROTOCOL_VERSION


def hb(node: str, inc: int = 1, seq: int = 1, term: int = 0, leader: str | None = None,
       prio: int = 100, eligible: bool = True, state: dict | None = None) -> Heartbeat:
    return Heartbeat(node, inc, seq, "127.0.0.1", 5000, term, leader, prio, eligible,
                     state_version=1 if state else 0,
                     state_digest=statesync.digest(state or {}))


def full_update(state: dict, version: int = 1) -> dict:
    return {"sv": version, "sd": statesync.digest(state), "full": state}


# --- membership folding ---

def test_heartbeat_wire_roundtrip() -> None:
    beat = hb("a", state={"q": 3})
    assert Heartbeat.from_wire(beat.to_wire()) == beat
    with pytest.raises(ValueError):
        Heartbeat.from_wire({"id": "a"})
    for bad in ({"sd": b"short"}, {"sv": -1}, {"ivl": 0}):
        with pytest.raises(ValueError):
            Heartbeat.from_wire({**beat.to_wire(), **bad})


def test_apply_heartbeat_orders_by_incarnation_then_seq() -> None:
    table, news = apply_heartbeat({}, hb("a", inc=5, seq=1, state={"x": 1}), now=1.0)
    table, applied = membership.with_state(table, "a", 5, full_update({"x": 1}))
    assert news and applied and table["a"].state == {"x": 1} and table["a"].state_current
    table, news = apply_heartbeat(table, hb("a", inc=5, seq=1, state={"x": 2}), now=2.0)
    assert not news and table["a"].state == {"x": 1}  # duplicate
    table, news = apply_heartbeat(table, hb("a", inc=4, seq=99), now=2.0)
    assert not news and table["a"].incarnation == 5  # from a previous life
    table = membership.with_capabilities(table, "a", 5, {"cpu_cores": 2})
    table, news = apply_heartbeat(table, hb("a", inc=5, seq=2), now=3.0)
    assert news and table["a"].first_seen == 1.0 and table["a"].capabilities
    table, news = apply_heartbeat(table, hb("a", inc=6, seq=1), now=4.0)
    # A restart is a fresh member: capabilities are fetched again, first_seen resets.
    assert news and table["a"].capabilities is None and table["a"].first_seen == 4.0


def test_with_capabilities_ignores_stale_incarnation() -> None:
    table, _ = apply_heartbeat({}, hb("a", inc=2), now=0.0)
    assert membership.with_capabilities(table, "a", 1, {"x": 1})["a"].capabilities is None


def test_expire_suspects_then_removes() -> None:
    table, _ = apply_heartbeat({}, hb("a"), now=0.0)
    table, _ = apply_heartbeat(table, hb("b"), now=1.0)
    t1, removed = expire(table, now=1.0, suspect_after=0.75, remove_after=1.5)
    assert removed == [] and t1["a"].status == "suspect" and t1["b"].status == "alive"
    t2, removed = expire(t1, now=1.6, suspect_after=0.75, remove_after=1.5)
    assert removed == ["a"] and set(t2) == {"b"}
    # A member that announces a 4x longer interval (a large cluster) gets 4x the bounds.
    slow, _ = apply_heartbeat({}, replace(hb("s"), interval=0.8), now=0.0)
    t3, removed = expire(slow, now=2.0, suspect_after=0.75, remove_after=1.5,
                         base_interval=0.2)
    assert removed == [] and t3["s"].status == "alive"
    assert expire(slow, now=6.1, suspect_after=0.75, remove_after=1.5,
                  base_interval=0.2)[1] == ["s"]


def test_heartbeat_interval_stretches_with_cluster_size() -> None:
    assert membership.heartbeat_interval(0.2, 4, 64.0) == 0.2
    assert membership.heartbeat_interval(0.2, 31, 64.0) == pytest.approx(31 / 64)
    assert membership.heartbeat_interval(0.2, 999, 0.0) == 0.2


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 3), st.integers(1, 20)),
                max_size=40))
def test_fold_is_order_insensitive_for_the_newest_record(beats: list) -> None:
    """Whatever order heartbeats arrive in, each member ends at its newest (inc, seq)."""
    def fold(order: list) -> dict:
        table: dict = {}
        for node, inc, seq in order:
            table, _ = apply_heartbeat(table, hb(node, inc, seq), now=0.0)
        return {k: (m.incarnation, m.seq) for k, m in table.items()}
    expected: dict[str, tuple[int, int]] = {}
    for node, inc, seq in beats:
        expected[node] = max(expected.get(node, (0, 0)), (inc, seq))
    assert fold(beats) == expected == fold(list(reversed(beats)))


def test_make_view_marks_roles_and_sorts() -> None:
    table, _ = apply_heartbeat({}, hb("b"), now=0.0)
    table, _ = apply_heartbeat(table, hb("a"), now=0.0)
    view = make_view("a", table.values(), "b", 3)
    assert view.member_ids == ("a", "b") and not view.is_leader
    assert view.member("b").role == "leader" and view.member("a").role == "follower"
    assert membership.view_from_dict(view.to_dict()).summary() == view.summary()


# --- election ---

GRACE = Timing(startup_grace=2.0, leaderless_timeout=3.0)


def cand(node: str, term: int = 0, leader: str | None = None, prio: int = 100,
         eligible: bool = True) -> Candidate:
    return Candidate(node, term, leader, prio, eligible)


def test_no_claim_during_startup_grace_then_top_priority_claims() -> None:
    peers = [cand("a", prio=100), cand("b", prio=200)]
    s = ElectionState(started_at=0.0)
    assert decide("b", s, peers, now=1.0, timing=GRACE).leader is None
    won = decide("b", s, peers, now=2.5, timing=GRACE)
    assert won.leader == "b" and won.term == 1
    assert decide("a", s, peers, now=2.5, timing=GRACE).leader is None  # waits for b


def test_never_lead_node_does_not_claim_even_after_timeout() -> None:
    s = ElectionState(started_at=0.0, leaderless_since=0.0)
    assert decide("a", s, [cand("a", eligible=False)], now=100.0, timing=GRACE).leader is None


def test_lower_node_claims_when_top_stays_silent() -> None:
    peers = [cand("a", prio=100), cand("b", prio=200)]
    s = ElectionState(started_at=0.0, leaderless_since=2.0)
    assert decide("a", s, peers, now=4.0, timing=GRACE).leader is None
    assert decide("a", s, peers, now=5.1, timing=GRACE).leader == "a"


def test_follow_existing_leader_even_if_better() -> None:
    """Stability: a capable newcomer adopts the incumbent instead of deposing it."""
    peers = [cand("old", term=4, leader="old", prio=100), cand("new", prio=300)]
    s = decide("new", ElectionState(started_at=0.0), peers, now=10.0, timing=GRACE)
    assert (s.leader, s.term) == ("old", 4)


def test_dead_leader_replaced_with_higher_term() -> None:
    s = ElectionState(term=4, leader="old", started_at=0.0)
    # "old" is gone from my view, but b still follows it: b has not noticed yet.
    peers = [cand("a", term=4, leader="old", prio=300), cand("b", term=4, leader="old")]
    s = decide("a", s, peers, now=10.0, timing=GRACE)
    assert (s.leader, s.leaderless_since) == (None, 10.0)
    peers = [cand("a", term=4, leader=None, prio=300), cand("b", term=4, leader=None)]
    s = decide("a", s, peers, now=10.2, timing=GRACE)  # now b has noticed too
    assert (s.leader, s.term) == ("a", 5)


def test_claim_after_patience_even_if_a_hidden_leader_is_followed() -> None:
    s = ElectionState(term=4, leader=None, started_at=0.0, leaderless_since=10.0)
    peers = [cand("a", term=4, prio=300), cand("b", term=4, leader="ghost")]
    assert decide("a", s, peers, now=12.9, timing=GRACE).leader is None
    assert decide("a", s, peers, now=13.1, timing=GRACE).leader == "a"


def test_merge_keeps_the_higher_term_leader() -> None:
    a = ElectionState(term=3, leader="a", started_at=0.0)
    peers = [cand("a", 3, "a", prio=900), cand("b", 5, "b", prio=1)]
    assert decide("a", a, peers, now=10.0, timing=GRACE).leader == "b"  # a steps down
    b = ElectionState(term=5, leader="b", started_at=0.0)
    assert decide("b", b, peers, now=10.0, timing=GRACE) == b


def test_leader_moves_past_a_higher_follower_term() -> None:
    s = ElectionState(term=3, leader="a", started_at=0.0)
    peers = [cand("a", 3, "a"), cand("c", 7, "a")]
    assert decide("a", s, peers, now=10.0, timing=GRACE).term == 8


def test_leader_yields_to_a_newer_leadership_it_cannot_hear_yet() -> None:
    """After a heal, the old leader may hear a follower of the newer leader first."""
    s = ElectionState(term=3, leader="a", started_at=0.0)
    peers = [cand("a", 3, "a", prio=900), cand("c", 4, "x")]
    s = decide("a", s, peers, now=10.0, timing=GRACE)
    assert (s.leader, s.term) == (None, 4)
    s = decide("a", s, [*peers, cand("x", 4, "x", prio=1)], now=10.2, timing=GRACE)
    assert (s.leader, s.term) == ("x", 4)


def test_accept_command_only_from_current_leader_and_term() -> None:
    s = ElectionState(term=5, leader="b")
    assert accept_command(s, "b", 5) and accept_command(s, "b", 6)
    assert not accept_command(s, "b", 4)  # older term
    assert not accept_command(s, "a", 5)  # not my leader


node_ids = st.sampled_from(["n0", "n1", "n2", "n3", "n4"])


@settings(max_examples=200)
@given(st.dictionaries(node_ids, st.tuples(st.integers(0, 6), st.booleans(),
                                            st.integers(0, 3), st.booleans()), min_size=1))
def test_one_leader_after_one_exchange_round(nodes: dict) -> None:
    """In a fully connected set, whatever each node believed before (any mix of
    claimants and terms), after every node has seen everyone's claim, all that follow
    anybody follow the same leader, and that leader follows itself."""
    states = {n: ElectionState(term=t, leader=n if claims and elig else None,
                               started_at=0.0, leaderless_since=0.0)
              for n, (t, claims, _p, elig) in nodes.items()}
    prio = {n: p for n, (_t, _c, p, _e) in nodes.items()}
    elig = {n: e for n, (_t, _c, _p, e) in nodes.items()}
    for _round in range(3):
        cands = [cand(n, s.term, s.leader, prio[n], elig[n]) for n, s in states.items()]
        states = {n: decide(n, s, cands, now=100.0, timing=GRACE) for n, s in states.items()}
    leaders = {s.leader for s in states.values()}
    if any(elig.values()):
        assert len(leaders) == 1 and None not in leaders
        (leader,) = leaders
        assert elig[leader] and states[leader].leader == leader
        # Every follower accepts the leader's commands at the leader's term.
        assert all(accept_command(s, leader, states[leader].term) for s in states.values())
    else:
        assert leaders == {None}


def test_leadership_priority_prefers_servers_on_mains() -> None:
    server = election.leadership_priority({"cls": "server", "gf": 50})
    pi = election.leadership_priority({"cls": "microcomputer", "gf": 5})
    laptop = election.leadership_priority({"cls": "server", "gf": 500}, "battery", 80)
    assert server > pi > laptop


# --- adverts and device classes ---

def test_txt_record_small_and_filtered() -> None:
    head = {"cls": "embedded", "cpu": 4, "mem": 3900, "gf": 12.5, "acc": "jetson"}
    props = txt_properties("jetson-nano-7f3a21", "0123456789abcdef", 7370, head)
    assert sum(len(k) + len(v) + 2 for k, v in props.items()) < MAX_TXT_BYTES
    raw = {k.encode(): v.encode() for k, v in props.items()}
    ok = parse_advert("x._epara._tcp.local.", raw, ["10.0.0.2"], 7370, "0123456789abcdef")
    assert ok is not None and ok.node_id == "jetson-nano-7f3a21"
    assert ok.headline["cls"] == "embedded"
    assert parse_advert("x", raw, ["10.0.0.2"], 7370, "ffffffffffffffff") is None
    raw[b"pv"] = str(PROTOCOL_VERSION + 1).encode()
    assert parse_advert("x", raw, ["10.0.0.2"], 7370, "0123456789abcdef") is None
    with pytest.raises(ValueError):
        txt_properties("n", "c", 1, {"blob": "x" * 500})


def test_classify_device() -> None:
    assert classify_device("x86_64", "", (Accelerator("cuda", "RTX"),), 32000) == "server"
    assert classify_device("aarch64", "NVIDIA Jetson Orin Nano", (Accelerator("jetson", "J"),),
                           7600) == "embedded"
    assert classify_device("aarch64", "Raspberry Pi 4 Model B", (), 3800) == "microcomputer"
    assert classify_device("armv7l", "", (), 1000) == "microcomputer"
    assert classify_device("x86_64", "", (), 24000) == "server"


# --- credentials ---

def test_credentials_created_private_and_reloadable(tmp_path: Path) -> None:
    creds = create_cluster_credentials(tmp_path / "c")
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "c" / "cluster.key").st_mode) == 0o600
    loaded = load_cluster_credentials(tmp_path / "c")
    assert loaded == creds and loaded.cluster_id == cluster_fingerprint(creds.public_key)
    # The fingerprint reveals neither key, and repr never shows the secret.
    assert creds.secret_key.decode() not in repr(creds) and len(creds.cluster_id) == 16
    with pytest.raises(CredentialsError):
        create_cluster_credentials(tmp_path / "c")
    os.chmod(tmp_path / "c" / "cluster.key", 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_cluster_credentials(tmp_path / "c")
    with pytest.raises(CredentialsError, match="cluster init"):
        load_cluster_credentials(tmp_path / "missing")
