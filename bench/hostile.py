"""What hostile local clients can make a node hold, and how long they can stall the others.

    python bench/hostile.py [--json] [--rounds 3] [--unread 300000] [--stall-only]

One node process (a tiny model), measured from /proc in the same run:

- ``declared_frames``: 10 connections each announce a 64 MiB frame and send nothing
  more. Target: node RSS under baseline + 20 MB.
- ``unread``: one client sends ``--unread`` pings and never reads a reply (until the
  end, when it reads them all to count the ``overloaded`` ones). Target: RSS under
  baseline + 100 MB, with ``overloaded`` replies.
- ``after_abuse``: RSS once those clients have gone and the node is idle, against the
  baseline. Target: within 10%.
- ``pathological_frame``: while a prober pings the node back to back, another client
  sends an 8 MB frame of millions of one-byte CBOR items (``one_byte``), or of varied
  1-9 byte integers that no run of one kind covers (``varied``); the prober's longest
  wait around the frame (from its send to its answer, at least 0.25 s), against its
  longest wait in as long a window without the frame (rounds interleaved, A B C A B
  C); also the CPU the node's event-loop thread spent on each frame (steady on a busy
  machine, where wall-clock waits are not). Target: under 50 ms. ``--stall-only``
  measures just this; ``--compare-pythonpath DIR`` runs another version beside it.

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


def pathological_frames() -> dict[str, bytes]:
    """Legal 8 MB frames that decode to millions of tiny items (encoded before any prober
    runs: encoding holds this process's GIL)."""
    count = 8 * MiB - 64
    # Integers whose encodings take 1, 2, 3, 5 and 9 bytes, in an order with no run of
    # one kind: the item counter's fast paths do not apply.
    cycle = [1, 100, 1000, 100_000, 10**10, 2, 30, 40_000, 7, 5 * 10**9]
    varied: list[int] = []
    size = 0
    while size < count:
        varied.extend(cycle)
        size += 1 + 2 + 3 + 5 + 9 + 1 + 2 + 3 + 1 + 9
    return {"one_byte": wire.frame(cbor2.dumps({"id": 9, "op": "ping", "x": [0] * count})),
            "varied": wire.frame(cbor2.dumps({"id": 9, "op": "ping", "x": varied}))}


WINDOW_S = 0.25  # the stall is the longest ping overlapping this long after the send


def stall_round(sock: Path, abusive: bytes | None, seconds: float) -> float:
    """The prober's longest ping round trip among those overlapping the frame's arrival
    and handling (from its send to its answer, at least WINDOW_S), or, as the baseline,
    the same WINDOW_S at the same point of a round without the frame. A window rather
    than the whole round: on a busy machine the longest wait over seconds is the
    machine's hiccup, not the frame's."""
    waits: list[tuple[float, float]] = []
    stop = threading.Event()

    def prober() -> None:
        with connect(sock) as s:
            while not stop.is_set():
                start = time.perf_counter()
                ping(s)
                waits.append((start, time.perf_counter()))

    thread = threading.Thread(target=prober)
    thread.start()
    time.sleep(0.3)
    sent = time.perf_counter()
    if abusive is not None:
        with connect(sock) as s:
            s.sendall(abusive)
            reply = read_reply(s)
            assert reply.get("ok") is False, reply
    window_end = max(time.perf_counter(), sent + WINDOW_S)
    time.sleep(seconds)
    stop.set()
    thread.join()
    return max(end - start for start, end in waits if start < window_end and end > sent) \
        * 1000


def thread_cpu_ns(pid: int, tid: int) -> int:
    """CPU time a thread of ``pid`` has run (schedstat: nanoseconds, exact, unlike the
    10 ms ticks of stat)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def loop_cpu_round(sock: Path, pid: int, abusive: bytes) -> tuple[float, float]:
    """(ms of CPU the node's event-loop thread spent, ms its other threads spent) from
    sending the frame to its answer, no prober running. CPU time is not stretched by
    other work on the machine as wall time is: on a busy machine this is the steadier
    measure of how long the loop itself was held."""
    def others() -> int:
        return sum(thread_cpu_ns(pid, int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()
                   if int(t.name) != pid)

    with connect(sock) as s:
        ping(s)
        loop_before, others_before = thread_cpu_ns(pid, pid), others()
        s.sendall(abusive)
        reply = read_reply(s)
        assert reply.get("ok") is False, reply
        time.sleep(0.05)  # the reply was written before the loop's last bookkeeping
        loop_after, others_after = thread_cpu_ns(pid, pid), others()
    return (loop_after - loop_before) / 1e6, (others_after - others_before) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unread", type=int, default=300_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--stall-only", action="store_true",
                        help="only the pathological-frame stall rounds")
    parser.add_argument("--compare-pythonpath", type=Path, metavar="DIR",
                        help="with --stall-only: also run a node importing epara from DIR "
                        "(another version of the code: DIR/epara/node, ...), its stall "
                        "rounds interleaved with this tree's")
    args = parser.parse_args()
    if args.compare_pythonpath is not None:
        if not args.stall_only:
            parser.error("--compare-pythonpath needs --stall-only")
        compare_stalls(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_add_model(store, "add", batch=None)
        sock = Path(tmp) / "run" / "node.sock"
        with running_node(store, sock) as process:
            pid = process.pid
            with connect(sock) as s:
                for _ in range(100):
                    ping(s)
            result: dict[str, object] = {}
            if not args.stall_only:
                baseline = settle(pid)
                declared = declared_frames(sock, pid)
                flood = unread(sock, pid, args.unread)
                after = settle(pid, 3.0)
                result.update({
                    "baseline_rss_mb": round(baseline, 1),
                    "declared_frames_growth_mb": round(declared["rss_mb"] - baseline, 1),
                    "unread_growth_mb": round(flood["rss_peak_mb"] - baseline, 1),
                    "unread_replies": flood["replies"],
                    "unread_all_sent_before_reading": flood["all_sent_while_unread"],
                    "after_abuse_rss_mb": round(after, 1),
                    "after_abuse_pct": round((after - baseline) / baseline * 100, 1)})
            frames = pathological_frames()
            stalls: dict[str, list[float]] = {"baseline": [], **{k: [] for k in frames}}
            for _ in range(args.rounds):  # interleaved: A B C A B C
                stalls["baseline"].append(stall_round(sock, None, 1.0))
                for kind, frame in frames.items():
                    stalls[kind].append(stall_round(sock, frame, 1.0))
            if not args.stall_only:
                result["after_pathological_rss_mb"] = round(settle(pid, 3.0), 1)
    for kind, values in stalls.items():
        name = "baseline" if kind == "baseline" else f"pathological_{kind}"
        result[f"stall_ms_{name}"] = round(statistics.median(values), 1)
        result[f"stall_ms_{name}_range"] = [round(min(values), 1), round(max(values), 1)]
        result[f"stall_ms_{name}_rounds"] = [round(v, 1) for v in values]
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:34} {value}")
    print("targets: declared < +20 MB; unread < +100 MB with overloaded replies; "
          "after abuse within 10%; stall < 50 ms")


def compare_stalls(args: argparse.Namespace) -> None:
    """Stall rounds on two nodes, this tree's (``new``) and ``--compare-pythonpath``'s
    (``other``), interleaved round by round: new A B C, other A B C, new A B C, ..."""
    frames = pathological_frames()
    kinds = ["baseline", *frames]
    stalls = {(who, kind): [] for who in ("new", "other") for kind in kinds}
    cpu: dict[tuple[str, str, str], list[float]] = {
        (who, kind, thread): [] for who in ("new", "other") for kind in frames
        for thread in ("loop", "others")}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_add_model(store, "add", batch=None)
        socks = {"new": Path(tmp) / "new" / "node.sock", "other": Path(tmp) / "other" / "node.sock"}
        env = {"PYTHONPATH": str(args.compare_pythonpath.resolve())}
        with running_node(store, socks["new"]) as new, \
                running_node(store, socks["other"], env=env) as other:
            pids = {"new": new.pid, "other": other.pid}
            for sock in socks.values():
                with connect(sock) as s:
                    for _ in range(100):
                        ping(s)
            for _ in range(args.rounds):
                for who, sock in socks.items():
                    for kind in kinds:
                        stalls[(who, kind)].append(
                            stall_round(sock, frames.get(kind), 1.0))
                    for kind, frame in frames.items():
                        loop_ms, others_ms = loop_cpu_round(sock, pids[who], frame)
                        cpu[(who, kind, "loop")].append(loop_ms)
                        cpu[(who, kind, "others")].append(others_ms)
    result = {}
    for (who, kind), values in stalls.items():
        result[f"{who}_{kind}_ms"] = round(statistics.median(values), 1)
        result[f"{who}_{kind}_range"] = [round(min(values), 1), round(max(values), 1)]
        result[f"{who}_{kind}_rounds"] = [round(v, 1) for v in values]
    for (who, kind, thread), values in cpu.items():
        result[f"{who}_{kind}_{thread}_cpu_ms"] = round(statistics.median(values), 1)
        result[f"{who}_{kind}_{thread}_cpu_range"] = [round(min(values), 1),
                                                     round(max(values), 1)]
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:34} {value}")


if __name__ == "__main__":
    main()
