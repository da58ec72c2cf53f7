"""What hostile local clients can make a node hold, and how long they can stall the others.

    python bench/hostile.py [--json] [--rounds 3] [--unread 300000]

One node process (a tiny model), measured from /proc in the same run:

- ``declared_frames``: 10 connections each announce a 64 MiB frame and send nothing
  more. Target: node RSS under baseline + 20 MB.
- ``unread``: one client sends ``--unread`` pings and never reads a reply (until the
  end, when it reads them all to count the ``overloaded`` ones). Target: RSS under
  baseline + 100 MB, with ``overloaded`` replies.
- ``after_abuse``: RSS once those clients have gone and the node is idle, against the
  baseline. Target: within 10%.
- ``pathological_frame``: while a prober pings the node back to back, another client
  sends an 8 MB frame of millions of one-byte CBOR items; the prober's longest wait,
  against its longest wait over the same time without the frame (rounds interleaved,
  A B A B). Target: under 50 ms.

Measured on whatever machine runs it; on a shared, busy VM the stall figures are noisy
(medians of the rounds and their spread are printed).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epara.peer import wire  # noqa: E402
from tests.helpers import make_add_model, running_node  # noqa: E402

MiB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(sock))
    return s


def read_reply(s: socket.socket) -> dict:
    header = s.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        raise EOFError("closed")
    (length,) = struct.unpack(">I", header)
    return cbor2.loads(s.recv(length, socket.MSG_WAITALL))


def ping(s: socket.socket) -> None:
    s.sendall(wire.frame(cbor2.dumps({"id": 0, "op": "ping"})))
    read_reply(s)


def settle(pid: int, seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return rss_mb(pid)


def declared_frames(sock: Path, pid: int) -> dict[str, float]:
    before = rss_mb(pid)
    held = []
    for _ in range(10):
        s = connect(sock)
        s.sendall(struct.pack(">I", 64 * MiB) + b"\xa1")
        held.append(s)
    with connect(sock) as probe:
        ping(probe)
    time.sleep(1.0)
    peak = rss_mb(pid)
    for s in held:
        s.close()
    return {"rss_before_mb": before, "rss_mb": peak, "growth_mb": peak - before}


def unread(sock: Path, pid: int, count: int) -> dict[str, float]:
    before = rss_mb(pid)
    s = connect(sock)
    frame = wire.frame(cbor2.dumps({"id": 1, "op": "ping"}))
    per_send = 5000
    done = threading.Event()

    def sender() -> None:
        remaining = count
        with_block = frame * per_send
        while remaining > 0:
            n = min(per_send, remaining)
            s.sendall(with_block if n == per_send else frame * n)
            remaining -= n
        done.set()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    peak = before
    end = time.monotonic() + 8.0
    while time.monotonic() < end and not done.is_set():
        peak = max(peak, rss_mb(pid))
        time.sleep(0.1)
    peak = max(peak, rss_mb(pid))
    sent_before_reading = done.is_set()
    codes: dict[str, int] = {}
    for _ in range(count):
        reply = read_reply(s)
        code = "ok" if reply.get("ok") else reply["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    thread.join()
    s.close()
    return {"rss_before_mb": before, "rss_peak_mb": peak, "growth_mb": peak - before,
            "all_sent_while_unread": sent_before_reading, "replies": codes}


def stall_round(sock: Path, abusive: bytes | None, seconds: float) -> float:
    """The prober's longest ping round trip while (or, as the baseline, not) an 8 MB
    frame of one-byte items arrives."""
    waits: list[float] = []
    stop = threading.Event()

    def prober() -> None:
        with connect(sock) as s:
            while not stop.is_set():
                start = time.perf_counter()
                ping(s)
                waits.append(time.perf_counter() - start)

    thread = threading.Thread(target=prober)
    thread.start()
    time.sleep(0.3)
    if abusive is not None:
        with connect(sock) as s:
            s.sendall(abusive)
            reply = read_reply(s)
            assert reply.get("ok") is False, reply
    time.sleep(seconds)
    stop.set()
    thread.join()
    return max(waits) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unread", type=int, default=300_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_add_model(store, "add", batch=None)
        sock = Path(tmp) / "run" / "node.sock"
        with running_node(store, sock) as process:
            pid = process.pid
            with connect(sock) as s:
                for _ in range(100):
                    ping(s)
            baseline = settle(pid)
            declared = declared_frames(sock, pid)
            flood = unread(sock, pid, args.unread)
            after = settle(pid, 3.0)
            quiet, loud = [], []
            # Encoded before any prober runs: encoding holds this process's GIL.
            pathological = wire.frame(cbor2.dumps({"id": 9, "op": "ping",
                                                   "x": [0] * (8 * MiB - 64)}))
            for _ in range(args.rounds):  # interleaved: A B A B
                quiet.append(stall_round(sock, None, 1.0))
                loud.append(stall_round(sock, pathological, 1.0))
            after_all = settle(pid, 3.0)
    result = {
        "baseline_rss_mb": round(baseline, 1),
        "declared_frames_growth_mb": round(declared["rss_mb"] - baseline, 1),
        "unread_growth_mb": round(flood["rss_peak_mb"] - baseline, 1),
        "unread_replies": flood["replies"],
        "unread_all_sent_before_reading": flood["all_sent_while_unread"],
        "after_abuse_rss_mb": round(after, 1),
        "after_abuse_pct": round((after - baseline) / baseline * 100, 1),
        "after_pathological_rss_mb": round(after_all, 1),
        "stall_ms_pathological": round(statistics.median(loud), 1),
        "stall_ms_pathological_rounds": [round(v, 1) for v in loud],
        "stall_ms_baseline": round(statistics.median(quiet), 1),
        "stall_ms_baseline_rounds": [round(v, 1) for v in quiet],
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:34} {value}")
    print("targets: declared < +20 MB; unread < +100 MB with overloaded replies; "
          "after abuse within 10%; stall < 50 ms")


if __name__ == "__main__":
    main()
