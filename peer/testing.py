"""Helpers to run member processes and network-namespace labs (tests and benchmarks).

Nothing here runs in a node. ``NamespaceLab`` needs root and ``ip``; it only ever
creates addresses inside its own namespaces (10.77.0.0/24 by default) and removes every
namespace it made in ``close()``, which is safe to call after any failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LossUnavailable(RuntimeError):
    """This kernel/host cannot emulate packet loss."""


@dataclass
class MemberProcess:
    """One ``python -m epara.peer.member`` child, observed through its status file."""

    node_id: str
    status_file: Path
    args: list[str]
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", ns]
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.status_file.unlink(missing_ok=True)
        log = open(self.log_file or os.devnull, "ab")  # noqa: SIM115 (child owns it)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "epara.peer.member", "--node-id",
             self.node_id, "--status-file", str(self.status_file), *self.args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no mDNS unregister; peers must notice the silence."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout:.1f} s")
        time.sleep(interval)
    return time.monotonic() - start


def views(procs: Sequence[MemberProcess]) -> dict[str, dict[str, Any]]:
    """Latest status of each running process, by node id."""
    out = {}
    for p in procs:
        status = p.status() if p.alive else None
        if status is not None:
            out[p.node_id] = status
    return out


def agreed(procs: Sequence[MemberProcess], members: set[str]) -> str | None:
    """The leader, if every process in ``procs`` sees exactly ``members`` and the same
    single leader (one of them, which itself claims it); else None."""
    seen = views(procs)
    if set(seen) != {p.node_id for p in procs}:
        return None
    leaders = {v["leader"] for v in seen.values()}
    if len(leaders) != 1:
        return None
    (leader,) = leaders
    if leader not in members:
        return None
    if any({m["node_id"] for m in v["members"]} != members for v in seen.values()):
        return None
    return leader


def claimants(procs: Sequence[MemberProcess]) -> set[str]:
    """Nodes that currently consider themselves leader."""
    return {n for n, v in views(procs).items() if v["leader"] == n}


def have_netns() -> str | None:
    """None when namespace labs can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
        subprocess.run(["tc", "-V"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns`/`tc` unavailable: {exc}"
    return None


class NamespaceLab:
    """A bridge namespace and ``n`` host namespaces, each on a veth pair to the bridge.

    Host i has 10.77.0.(i+1)/24 on its ``eth0``; the bridge side of its pair is
    ``v<i>`` inside the bridge namespace (cut it to partition host i off).
    """

    def __init__(self, n: int, subnet: str = "10.77.0") -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.bridge_ns = f"epb-{self.tag}"
        self.hosts = [f"eph{i}-{self.tag}" for i in range(n)]
        self.subnet = subnet
        self._created: list[str] = []

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @staticmethod
    def _run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=20)

    def _in(self, ns: str, *cmd: str) -> None:
        self._run("ip", "netns", "exec", ns, *cmd)

    def create(self) -> NamespaceLab:
        self._run("ip", "netns", "add", self.bridge_ns)
        self._created.append(self.bridge_ns)
        self._in(self.bridge_ns, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.bridge_ns, "ip", "link", "set", "br0", "up")
        self._in(self.bridge_ns, "ip", "link", "set", "lo", "up")
        for i, ns in enumerate(self.hosts):
            self._run("ip", "netns", "add", ns)
            self._created.append(ns)
            # Create the pair inside the host namespace, then move one end to the bridge:
            # nothing ever touches the root namespace's links.
            self._in(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"v{i}")
            self._in(ns, "ip", "link", "set", f"v{i}", "netns", self.bridge_ns)
            self._in(ns, "ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            # mDNS needs a multicast route on the veth (no default route in the namespace).
            self._in(ns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0")
            self._in(self.bridge_ns, "ip", "link", "set", f"v{i}", "master", "br0")
            self._in(self.bridge_ns, "ip", "link", "set", f"v{i}", "up")
        return self

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i]]

    def cut(self, i: int) -> None:
        self._in(self.bridge_ns, "ip", "link", "set", f"v{i}", "down")

    def heal(self, i: int) -> None:
        self._in(self.bridge_ns, "ip", "link", "set", f"v{i}", "up")

    def loss(self, i: int, percent: int) -> None:
        """Drop ``percent`` % of the packets host i sends, at random.

        ``tc ... netem loss`` where the kernel has netem; otherwise nftables' random
        number generator (some minimal kernels, e.g. Firecracker guests, ship nf_tables
        but not sch_netem). LossUnavailable when neither works.
        """
        try:
            self._in(self.hosts[i], "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                     "loss", f"{percent}%")
            return
        except subprocess.CalledProcessError:
            pass
        if shutil.which("nft") is None:
            raise LossUnavailable("no sch_netem in this kernel and no `nft` tool")
        try:
            self._in(self.hosts[i], "nft", "add", "table", "inet", "eplab")
            self._in(self.hosts[i], "nft", "add", "chain", "inet", "eplab", "out",
                     "{ type filter hook output priority 0; }")
            self._in(self.hosts[i], "nft", "add", "rule", "inet", "eplab", "out", "oifname",
                     "eth0", "numgen", "random", "mod", "100", "<", str(percent), "drop")
        except subprocess.CalledProcessError as exc:
            raise LossUnavailable(f"neither netem nor nftables loss works: {exc.stderr!r}") \
                from None

    def close(self) -> None:
        for ns in reversed(self._created):
            # Killing what still runs inside first: a namespace with live processes
            # would outlive `ip netns del` (the name goes, the network stays).
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True, timeout=10).stdout.split()
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._created.clear()
