"""The local socket's bounds and its shared-memory transport, against a real node process.

Each test checks a mechanism, not a speed: memory is read from the node's /proc entries
and its `status` (`buffered_bytes`), and every test ends by checking that the node
still serves another client.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import numpy as np
import pytest

from epara.node.client import Client
from epara.node.localsock import INLINE_ITEMS, LARGE_BUFFER, READ_CAP
from epara.peer import wire

from .helpers import make_add_model, raw_connect, running_node, still_serving, wait_until

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    root = tmp_path_factory.mktemp("localsock")
    store = root / "store"
    make_add_model(store, "add", batch=None)
    make_add_model(store, "slow", batch=None, matmul_size=256, max_queue=64)
    sock = root / "run" / "node.sock"
    with running_node(store, sock, "--max-frame-mb", "32", "--max-inflight", "4",
                      "--frame-timeout", "1", "--max-buffered-mb", "24") as process:
        yield sock, process.pid


def send(s: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    payload = wire.frame(cbor2.dumps(message))
    if fds:
        s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        s.sendall(payload)


def read_reply(s: socket.socket) -> dict:
    header = s.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        raise EOFError("connection closed")
    (length,) = struct.unpack(">I", header)
    data = s.recv(length, socket.MSG_WAITALL)
    return cbor2.loads(data)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def node_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd_mappings(pid: int) -> int:
    return sum("memfd:" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def buffered(sock: Path) -> int:
    with Client(sock, timeout=30) as client:
        return int(client.status()["buffered_bytes"])


def sealed_memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


# --- shared memory -------------------------------------------------------------------


def test_large_tensors_travel_through_shared_memory_both_ways(node: tuple[Path, int]) -> None:
    sock, pid = node
    x = np.random.default_rng(0).random((20000, 4), dtype=np.float32)  # 320 KB
    with Client(sock) as client:
        out = client.infer("add", {"x": x})
        np.testing.assert_array_equal(out["y"], x + 1)
        assert set(client._areas) == {0, 1}  # an input area and a reply area attached
        assert memfd_mappings(pid) >= 2  # the node maps both
        small = client.infer("add", {"x": x[:3]})  # small tensors stay inline
        np.testing.assert_array_equal(small["y"], x[:3] + 1)
        again = client.infer("add", {"x": x * 2})  # the areas are reused
        np.testing.assert_array_equal(again["y"], x * 2 + 1)
        np.testing.assert_array_equal(out["y"], x + 1)  # earlier results were copied out
    with Client(sock, shared_memory=False) as client:
        out = client.infer("add", {"x": x})
        assert client._areas == {}
    np.testing.assert_array_equal(out["y"], x + 1)


def test_raw_client_reads_the_reply_from_its_own_region(node: tuple[Path, int]) -> None:
    """The protocol as docs/local-api.md gives it, without the Python client."""
    sock, _ = node
    size = 2 * MiB
    fd = sealed_memfd(size)
    region = mmap.mmap(fd, size)
    x = np.arange(40000 * 4, dtype=np.float32).reshape(40000, 4)
    region[:x.nbytes] = x.tobytes()
    with raw_connect(sock) as s:
        send(s, {"id": "a", "op": "shm_attach", "slot": 7, "size": size}, [fd])
        os.close(fd)
        assert read_reply(s)["ok"] is True
        reference = cbor2.CBORTag(wire.TAG_SHARED, [7, 0, x.nbytes])
        tensor = cbor2.CBORTag(40, [[40000, 4], cbor2.CBORTag(85, reference)])
        send(s, {"id": 1, "op": "infer", "model": "add", "inputs": {"x": tensor},
                 "shm_reply": [7, MiB, MiB]})
        reply = read_reply(s)
        assert reply["ok"] is True, reply
        y = reply["outputs"]["y"]
        shape, typed = y.value
        assert list(shape) == [40000, 4] and typed.tag == 85
        slot, offset, length = typed.value.value
        assert (slot, offset, length) == (7, MiB, x.nbytes)
        got = np.frombuffer(region[offset:offset + length], np.float32).reshape(shape)
        np.testing.assert_array_equal(got, x + 1)
        send(s, {"id": 2, "op": "shm_detach", "slot": 7})
        assert read_reply(s) == {"v": 1, "id": 2, "ok": True, "detached": True}
    region.close()


@pytest.mark.parametrize("case", ["no_fd", "unsealed", "pipe", "too_big"])
def test_bad_shared_regions_are_refused(node: tuple[Path, int], case: str) -> None:
    sock, pid = node
    fds_before = node_fds(pid)
    fds: list[int] = []
    size = 64 * 1024
    if case == "unsealed":
        fds = [sealed_memfd(size, seal=False)]
    elif case == "pipe":
        fds = list(os.pipe())[:1]
    elif case == "too_big":
        fds = [sealed_memfd(size)]
        size = 2 * size  # declares more than the memfd holds
    elif case != "no_fd":
        raise AssertionError(case)
    with raw_connect(sock) as s:
        send(s, {"id": 1, "op": "shm_attach", "slot": 0, "size": size}, fds)
        reply = read_reply(s)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        send(s, {"id": 2, "op": "ping"})
        assert read_reply(s)["ok"] is True
    for fd in fds:
        os.close(fd)
    wait_until(lambda: node_fds(pid) <= fds_before, 10, "the node to close passed fds")
    still_serving(sock)


def test_references_outside_attached_regions_are_refused(node: tuple[Path, int]) -> None:
    sock, _ = node
    fd = sealed_memfd(256 * 1024)
    with raw_connect(sock) as s:
        send(s, {"id": 1, "op": "shm_attach", "slot": 1, "size": 256 * 1024}, [fd])
        os.close(fd)
        assert read_reply(s)["ok"] is True
        for request_id, reference in enumerate(([2, 0, 16], [1, 256 * 1024 - 8, 16],
                                                [1, 3, 16], [1, -64, 16]), start=2):
            tensor = cbor2.CBORTag(40, [[1, 4], cbor2.CBORTag(
                85, cbor2.CBORTag(wire.TAG_SHARED, reference))])
            send(s, {"id": request_id, "op": "infer", "model": "add",
                     "inputs": {"x": tensor}})
            reply = read_reply(s)
            assert reply["id"] == request_id and reply["error"]["code"] == "bad_frame", reply
        send(s, {"id": 9, "op": "ping", "shm_reply": [1, 0, 512 * 1024]})
        assert read_reply(s)["error"]["code"] == "bad_request"
    still_serving(sock)


CLIENT_THAT_DIES = textwrap.dedent("""
    import sys, time
    import numpy as np
    from epara.node.client import Client
    client = Client(sys.argv[1])
    x = np.ones((70000, 4), np.float32)
    client.infer("add", {"x": x})  # attaches its regions
    # A slow request still running in the node, reading the region, when the client dies.
    client._send({"op": "infer", "model": "slow", "inputs": {"x": x}})
    print("holding", flush=True)
    time.sleep(60)
""")


def test_client_killed_holding_a_region_leaks_nothing(node: tuple[Path, int]) -> None:
    sock, pid = node
    still_serving(sock)
    fds_before = node_fds(pid)
    # Earlier tests' regions are gone once the node has seen their connections close.
    wait_until(lambda: memfd_mappings(pid) == 0, 20, "earlier regions to be unmapped")
    maps_before = memfd_mappings(pid)
    child = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES, str(sock)],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"holding"
        assert memfd_mappings(pid) >= maps_before + 2  # the node maps the client's regions
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    wait_until(lambda: memfd_mappings(pid) == maps_before, 20,
               "the node to unmap the dead client's regions")
    wait_until(lambda: node_fds(pid) <= fds_before, 20, "the node to close its descriptors")
    still_serving(sock)


# --- bounds --------------------------------------------------------------------------


def test_requests_past_the_in_flight_bound_are_overloaded(node: tuple[Path, int]) -> None:
    sock, _ = node
    x = cbor2.CBORTag(40, [[1, 4], cbor2.CBORTag(85, np.ones(4, np.float32).tobytes())])
    with raw_connect(sock) as s:
        for i in range(12):  # node started with --max-inflight 4
            send(s, {"id": i, "op": "infer", "model": "slow", "inputs": {"x": x}})
        replies = [read_reply(s) for _ in range(12)]
    by_code: dict[str, list] = {}
    for reply in replies:
        code = "ok" if reply["ok"] else reply["error"]["code"]
        by_code.setdefault(code, []).append(reply["id"])
    assert len(by_code.get("ok", [])) >= 4, by_code
    assert len(by_code.get("overloaded", [])) >= 1, by_code
    assert sorted(i for ids in by_code.values() for i in ids) == list(range(12))
    still_serving(sock)


def test_a_client_that_never_reads_is_bounded_and_others_are_served(
        node: tuple[Path, int]) -> None:
    sock, pid = node
    baseline = rss_mb(pid)
    flood = raw_connect(sock)
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    flood.setblocking(False)
    ping = wire.frame(cbor2.dumps({"id": 1, "op": "ping"}))
    chunk = ping * 2000
    sent = 0
    stalled_since = None
    # Send until the node stops taking requests (its replies back up, it stops reading).
    while sent < 300_000 * len(ping):
        try:
            sent += flood.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 2.0:
                break
            time.sleep(0.01)
    try:
        assert sent < 300_000 * len(ping), "the node never pushed back"
        still_serving(sock)  # the stuck client does not stop the others
        assert buffered(sock) <= 24 * MiB
        assert rss_mb(pid) - baseline < 100
        # The replies it finally reads include `overloaded` ones, all well formed.
        flood.setblocking(True)
        flood.settimeout(30)
        codes = set()
        for _ in range(3000):
            reply = read_reply(flood)
            codes.add("ok" if reply["ok"] else reply["error"]["code"])
        assert codes <= {"ok", "overloaded"} and "overloaded" in codes, codes
    finally:
        flood.close()
    still_serving(sock)


def test_partial_frame_times_out(node: tuple[Path, int]) -> None:
    sock, _ = node
    with raw_connect(sock) as s:
        s.sendall(struct.pack(">I", 1000) + b"\xa1" * 10)  # 10 of 1000 bytes, then nothing
        reply = read_reply(s)  # node started with --frame-timeout 1
        assert reply["id"] is None and reply["error"]["code"] == "frame_timeout", reply
        assert s.recv(1) == b""  # and closed
    still_serving(sock)


def test_declared_frames_are_not_allocated_up_front(node: tuple[Path, int]) -> None:
    sock, pid = node
    baseline = rss_mb(pid)
    held = []
    for _ in range(10):
        s = raw_connect(sock)
        s.sendall(struct.pack(">I", 30 * MiB) + b"\xa1" * 100)  # announces 30 MiB, sends 104 B
        held.append(s)
    try:
        still_serving(sock)
        assert buffered(sock) < 10 * MiB
        assert rss_mb(pid) - baseline < 20
    finally:
        for s in held:
            s.close()
    still_serving(sock)


def test_frame_past_the_node_budget_is_dropped_with_overloaded(node: tuple[Path, int]) -> None:
    sock, _ = node
    big = {"id": 5, "op": "ping", "pad": b"\0" * (28 * MiB)}  # node budget: 24 MiB
    with raw_connect(sock) as s:
        s.sendall(wire.frame(cbor2.dumps(big)))
        reply = read_reply(s)
        assert reply["id"] is None and reply["error"]["code"] == "overloaded", reply
        send(s, {"id": 6, "op": "ping"})  # the connection stays usable
        assert read_reply(s) == {"v": 1, "id": 6, "ok": True}
    wait_until(lambda: buffered(sock) < 2 * MiB, 10, "the node to free the frame's buffer")


def test_cbor_item_count_is_limited(node: tuple[Path, int]) -> None:
    sock, _ = node
    many = cbor2.dumps({"id": 3, "op": "ping", "junk": [0] * (wire.DEFAULT_MAX_ITEMS + 10)})
    with raw_connect(sock) as s:
        s.sendall(wire.frame(many))
        reply = read_reply(s)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_frame", reply
        assert "items" in reply["error"]["message"]
        send(s, {"id": 4, "op": "ping"})
        assert read_reply(s)["ok"] is True
    still_serving(sock)


def test_large_inline_frames_arrive_whole_back_to_back(node: tuple[Path, int]) -> None:
    """Past LARGE_BUFFER a frame's buffer is an anonymous map grown in place (mremap) and
    read at most READ_CAP at a time: two 3 MiB tensors sent back to back (the second
    starts mid-buffer) come back exact. (Small enough that both, and both replies, stay
    far under the node's 24 MiB buffer budget whatever the timing.)"""
    sock, _ = node
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((3 * MiB // 16, 4), dtype=np.float32) for _ in range(2)]
    assert xs[0].nbytes > max(LARGE_BUFFER, READ_CAP)
    frames = [wire.frame(cbor2.dumps({"id": i, "op": "infer", "model": "add", "inputs": {
        "x": cbor2.CBORTag(40, [list(x.shape), cbor2.CBORTag(85, x.tobytes())])}}))
        for i, x in enumerate(xs)]
    with raw_connect(sock) as s:
        s.sendall(b"".join(frames))
        for _ in xs:
            reply = read_reply(s)
            assert reply["ok"], reply
            shape, data = reply["outputs"]["y"].value
            y = np.frombuffer(data.value, np.float32).reshape(shape)
            np.testing.assert_array_equal(y, xs[reply["id"]] + 1)
    still_serving(sock)


def test_frames_of_many_items_are_decoded_aside_in_order(node: tuple[Path, int]) -> None:
    """Past INLINE_ITEMS a frame is counted and decoded in the decode thread; the frames
    behind it on its connection wait for it, so replies keep the order of the requests."""
    sock, _ = node
    varied = [1, 100, 1000, 100_000, 10**10] * 400  # 2000 items, no run of one kind
    assert len(varied) > INLINE_ITEMS
    too_many = [7, 300, 70_000] * (wire.DEFAULT_MAX_ITEMS // 3 + 10)
    frames = [wire.frame(cbor2.dumps(m)) for m in (
        {"id": 10, "op": "ping", "junk": varied}, {"id": 11, "op": "ping"},
        {"id": 12, "op": "ping", "junk": too_many}, {"id": 13, "op": "ping"})]
    with raw_connect(sock) as s:
        s.sendall(b"".join(frames))  # all at once: the parser meets them back to back
        replies = [read_reply(s) for _ in range(4)]
    assert [r["id"] for r in replies] == [10, 11, None, 13], replies
    assert replies[2]["error"]["code"] == "bad_frame" and "items" in \
        replies[2]["error"]["message"]
    assert all(r["ok"] for i, r in enumerate(replies) if i != 2)
    still_serving(sock)


def test_cancel_is_not_refused_at_the_in_flight_bound(node: tuple[Path, int]) -> None:
    sock, _ = node
    x = cbor2.CBORTag(40, [[1, 4], cbor2.CBORTag(85, np.ones(4, np.float32).tobytes())])
    with raw_connect(sock) as s:
        for i in range(4):
            send(s, {"id": i, "op": "infer", "model": "slow", "inputs": {"x": x}})
        send(s, {"id": 99, "op": "cancel", "target": 3})
        replies = {}
        while 99 not in replies or len(replies) < 5:
            reply = read_reply(s)
            replies[reply["id"]] = reply
        assert replies[99]["ok"] is True
    still_serving(sock)
