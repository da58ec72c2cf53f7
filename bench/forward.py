"""A request forwarded to a peer's replica against raw pyzmq with CURVE, same bytes, one run.

    python bench/forward.py [--rounds 5] [--requests 40] [--mb 1] [--json]

Both peers are separate processes on loopback:
  epara  the origin's Forwarder sends an `infer` request carrying a float32 tensor of
         --mb MiB to a peer node's data plane (CURVE DEALER/ROUTER, header plus raw
         frames); the peer serves it through the node's own LocalApi and ModelService
         (an ONNX `y = x + 1`, so the reply carries as many bytes back) and replies.
  raw    a pyzmq CURVE DEALER sends the same tensor as one raw frame to a ROUTER in
         another process that computes the same `x + 1` with numpy and sends it back.
Each round runs --requests round trips of each, interleaved (epara, raw, epara, raw ...),
one request at a time. ``forward_vs_raw_curve`` is raw's median round trip divided by
epara's (1.0: forwarding costs nothing over moving the bytes with CURVE; the target of
issue 13 is at least 0.8): the median over rounds, with the min and max as the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.node.dataplane import DataPlane  # noqa: E402
from epara.node.forwarder import Forwarder  # noqa: E402
from epara.peer.security import create_cluster_credentials, load_cluster_credentials  # noqa: E402


def _add_model(store: Path) -> Path:
    from tests.helpers import make_add_model

    return make_add_model(store, "add", batch=None)


# --- the two servers (child processes) ------------------------------------------------


def serve_epara(credentials: Path, store: Path, port_file: Path) -> None:
    from epara.models.manifest import load_manifest
    from epara.node.api import LocalApi, Request
    from epara.node.daemon import load_service

    directory = store / "add"
    service = load_service(directory, load_manifest(directory), 1)
    api = LocalApi({"add": service}, lambda: [], lambda: {})

    async def run() -> None:
        plane = DataPlane(credentials, "127.0.0.1")

        async def serve(message: dict[str, Any], reply: Any) -> None:
            await api._handle(Request(message), reply, {})

        Forwarder(plane, "peer", serve, lambda _: ("127.0.0.1", 0))
        port = await plane.start()
        port_file.write_text(str(port))
        await asyncio.Event().wait()

    asyncio.run(run())


def serve_raw(credentials: Path, port_file: Path) -> None:
    keys = load_cluster_credentials(credentials)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_secretkey = keys.secret_key
    port = router.bind_to_random_port("tcp://127.0.0.1")
    port_file.write_text(str(port))
    while True:
        identity, header, body = router.recv_multipart(copy=False)
        x = np.frombuffer(body.buffer, np.float32)
        router.send_multipart([identity, header, x + 1], copy=False)


def _spawn(mode: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    port_file = Path(tempfile.mkstemp(prefix="fwd-port-")[1])
    port_file.write_text("")
    process = subprocess.Popen([sys.executable, __file__, mode, *args, str(port_file)])
    end = time.monotonic() + 60
    while not port_file.read_text():
        if process.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{mode} server did not start")
        time.sleep(0.05)
    port = int(port_file.read_text())
    port_file.unlink()
    return process, port


# --- the clients (this process) ---------------------------------------------------------


class EparaClient:
    def __init__(self, credentials: Path, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.plane = DataPlane(credentials, "127.0.0.1")

        async def nothing(message: dict[str, Any], reply: Any) -> None:
            raise RuntimeError("the bench's origin serves nothing")

        self.forwarder = Forwarder(self.plane, "origin", nothing,
                                   lambda _: ("127.0.0.1", port))
        loop.run_until_complete(self.plane.start())

    def round_trip(self, x: np.ndarray) -> float:
        replies: list[dict[str, Any]] = []

        async def reply(answer: dict[str, Any]) -> None:
            replies.append(answer)

        message = {"id": 1, "op": "infer", "model": "add", "inputs": {"x": x}}
        start = time.perf_counter()
        self.loop.run_until_complete(self.forwarder.forward(
            "peer", message, reply, time.monotonic() + 30))
        elapsed = time.perf_counter() - start
        if not replies[-1]["ok"] or replies[-1]["outputs"]["y"].shape != x.shape:
            raise RuntimeError(f"bad reply {replies[-1]}")
        return elapsed

    def close(self) -> None:
        self.loop.run_until_complete(self.plane.stop())


class RawClient:
    def __init__(self, credentials: Path, port: int) -> None:
        keys = load_cluster_credentials(credentials)
        self.context = zmq.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.curve_serverkey = keys.public_key
        self.dealer.curve_publickey = keys.public_key
        self.dealer.curve_secretkey = keys.secret_key
        self.dealer.connect(f"tcp://127.0.0.1:{port}")

    def round_trip(self, x: np.ndarray) -> float:
        start = time.perf_counter()
        self.dealer.send_multipart([b"h" * 64, x], copy=False)
        _, body = self.dealer.recv_multipart(copy=False)
        elapsed = time.perf_counter() - start
        if len(body.buffer) != x.nbytes:
            raise RuntimeError("bad raw reply")
        return elapsed

    def close(self) -> None:
        self.context.destroy(linger=0)


def measure(rounds: int, requests: int, megabytes: float) -> dict[str, Any]:
    x = np.random.default_rng(0).random((int(megabytes * 65536), 4), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        credentials = Path(tmp) / "cluster"
        create_cluster_credentials(credentials)
        store = Path(tmp) / "store"
        _add_model(store)
        epara_server, epara_port = _spawn("--serve-epara", str(credentials), str(store))
        raw_server, raw_port = _spawn("--serve-raw", str(credentials))
        loop = asyncio.new_event_loop()
        epara = EparaClient(credentials, epara_port, loop)
        raw = RawClient(credentials, raw_port)
        try:
            for _ in range(5):  # connect, handshake, first runs
                epara.round_trip(x)
                raw.round_trip(x)
            per_round: list[dict[str, float]] = []
            for _ in range(rounds):
                times: dict[str, list[float]] = {"epara": [], "raw": []}
                for _ in range(requests):  # interleaved, one request at a time
                    times["epara"].append(epara.round_trip(x))
                    times["raw"].append(raw.round_trip(x))
                epara_ms = statistics.median(times["epara"]) * 1000
                raw_ms = statistics.median(times["raw"]) * 1000
                per_round.append({"epara_ms": epara_ms, "raw_curve_ms": raw_ms,
                                  "ratio": raw_ms / epara_ms})
        finally:
            epara.close()
            raw.close()
            loop.close()
            for server in (epara_server, raw_server):
                server.terminate()
                server.wait(10)
    ratios = [r["ratio"] for r in per_round]
    return {
        "forward_vs_raw_curve": round(statistics.median(ratios), 3),
        "forward_vs_raw_curve_min": round(min(ratios), 3),
        "forward_vs_raw_curve_max": round(max(ratios), 3),
        "epara_ms_median": round(statistics.median(r["epara_ms"] for r in per_round), 3),
        "raw_curve_ms_median": round(statistics.median(r["raw_curve_ms"] for r in per_round),
                                     3),
        "megabytes": megabytes, "rounds": rounds, "requests_per_round": requests,
        "per_round": per_round,
        "note": "request and reply each carry the tensor; loopback; measured on this machine",
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-epara":
        serve_epara(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-raw":
        serve_raw(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--mb", type=float, default=1.0, help="tensor size in MiB")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = measure(args.rounds, args.requests, args.mb)
    if args.json:
        print(json.dumps(result))
        return
    print(f"forwarded {args.mb:g} MiB request + reply vs raw pyzmq+CURVE, "
          f"{args.rounds} interleaved rounds of {args.requests}")
    for i, r in enumerate(result["per_round"]):
        print(f"  round {i}: epara {r['epara_ms']:.2f} ms  raw+curve {r['raw_curve_ms']:.2f} ms"
              f"  ratio {r['ratio']:.2f}")
    print(f"forward_vs_raw_curve {result['forward_vs_raw_curve']:.2f} "
          f"(range {result['forward_vs_raw_curve_min']:.2f}-"
          f"{result['forward_vs_raw_curve_max']:.2f})")


if __name__ == "__main__":
    main()
