"""The local socket's connections: framing, the bounds on what each one may buffer, and
tensors in shared memory.

One design bounds every byte a client can make the node hold (docs/local-api.md,
"Limits"):

- Reading: a frame is read into a buffer that grows with the bytes that actually arrive
  (doubling, so copies stay linear), never to its announced length up front; past
  ``LARGE_BUFFER`` it is an anonymous map grown in place, and each read takes at most
  ``READ_CAP``, so a large frame's page faults are spread over loop turns. A frame
  must arrive whole within ``frame_timeout_s`` of its first byte. Its CBOR may hold at
  most ``max_items`` data items, counted before anything is decoded. Counting and
  decoding cost time per item: a frame of more than ``INLINE_ITEMS`` items is counted
  and decoded in a worker thread while its connection stops reading (its frames keep
  their order), so one client's frame of many tiny items cannot stall the others.
- Work: at most ``max_inflight`` requests run per connection; more get ``overloaded``.
- Writing: replies queue for a slow reader up to ``max_write_bytes`` or
  ``max_write_frames``; past that the node stops reading that client's requests (its own
  sends block) until it reads, so a client that never reads costs a bounded amount.
- The node: all connections' read and write buffers together stay under
  ``max_buffered_bytes``; a request that arrives past it, or a frame that would grow
  past it, gets ``overloaded``.

Shared memory: a client may attach memfd regions (passed with SCM_RIGHTS on an
``shm_attach`` frame). A tensor in a request may then be a reference into a region (no
copy on either side), and a request may name a reply area where the node writes large
output tensors, replying with references. Regions belong to the client; the node maps
them (closing the descriptor at once) and drops its mapping on ``shm_detach`` or when
the connection closes, as soon as no running request still reads it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import gc
import logging
import mmap
import os
import socket
import stat
import termios
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from epara.peer import wire
from epara.peer.wire import PROTOCOL_VERSION, WireError

log = logging.getLogger(__name__)

Reply = Callable[[dict[str, Any]], Awaitable[None]]
# (message, reply, the connection's in-flight requests by id) -> the request's work
Serve = Callable[[dict[str, Any], Reply, dict[Any, Any]], Awaitable[None]]

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024  # an idle connection's read buffer; small frames share one read
# One read takes at most this much (fresh pages fault in as it lands, ~1.6 ms per MiB on
# a 2-core VM): a large frame arrives over several loop turns, others served between.
READ_CAP = 1024 * 1024
LARGE_BUFFER = 1024 * 1024  # above this, a frame's buffer is an anonymous map (_grow)
SHARED_ALIGN = 64  # offsets into shared regions are multiples of this (any dtype, a line)
SHARED_MIN_BYTES = 64 * 1024  # smaller output tensors stay inline (a copy is cheaper)
MAX_FDS_PER_READ = 4
MAX_PENDING_FDS = 4  # passed descriptors not yet claimed by an shm_attach frame
CONNECTION_OPS = ("shm_attach", "shm_detach")
# Frames of up to this many CBOR items are decoded on the event loop (counting them costs
# ~1 ms at worst); larger ones go to the decode thread. Ordinary requests (tensors as
# typed arrays, a chat's messages) hold far fewer.
INLINE_ITEMS = 1024


@dataclass(frozen=True)
class SocketLimits:
    """Every bound of the local socket, per connection and per node (docs/local-api.md)."""

    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    max_items: int = wire.DEFAULT_MAX_ITEMS
    frame_timeout_s: float = 10.0
    max_inflight: int = 64
    max_write_bytes: int = 16 * 1024 * 1024
    max_write_frames: int = 4096
    max_buffered_bytes: int = 256 * 1024 * 1024
    max_shared_regions: int = 8
    max_shared_bytes: int = 1024 * 1024 * 1024  # mapped per connection (the client's memory)

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_items", "max_inflight", "max_write_bytes",
                     "max_write_frames", "max_buffered_bytes", "max_shared_regions",
                     "max_shared_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.frame_timeout_s > 0:
            raise ValueError("frame_timeout_s must be positive")


class _Allocator:
    """glibc keeps freed memory for reuse; after a burst of large buffers (an abusive
    client, a flood of big frames) hand it back to the system once things calm down."""

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = None
        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
        self._pending: asyncio.TimerHandle | None = None

    def trim_soon(self, loop: asyncio.AbstractEventLoop, delay: float = 0.5) -> None:
        if self._trim is None or self._pending is not None:
            return
        self._pending = loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._pending = None
        if self._trim is not None:
            self._trim(0)


_ALLOCATOR = _Allocator()
TRIM_AFTER_BYTES = 4 * 1024 * 1024  # a connection that buffered this much trims on close


class _UnmapWatch:
    """A closed connection's regions are unmapped when the last view of them goes, which
    reference counting does at once unless a reference cycle holds one (an exception's
    traceback, say). As a safety net, a region still mapped a while after its connection
    closed (its requests are long cancelled) gets a GC pass, at most one per interval."""

    def __init__(self, delay: float = 5.0, interval: float = 30.0) -> None:
        self.delay = delay
        self.interval = interval
        self._last = -interval

    def watch(self, loop: asyncio.AbstractEventLoop, regions: Iterable[SharedRegion]) -> None:
        refs = [weakref.ref(region) for region in regions]
        loop.call_later(self.delay, self._check, refs)

    def _check(self, refs: list[weakref.ref[SharedRegion]]) -> None:
        if not any(ref() is not None for ref in refs):
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        collected = gc.collect()
        left = sum(ref() is not None for ref in refs)
        log.info("shared regions of a closed connection outlived it: a GC pass freed %d "
                 "objects, %d regions still mapped", collected, left)


_UNMAP_WATCH = _UnmapWatch()


class LocalSocketServer:
    """Accepts connections on a Unix socket; ``serve`` runs each decoded request."""

    def __init__(self, serve: Serve, limits: SocketLimits) -> None:
        self.serve = serve
        self.limits = limits
        self.buffered = 0  # bytes in all connections' read and write buffers
        self.connections: set[Connection] = set()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread for frames of many items: one such frame at a time, node-wide; each
        # waiting one holds only its own (paused) connection.
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epara-decode")

    def listen(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(64):  # a burst of connects must not starve the others
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: keep serving who is connected
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            self.connections.add(Connection(self, conn, self._loop))

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for connection in list(self.connections):
            connection.close()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def over_budget(self) -> bool:
        return self.buffered > self.limits.max_buffered_bytes


@dataclass(eq=False)
class SharedRegion:
    """A client's memfd, mapped here. ``memory`` (uint8) keeps the mapping alive: views of
    it handed to requests keep it mapped until they are gone, then it is unmapped."""

    slot: int
    memory: np.ndarray

    @property
    def size(self) -> int:
        return int(self.memory.size)


def map_region(fd: int, slot: int, size: int) -> SharedRegion:
    """Validate and map a passed descriptor (the caller closes ``fd``). Only a memfd
    sealed against shrinking is accepted: a region the client could truncate under the
    node would turn the node's next access into SIGBUS."""
    if not hasattr(fcntl, "F_GET_SEALS"):
        raise WireError("bad_request", "shared memory needs Linux memfd seals, which this "
                        "system lacks")
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise WireError("bad_request", f"the passed descriptor is not a sealable memfd "
                        f"({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise WireError("bad_request", "the passed descriptor is not a memfd")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise WireError("bad_request", "the memfd must carry F_SEAL_SHRINK (so it cannot "
                        "be truncated while mapped)")
    if info.st_size < size:
        raise WireError("bad_request", f"the memfd holds {info.st_size} bytes, fewer than "
                        f"the {size} declared")
    try:
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:
        raise WireError("bad_request", f"cannot map the memfd read-write: {exc}") from None
    return SharedRegion(slot, np.frombuffer(mapping, dtype=np.uint8))


def _whole(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


class ReplyArea:
    """Where the node may place one request's large output tensors: a client's region,
    from ``offset``, ``length`` bytes. Filled front to back over the request's replies."""

    def __init__(self, region: SharedRegion, offset: int, length: int) -> None:
        self.region = region
        self.cursor = offset
        self.end = offset + length

    def place(self, array_: np.ndarray) -> cbor2.CBORTag | None:
        if array_.nbytes < SHARED_MIN_BYTES:
            return None
        if array_.dtype == np.bool_:
            array_ = array_.view(np.uint8)
        if array_.dtype.name not in wire.SUPPORTED_DTYPES:
            return None  # the inline encoder gives the proper error
        size = array_.nbytes
        if self.cursor + size > self.end:
            return None  # no room left: inline
        offset = self.cursor
        target = self.region.memory[offset:offset + size].view(
            array_.dtype.newbyteorder("<")).reshape(array_.shape)
        np.copyto(target, array_, casting="no" if array_.dtype.isnative else "equiv")
        self.cursor = offset + -(-size // SHARED_ALIGN) * SHARED_ALIGN
        return wire.shared_tensor(array_, [self.region.slot, offset, size])


class Connection:
    """One client connection, read and written with the socket calls themselves
    (``recvmsg`` to receive passed descriptors), all on the event loop thread."""

    def __init__(self, server: LocalSocketServer, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.limits = server.limits
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight: dict[Any, Any] = {}  # by id, for the `cancel` op
        self.regions: dict[int, SharedRegion] = {}
        self.closed = False
        self.peak_buffered = 0
        self._rx: bytearray | mmap.mmap = bytearray(READ_CHUNK)
        self._start = 0  # first unparsed byte of _rx
        self._end = 0  # end of received bytes in _rx
        self._frame_length: int | None = None  # the frame being read, once its header is
        self._discard = 0  # bytes still to skip of a frame refused for node memory
        self._frame_timer: asyncio.TimerHandle | None = None
        self._fds: deque[int] = deque()
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._counted = 0  # what this connection has added to server.buffered
        self._reading = False
        self._decoding = False  # a frame of many items is in the decode thread
        self._write_blocked = False  # the client reads too slowly: its requests wait
        self._writer_armed = False
        self._closing = False  # close once the queued replies are written
        self._writable = asyncio.Event()
        self._writable.set()
        with contextlib.suppress(OSError):
            # Room for a whole image-sized tensor: fewer wake-ups per frame both ways.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        self._account()
        self._set_reading(True)

    # --- accounting ----------------------------------------------------------------

    def _account(self) -> None:
        held = len(self._rx) + self._out_bytes
        self.server.buffered += held - self._counted
        self._counted = held
        self.peak_buffered = max(self.peak_buffered, held)

    def _set_reading(self, on: bool) -> None:
        if self.closed or on == self._reading or (on and self._decoding):
            return  # while a frame decodes aside, its successors wait (and its buffer)
        self._reading = on
        if on:
            self.loop.add_reader(self.fd, self._on_readable)
            if self._start < self._end:
                self._arm_frame_timer(restart=True)
                self.loop.call_soon(self._parse_safely)  # frames already here go on
        else:
            self.loop.remove_reader(self.fd)
            # Time spent not reading (the client's own replies back up) is not the client's
            # delay: the partial-frame clock restarts when reading does.
            self._cancel_frame_timer()

    # --- reading -------------------------------------------------------------------

    def _read_view(self) -> memoryview:
        """The free tail of the read buffer (at most READ_CAP of it), grown or compacted
        as the frame needs."""
        if self._discard:
            return memoryview(self._rx)[:min(len(self._rx), self._discard, READ_CAP)]
        if self._end < len(self._rx):
            return memoryview(self._rx)[self._end:self._end + READ_CAP]
        pending = self._end - self._start
        wanted = READ_CHUNK if self._frame_length is None else 4 + self._frame_length
        if self._start > 0 and wanted <= len(self._rx):
            self._rx[:pending] = self._rx[self._start:self._end]  # compact in place
        else:
            # Grow to what has arrived (the kernel says how much waits) or double, never
            # past the frame: memory follows the bytes, not the announced length.
            size = max(READ_CHUNK, min(wanted, max(2 * len(self._rx),
                                                   pending + self._bytes_waiting())))
            if self.server.buffered + size - len(self._rx) > self.limits.max_buffered_bytes \
                    or not self._grow(size, pending):
                self._refuse_frame()
                return memoryview(self._rx)[:min(len(self._rx), self._discard, READ_CAP)]
        self._start, self._end = 0, pending
        self._account()
        return memoryview(self._rx)[self._end:self._end + READ_CAP]

    def _grow(self, size: int, pending: int) -> bool:
        """Make the buffer ``size`` bytes, its ``pending`` unparsed bytes first. A large
        one is an anonymous map that grows in place (mremap): no zero-filling pass and no
        copy of what arrived, and its pages fault in as bytes land, at most READ_CAP per
        read, so one frame's growth never holds the loop for long. False: no memory."""
        if size <= LARGE_BUFFER:
            grown = bytearray(size)
            grown[:pending] = self._rx[self._start:self._end]
            self._rx = grown
            return True
        try:
            if isinstance(self._rx, mmap.mmap):
                if self._start:
                    self._rx[:pending] = self._rx[self._start:self._end]
                self._rx.resize(size)
            else:
                # Private: a shared anonymous map is a fixed-size shmem object that
                # mremap cannot grow (bytes landing past its first size fault).
                mapped = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                mapped[:pending] = self._rx[self._start:self._end]
                self._rx = mapped
        except (OSError, BufferError, ValueError) as exc:
            log.warning("cannot grow a connection's read buffer to %d bytes: %s", size, exc)
            return False
        return True

    def _bytes_waiting(self) -> int:
        try:
            waiting = array.array("i", [0])
            fcntl.ioctl(self.fd, termios.FIONREAD, waiting)
            return int(waiting[0])
        except OSError:
            return 0

    def _refuse_frame(self) -> None:
        """The node's buffers are full: skip this frame as it arrives and say so. The
        connection stays usable (the length prefix keeps it aligned)."""
        assert self._frame_length is not None
        self._discard = 4 + self._frame_length - (self._end - self._start)
        self._frame_length = None
        self._rx = bytearray(READ_CHUNK)
        self._start = self._end = 0
        self._account()
        self._write(_error(None, "overloaded", "the node is buffering more than "
                           f"{self.limits.max_buffered_bytes} bytes for its clients; "
                           "the frame was dropped"))

    def _on_readable(self) -> None:
        view = self._read_view()
        if self.closed:
            view.release()
            return
        try:
            nbytes, ancillary, _, _ = self.sock.recvmsg_into(
                [view], socket.CMSG_SPACE(MAX_FDS_PER_READ * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("connection read failed: %s", exc)
            self.close()
            return
        finally:
            view.release()  # the buffer may be resized now
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                for fd in fds:
                    if len(self._fds) < MAX_PENDING_FDS:
                        self._fds.append(fd)
                    else:
                        os.close(fd)
        if nbytes == 0:
            if self._end > self._start or self._discard:
                log.info("client closed mid-frame")
            self._close_after_flush()
            return
        if self._discard:
            self._discard -= nbytes
            if not self._discard:
                self._cancel_frame_timer()
            return
        self._end += nbytes
        self._parse_safely()

    def _parse_safely(self) -> None:
        try:
            self._parse()
        except Exception:  # a bug here must cost this connection, never the node
            log.exception("local connection failed; closing it")
            self.close()

    def _parse(self) -> None:
        completed = False
        while self._reading and not self.closed and not self._closing:
            available = self._end - self._start
            if self._frame_length is None:
                if available < wire.FRAME_HEADER.size:
                    break
                header = bytes(self._rx[self._start:self._start + wire.FRAME_HEADER.size])
                try:
                    self._frame_length = wire.parse_frame_length(header,
                                                                 self.limits.max_frame_bytes)
                except WireError as exc:
                    # The rest of the stream cannot be trusted to realign: answer, close.
                    self._write(_error(None, exc.code, str(exc)))
                    self._close_after_flush()
                    return
            end = self._start + 4 + self._frame_length
            if end > self._end:
                break
            whole = memoryview(self._rx)
            payload = whole[self._start + 4:end]
            self._start = end
            self._frame_length = None
            completed = True
            if wire.count_items(payload, INLINE_ITEMS) > INLINE_ITEMS:
                self._decode_aside(whole, payload)
                break
            try:
                self._dispatch(payload)
            finally:
                payload.release()
                whole.release()
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._rx) > READ_CHUNK:
                if len(self._rx) >= TRIM_AFTER_BYTES:
                    _ALLOCATOR.trim_soon(self.loop)
                self._rx = bytearray(READ_CHUNK)  # a big frame's buffer goes with it
                self._account()
            self._cancel_frame_timer()
        elif self._reading:
            self._arm_frame_timer(restart=completed)

    def _arm_frame_timer(self, restart: bool) -> None:
        if self._frame_timer is not None and not restart:
            return
        self._cancel_frame_timer()
        self._frame_timer = self.loop.call_later(self.limits.frame_timeout_s,
                                                 self._frame_timed_out)

    def _cancel_frame_timer(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        received = self._end - self._start
        self._write(_error(None, "frame_timeout", f"a frame was not complete "
                           f"{self.limits.frame_timeout_s:g} s after its first byte "
                           f"({received} bytes received)"))
        self._close_after_flush()

    def _decode_aside(self, whole: memoryview, payload: memoryview) -> None:
        """Count and decode a frame of many items in the decode thread. The connection
        stops reading until it is done: its next frames keep their order, and the buffer
        the thread reads is not touched meanwhile."""
        self._decoding = True
        self._set_reading(False)
        decoding = self.loop.run_in_executor(self.server.decoder, _decode_or_error, payload,
                                             self.limits.max_items, self._resolve)

        def decoded(future: asyncio.Future[tuple[dict[str, Any] | None, WireError | None,
                                                  Any]]) -> None:
            self._decoding = False
            try:
                message, error, request_id = future.result()
            except (asyncio.CancelledError, RuntimeError):  # the server closed meanwhile
                message, error, request_id = None, None, None
            finally:
                payload.release()
                whole.release()
            if self.closed:
                return
            try:
                if error is not None:
                    self._write(_error(request_id, error.code, str(error)))
                elif message is not None:
                    self._handle(message)
            except Exception:  # as in _parse_safely: a bug costs this connection only
                log.exception("local connection failed; closing it")
                self.close()
                return
            if not self._write_blocked and not self._closing:
                self._set_reading(True)
            self._parse_safely()  # frames already here, or the buffer's reset

        decoding.add_done_callback(decoded)

    def _dispatch(self, payload: memoryview) -> None:
        message, error, request_id = _decode_or_error(payload, self.limits.max_items,
                                                      self._resolve)
        if error is not None:
            self._write(_error(request_id, error.code, str(error)))
            return
        assert message is not None
        self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        raw_id = message.get("id")
        request_id = raw_id if wire.valid_id(raw_id) else None
        op = message.get("op")
        if op in CONNECTION_OPS:
            self._connection_op(op, request_id, message)
            return
        if op != "cancel":  # a cancel is how a client gets back under the bound
            if len(self.tasks) >= self.limits.max_inflight:
                self._write(_error(request_id, "overloaded", f"this connection has "
                                   f"{len(self.tasks)} requests in flight, the limit; "
                                   "wait for replies before sending more"))
                return
            if self.server.over_budget():
                self._write(_error(request_id, "overloaded", "the node is buffering more "
                                   f"than {self.limits.max_buffered_bytes} bytes for its "
                                   "clients; retry later"))
                return
        area: ReplyArea | None = None
        if "shm_reply" in message:
            try:
                area = self._reply_area(message.pop("shm_reply"))
            except WireError as exc:
                self._write(_error(request_id, exc.code, str(exc)))
                return
        reply = self._reply if area is None else self._area_reply(area)
        task = asyncio.create_task(self.server.serve(message, reply, self.inflight))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- shared memory ---------------------------------------------------------------

    def _resolve(self, reference: Any) -> np.ndarray:
        """A TAG_SHARED [slot, offset, length] → that part of the region, no copy."""
        if not (isinstance(reference, (list, tuple)) and len(reference) == 3):
            raise WireError("bad_frame", "a shared-memory reference is [slot, offset, length]")
        slot, offset, length = (_whole(v, 0, 2**63) for v in reference)
        region = self.regions.get(slot) if slot is not None else None
        if region is None:
            raise WireError("bad_frame", f"no shared region is attached as slot "
                            f"{reference[0]!r} on this connection")
        if offset is None or length is None or offset % SHARED_ALIGN \
                or offset + length > region.size:
            raise WireError("bad_frame", f"shared reference {reference!r} is not inside "
                            f"slot {slot} ({region.size} bytes) at a multiple of "
                            f"{SHARED_ALIGN}")
        return region.memory[offset:offset + length]

    def _reply_area(self, value: Any) -> ReplyArea:
        if not (isinstance(value, list) and len(value) == 3):
            raise WireError("bad_request", "shm_reply is [slot, offset, length]")
        slot, offset, length = (_whole(v, 0, 2**63) for v in value)
        region = self.regions.get(slot) if slot is not None else None
        if region is None:
            raise WireError("bad_request", f"shm_reply names slot {value[0]!r}, which is "
                            "not attached on this connection")
        if offset is None or length is None or offset % SHARED_ALIGN \
                or offset + length > region.size:
            raise WireError("bad_request", f"shm_reply {value!r} is not inside slot {slot} "
                            f"({region.size} bytes) at a multiple of {SHARED_ALIGN}")
        return ReplyArea(region, offset, length)

    def _connection_op(self, op: str, request_id: Any, message: dict[str, Any]) -> None:
        try:
            if op == "shm_attach":
                # The descriptor came with this frame's bytes, so it is the oldest unclaimed.
                fd = self._fds.popleft() if self._fds else None
                try:
                    answer = self._attach(fd, message)
                finally:
                    if fd is not None:
                        os.close(fd)  # the mapping keeps the memory; no descriptor is kept
            else:
                slot = _whole(message.get("slot"), 0, 2**31 - 1)
                if slot is None:
                    raise WireError("bad_request", "field 'slot' must be an integer in "
                                    "[0, 2^31)")
                answer = {"detached": self.regions.pop(slot, None) is not None}
        except WireError as exc:
            self._write(_error(request_id, exc.code, str(exc)))
            return
        self._write({"id": request_id, "ok": True, **answer})

    def _attach(self, fd: int | None, message: dict[str, Any]) -> dict[str, Any]:
        if fd is None:
            raise WireError("bad_request", "shm_attach needs one memfd passed with its frame "
                            "(SCM_RIGHTS)")
        slot = _whole(message.get("slot"), 0, 2**31 - 1)
        size = _whole(message.get("size"), 1, 2**62)
        if slot is None or size is None:
            raise WireError("bad_request", "shm_attach needs 'slot' (integer in [0, 2^31)) "
                            "and 'size' (bytes, at least 1)")
        others = [r for s, r in self.regions.items() if s != slot]
        if len(others) >= self.limits.max_shared_regions:
            raise WireError("overloaded", f"{len(others)} regions are attached, the limit "
                            "per connection; detach one first")
        mapped = sum(r.size for r in others)
        if mapped + size > self.limits.max_shared_bytes:
            raise WireError("overloaded", f"attaching {size} bytes would map more than "
                            f"{self.limits.max_shared_bytes} bytes for this connection")
        self.regions[slot] = map_region(fd, slot, size)
        return {"slot": slot, "size": size, "align": SHARED_ALIGN,
                "min_bytes": SHARED_MIN_BYTES}

    # --- writing -------------------------------------------------------------------

    async def _reply(self, message: dict[str, Any]) -> None:
        self._write(message)
        await self._writable.wait()  # back-pressure from a client that reads slowly

    def _area_reply(self, area: ReplyArea) -> Reply:
        async def reply(message: dict[str, Any]) -> None:
            self._write(message, area.place)
            await self._writable.wait()
        return reply

    def _write(self, message: dict[str, Any],
               place: Callable[[np.ndarray], cbor2.CBORTag | None] | None = None) -> None:
        if self.closed:
            return
        payload = wire.encode({"v": PROTOCOL_VERSION, **message}, place)
        header = wire.FRAME_HEADER.pack(len(payload))
        if self._out:
            self._out.append(memoryview(header))
            self._out.append(memoryview(payload))
            self._out_bytes += len(header) + len(payload)
        else:
            try:
                sent = self.sock.sendmsg([header, payload])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                log.info("connection write failed: %s", exc)
                self.close()
                return
            if sent < len(header):
                self._out.append(memoryview(header)[sent:])
                self._out.append(memoryview(payload))
            elif sent < len(header) + len(payload):
                self._out.append(memoryview(payload)[sent - len(header):])
            self._out_bytes += len(header) + len(payload) - sent
        if self._out:
            self._after_queue_change()

    def _after_queue_change(self) -> None:
        frames = len(self._out)
        if self._out and not self._writer_armed:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writer_armed = True
        elif not self._out and self._writer_armed:
            self.loop.remove_writer(self.fd)
            self._writer_armed = False
        high = (self._out_bytes > self.limits.max_write_bytes
                or frames > 2 * self.limits.max_write_frames)
        low = (self._out_bytes <= self.limits.max_write_bytes // 4
               and frames <= self.limits.max_write_frames // 2)
        if high and not self._write_blocked:
            self._write_blocked = True
            self._writable.clear()
            self._set_reading(False)
        elif low and self._write_blocked:
            self._write_blocked = False
            self._writable.set()
            if not self._closing:
                self._set_reading(True)
        self._account()

    def _on_writable(self) -> None:
        while self._out and not self.closed:
            batch = [self._out[i] for i in range(min(len(self._out), 64))]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info("connection write failed: %s", exc)
                self.close()
                return
            self._out_bytes -= sent
            while sent:
                head = self._out[0]
                if sent >= len(head):
                    sent -= len(head)
                    self._out.popleft()
                else:
                    self._out[0] = head[sent:]
                    sent = 0
        if self.closed:
            return
        self._after_queue_change()
        if self._closing and not self._out:
            self.close()

    # --- closing -------------------------------------------------------------------

    def _close_after_flush(self) -> None:
        """Stop reading; close once what is queued for the client is written."""
        self._closing = True
        self._set_reading(False)
        for task in self.tasks:
            task.cancel()  # the client is gone or cannot be trusted: stop its work
        if not self._out:
            self.close()
        else:
            # A client that stopped reading must not hold the connection open for ever.
            self.loop.call_later(self.limits.frame_timeout_s, self.close)

    def close(self) -> None:
        if self.closed:
            return
        self._set_reading(False)
        self.closed = True
        if self._writer_armed:
            self.loop.remove_writer(self.fd)
            self._writer_armed = False
        self._cancel_frame_timer()
        self.sock.close()
        self._writable.set()
        for task in self.tasks:
            task.cancel()  # the client is gone: stop its work, free its queue slots
        while self._fds:
            os.close(self._fds.popleft())
        # Running requests may still read a region; the mapping goes with their views.
        if self.regions:
            _UNMAP_WATCH.watch(self.loop, self.regions.values())
        self.regions.clear()
        self._out.clear()
        self._out_bytes = 0
        self._rx = bytearray()
        self._account()
        self.server.connections.discard(self)
        if self.peak_buffered >= TRIM_AFTER_BYTES:
            _ALLOCATOR.trim_soon(self.loop)


def _decode_or_error(payload: memoryview, max_items: int,
                     resolve: Callable[[Any], np.ndarray],
                     ) -> tuple[dict[str, Any] | None, WireError | None, Any]:
    """(message, None, None), or (None, the error, the request id to answer it with)."""
    try:
        return wire.decode(payload, max_items, resolve), None, None
    except WireError as exc:
        # The traceback's frames may hold views of a shared region; in a reference cycle
        # (the decoder re-raises causes) they would keep it mapped until a GC pass.
        exc.__traceback__ = None
        # Past the item limit the id is not looked for: that would decode the frame.
        return None, exc, None if exc.too_many_items else wire.peek_id(payload)


def _error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}

