"""``epara demo``: a small cluster on this machine, serving real models to a workload.

Starts several node processes on loopback with fresh cluster credentials, waits until
they discover each other and elect a leader, prepares the shipped segmentation and
text-detection models, drives requests at every node for a set time with a live
progress line, prints a per-node table, writes the photo's mask, and stops every process
it started (also on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epara.node.client import Client, EparaError, NodeUnreachable

DEMO_MODELS = ("selfie-seg", "text-det")


@dataclass
class NodeHandle:
    name: str
    socket: Path
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Tally:
    ok: int = 0
    late: int = 0
    refused: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, latency_ms: float | None = None) -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if latency_ms is not None:
                self.latencies_ms.append(latency_ms)


def _start_nodes(count: int, work: Path, store: Path, credentials: Path) -> list[NodeHandle]:
    nodes = []
    for i in range(count):
        name = f"demo-node{i}"
        sock = work / name / "node.sock"
        log = work / f"{name}.log"
        command = [sys.executable, "-m", "epara.node.cli", "--log-level", "info", "node",
                   "--store", str(store), "--socket", str(sock), "--cluster", str(credentials),
                   "--node-id", name, "--interface", "127.0.0.1", "--port", "0",
                   "--threads", "1"]
        with open(log, "wb") as out:
            # Own process group: Ctrl-C in the terminal reaches the demo, which then stops
            # the nodes in order, instead of killing them mid-write.
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        nodes.append(NodeHandle(name, sock, process, log))
    return nodes


def _stop_nodes(nodes: list[NodeHandle]) -> None:
    for node in nodes:
        if node.process.poll() is None:
            node.process.terminate()
    for node in nodes:
        try:
            node.process.wait(10)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


def _cluster(node: NodeHandle) -> dict[str, Any] | None:
    with contextlib.suppress(NodeUnreachable, EparaError), Client(node.socket, timeout=5) as c:
        return c.status()["cluster"]
    return None


def _wait_for_cluster(nodes: list[NodeHandle], timeout: float) -> dict[str, Any]:
    names = {n.name for n in nodes}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for node in nodes:
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited; see {node.log}")
        views = [_cluster(n) for n in nodes]
        seen = [{m["node_id"] for m in v["members"]} if v else set() for v in views]
        leaders = {v["leader"] for v in views if v}
        print(f"\r  discovering: {min(len(s) for s in seen)}/{len(nodes)} members seen by "
              f"every node, leader {', '.join(sorted(map(str, leaders)))}", end="", flush=True)
        if all(s == names for s in seen) and len(leaders) == 1 and None not in leaders:
            print()
            assert views[0] is not None
            return views[0]
        time.sleep(0.2)
    raise RuntimeError(f"the cluster did not form in {timeout:.0f} s")


def _wait_for_placement(node: NodeHandle, models: tuple[str, ...], timeout: float) -> dict:
    """Until the leader's placement has a ready unit of every model somewhere."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(NodeUnreachable, EparaError), Client(node.socket) as client:
            status = client.status()
            ready = {unit for m in status["cluster"]["members"]
                     for unit in (m.get("state") or {}).get("ready") or ()}
            placement = status["plan"]["placement"]
            placed = {unit.split("@")[0] for unit in ready}
            known = {plan["service"] for plan in placement["services"]}
            if set(models) <= placed and set(models) <= known:
                return placement
        time.sleep(0.25)
    raise RuntimeError(f"the leader did not place {', '.join(models)} in {timeout:.0f} s")


def _drive(nodes: list[NodeHandle], photo: bytes, seconds: float, clients_per_node: int,
           slo_ms: dict[str, float]) -> dict[str, dict[str, Tally]]:
    tallies = {n.name: {m: Tally() for m in DEMO_MODELS} for n in nodes}
    stop = time.monotonic() + seconds

    def worker(node: NodeHandle, model: str) -> None:
        with Client(node.socket, timeout=30) as client:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    client.segment(model, photo, deadline_ms=slo_ms[model])
                except EparaError as exc:
                    outcome = "refused" if exc.code.startswith("deadline") \
                        or exc.code == "overloaded" else "failed"
                    tallies[node.name][model].add(outcome)
                    time.sleep(0.01)
                    continue
                latency = (time.monotonic() - started) * 1000
                outcome = "ok" if latency <= slo_ms[model] else "late"
                tallies[node.name][model].add(outcome, latency)

    threads = [threading.Thread(target=worker, args=(n, m), daemon=True)
               for n in nodes for m in DEMO_MODELS for _ in range(clients_per_node)]
    for t in threads:
        t.start()
    start = time.monotonic()
    while any(t.is_alive() for t in threads):
        elapsed = time.monotonic() - start
        done = sum(t.ok for per in tallies.values() for t in per.values())
        print(f"\r  workload: {min(elapsed, seconds):5.1f}/{seconds:.0f} s, {done} requests "
              f"met their SLO", end="", flush=True)
        time.sleep(0.25)
    print()
    return tallies


def _report(tallies: dict[str, dict[str, Tally]], seconds: float) -> None:
    print(f"\n  {'node':<12} {'model':<11} {'ok':>6} {'late':>5} {'refused':>8} "
          f"{'p50 ms':>7} {'goodput/s':>10}")
    total = 0
    for node, per_model in tallies.items():
        for model, t in per_model.items():
            p50 = statistics.median(t.latencies_ms) if t.latencies_ms else float("nan")
            total += t.ok
            print(f"  {node:<12} {model:<11} {t.ok:>6} {t.late:>5} {t.refused + t.failed:>8} "
                  f"{p50:>7.1f} {t.ok / seconds:>10.1f}")
    print(f"  cluster goodput: {total / seconds:.1f} requests/s meeting their SLO")


@contextlib.contextmanager
def _interrupt_as_exception() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(nodes: int = 3, seconds: float = 15.0, out_dir: Path = Path("epara-demo"),
             store: Path | None = None) -> int:
    from epara.models.store import ModelStore
    from epara.models.zoo import prepare, sample_photo
    from epara.peer.security import create_cluster_credentials

    model_store = ModelStore(store)
    print(f"epara demo: {nodes} nodes on loopback (processes on this machine; run as root "
          "for namespace hosts once that mode lands)")
    print(f"1. preparing models {', '.join(DEMO_MODELS)} in {model_store.root}")
    for name in DEMO_MODELS:
        prepare(name, model_store)
    photo_path = sample_photo(model_store)
    photo = photo_path.read_bytes()
    slo_ms = {name: model_store.get(name).manifest.hints.slo_ms or 500.0
              for name in DEMO_MODELS}
    # The CPU is shared by every node here: allow each model a few times its SLO.
    slo_ms = {name: value * (nodes + 1) for name, value in slo_ms.items()}

    with tempfile.TemporaryDirectory(prefix="epara-demo-") as tmp, _interrupt_as_exception():
        work = Path(tmp)
        credentials = work / "cluster"
        create_cluster_credentials(credentials)
        print(f"2. starting {nodes} nodes with fresh cluster credentials")
        handles = _start_nodes(nodes, work, model_store.root, credentials)
        try:
            view = _wait_for_cluster(handles, timeout=60)
            print(f"   cluster formed: leader {view['leader']}, term {view['term']}")
            placement = _wait_for_placement(handles[0], DEMO_MODELS, timeout=60)
            print(f"   placement v{placement['version']}:")
            for plan in placement["services"]:
                units = ", ".join("+".join(stage[0] for stage in u["stages"])
                                  for u in plan["units"])
                print(f"     {plan['service']:<12} {plan['category']:<16} {plan['mode']:<10}"
                      f" on {units}")
            print(f"3. driving segmentation requests at every node for {seconds:.0f} s "
                  f"(SLOs: {', '.join(f'{k} {v:.0f} ms' for k, v in slo_ms.items())})")
            tallies = _drive(handles, photo, seconds, clients_per_node=1, slo_ms=slo_ms)
            _report(tallies, seconds)
            out_dir.mkdir(parents=True, exist_ok=True)
            with Client(handles[0].socket) as client:
                result = client.segment("selfie-seg", photo, overlay=True)
            from epara.models.imaging import encode_png

            (out_dir / "mask.png").write_bytes(encode_png(result["mask"]))
            (out_dir / "overlay.png").write_bytes(result["overlay_png"])
            print(f"4. wrote {out_dir / 'mask.png'} and {out_dir / 'overlay.png'} "
                  f"({result['coverage'] * 100:.0f}% of the photo is the person)")
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the nodes")
            return 130
        finally:
            _stop_nodes(handles)
            print(f"5. stopped {len(handles)} nodes; nothing left running")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(seconds=float(os.environ.get("EPARA_DEMO_SECONDS", "15"))))
