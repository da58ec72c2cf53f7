"""Goodput on a real cluster: replay a trace against node processes under each placement
policy, in one run (``epara bench goodput --real``).

For each policy (epara's scheduler, and the simulator's baseline strategies, selected on
the leader with ``--placement-policy``) it starts a fresh cluster of node processes on
this machine (loopback), waits until the leader has placed every service of the trace,
replays the trace (JSONL, docs/trace-format.md) open-loop — each request is sent at its
time to its origin node, whatever happened to earlier ones — and counts the requests
answered within their SLO. Routing is epara's on every policy; only placement differs.
The same trace, nodes and models serve every policy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from epara.node.client import Client, Done, EparaError, NodeUnreachable
from epara.node.leader.workloads import Request

REAL_POLICIES = ("epara", "one-replica", "replicate-all")
# The shipped models a built-in trace uses, with the SLO each request carries.
BUILTIN_SLO_MS = {"selfie-seg": 150.0, "minilm": 400.0, "text-det": 2500.0,
                  "smollm2-135m": 6000.0}


def builtin_trace(seconds: float, nodes: int, seed: int = 0,
                  load: float = 1.0) -> list[Request]:
    """A production-like mix over the shipped models: camera streams (selfie-seg at a
    steady 10 fps each, 2 streams at load 1), bursty embedding lookups (minilm, on/off),
    occasional document pages (text-det) and chat turns (smollm2-135m, 16 tokens).
    ``load`` scales every rate (and the number of streams)."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    for stream in range(max(1, round(2 * load))):  # steady streams: frequency-sensitive
        t = rng.uniform(0, 0.1)
        while t < seconds:
            out.append(Request(t, "selfie-seg", BUILTIN_SLO_MS["selfie-seg"],
                               origin=stream % nodes))
            t += 0.1
    t = 0.0
    while t < seconds:  # bursty: 10/s for 2 s, then 1/s for 3 s (times load)
        rate = (10.0 if (t % 5.0) < 2.0 else 1.0) * load
        t += rng.exponential(1 / rate)
        out.append(Request(t, "minilm", BUILTIN_SLO_MS["minilm"],
                           origin=int(rng.integers(nodes))))
    for service, rate, tokens in (("text-det", 0.4 * load, 0),
                                  ("smollm2-135m", 0.4 * load, 16)):
        t = rng.exponential(1 / rate)
        while t < seconds:
            out.append(Request(t, service, BUILTIN_SLO_MS[service], output_tokens=tokens,
                               origin=int(rng.integers(nodes))))
            t += rng.exponential(1 / rate)
    return sorted((r for r in out if r.t < seconds), key=lambda r: r.t)


@dataclass
class Outcome:
    service: str
    ok: bool
    within_slo: bool
    latency_ms: float
    error: str = ""


@dataclass
class PolicyResult:
    policy: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    placement: dict[str, Any] = field(default_factory=dict)

    def goodput(self) -> float:
        return sum(o.within_slo for o in self.outcomes) / self.seconds

    def attainment(self) -> float:
        return sum(o.within_slo for o in self.outcomes) / max(1, len(self.outcomes))


class _Inputs:
    """A real input per model (decoded once)."""

    def __init__(self, photo: bytes) -> None:
        self.photo = photo
        ids = np.array([[101, 2023, 2003, 1037, 3231, 6251, 1012, 102]], np.int64)
        self.minilm = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def send(self, client: Client, request: Request) -> None:
        deadline = request.slo_ms
        if request.service in ("selfie-seg", "text-det"):
            client.segment(request.service, self.photo, deadline_ms=deadline)
        elif request.service == "minilm":
            client.infer("minilm", self.minilm, deadline_ms=deadline)
        else:
            for item in client.generate(request.service, "Name a colour.",
                                        max_tokens=request.output_tokens or 16,
                                        deadline_ms=deadline):
                if isinstance(item, Done):
                    break


def replay(trace: Sequence[Request], sockets: Sequence[Path], inputs: _Inputs,
           workers: int = 16) -> tuple[list[Outcome], float]:
    """Send every request at its time (open loop) and time its answer."""
    local = threading.local()

    def client_for(origin: int) -> Client:
        clients = getattr(local, "clients", None)
        if clients is None:
            clients = local.clients = {}
        if origin not in clients:
            clients[origin] = Client(sockets[origin], timeout=60)
        return clients[origin]

    def run(request: Request, due: float) -> Outcome:
        origin = request.origin % len(sockets) if request.origin >= 0 else 0
        try:
            inputs.send(client_for(origin), request)
        except (EparaError, NodeUnreachable) as exc:
            return Outcome(request.service, False, False, (time.monotonic() - due) * 1000,
                           exc.code)
        latency = (time.monotonic() - due) * 1000
        return Outcome(request.service, True, latency <= request.slo_ms, latency)

    start = time.monotonic()
    futures = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for request in trace:
            due = start + request.t
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(run, request, due))
        outcomes = [f.result() for f in futures]
    return outcomes, max((r.t for r in trace), default=0.0)


def _start_cluster(policy: str, work: Path, store: Path, nodes: int,
                   credentials: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    started = []
    for i in range(nodes):
        sock = work / f"{policy}-n{i}" / "node.sock"
        log = work / f"{policy}-n{i}.log"
        command = [sys.executable, "-m", "epara.node.cli", "--log-level", "info", "node",
                   "--store", str(store), "--socket", str(sock), "--cluster",
                   str(credentials), "--node-id", f"{policy}-n{i}", "--interface",
                   "127.0.0.1", "--port", "0", "--threads", "1",
                   "--placement-policy", policy]
        with open(log, "wb") as out:
            started.append((subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True), sock))
    return started


def _wait_placed(sock: Path, services: set[str], timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(EparaError, NodeUnreachable, KeyError, TypeError), \
                Client(sock, timeout=5) as client:
            status = client.status()
            ready = {u.split("@")[0] for m in status["cluster"]["members"]
                     for u in (m.get("state") or {}).get("ready") or ()}
            if services <= ready:
                return status["plan"]["placement"]
        time.sleep(0.3)
    raise RuntimeError(f"services {sorted(services)} were not placed in {timeout:.0f} s")


def _leader_socket(sockets: Sequence[Path]) -> Path:
    with Client(sockets[0], timeout=10) as client:
        leader = client.status()["cluster"]["leader"]
    return next((s for s in sockets if s.parent.name == leader), sockets[0])


def run_policy(policy: str, trace: Sequence[Request], store: Path, nodes: int,
               inputs: _Inputs) -> PolicyResult:
    from epara.peer.security import create_cluster_credentials

    with tempfile.TemporaryDirectory(prefix=f"epara-goodput-{policy}-") as tmp:
        work = Path(tmp)
        create_cluster_credentials(work / "cluster")
        cluster = _start_cluster(policy, work, store, nodes, work / "cluster")
        try:
            sockets = [sock for _, sock in cluster]
            for process, sock in cluster:
                end = time.monotonic() + 60
                while not sock.exists() and process.poll() is None and \
                        time.monotonic() < end:
                    time.sleep(0.1)
            # Warm-up: one request per service makes the demand visible to the leader.
            warm = [Request(0.0, s, BUILTIN_SLO_MS.get(s, 5000.0) * 10, 4, origin=0)
                    for s in sorted({r.service for r in trace})]
            replay(warm, sockets, inputs)
            _wait_placed(sockets[0], {r.service for r in trace}, 60)
            outcomes, seconds = replay(trace, sockets, inputs)
            # The leader's placement at the end of the run: what the load made of it.
            leader = _leader_socket(sockets)
            with Client(leader, timeout=10) as client:
                placement = client.status()["plan"]["placement"]
            return PolicyResult(policy, outcomes, seconds, placement)
        finally:
            for process, _ in cluster:
                process.terminate()
            for process, _ in cluster:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


def run_real_goodput(trace_path: Path | None, seconds: float, nodes: int,
                     store: Path | None, json_out: bool, plot: Path | None,
                     policies: Sequence[str] = REAL_POLICIES, load: float = 1.0) -> str:
    from epara.models.store import ModelStore
    from epara.models.zoo import prepare, sample_photo
    from epara.node.leader.workloads import read_trace

    model_store = ModelStore(store)
    trace = read_trace(trace_path) if trace_path else builtin_trace(seconds, nodes,
                                                                    load=load)
    for service in sorted({r.service for r in trace}):
        prepare(service, model_store)
    inputs = _Inputs(sample_photo(model_store).read_bytes())
    results = [run_policy(p, trace, model_store.root, nodes, inputs) for p in policies]
    baselines = [r for r in results if r.policy != "epara"]
    epara = next(r for r in results if r.policy == "epara")
    best = max(baselines, key=PolicyResult.goodput) if baselines else None
    report: dict[str, Any] = {
        "emulated": False, "nodes": nodes, "requests": len(trace),
        "trace": str(trace_path) if trace_path else f"builtin, load {load:g}",
        "routing": "epara (least expected completion) for every policy",
        "systems": {r.policy: {
            "goodput_hz": round(r.goodput(), 3), "slo_attainment": round(r.attainment(), 4),
            "per_service": {s: {"requests": len(os_), "within_slo": sum(o.within_slo
                                                                      for o in os_),
                                "p50_ms": round(statistics.median(o.latency_ms
                                                                  for o in os_), 1)}
                            for s in sorted({o.service for o in r.outcomes})
                            for os_ in [[o for o in r.outcomes if o.service == s]]},
            "errors": sorted({o.error for o in r.outcomes if o.error})}
            for r in results},
        "ratio_vs_best_baseline": round(epara.goodput() / best.goodput(), 3)
        if best and best.goodput() > 0 else None,
    }
    if plot is not None:
        _plot(results, plot)
        report["plot"] = str(plot)
    if json_out:
        return json.dumps(report, indent=2)
    lines = [f"real cluster: {nodes} node processes on this machine (loopback), "
             f"{len(trace)} requests ({report['trace']}) over {seconds:.0f} s; routing is "
             "epara's for all",
             f"{'policy':<15} {'goodput/s':>10} {'SLO%':>7}  per service (within SLO / sent)"]
    for r in results:
        per = ", ".join(f"{s} {v['within_slo']}/{v['requests']}" for s, v in
                        report["systems"][r.policy]["per_service"].items())
        lines.append(f"{r.policy:<15} {r.goodput():>10.2f} {r.attainment() * 100:>6.1f}%  "
                     f"{per}")
    lines.append(f"epara vs best baseline: {report['ratio_vs_best_baseline']}x")
    for r in results:
        where = "; ".join(
            f"{plan['service']} on " + ", ".join("+".join(st[0].rsplit("-", 1)[-1]
                                                          for st in unit["stages"])
                                                 for unit in plan["units"])
            for plan in r.placement.get("services", []))
        lines.append(f"  {r.policy} placement: {where}")
    return "\n".join(lines)


def _plot(results: Sequence[PolicyResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r.policy for r in results]
    axes[0].bar(names, [r.goodput() for r in results], color="#3b7dd8")
    axes[0].set_ylabel("goodput (requests within SLO / s)")
    axes[1].bar(names, [r.attainment() * 100 for r in results], color="#5aa469")
    axes[1].set_ylabel("SLO attainment (%)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("real cluster (node processes on one machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
