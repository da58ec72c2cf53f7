"""Cost of the local socket API against calling the same backend session in-process.

    python bench/local_api.py [--json] [--requests 300] [--seconds 4] [--rss-requests 10000]

In one run, one node process, the same thread count on both sides:

- ``overhead_ms_tiny``: a tiny model (``add``, float32[1, 4]) through the socket against
  the same ONNX session called in-process (median per call).
- ``overhead_pct_1mb``: selfie segmentation (float32[1, 256, 256, 3] in = 768 KiB,
  [1, 256, 256, 1] out = 256 KiB) likewise, with the Python client's shared-memory
  transport (the default); ``inline`` gives the same with tensors inside the CBOR.
  Blocks of calls alternate between the paths (A B A B) so noise hits both alike.
- ``seg_fps_ratio_2_streams`` / ``_4_streams``: frames per second of the node serving 2
  (4) concurrent streams, against the interpreter called in a loop in-process; rounds
  interleaved, median of rounds.
- ``batch_curve``: the model's in-process time per frame at batch 1, 2, 4, 8, the
  measurement behind the batching defaults (what stacking frames saves per frame).
- ``rss_growth_mb``: node RSS after 10,000 requests of 1 MiB against after 100.
- ``forward_vs_raw_curve``: from ``bench/forward.py --json`` when that file exists
  (null with a reason otherwise).

Targets (issue "The data path at memory speed"): tiny < 0.15 ms added; 1 MB < 5%;
streams >= 90% of the interpreter; RSS growth within 5 MB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.models.backends import Session, get_backend  # noqa: E402
from epara.models.store import ModelStore, default_store  # noqa: E402
from epara.node.client import Client  # noqa: E402
from tests.helpers import make_add_model, running_node  # noqa: E402


def load(directory: Path, threads: int) -> Session:
    store = ModelStore(directory.parent)
    manifest = store.get(directory.name).manifest
    return get_backend(manifest.backend).load(directory, manifest, threads=threads)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def overhead(name: str, session: Session, inputs: dict[str, np.ndarray],
             clients: dict[str, Client], requests: int) -> dict[str, Any]:
    """Median per-call time in-process and through each client, blocks interleaved."""
    for _ in range(20):  # warm every path
        session.run(inputs)
        for client in clients.values():
            client.infer(name, inputs)
    times: dict[str, list[float]] = {"in_process": [], **{k: [] for k in clients}}
    # Blocks, not call by call: two processes running the same model in turn evict each
    # other's caches, a cost a node serving alone never pays.
    block = 25
    for _ in range(max(1, requests // block)):
        for _ in range(block):
            start = time.perf_counter()
            session.run(inputs)
            times["in_process"].append(time.perf_counter() - start)
        for path, client in clients.items():
            for _ in range(block):
                start = time.perf_counter()
                client.infer(name, inputs)
                times[path].append(time.perf_counter() - start)
    base = statistics.median(times["in_process"]) * 1000
    result: dict[str, Any] = {"in_process_ms": base}
    for path in clients:
        ms = statistics.median(times[path]) * 1000
        result[path] = {"ms": ms, "overhead_ms": ms - base,
                        "overhead_pct": (ms - base) / base * 100}
    return result


def direct_fps(session: Session, inputs: dict[str, np.ndarray], seconds: float) -> float:
    frames = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(inputs)
        frames += 1
    return frames / (time.perf_counter() - start)


def node_fps(sock: Path, name: str, inputs: dict[str, np.ndarray], seconds: float,
             streams: int) -> tuple[float, float]:
    counts = [0] * streams
    batches: list[int] = []
    stop = threading.Event()
    ready = threading.Barrier(streams + 1)

    def stream(i: int) -> None:
        with Client(sock) as client:
            client.infer(name, inputs)  # attach its shared memory before the clock starts
            ready.wait()
            while not stop.is_set():
                _, timing = client.infer_timed(name, inputs)
                counts[i] += 1
                batches.append(timing["batch"])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)  # warm up
    warm = sum(counts)
    start = time.perf_counter()
    time.sleep(seconds)
    done = sum(counts) - warm
    elapsed = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join()
    return done / elapsed, float(np.mean(batches)) if batches else 1.0


def batch_curve(session: Session, name: str, frame: np.ndarray, max_batch: int,
                rounds: int = 6, repeats: int = 5) -> list[dict[str, Any]]:
    """In-process time per frame by batch size, sizes interleaved round by round."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    stacked = {b: {name: np.repeat(frame, b, axis=0)} for b in sizes}
    per_frame: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(rounds):
        for batch in sizes:
            session.run(stacked[batch])  # a new batch size may resize the runtime's tensors
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(stacked[batch])
            per_frame[batch].append((time.perf_counter() - start) * 1000 / repeats / batch)
    return [{"batch": b, "ms_per_frame": statistics.median(v), "min": min(v), "max": max(v)}
            for b, v in per_frame.items()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def rss_growth(sock: Path, pid: int, requests: int) -> dict[str, float]:
    x = np.random.default_rng(1).random((65536, 4), dtype=np.float32)  # 1 MiB
    with Client(sock) as client:
        for _ in range(100):
            client.infer("big", {"x": x})
        time.sleep(1.0)
        after_100 = rss_mb(pid)
        for _ in range(requests - 100):
            client.infer("big", {"x": x})
        time.sleep(1.0)
        after_all = rss_mb(pid)
    return {"after_100_mb": after_100, f"after_{requests}_mb": after_all,
            "growth_mb": after_all - after_100}


def forward_curve() -> tuple[dict[str, Any] | None, str | None]:
    """bench/forward.py's whole JSON object (its own same-run baseline: raw CURVE)."""
    script = ROOT / "bench" / "forward.py"
    if not script.exists():
        return None, "bench/forward.py is not in this checkout"
    try:
        done = subprocess.run([sys.executable, str(script), "--json"], capture_output=True,
                              text=True, timeout=900, check=True)
        found = json.loads(done.stdout.strip().splitlines()[-1])
        if "forward_vs_raw_curve" not in found:
            raise KeyError("forward_vs_raw_curve")
        return found, None
    except (subprocess.SubprocessError, json.JSONDecodeError, KeyError, IndexError) as exc:
        return None, f"bench/forward.py failed: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-requests", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from epara.models.zoo import PREPARERS

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_add_model(store, "add", batch=1)
        make_add_model(store, "big", batch=None)
        seg_dir = PREPARERS["selfie-seg"].prepare(ModelStore(default_store()))
        (store / "selfie-seg").symlink_to(seg_dir)
        sock = Path(tmp) / "run" / "node.sock"
        with running_node(store, sock, "--threads", str(args.threads)) as process, \
                Client(sock) as shm, Client(sock, shared_memory=False) as inline:
            models = {m["name"]: m for m in shm.models()}
            seg_spec = models["selfie-seg"]["inputs"][0]
            seg_name = seg_spec["name"]
            frame = rng.random([1 if d is None else d for d in seg_spec["shape"]],
                               dtype=np.float32)
            clients = {"shared_memory": shm, "inline": inline}
            tiny = overhead("add", load(store / "add", args.threads),
                            {"x": rng.random((1, 4), dtype=np.float32)}, clients, args.requests)
            seg_session = load(store / "selfie-seg", args.threads)
            seg = overhead("selfie-seg", seg_session, {seg_name: frame}, clients, args.requests)
            fps: dict[int, list[float]] = {2: [], 4: []}
            direct: list[float] = []
            mean_batch: dict[int, list[float]] = {2: [], 4: []}
            for _ in range(args.rounds):  # A B A B
                for streams in (2, 4):
                    direct.append(direct_fps(seg_session, {seg_name: frame}, args.seconds))
                    served, batch = node_fps(sock, "selfie-seg", {seg_name: frame},
                                             args.seconds, streams)
                    fps[streams].append(served / direct[-1])
                    mean_batch[streams].append(batch)
            curve = batch_curve(seg_session, seg_name, frame,
                                models["selfie-seg"]["hints"]["max_batch"])
            rss = rss_growth(sock, process.pid, args.rss_requests)
    forward, forward_reason = forward_curve()
    result: dict[str, Any] = {
        "overhead_pct_1mb": seg["shared_memory"]["overhead_pct"],
        "overhead_ms_tiny": tiny["shared_memory"]["overhead_ms"],
        "seg_fps_ratio_2_streams": statistics.median(fps[2]),
        "seg_fps_ratio_4_streams": statistics.median(fps[4]),
        "forward_vs_raw_curve": None if forward is None else forward["forward_vs_raw_curve"],
        "rss_growth_mb": rss["growth_mb"],
        "detail": {
            "tiny": tiny, "segmentation_1mb": seg,
            "seg_fps_ratio_rounds": {str(k): v for k, v in fps.items()},
            "seg_direct_fps": spread(direct),
            "seg_mean_batch": {str(k): statistics.mean(v) for k, v in mean_batch.items()},
            "batch_curve": curve, "rss": rss, "threads": args.threads, "forward": forward,
        },
    }
    if forward_reason is not None:
        result["forward_vs_raw_curve_reason"] = forward_reason
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))
    print("targets: tiny < 0.15 ms; 1 MB < 5%; streams >= 0.9; RSS growth < 5 MB")


if __name__ == "__main__":
    main()
