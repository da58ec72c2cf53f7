"""Activation transport: the data plane against raw pyzmq, on the same sizes, one run.

    python bench/transport.py [--seconds 1.5]

For each tensor size, one-way throughput of float32 activations over loopback TCP:
  raw       pyzmq PUSH/PULL, plaintext, zero-copy frames (the floor of what Python gets)
  raw+curve pyzmq PUSH/PULL with CurveZMQ (what any encrypted transport pays)
  epara     DataPlane: CURVE DEALER/ROUTER, CBOR header + raw frames, decoded to arrays
The target (issue "Split inference"): epara at least 80% of raw throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.node.dataplane import DataPlane  # noqa: E402
from epara.peer.security import create_cluster_credentials  # noqa: E402

SIZES = [64 * 1024, 1024 * 1024, 4 * 1024 * 1024]


def raw(size: int, seconds: float, curve: tuple[bytes, bytes] | None) -> float:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    if curve is not None:
        public, secret = curve
        pull.curve_server = True
        pull.curve_secretkey = secret
        push.curve_serverkey = public
        push.curve_publickey = public
        push.curve_secretkey = secret
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    received = 0
    done = threading.Event()

    def sink() -> None:
        nonlocal received
        while not done.is_set():
            if pull.poll(100):
                frames = pull.recv_multipart(copy=False)
                np.frombuffer(frames[1].buffer, dtype=np.float32)
                received += 1

    thread = threading.Thread(target=sink)
    thread.start()
    header = b"h" * 64
    start = time.perf_counter()
    sent = 0
    while time.perf_counter() - start < seconds:
        push.send_multipart([header, payload], copy=False)
        sent += 1
    while received < sent and time.perf_counter() - start < seconds * 4:
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    context.destroy(linger=0)
    return received * size / elapsed / 1e9


def dataplane(size: int, seconds: float, credentials: Path) -> float:
    async def run() -> float:
        receiver = DataPlane(credentials, "127.0.0.1")
        sender = DataPlane(credentials, "127.0.0.1")
        received = 0

        async def on_data(header: dict, tensors: dict) -> None:
            nonlocal received
            received += 1

        receiver.on("data", on_data)
        await receiver.start()
        await sender.start()
        payload = {"x": np.random.default_rng(0).random(size // 4, dtype=np.float32)}
        header = {"kind": "data", "req": "bench"}
        await sender.send_when_connected(receiver.endpoint, header, payload)
        await asyncio.sleep(0.1)
        received = 0
        start = time.perf_counter()
        sent = 0
        while time.perf_counter() - start < seconds:
            if sender.send(receiver.endpoint, header, payload):
                sent += 1
                if sent % 8 == 0:
                    await asyncio.sleep(0)  # let the receiver's task run
            else:
                await asyncio.sleep(0.0005)  # queue full: wait, do not spin on the CPU
        while received < sent and time.perf_counter() - start < seconds * 4:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - start
        await sender.stop()
        await receiver.stop()
        return received * size / elapsed / 1e9

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        creds = create_cluster_credentials(Path(tmp) / "cluster")
        rows = []
        for size in SIZES:
            plain = raw(size, args.seconds, None)
            curve = raw(size, args.seconds, (creds.public_key, creds.secret_key))
            ours = dataplane(size, args.seconds, Path(tmp) / "cluster")
            rows.append({"bytes": size, "raw_gbs": plain, "raw_curve_gbs": curve,
                         "epara_gbs": ours, "vs_raw": ours / plain, "vs_raw_curve": ours / curve})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'size':>8} {'raw GB/s':>9} {'raw+curve':>10} {'epara':>8} {'vs raw':>7} "
          f"{'vs raw+curve':>12}")
    for r in rows:
        print(f"{r['bytes'] // 1024:>6}KB {r['raw_gbs']:>9.2f} {r['raw_curve_gbs']:>10.2f} "
              f"{r['epara_gbs']:>8.2f} {r['vs_raw'] * 100:>6.0f}% "
              f"{r['vs_raw_curve'] * 100:>11.0f}%")


if __name__ == "__main__":
    main()
