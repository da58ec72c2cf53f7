"""Segmentation frame throughput: a node serving a frame stream against the interpreter.

    python bench/segmentation.py [--seconds 8] [--streams 2] [--threads 1]

In one run: (a) the LiteRT interpreter called directly in a loop, one frame at a time
(the reference), and (b) a node serving selfie-seg to ``--streams`` concurrent clients
that each send frames back to back through the local socket API (the node batches
concurrent frames: the model is frequency-sensitive). Both use the same thread count.
Prints frames per second and the ratio. Target (issue "The two case studies"): the node
within 5% of the direct interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.models.backends import get_backend  # noqa: E402
from epara.models.store import ModelStore, default_store  # noqa: E402
from epara.node.client import Client  # noqa: E402
from tests.helpers import running_node  # noqa: E402


def direct(directory: Path, frame: np.ndarray, seconds: float, threads: int) -> float:
    store = ModelStore(directory.parent)
    manifest = store.get(directory.name).manifest
    session = get_backend(manifest.backend).load(directory, manifest, threads=threads)
    name = manifest.inputs[0].name
    for _ in range(10):
        session.run({name: frame})
    frames = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run({name: frame})
        frames += 1
    return frames / (time.perf_counter() - start)


def via_node(sock: Path, frame: np.ndarray, seconds: float, streams: int) -> tuple[float, float]:
    counts = [0] * streams
    batches: list[int] = []
    stop = threading.Event()

    def stream(i: int) -> None:
        with Client(sock) as client:
            name = client.models()[0]["inputs"][0]["name"]
            while not stop.is_set():
                _, timing = client.infer_timed("selfie-seg", {name: frame})
                counts[i] += 1
                batches.append(timing["batch"])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm up
    warm = sum(counts)
    start = time.perf_counter()
    time.sleep(seconds)
    done = sum(counts) - warm
    elapsed = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return done / elapsed, float(np.mean(batches)) if batches else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from epara.models.zoo import prepare

    seg_dir = prepare("selfie-seg", ModelStore(default_store()))
    frame = np.random.default_rng(0).random((1, 256, 256, 3), dtype=np.float32)
    reference = direct(seg_dir, frame, args.seconds, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        (store / "selfie-seg").symlink_to(seg_dir)
        sock = Path(tmp) / "run" / "node.sock"
        with running_node(store, sock, "--threads", str(args.threads)):
            served, mean_batch = via_node(sock, frame, args.seconds, args.streams)
    result = {"direct_fps": reference, "node_fps": served, "ratio": served / reference,
              "streams": args.streams, "mean_batch": mean_batch, "threads": args.threads}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"direct interpreter: {reference:7.1f} frames/s (1 thread of compute: "
          f"{args.threads})")
    print(f"node, {args.streams} streams:  {served:7.1f} frames/s (mean batch "
          f"{mean_batch:.2f})  = {served / reference * 100:.1f}% of direct")
    print("target: within 5% of direct")


if __name__ == "__main__":
    main()
