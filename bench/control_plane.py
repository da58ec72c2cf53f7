"""Control traffic per node against cluster size, in network namespaces (needs root).

Run by hand: ``python bench/control_plane.py [--sizes 8,16,32] [--rounds 2]
[--baseline REV] [--json]``. Each host is a namespace on a bridge
(``epara.peer.testing.NamespaceLab``) running one ``python -m epara.peer.member``
process with real mDNS and CurveZMQ. For each size it waits until every node lists
every node, all agree on one leader and every node holds every member's current state
record; then, over ``--window`` seconds, it reads

* **wire bytes**: ``tx_bytes`` of each host's only interface: everything the node puts
  on the network (heartbeats, state deltas, TCP/IP and CURVE overhead, libzmq pings,
  mDNS);
* **payload bytes**: the CBOR bytes the member handed to ZeroMQ (its own counter);
* **where they go** (host 0): packets per second on its interface, and per TCP
  connection kind from ``ss -tin`` (``dialled``: its DEALERs, carrying its heartbeats;
  ``accepted``: its control ROUTER's connections, carrying the ACKs of what it
  receives), as data segments and pure ACKs; what is left is UDP (mDNS);

then SIGKILLs the leader and times until the rest agree on a new one (state sync and
election holding at that size).

``--baseline REV`` runs the same measurement on the peer code of git revision ``REV``
(exported with ``git archive``), interleaved with the working tree's (A B A B), so the
figures come with a baseline from the same run on the same (shared, noisy) machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from epara.peer import capabilities
from epara.peer.security import create_cluster_credentials
from epara.peer.testing import MemberProcess, NamespaceLab, agreed, have_netns, views, wait_for

REPO = Path(__file__).resolve().parent.parent


def export_revision(rev: str, into: Path) -> Path:
    """``peer/`` of revision ``rev`` as an importable ``epara.peer`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "peer"], check=True,
                             capture_output=True).stdout
    (into / "epara").mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into / "epara")], input=archive, check=True)
    return into


def tx_bytes(lab: NamespaceLab, i: int) -> int:
    out = subprocess.run([*lab.prefix(i), "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                         check=True, capture_output=True, text=True, timeout=20).stdout
    return int(out)


def interface_counters(lab: NamespaceLab, i: int) -> dict[str, int]:
    out = subprocess.run([*lab.prefix(i), "cat", "/sys/class/net/eth0/statistics/tx_bytes",
                          "/sys/class/net/eth0/statistics/tx_packets"], check=True,
                         capture_output=True, text=True, timeout=20).stdout.split()
    return {"bytes": int(out[0]), "packets": int(out[1])}


def tcp_segments(lab: NamespaceLab, i: int, control_port: int) -> dict[str, dict[str, int]]:
    """Segments and data segments sent, summed per connection kind (``ss -tin``)."""
    out = subprocess.run([*lab.prefix(i), "ss", "-tinH", "state", "established"],
                         check=True, capture_output=True, text=True, timeout=20).stdout
    totals = {kind: {"segs": 0, "data_segs": 0} for kind in ("dialled", "accepted")}
    kind = None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not line[0].isspace():  # Recv-Q Send-Q Local Peer
            kind = "accepted" if fields[2].endswith(f":{control_port}") else "dialled"
        elif kind is not None:
            for key, name in (("segs", "segs_out"), ("data_segs", "data_segs_out")):
                match = re.search(rf"\b{name}:(\d+)", line)
                if match:
                    totals[kind][key] += int(match.group(1))
    return totals


def breakdown(before: tuple[dict[str, int], dict[str, dict[str, int]]],
              after: tuple[dict[str, int], dict[str, dict[str, int]]],
              elapsed: float) -> dict[str, float]:
    """Per second: packets, and per connection kind data segments and pure ACKs.
    Connections opened or closed inside the window blur it (they are rare once synced)."""
    (if0, tcp0), (if1, tcp1) = before, after
    rates = {"packets": (if1["packets"] - if0["packets"]) / elapsed}
    tcp_packets = 0.0
    for kind in ("dialled", "accepted"):
        segs = (tcp1[kind]["segs"] - tcp0[kind]["segs"]) / elapsed
        data = (tcp1[kind]["data_segs"] - tcp0[kind]["data_segs"]) / elapsed
        rates[f"{kind}_data_segments"] = round(data, 1)
        rates[f"{kind}_pure_acks"] = round(segs - data, 1)
        tcp_packets += segs
    rates["other_packets"] = round(rates["packets"] - tcp_packets, 1)
    rates["packets"] = round(rates["packets"], 1)
    return rates


def synced(procs: list[MemberProcess], ids: set[str]) -> bool:
    """Everyone agrees on members and leader, and holds everyone's state record."""
    if agreed(procs, ids) is None:
        return False
    return all(m["node_id"] == v["self"] or m["state"].get("uptime_s") is not None
               for v in views(procs).values() for m in v["members"])


def run_once(root: Path, n: int, window: float, pythonpath: Path | None,
             converge_s: float = 180.0, member_args: tuple[str, ...] = ()) -> dict[str, Any]:
    creds = root / "cluster"
    if not creds.exists():
        create_cluster_credentials(creds)
    cache = root / "cache"
    lab = NamespaceLab(n).create()
    procs: list[MemberProcess] = []
    env_before = os.environ.get("PYTHONPATH")
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = str(pythonpath)
    try:
        start = time.monotonic()
        for i in range(n):
            proc = MemberProcess(f"c{i}", root / f"c{i}-{n}.json",
                                 ["--credentials", str(creds), "--cache-dir", str(cache),
                                  "--log-level", "WARNING", *member_args],
                                 prefix=lab.prefix(i), log_file=root / f"c{i}-{n}.log")
            proc.start()
            procs.append(proc)
        ids = {p.node_id for p in procs}
        try:
            wait_for(lambda: synced(procs, ids), converge_s, interval=0.5)
            converged: float | None = time.monotonic() - start
        except AssertionError:  # measured anyway: the bytes, and that it did not hold
            converged = None
        time.sleep(3.0)  # let start-up traffic (first full records, mDNS) pass
        endpoint = views(procs).get(procs[0].node_id, {}).get("endpoint", ":0")
        control_port = int(endpoint.rsplit(":", 1)[1])
        host0 = (interface_counters(lab, 0), tcp_segments(lab, 0, control_port))
        wire0 = [tx_bytes(lab, i) for i in range(n)]
        app0 = [views(procs).get(p.node_id, {}).get("control_tx_bytes") for p in procs]
        t0 = time.monotonic()
        time.sleep(window)
        wire1 = [tx_bytes(lab, i) for i in range(n)]
        app1 = [views(procs).get(p.node_id, {}).get("control_tx_bytes") for p in procs]
        elapsed = time.monotonic() - t0
        where = breakdown(host0, (interface_counters(lab, 0),
                                  tcp_segments(lab, 0, control_port)), elapsed)
        wire = [(b - a) / elapsed for a, b in zip(wire0, wire1, strict=True)]
        app = [(b - a) / elapsed for a, b in zip(app0, app1, strict=True)
               if a is not None and b is not None]
        still = synced(procs, ids)
        leader = agreed(procs, ids)
        failover: float | None = None
        if leader is not None:
            victim = next(p for p in procs if p.node_id == leader)
            victim.kill()
            rest = [p for p in procs if p is not victim]
            start = time.monotonic()
            try:
                wait_for(lambda: agreed(rest, ids - {victim.node_id}) not in (None, leader),
                         120, interval=0.1)
                failover = round(time.monotonic() - start, 2)
            except AssertionError:
                failover = None
        return {"nodes": n, "converged_s": None if converged is None else round(converged, 2),
                "synced_after_window": still, "wire_bytes_per_s": wire,
                "payload_bytes_per_s": app, "failover_s": failover,
                "host0_per_s": where}
    finally:
        for proc in procs:
            proc.kill()
        lab.close()
        if pythonpath is not None:
            if env_before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_before


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        per_run = [statistics.median(r[key]) for r in runs if r[key]]
        return {"median": round(statistics.median(per_run), 1), "min": round(min(per_run), 1),
                "max": round(max(per_run), 1),
                "worst_node": round(max(max(r[key]) for r in runs if r[key]), 1)} \
            if per_run else {}
    return {"runs": len(runs), "wire_bytes_per_s_per_node": stats("wire_bytes_per_s"),
            "payload_bytes_per_s_per_node": stats("payload_bytes_per_s"),
            "converged_s": [r["converged_s"] for r in runs],
            "failover_s": [r["failover_s"] for r in runs],
            "always_synced": all(r["synced_after_window"] for r in runs),
            "host0_per_s": [r["host0_per_s"] for r in runs]}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured")
    parser.add_argument("--baseline", help="git revision to compare against (its peer/)")
    parser.add_argument("--converge", type=float, default=180.0,
                        help="seconds to wait for a full, synced view before measuring")
    parser.add_argument("--member-arg", action="append", default=[],
                        help="extra argument for the current code's members (repeatable), "
                        "e.g. --member-arg=--max-heartbeats-per-s=32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = have_netns()
    if reason:
        sys.exit(f"control_plane bench needs network namespaces: {reason}")
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        capabilities.probe(root / "cache")  # measured once, shared by every process
        variants: list[tuple[str, Path | None]] = [("current", None)]
        if args.baseline:
            variants.append((f"baseline {args.baseline}",
                             export_revision(args.baseline, root / "baseline")))
        for _ in range(args.rounds):
            for n in (int(s) for s in args.sizes.split(",")):
                for name, path in variants:  # interleaved: A B A B
                    run = run_once(root, n, args.window, path, args.converge,
                                   tuple(args.member_arg) if path is None else ())
                    results.setdefault(name, {}).setdefault(n, []).append(run)
                    if not args.json:
                        wire = statistics.median(run["wire_bytes_per_s"])
                        print(f"{name:24} {n:3d} nodes: wire {wire / 1024:7.2f} KB/s per node "
                              f"(median), converged {run['converged_s']} s, failover "
                              f"{run['failover_s']} s", flush=True)
    summary = {name: {str(n): summarise(runs) for n, runs in sizes.items()}
               for name, sizes in results.items()}
    report = {"machine": "shared, busy 2-core VM; namespaces on one bridge",
              "window_s": args.window, "member_args": args.member_arg, "summary": summary}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
