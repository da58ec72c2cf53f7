"""An emulated heterogeneous test bed: hosts with device-class CPU quotas and shaped links.

Used by tests and benchmarks (never by a running node). Each host is a network namespace
from ``NamespaceLab`` (bridge + veth pairs, 10.77.0.0/24 inside the namespaces only). On
top of that:

- **CPU**: one cgroup v1 ``cpu`` group per host with a CFS quota
  (``cpu.cfs_quota_us / cpu.cfs_period_us`` = the class's CPUs of *this* machine). Every
  process started through ``prefix(i)`` joins the group before it execs, so all its
  threads and children are capped from their first instruction. The groups carry a
  large ``cpu.shares`` (``BED_SHARES``), so the quota is also what a host gets when other
  work on this machine keeps every core busy: a shared VM's background load does not
  make an emulated device slower than its class.
- **Links**: ``tc tbf`` rate limits on both ends of the host's veth pair (egress of the
  host's ``eth0`` and of the bridge side ``v<i>``, i.e. both directions). One-way delay
  needs ``sch_netem``; where the kernel lacks it (Firecracker guests), delay is *not*
  emulated and ``not_emulated`` says so: results must then be read as "rate-limited,
  near-zero propagation delay".
- **Memory**: the class's budget for ``epara node --memory-budget-mb`` (what the planner
  sees); physical memory is not capped.
- **Reaching a host from the machine**: the root namespace has no address on the bed's
  bridge; ``forward(i, port)`` listens on 127.0.0.1 in the caller's process and connects
  to host i's address from inside its namespace (``PortForward``).

Device classes, in CPUs of the host running the bed (document these beside any number):

=========  ======  =======  ==========  ==================================================
class      CPUs    threads  budget MB   stands for
=========  ======  =======  ==========  ==================================================
server     2.0     2        4096        a small x86 server / desktop (the whole 2-core VM)
jetson     1.0     1        2048        a Jetson-class board's CPU side
pi         0.4     1        1024        a Raspberry Pi-class board
=========  ======  =======  ==========  ==================================================

Links: ``wired`` 1000 Mbit/s, 0.2 ms one way; ``wifi`` 50 Mbit/s, 3 ms one way.

The CPUs above are the classes' proportions. A bed whose quotas, plus the load
generator's share (``LOADGEN_CPUS``), add up to more than this machine's cores would
make its hosts contend for cores and be slower than their class says; so every quota is
scaled by the same factor to fit (``EmulatedBed.scale``, said by ``describe()``, e.g.
"quotas x0.47 to fit 2 cores"). The process that drives the load (the demo, the bench)
joins a cgroup of its own with ``LOADGEN_CPUS`` (``EmulatedBed.load_generator()``).

Everything measured on the bed is **emulated**: the quota reproduces a slower CPU's
throughput, not its cache, memory bandwidth or instruction set.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from epara.peer.testing import NamespaceLab, have_netns

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
# CPUs kept for the load generator (the demo's or bench's driver process) beside the hosts
LOADGEN_CPUS = 0.4
# cgroup v1 cpu.shares of the bed's groups: 64x a default process's (1024), so the hosts
# and the load generator get their quotas ahead of anything else on the machine.
BED_SHARES = 65536


@dataclass(frozen=True)
class DeviceClass:
    name: str
    cpus: float  # CFS quota, in CPUs of the machine running the bed
    threads: int  # runtime threads a node of this class uses (--threads)
    budget_mb: int  # what the node offers to models (--memory-budget-mb)


@dataclass(frozen=True)
class LinkClass:
    name: str
    rate_mbit: float
    delay_ms: float  # one way; needs sch_netem


DEVICE_CLASSES: dict[str, DeviceClass] = {
    "server": DeviceClass("server", 2.0, 2, 4096),
    "jetson": DeviceClass("jetson", 1.0, 1, 2048),
    "pi": DeviceClass("pi", 0.4, 1, 1024),
}
# The capability class a host of each emulated class advertises (the probe would see
# the machine running the bed).
ADVERTISED_CLASS = {"server": "server", "jetson": "embedded", "pi": "microcomputer"}
LINKS: dict[str, LinkClass] = {
    "wired": LinkClass("wired", 1000.0, 0.2),
    "wifi": LinkClass("wifi", 50.0, 3.0),
}


@dataclass(frozen=True)
class HostSpec:
    device: DeviceClass
    link: LinkClass
    budget_mb: int | None = None  # overrides the class's budget

    @property
    def budget(self) -> int:
        return self.device.budget_mb if self.budget_mb is None else self.budget_mb


def host(device: str, link: str = "wired", budget_mb: int | None = None) -> HostSpec:
    return HostSpec(DEVICE_CLASSES[device], LINKS[link], budget_mb)


def have_bed() -> str | None:
    """None when an emulated bed can run here, else the reason it cannot."""
    reason = have_netns()
    if reason is not None:
        return reason
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller with CFS bandwidth at {CGROUP_CPU}"
    return None


CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def connect_in_namespace(ns: str, address: tuple[str, int],
                         timeout: float = 10.0) -> socket.socket:
    """A TCP connection made from inside network namespace ``ns`` (by ``ip netns``
    name). Only the calling thread enters the namespace, and it comes back before this
    returns; the socket keeps the namespace it was made in."""
    with open(f"/run/netns/{ns}") as target, open("/proc/thread-self/ns/net") as home:
        _setns(target.fileno())
        try:
            return socket.create_connection(address, timeout=timeout)
        finally:
            _setns(home.fileno())


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class PortForward:
    """``127.0.0.1:port`` in the caller's network namespace, forwarded to ``address``
    inside namespace ``ns``: the root namespace has no address on a bed's bridge, so
    this is how a browser or curl on the machine reaches a host's HTTP endpoint. It
    lives in the caller's process (threads) until ``close()``."""

    def __init__(self, ns: str, address: tuple[str, int]) -> None:
        self.ns = ns
        self.address = address
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True,
                         name=f"forward-{self.port}").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = connect_in_namespace(self.ns, self.address)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open |= {client, upstream}
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._open -= {client, upstream}
        client.close()
        upstream.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._server.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def quota_scale(cpus: Sequence[float], cores: float, loadgen_cpus: float) -> float:
    """The factor (at most 1) that makes the hosts' quotas plus the load generator's
    share fit ``cores``."""
    room = cores - loadgen_cpus
    total = sum(cpus)
    if room <= 0:
        raise ValueError(f"{cores:g} cores leave nothing beside the load generator's "
                         f"{loadgen_cpus:g} CPU")
    return min(1.0, room / total) if total > 0 else 1.0


def _quota_group(group: Path, cpus: float) -> None:
    group.mkdir()
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    # The kernel refuses quotas under 1 ms.
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, round(cpus * PERIOD_US))))
    # The quota is a ceiling; the weight makes it a floor too. Other work on this
    # machine (a build, a test run, a CPU hog) would otherwise take the cores the quotas
    # add up to, and a host would be slower than its class claims. Work that should load
    # an emulated device runs inside its cgroup (``prefix(i)``, ``EmulatedBed.hog``).
    (group / "cpu.shares").write_text(str(BED_SHARES))


def _own_cpu_group() -> str:
    """This process's cgroup in the v1 cpu hierarchy ("/" at the root)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return "/"


class EmulatedBed:
    """``hosts[i]`` runs in namespace ``lab.hosts[i]`` at ``ip(i)``, inside its own cpu
    cgroup, behind a shaped link. Use as a context manager: ``close()`` always runs."""

    def __init__(self, hosts: Sequence[HostSpec], subnet: str = "10.77.0",
                 cores: float | None = None, loadgen_cpus: float = LOADGEN_CPUS) -> None:
        self.specs = list(hosts)
        self.lab = NamespaceLab(len(self.specs), subnet)
        self.groups = [CGROUP_CPU / f"epara-{self.lab.tag}-h{i}"
                       for i in range(len(self.specs))]
        self.loadgen_group = CGROUP_CPU / f"epara-{self.lab.tag}-loadgen"
        self.cores = float(cores if cores is not None else os.cpu_count() or 1)
        self.loadgen_cpus = loadgen_cpus
        self.scale = quota_scale([s.device.cpus for s in self.specs], self.cores,
                                 loadgen_cpus)
        self._home_group: str | None = None  # the driver's cgroup before it joined ours
        self.not_emulated: list[str] = []  # what this kernel could not emulate
        self.forwards: list[PortForward] = []

    def __enter__(self) -> EmulatedBed:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ip(self, i: int) -> str:
        return self.lab.ip(i)

    def create(self) -> EmulatedBed:
        self.lab.create()
        for i, spec in enumerate(self.specs):
            _quota_group(self.groups[i], spec.device.cpus * self.scale)
            self._shape(i, spec.link)
        _quota_group(self.loadgen_group, self.loadgen_cpus)
        return self

    def cpus(self, i: int) -> float:
        """Host i's CPU quota after scaling."""
        return self.specs[i].device.cpus * self.scale

    @contextlib.contextmanager
    def load_generator(self) -> Iterator[None]:
        """The calling process (all its threads) runs in the load generator's cgroup
        while the body runs, then returns to the cgroup it came from."""
        home = _own_cpu_group()
        (self.loadgen_group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                (CGROUP_CPU / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))

    def _shape(self, i: int, link: LinkClass) -> None:
        # The token bucket must hold at least one timer tick of traffic (the kernel ticks
        # at up to 1000 Hz) or the rate is never reached; 64 KiB at least for GSO bursts.
        burst = max(64 * 1024, int(link.rate_mbit * 1e6 / 8 / 250))
        tbf = ["tbf", "rate", f"{link.rate_mbit:g}mbit", "burst", str(burst),
               "latency", "50ms"]
        for ns, dev in ((self.lab.hosts[i], "eth0"), (self.lab.bridge_ns, f"v{i}")):
            delayed = self._tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:",
                               "netem", "delay", f"{link.delay_ms / 2:g}ms")
            if delayed:  # half the one-way delay on each end of the pair
                self._tc(ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                         *tbf, check=True)
            else:
                self._tc(ns, "qdisc", "add", "dev", dev, "root", *tbf, check=True)
                note = f"{link.delay_ms:g} ms link delay (no sch_netem in this kernel)"
                if note not in self.not_emulated:
                    self.not_emulated.append(note)

    def reshape(self, i: int, link: LinkClass) -> None:
        """Give host i another link class, in place (a bench compares links on one bed)."""
        for ns, dev in ((self.lab.hosts[i], "eth0"), (self.lab.bridge_ns, f"v{i}")):
            self._tc(ns, "qdisc", "del", "dev", dev, "root")
        self._shape(i, link)
        self.specs[i] = HostSpec(self.specs[i].device, link, self.specs[i].budget_mb)

    def _tc(self, ns: str, *args: str, check: bool = False) -> bool:
        done = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True,
                              timeout=20)
        if check and done.returncode != 0:
            raise RuntimeError(f"tc {' '.join(args)} failed in {ns}: {done.stderr!r}")
        return done.returncode == 0

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a command on host i: it joins host i's cgroup, then
        execs into the namespace (the same PID throughout, so nothing escapes the quota).
        ``ip netns exec`` gives the command a fresh /sys without the cgroup mounts; the
        cpu hierarchy is mounted again inside its private mount namespace, so a node
        there can read its quota like one in a container can."""
        remount = ('mount -t tmpfs cgroup_root /sys/fs/cgroup 2>/dev/null && '
                   'mkdir -p /sys/fs/cgroup/cpu && '
                   'mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu 2>/dev/null; exec "$@"')
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.groups[i] / "cgroup.procs"),
                *self.lab.prefix(i), "sh", "-c", remount, "sh"]

    def forward(self, i: int, port: int) -> PortForward:
        """``127.0.0.1:<forward.port>`` here reaches ``ip(i):port`` on host i, until
        ``close()``."""
        forward = PortForward(self.lab.hosts[i], (self.ip(i), port))
        self.forwards.append(forward)
        return forward

    def node_args(self, i: int) -> list[str]:
        """``epara node`` arguments that match host i's class (threads, memory budget,
        the device class it advertises)."""
        spec = self.specs[i]
        return ["--threads", str(spec.device.threads), "--memory-budget-mb", str(spec.budget),
                "--device-class", ADVERTISED_CLASS[spec.device.name]]

    def describe(self) -> list[str]:
        lines = [f"quotas x{self.scale:.2f} to fit {self.cores:g} cores (the class CPUs "
                 f"add up to {sum(s.device.cpus for s in self.specs):g}, the load generator "
                 f"has {self.loadgen_cpus:g} CPU in a cgroup of its own)"
                 if self.scale < 1 else
                 f"quotas as the classes say: they fit {self.cores:g} cores with the load "
                 f"generator's {self.loadgen_cpus:g} CPU (in a cgroup of its own)"]
        lines += [f"host {i} {self.ip(i)}: {s.device.name} ({self.cpus(i):.2f} CPU quota, "
                 f"{s.budget} MB budget), {s.link.name} link ({s.link.rate_mbit:g} Mbit/s, "
                 f"{s.link.delay_ms:g} ms)" for i, s in enumerate(self.specs)]
        lines += [f"not emulated: {n}" for n in self.not_emulated]
        return lines

    def close(self) -> None:
        """Kill what runs in the bed, delete the namespaces and the cgroups. Safe to call
        after any failure, and more than once."""
        for forward in self.forwards:
            forward.close()
        self.forwards.clear()
        self.lab.close()
        for group in [*self.groups, self.loadgen_group]:
            if not group.exists():
                continue
            # Processes of ours that left the namespaces (none should) still hold the group.
            for _ in range(50):
                pids = (group / "cgroup.procs").read_text().split()
                for pid in pids:
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    group.rmdir()
                if not group.exists():
                    break
                time.sleep(0.05)
