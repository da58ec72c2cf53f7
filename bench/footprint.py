"""What a node costs a device: bundle sizes, installed size, idle memory, start-up time.

    python bench/footprint.py [--runs 3] [--json]

For every shipped profile: the bundle's size and wheel count (its biggest wheels named).
For x86_64-server, the profile this machine can run: the bundle installed into a fresh
root directory (the installed venv's size), then the installed node started as its unit
would start it. With root, on a namespace host next to a node from this source tree with
the same credentials, timing start-up until both see each other in the cluster; without
root, alone, timing start-up until its socket answers. Idle RSS is read 3 s after that.
The node serves the tiny ``add`` model (onnxruntime loaded), as a minimal real service.

Targets (issue "firmware_scripts"): rpi bundle < 60 MB, x86_64 installed venv < 350 MB,
idle RSS < 150 MB, start-up to joined < 5 s (on these 2-core VMs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.firmware.bundle import build_bundle  # noqa: E402
from epara.firmware.installed import installed_node_command  # noqa: E402
from epara.firmware.profiles import available_profiles, load_profile  # noqa: E402
from epara.models.store import ModelStore  # noqa: E402
from epara.node.client import Client, NodeUnreachable  # noqa: E402
from epara.peer.security import create_cluster_credentials  # noqa: E402
from epara.peer.testing import NamespaceLab, have_netns  # noqa: E402
from tests.helpers import make_add_model, start_node, stop_node  # noqa: E402


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cluster_members(sock: Path) -> set[str]:
    try:
        with Client(sock, timeout=2) as client:
            view = client.status()["cluster"]
    except (NodeUnreachable, OSError):
        return set()
    return {m["node_id"] for m in view["members"]} if view else set()


def answers(sock: Path) -> bool:
    try:
        with Client(sock, timeout=2) as client:
            client.ping()
        return True
    except (NodeUnreachable, OSError):
        return False


def one_start(root: Path, prefix: list[str], ready: Any, log: Path) -> tuple[float, float]:
    """Seconds from spawn until ``ready(socket)``, and RSS (MB) 3 s later."""
    node = installed_node_command(root)
    start = time.monotonic()
    with open(log, "ab") as out:
        process = subprocess.Popen([*prefix, *node.argv], env=node.env, cwd="/", stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        while not ready(node.socket):
            if process.poll() is not None or time.monotonic() - start > 60:
                raise RuntimeError(f"installed node did not come up; see {log}")
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        time.sleep(3)
        return elapsed, rss_mb(process.pid)
    finally:
        stop_node(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"bundles": {}}
    with tempfile.TemporaryDirectory(prefix="epara-footprint-") as tmp:
        work = Path(tmp)
        make_add_model(work / "store", "add", batch=None)
        create_cluster_credentials(work / "cluster")
        for name in available_profiles():
            profile = load_profile(name)
            models = ["add"] if "onnx" in profile.extras else []
            summary = build_bundle(profile, ModelStore(work / "store"),
                                   out=work / f"{name}.tar.gz", models=models,
                                   cluster=work / "cluster")
            results["bundles"][name] = {"mb": round(summary.size / 1e6, 1),
                                        "wheels": len(summary.wheels)}
        root = work / "root"
        subprocess.run([sys.executable, "-m", "epara.node.cli", "firmware", "flash",
                        str(work / "x86_64-server.tar.gz"), "--root", str(root), "--node-id",
                        "measured"], check=True, capture_output=True)
        results["x86_64_installed_mb"] = round(du(root / "opt/epara") / 1e6, 1)
        lab = None if have_netns() else NamespaceLab(2).create()
        peer = None
        try:
            if lab is not None:
                peer = start_node(work / "store", work / "peer" / "node.sock", "--cluster",
                                  str(work / "cluster"), "--node-id", "peer",
                                  prefix=lab.prefix(0))

                def ready(sock: Path) -> bool:
                    return cluster_members(sock) == {"peer", "measured"}

                prefix, what = lab.prefix(1), "joined the cluster"
            else:
                ready, prefix, what = answers, [], "socket answers (alone: not root)"
                (root / "etc/epara/cluster/cluster.key").unlink()
            runs = [one_start(root, prefix, ready, work / "node.log") for _ in range(args.runs)]
        finally:
            if peer is not None:
                stop_node(peer)
            if lab is not None:
                lab.close()
    results["startup_s"] = {"what": what, "median": round(statistics.median(
        r[0] for r in runs), 2), "runs": [round(r[0], 2) for r in runs]}
    results["idle_rss_mb"] = {"median": round(statistics.median(r[1] for r in runs), 1),
                              "runs": [round(r[1], 1) for r in runs]}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, b in results["bundles"].items():
        print(f"bundle {name:<15} {b['mb']:7.1f} MB  {b['wheels']} wheels")
    print(f"x86_64-server installed (/opt/epara): {results['x86_64_installed_mb']:.1f} MB")
    print(f"start-up until {what}: median {results['startup_s']['median']} s "
          f"{results['startup_s']['runs']}")
    print(f"idle RSS: median {results['idle_rss_mb']['median']} MB "
          f"{results['idle_rss_mb']['runs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
