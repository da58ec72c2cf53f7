"""Cost of the local socket API against calling the same backend session in-process.

    python bench/local_api.py [--requests 300]

Runs, in one process tree and one run: a tiny model (``add``: float32[1, 4]) and the
selfie segmentation model (float32[1, 256, 256, 3] in, [1, 256, 256, 1] out), each
called (a) in-process through the backend session and (b) through a node on a Unix
socket with the Python client. Blocks of calls alternate between the two paths so
machine noise hits both alike. Prints medians and the overhead (absolute and relative).
Targets (issue "A node on one device"): under 0.3 ms added to a tiny request and under
5% added to a segmentation-sized one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.models.backends import get_backend  # noqa: E402
from epara.models.store import ModelStore, default_store  # noqa: E402
from epara.node.client import Client  # noqa: E402
from tests.helpers import make_add_model, running_node  # noqa: E402


def measure(name: str, directory: Path, inputs: dict[str, np.ndarray], client: Client,
            requests: int, threads: int) -> dict[str, float]:
    store = ModelStore(directory.parent)
    manifest = store.get(directory.name).manifest
    session = get_backend(manifest.backend).load(directory, manifest, threads=threads)
    for _ in range(20):  # warm both paths
        session.run(inputs)
        client.infer(name, inputs)
    local, remote, compute = [], [], []
    # Alternate in blocks, not call by call: two processes running the same model in
    # turn evict each other's weights and activations from the CPU caches, which would
    # charge the socket path for a cost a node serving alone never pays.
    block = 25
    for _ in range(max(1, requests // block)):
        for _ in range(block):
            start = time.perf_counter()
            session.run(inputs)
            local.append(time.perf_counter() - start)
        for _ in range(block):
            start = time.perf_counter()
            _, timing = client.infer_timed(name, inputs)
            remote.append(time.perf_counter() - start)
            compute.append(timing["compute_ms"] / 1000)
    in_process = statistics.median(local) * 1000
    via_socket = statistics.median(remote) * 1000
    return {"in_process_ms": in_process, "socket_ms": via_socket,
            "node_compute_ms": statistics.median(compute) * 1000,
            "overhead_ms": via_socket - in_process,
            "overhead_pct": (via_socket - in_process) / in_process * 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from epara.models.zoo import PREPARERS

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_add_model(store, "add", batch=1)
        shipped = ModelStore(default_store())
        seg_dir = PREPARERS["selfie-seg"].prepare(shipped)
        (store / "selfie-seg").symlink_to(seg_dir)
        sock = Path(tmp) / "run" / "node.sock"
        rng = np.random.default_rng(0)
        cases = {
            "add": {"x": rng.random((1, 4), dtype=np.float32)},
            "selfie-seg": None,
        }
        with running_node(store, sock, "--threads", str(args.threads)), Client(sock) as client:
            seg_spec = next(m for m in client.models() if m["name"] == "selfie-seg")["inputs"][0]
            cases["selfie-seg"] = {seg_spec["name"]: rng.random(
                [1 if d is None else d for d in seg_spec["shape"]], dtype=np.float32)}
            results = {name: measure(name, store / name, inputs, client, args.requests,
                                     args.threads)
                       for name, inputs in cases.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'model':<12} {'in-process':>11} {'via socket':>11} {'node compute':>13} "
          f"{'overhead':>10} {'rel':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['in_process_ms']:9.3f}ms {r['socket_ms']:9.3f}ms "
              f"{r['node_compute_ms']:11.3f}ms {r['overhead_ms']:8.3f}ms "
              f"{r['overhead_pct']:6.1f}%")
    print("targets: tiny < 0.3 ms added; segmentation-sized < 5% added")


if __name__ == "__main__":
    main()
