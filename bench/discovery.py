"""Time to a full, agreed cluster view from a cold start, and leader failover time.

Run by hand (not a test): ``python bench/discovery.py [--sizes 2,4,8] [--netns]``.
Every node is a separate ``python -m epara.peer.member`` process with real mDNS and
CurveZMQ; on loopback (``--interface 127.0.0.1``) and, with ``--netns`` as root, one
network namespace per node on a bridge. "Full view" means every node lists every node
and all agree on one leader; failover is SIGKILL of the leader until the rest agree on
a new one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from epara.peer import capabilities
from epara.peer.security import create_cluster_credentials
from epara.peer.testing import MemberProcess, NamespaceLab, agreed, have_netns, wait_for


def run_once(root: Path, n: int, netns: bool) -> tuple[float, float]:
    creds = root / "cluster"
    if not creds.exists():
        create_cluster_credentials(creds)
    cache = root / "cache"
    capabilities.probe(cache)  # measured once, outside the timed part
    lab = NamespaceLab(n).create() if netns else None
    procs: list[MemberProcess] = []
    try:
        start = time.monotonic()
        for i in range(n):
            args = ["--credentials", str(creds), "--cache-dir", str(cache)]
            if lab is None:
                args += ["--interface", "127.0.0.1"]
            proc = MemberProcess(f"b{i}", root / f"b{i}-{n}.json", args,
                                 prefix=lab.prefix(i) if lab else [])
            proc.start()
            procs.append(proc)
        ids = {p.node_id for p in procs}
        wait_for(lambda: agreed(procs, ids) is not None, 60, interval=0.02)
        cold = time.monotonic() - start
        leader = agreed(procs, ids)
        victim = next(p for p in procs if p.node_id == leader)
        victim.kill()
        rest = [p for p in procs if p is not victim]
        start = time.monotonic()
        wait_for(lambda: agreed(rest, ids - {victim.node_id}) not in (None, leader), 60,
                 interval=0.02)
        failover = time.monotonic() - start
        return cold, failover
    finally:
        for proc in procs:
            proc.kill()
        if lab is not None:
            lab.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,3,4,6,8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--netns", action="store_true", help="also run in namespaces (root)")
    args = parser.parse_args()
    modes = ["loopback"]
    if args.netns:
        reason = have_netns()
        if reason:
            print(f"skipping namespaces: {reason}")
        else:
            modes.append("netns")
    print(f"{'mode':9} {'nodes':>5} {'full view s (median, max)':>27} "
          f"{'failover s (median, max)':>26}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for n in (int(s) for s in args.sizes.split(",")):
                colds, fails = [], []
                for _ in range(args.repeat):
                    cold, fail = run_once(Path(tmp), n, mode == "netns")
                    colds.append(cold)
                    fails.append(fail)
                colds.sort()
                fails.sort()
                print(f"{mode:9} {n:5d} {colds[len(colds) // 2]:15.2f} {colds[-1]:10.2f}"
                      f" {fails[len(fails) // 2]:15.2f} {fails[-1]:10.2f}", flush=True)


if __name__ == "__main__":
    main()
