"""text-det served as a 2-stage pipeline head against the whole model as a local replica.

    python bench/onnx_pipeline.py [--rounds 5] [--requests 10] [--size 480x640]
                                  [--threads 1] [--store DIR] [--json]

Both are the node's own serving path, in one process:
  replica   a ModelService over the whole model (onnxruntime), what a node that holds
            the model serves;
  pipeline  the ModelService a pipeline head serves (node/runtime.py ``_session_head``):
            stage 0 runs in the head's worker, its output crosses a CURVE data plane on
            loopback to a StageHost running stage 1 (its own worker thread), and the
            result comes back; cut at the balanced cut that ``split_model`` picks.
Each round runs --requests requests of each, one at a time, interleaved (replica,
pipeline, replica, pipeline ...). ``pipeline_vs_replica`` is the pipeline's median
request time divided by the replica's, per round; reported as the median over rounds
with min and max as the spread. Both stages share this machine's cores (as on one
device), so the ratio is the pipeline's overhead (the cut, the activations' trip through
the data plane), not the gain of spreading a model over devices.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.models.backends import get_backend  # noqa: E402
from epara.models.manifest import load_manifest  # noqa: E402
from epara.models.split import balanced_cuts, onnx_stage_analysis, stage_of  # noqa: E402
from epara.models.store import ModelStore  # noqa: E402
from epara.node.dataplane import DataPlane  # noqa: E402
from epara.node.pipeline import (  # noqa: E402
    PipelineClient,
    PipelineSession,
    SessionStage,
    StageHost,
    StageRef,
)
from epara.node.service import ModelService  # noqa: E402
from epara.peer.security import create_cluster_credentials  # noqa: E402

MODEL = "text-det"


def _stage(directory: Path, threads: int) -> SessionStage:
    manifest = load_manifest(directory)
    session = get_backend(manifest.backend).load(directory, manifest, threads=threads)
    return SessionStage(session, [s.name for s in manifest.inputs])


async def _timed(service: ModelService, page: np.ndarray) -> float:
    started = time.perf_counter()
    await asyncio.wrap_future(service.submit({"x": page}, None))
    return time.perf_counter() - started


async def measure(store: ModelStore, rounds: int, requests: int, size: tuple[int, int],
                  threads: int) -> dict[str, Any]:
    from epara.models.zoo import prepare

    directory = prepare(MODEL, store)
    parent = load_manifest(directory)
    analysis = onnx_stage_analysis(directory / parent.model_file,
                                   parent.extra.get("reference_shapes"))
    (cut,) = balanced_cuts(analysis, 2)
    head_dir = stage_of(store, MODEL, 0, cut, stream=io.StringIO())
    tail_dir = stage_of(store, MODEL, cut, analysis.node_count, stream=io.StringIO())
    with tempfile.TemporaryDirectory(prefix="epara-bench-cluster-") as credentials:
        create_cluster_credentials(Path(credentials) / "cluster")
        planes = [DataPlane(Path(credentials) / "cluster", "127.0.0.1") for _ in range(2)]
    for plane in planes:
        await plane.start()
    host = StageHost(planes[0], "stage")
    host.add(f"{MODEL}#1-2", _stage(tail_dir, threads))
    route = [StageRef("stage", planes[0].endpoint, f"{MODEL}#1-2")]
    replica = ModelService(parent, get_backend("onnx").load(directory, parent,
                                                            threads=threads))
    pipeline = ModelService(parent, PipelineSession(
        _stage(head_dir, threads), PipelineClient(planes[1], "head"), lambda: route,
        [s.name for s in parent.outputs], asyncio.get_running_loop(), "pipeline:bench"))
    page = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    try:
        for service in (replica, pipeline):  # warm both (first runs allocate)
            for _ in range(2):
                await _timed(service, page)
        ratios, replica_ms, pipeline_ms = [], [], []
        for _ in range(rounds):
            times: dict[str, list[float]] = {"replica": [], "pipeline": []}
            for _ in range(requests):
                times["replica"].append(await _timed(replica, page))
                times["pipeline"].append(await _timed(pipeline, page))
            a = statistics.median(times["replica"]) * 1000
            b = statistics.median(times["pipeline"]) * 1000
            replica_ms.append(round(a, 2))
            pipeline_ms.append(round(b, 2))
            ratios.append(b / a)
    finally:
        for service in (replica, pipeline):
            await asyncio.to_thread(service.stop)
        host.close()
        for plane in planes:
            await plane.stop()
    return {"model": MODEL, "cut": cut, "size": list(size), "threads": threads,
            "rounds": rounds, "requests": requests,
            "replica_ms": replica_ms, "pipeline_ms": pipeline_ms,
            "pipeline_vs_replica": {"median": round(statistics.median(ratios), 3),
                                    "min": round(min(ratios), 3),
                                    "max": round(max(ratios), 3)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--size", default="480x640", help="page HxW")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", type=Path, help="model store (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    store = ModelStore(args.store or Path(tempfile.mkdtemp(prefix="epara-bench-store-")))
    result = asyncio.run(measure(store, args.rounds, args.requests, (height, width),
                                 args.threads))
    if args.json:
        print(json.dumps(result))
    else:
        ratio = result["pipeline_vs_replica"]
        print(f"{MODEL} {height}x{width}, cut at {result['cut']}, {args.threads} thread(s): "
              f"pipeline/replica {ratio['median']:.3f} (min {ratio['min']:.3f}, "
              f"max {ratio['max']:.3f}) over {args.rounds} rounds")
        print(f"  replica ms per round:  {result['replica_ms']}")
        print(f"  pipeline ms per round: {result['pipeline_ms']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
