"""Goodput on a real cluster: replay a trace against node processes under each placement
policy (``epara bench goodput --real``, and the workload part of ``epara demo``).

For each policy (epara's scheduler, and the simulator's baseline strategies, selected on
the leader with ``--placement-policy``) it starts a fresh cluster of node processes on
this machine — loopback processes, or processes inside the namespace hosts of an
``EmulatedBed`` (``node/lab/testbed.py``) — waits until they form one cluster and the leader
has placed every service of the trace, replays the trace (JSONL, docs/trace-format.md)
open-loop — each request is sent at its time to its origin node, whatever happened to
earlier ones — and counts the requests answered within their SLO. Routing is epara's on
every policy; only placement differs. The same trace, nodes and models serve every
policy. The driver runs in the caller's process: node sockets are Unix sockets on the
shared filesystem, so it reaches nodes inside namespaces too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from epara.node.client import Client, Done, EparaError, NodeUnreachable
from epara.node.httpapi import load_or_create_token
from epara.node.leader.workloads import Request

if TYPE_CHECKING:
    from epara.node.lab.testbed import EmulatedBed

REAL_POLICIES = ("epara", "one-replica", "replicate-all")
BENCH_ROUNDS = 3  # policies run interleaved, A B A B ..., this many rounds each
# The shipped models a built-in trace uses, with the SLO each request carries.
BUILTIN_SLO_MS = {"selfie-seg": 150.0, "minilm": 400.0, "text-det": 2500.0,
                  "smollm2-135m": 6000.0}


def builtin_trace(seconds: float, nodes: int, seed: int = 0, load: float = 1.0,
                  services: Collection[str] | None = None) -> list[Request]:
    """A production-like mix over the shipped models: camera streams (selfie-seg at a
    steady 10 fps each, 2 streams at load 1), bursty embedding lookups (minilm, on/off),
    occasional document pages (text-det) and chat turns (smollm2-135m, 16 tokens).
    ``load`` scales every rate (and the number of streams); ``services`` keeps only those
    services (the others' requests are drawn all the same, so a subset is the same
    subset of the full trace)."""
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
    kept = (r for r in out if r.t < seconds and (services is None or r.service in services))
    return sorted(kept, key=lambda r: r.t)


@dataclass(frozen=True)
class Scenario:
    """A bed, a workload and the baselines epara is compared with."""

    name: str
    hosts: tuple[tuple[str, int | None], ...]  # (device class, memory budget MB or None)
    services: tuple[str, ...]
    baselines: tuple[str, ...]
    about: str

    def trace(self, seconds: float, load: float, nodes: int | None = None) -> list[Request]:
        nodes = len(self.hosts) if nodes is None else nodes
        if self.name == "case-study":
            return case_study_trace(seconds, nodes, load=load)
        return builtin_trace(seconds, nodes, load=load, services=self.services)


# The paper's case study (EPARA, section on the edge deployment): a server-, a Jetson- and
# a Pi-class host whose memory budgets hold no whole copy of the LLM (536.7 MB with its KV
# cache), so it must run as a pipeline; camera streams for segmentation and a small
# latency-critical model beside it.
CASE_STUDY_BUDGETS_MB = {"server": 448, "jetson": 384, "pi": 256}
SCENARIOS: dict[str, Scenario] = {
    "default": Scenario(
        "default", (("server", None), ("jetson", None), ("pi", None)),
        ("smollm2-135m", "selfie-seg"), ("replicate-all",),
        "camera streams (selfie-seg) and chat turns (smollm2-135m); every model fits "
        "every host"),
    "case-study": Scenario(
        "case-study", tuple((c, b) for c, b in CASE_STUDY_BUDGETS_MB.items()),
        ("smollm2-135m", "selfie-seg", "minilm"), ("replicate-all", "pipeline-all"),
        "the paper's case study: memory budgets "
        + ", ".join(f"{c} {b} MB" for c, b in CASE_STUDY_BUDGETS_MB.items())
        + " (the LLM fits no single host: a pipeline or nothing); camera streams "
        "(selfie-seg, 10 fps each), latency-critical embeddings (minilm) and chat turns"),
}


def case_study_trace(seconds: float, nodes: int, seed: int = 0,
                     load: float = 1.0) -> list[Request]:
    """The case study's workload: ``3 x load`` camera streams of selfie-seg at a steady
    10 fps, minilm lookups (Poisson, 4/s x load, a tight 250 ms SLO) and chat turns
    (Poisson, 1/s x load, 16 tokens, 8 s)."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    for stream in range(max(1, round(3 * load))):
        t = rng.uniform(0, 0.1)
        while t < seconds:
            out.append(Request(t, "selfie-seg", BUILTIN_SLO_MS["selfie-seg"],
                               origin=stream % nodes))
            t += 0.1
    for service, rate, slo, tokens in (("minilm", 4.0 * load, 250.0, 0),
                                       ("smollm2-135m", 1.0 * load, 8000.0, 16)):
        t = rng.exponential(1 / rate)
        while t < seconds:
            out.append(Request(t, service, slo, output_tokens=tokens,
                               origin=int(rng.integers(nodes))))
            t += rng.exponential(1 / rate)
    return sorted(out, key=lambda r: r.t)


@dataclass
class Outcome:
    service: str
    ok: bool
    within_slo: bool
    latency_ms: float
    error: str = ""
    sent_s: float = 0.0  # when it was due, seconds into the trace


@dataclass
class PolicyResult:
    policy: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    placement: dict[str, Any] = field(default_factory=dict)
    # The leader's estimated attainment per service at the end of the run (epara's)
    estimated: dict[str, float] = field(default_factory=dict)
    decisions: int = 0  # placement versions the leader published
    # nodes whose running configuration differed from the final placement (should be none)
    mismatches: list[str] = field(default_factory=list)
    # The trace's first seconds: a warm-up that goodput does not count, for any policy
    # (a placement adapting to load it has just met is measured apart: warmup_goodput).
    warmup_s: float = 0.0

    @property
    def counted(self) -> list[Outcome]:
        """The requests sent after the warm-up: what goodput and attainment count."""
        return [o for o in self.outcomes if o.sent_s >= self.warmup_s]

    def warmup_goodput(self) -> float | None:
        if self.warmup_s <= 0:
            return None
        return sum(o.within_slo for o in self.outcomes if o.sent_s < self.warmup_s) \
            / self.warmup_s

    def measured_attainment(self, last_s: float = 5.0) -> dict[str, float]:
        """Per service, the share of the requests sent in the last ``last_s`` seconds
        that met their SLO: what the leader's last estimate is compared with."""
        since = self.seconds - last_s
        out: dict[str, float] = {}
        for s in sorted({o.service for o in self.outcomes}):
            recent = [o for o in self.outcomes if o.service == s and o.sent_s >= since]
            if recent:
                out[s] = sum(o.within_slo for o in recent) / len(recent)
        return out

    def goodput(self) -> float:
        return sum(o.within_slo for o in self.counted) / max(1e-9, self.seconds - self.warmup_s)

    def attainment(self) -> float:
        counted = self.counted
        return sum(o.within_slo for o in counted) / max(1, len(counted))

    def goodput_over_time(self, bin_s: float = 1.0) -> tuple[list[float], list[float]]:
        """Requests within SLO per second, by the second they were sent in."""
        bins = max(1, int(np.ceil(self.seconds / bin_s)))
        counts = [0] * bins
        for o in self.outcomes:
            if o.within_slo:
                counts[min(bins - 1, int(o.sent_s / bin_s))] += 1
        return [(i + 0.5) * bin_s for i in range(bins)], [c / bin_s for c in counts]


class Live:
    """Running counts of a replay, for a progress display (any thread may read)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.sent = 0
        self.answered = 0
        self.within_slo = 0
        self._lock = threading.Lock()

    def on_sent(self) -> None:
        with self._lock:
            self.sent += 1

    def on_outcome(self, outcome: Outcome) -> None:
        with self._lock:
            self.answered += 1
            self.within_slo += outcome.within_slo


class Watch:
    """Where a run reports what it is doing: ``line`` a lasting line, ``status`` a
    transient one (a live progress line). This one says nothing."""

    def line(self, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass


QUIET = Watch()


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
           workers: int = 16, live: Live | None = None) -> tuple[list[Outcome], float]:
    """Send every request at its time (open loop) and time its answer."""
    local = threading.local()
    opened: list[Client] = []

    def client_for(origin: int) -> Client:
        clients = getattr(local, "clients", None)
        if clients is None:
            clients = local.clients = {}
        if origin not in clients:
            clients[origin] = Client(sockets[origin], timeout=60)
            opened.append(clients[origin])
        return clients[origin]

    def run(request: Request, due: float) -> Outcome:
        origin = request.origin % len(sockets) if request.origin >= 0 else 0
        try:
            inputs.send(client_for(origin), request)
        except (EparaError, NodeUnreachable) as exc:
            outcome = Outcome(request.service, False, False,
                              (time.monotonic() - due) * 1000, exc.code, request.t)
        else:
            latency = (time.monotonic() - due) * 1000
            outcome = Outcome(request.service, True, latency <= request.slo_ms, latency,
                              sent_s=request.t)
        if live is not None:
            live.on_outcome(outcome)
        return outcome

    start = time.monotonic()
    if live is not None:
        live.started = start
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    futures = []
    try:
        for request in trace:
            due = start + request.t
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(run, request, due))
            if live is not None:
                live.on_sent()
        outcomes = [f.result() for f in futures]
    finally:
        # On an interrupt, queued requests are dropped at once; those in flight end when
        # the caller stops the nodes (their sockets close).
        pool.shutdown(wait=False, cancel_futures=True)
        for client in opened:
            with contextlib.suppress(Exception):
                client.close()
    return outcomes, max((r.t for r in trace), default=0.0)


# --- clusters ---------------------------------------------------------------------------

@dataclass
class NodeProc:
    name: str
    socket: Path
    process: subprocess.Popen[bytes]
    log: Path


def start_cluster(policy: str, work: Path, store: Path, nodes: int, credentials: Path,
                  bed: EmulatedBed | None = None, services: Collection[str] = (),
                  http: bool = False) -> list[NodeProc]:
    """``nodes`` node processes with ``--placement-policy policy``: on loopback, or one
    per host of ``bed`` (inside its namespace and cgroup, with its class's threads and
    memory budget; ``nodes`` is then the bed's size). ``services``: serve only these
    models of the store (default: all). ``http``: each node also serves HTTP on a free
    port (on 127.0.0.1, or its namespace address on a bed; its status says the URL)."""
    started = []
    count = len(bed.specs) if bed is not None else nodes
    for i in range(count):
        name = f"{policy}-n{i}"
        sock = work / name / "node.sock"
        log = work / f"{name}.log"
        if bed is None:
            prefix: list[str] = []
            where = ["--interface", "127.0.0.1", "--threads", "1"]
        else:
            prefix = bed.prefix(i)
            where = ["--interface", bed.ip(i), *bed.node_args(i)]
        if http:
            where += ["--http-port", "0", "--http-host",
                      "127.0.0.1" if bed is None else bed.ip(i)]
            if bed is not None:  # off loopback the endpoint needs a token: one for all
                load_or_create_token(work / "http.token")
                where += ["--http-token-file", str(work / "http.token")]
        command = [*prefix, sys.executable, "-m", "epara.node.cli", "--log-level", "info",
                   "node", "--store", str(store), "--socket", str(sock), "--cluster",
                   str(credentials), "--node-id", name, "--port", "0", *where,
                   "--placement-policy", policy,
                   *(arg for name in sorted(services) for arg in ("--model", name))]
        with open(log, "wb") as out:
            # Own session: Ctrl-C in a terminal reaches the driver only, which then stops
            # the nodes in order instead of having them killed mid-write.
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        started.append(NodeProc(name, sock, process, log))
    return started


@contextlib.contextmanager
def interrupts_handled_by(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` while the body runs, as before after it."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the body (a clean-up) runs, then take effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    with interrupts_handled_by(lambda n, _f: pending.append(n)):
        yield
    if pending:
        raise KeyboardInterrupt


def stop_cluster(nodes: Sequence[NodeProc]) -> None:
    with shielded():
        for node in nodes:
            if node.process.poll() is None:
                node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()


def _check_running(nodes: Sequence[NodeProc]) -> None:
    for node in nodes:
        if node.process.poll() is not None:
            tail = node.log.read_text(errors="replace")[-2000:] if node.log.exists() else ""
            raise RuntimeError(f"node {node.name} exited with {node.process.returncode}; "
                               f"its log ({node.log}) ends:\n{tail}")


def _cluster_view(sock: Path) -> dict[str, Any] | None:
    with contextlib.suppress(NodeUnreachable, EparaError, KeyError), \
            Client(sock, timeout=5) as client:
        return client.status()["cluster"]
    return None


def wait_cluster(nodes: Sequence[NodeProc], timeout: float,
                 watch: Watch = QUIET) -> dict[str, Any]:
    """Until every node sees every other one and all agree on one leader."""
    names = {n.name for n in nodes}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _check_running(nodes)
        views = [_cluster_view(n.socket) if n.socket.exists() else None for n in nodes]
        seen = [{m["node_id"] for m in v["members"]} if v else set() for v in views]
        leaders = {v["leader"] for v in views if v}
        watch.status(f"discovering: {min(len(s) for s in seen)}/{len(nodes)} members seen "
                     f"by every node, leader {', '.join(sorted(map(str, leaders))) or '-'}")
        if all(s == names for s in seen) and len(leaders) == 1 and None not in leaders:
            assert views[0] is not None
            return views[0]
        time.sleep(0.25)
    raise RuntimeError(f"the cluster did not form in {timeout:.0f} s")


# A policy that places some service nowhere (replicate-all with a model that fits no
# host) is given this long to change its mind; then the run goes ahead without it.
UNPLACED_GRACE_S = 20.0


def _wait_placed(sock: Path, services: set[str], timeout: float,
                 watch: Watch = QUIET) -> dict[str, Any]:
    """Until every service has a ready unit; or, after ``UNPLACED_GRACE_S``, every
    service the leader's placement gives a unit (the others are said to be unplaced)."""
    start = time.monotonic()
    end = start + timeout
    while time.monotonic() < end:
        with contextlib.suppress(EparaError, NodeUnreachable, KeyError, TypeError), \
                Client(sock, timeout=5) as client:
            status = client.status()
            ready = {u.split("@")[0] for m in status["cluster"]["members"]
                     for u in (m.get("state") or {}).get("ready") or ()}
            placement = status["plan"]["placement"]
            placed = {p["service"] for p in placement["services"] if p["units"]}
            watch.status(f"placing: ready {', '.join(sorted(services & ready)) or '-'} "
                         f"of {', '.join(sorted(services))}")
            if services <= ready:
                return placement
            if time.monotonic() - start > UNPLACED_GRACE_S and placed and \
                    services & placed <= ready:
                watch.line(f"placed nowhere by this policy: "
                           f"{', '.join(sorted(services - placed))}")
                return placement
        time.sleep(0.3)
    raise RuntimeError(f"services {sorted(services)} were not placed in {timeout:.0f} s")


def _leader_socket(sockets: Sequence[Path]) -> Path:
    with Client(sockets[0], timeout=10) as client:
        leader = client.status()["cluster"]["leader"]
    return next((s for s in sockets if s.parent.name == leader), sockets[0])


def placement_lines(placement: dict[str, Any]) -> list[str]:
    """The leader's placement, one line per service: category, mode and its units (each
    a replica on one node or a pipeline's stages, node+node)."""
    lines = []
    for plan in placement.get("services", []):
        units = ", ".join("+".join(str(stage[0]) for stage in unit["stages"])
                          for unit in plan["units"]) or "-"
        lines.append(f"{plan['service']:<13} {plan.get('category', '?'):<16} "
                     f"{plan.get('mode', '?'):<10} {len(plan['units'])} unit(s): {units}")
    return lines


@contextlib.contextmanager
def running_cluster(policy: str, store: Path, nodes: int, services: Collection[str],
                    inputs: _Inputs, bed: EmulatedBed | None = None, watch: Watch = QUIET,
                    http: bool = False, prefix: str = "epara-goodput-",
                    ) -> Iterator[list[NodeProc]]:
    """A fresh cluster under ``policy`` with new credentials (in a temporary directory,
    ``cluster``, beside the nodes' sockets): started, formed, shown one request per
    service (the demand the leader places by) and with every service placed and ready.
    Every node is stopped and the directory removed on leaving, also on an error or an
    interrupt."""
    from epara.peer.security import create_cluster_credentials

    with tempfile.TemporaryDirectory(prefix=f"{prefix}{policy}-") as tmp:
        work = Path(tmp)
        create_cluster_credentials(work / "cluster")
        cluster = start_cluster(policy, work, store, nodes, work / "cluster", bed, services,
                                http)
        try:
            sockets = [n.socket for n in cluster]
            view = wait_cluster(cluster, 120, watch)
            watch.line(f"cluster formed: {len(cluster)} nodes, leader {view['leader']}, "
                       f"term {view['term']}")
            # Warm-up: one request per service makes the demand visible to the leader.
            warm = [Request(0.0, s, BUILTIN_SLO_MS.get(s, 5000.0) * 10, 4, origin=0)
                    for s in sorted(services)]
            replay(warm, sockets, inputs)
            placed = _wait_placed(sockets[0], set(services), 120, watch)
            watch.line(f"placement v{placed.get('version')} ready:")
            for line in placement_lines(placed):
                watch.line(f"  {line}")
            yield cluster
        finally:
            stop_cluster(cluster)


def run_policy(policy: str, trace: Sequence[Request], store: Path, nodes: int,
               inputs: _Inputs, bed: EmulatedBed | None = None, watch: Watch = QUIET,
               after: Callable[[list[NodeProc]], None] | None = None,
               ready: Callable[[list[NodeProc]], None] | None = None,
               http: bool = False, warmup_s: float = 0.0) -> PolicyResult:
    """One policy on a fresh cluster (``running_cluster``): call ``ready`` with the
    running nodes once every service is placed, replay ``trace``, read the final
    placement, call ``after`` with the running nodes, and stop every node (also on an
    error or an interrupt). Requests of the trace's first ``warmup_s`` seconds are a
    warm-up, not counted in goodput (``PolicyResult.warmup_s``)."""
    services = {r.service for r in trace}
    with running_cluster(policy, store, nodes, services, inputs, bed, watch,
                         http) as cluster:
        sockets = [n.socket for n in cluster]
        if ready is not None:
            ready(cluster)
        live = Live()
        ticking = threading.Event()

        def tick() -> None:
            total = len(trace)
            span = max((r.t for r in trace), default=0.0)
            while not ticking.wait(0.5):
                elapsed = min(time.monotonic() - live.started, span)
                share = live.within_slo / max(1, live.answered) * 100
                watch.status(f"[{policy}] {elapsed:5.1f}/{span:.0f} s  sent "
                             f"{live.sent}/{total}  answered {live.answered}  within "
                             f"SLO {live.within_slo} ({share:.0f}%)")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            outcomes, seconds = replay(trace, sockets, inputs, live=live)
        finally:
            ticking.set()
            ticker.join()
        # The leader's placement at the end of the run: what the load made of it.
        with Client(_leader_socket(sockets), timeout=10) as client:
            plan = client.status()["plan"]
        mismatches = running_mismatches(sockets, plan["placement"])
        for problem in mismatches:
            watch.line(f"warning: not as planned: {problem}")
        if after is not None:
            after(cluster)
        return PolicyResult(policy, outcomes, seconds, plan["placement"],
                            dict(plan.get("estimated_attainment") or {}),
                            int(plan["placement"].get("version", 0)), mismatches,
                            warmup_s)


def running_mismatches(sockets: Sequence[Path], placement: dict[str, Any],
                       timeout: float = 30.0) -> list[str]:
    """Nodes that do not run exactly what the published placement asks of them
    (replicas with the plan's batch, pipeline heads, hosted stages), each with what it
    runs and what it should; waits up to ``timeout`` for one still applying it."""
    from epara.node.leader.model import Placement
    from epara.node.reconcile import desired

    wanted = Placement.from_dict(placement)
    end = time.monotonic() + timeout
    problems = []
    for sock in sockets:
        while True:
            with Client(sock, timeout=10) as client:
                status = client.status()
            plan = status["plan"]
            # The placement the node holds now (the leader may have published a newer
            # one than ``placement`` meanwhile): at least that version, and what runs
            # is exactly what it asks.
            held = Placement.from_dict(plan["placement"])
            want = desired(held, status["node_id"]).to_dict()
            if held.version >= wanted.version and plan["running"] == want:
                break
            if time.monotonic() > end:
                problems.append(f"{status['node_id']} runs {plan['running']} under "
                                f"placement v{held.version}, which asks for {want}")
                break
            time.sleep(0.3)
    return problems


# --- reporting --------------------------------------------------------------------------

def verdict(epara: Sequence[float], baseline: Sequence[float]) -> str:
    """"ahead" or "behind" only when the medians differ by more than the spread (the
    larger of the two ranges over the rounds); otherwise "level"."""
    spread = max(max(epara) - min(epara), max(baseline) - min(baseline))
    gap = statistics.median(epara) - statistics.median(baseline)
    if gap > spread:
        return "ahead"
    if -gap > spread:
        return "behind"
    return "level"


def summarize(rounds: Sequence[Sequence[PolicyResult]]) -> dict[str, Any]:
    """Per policy over the rounds (each round runs every policy once, in the same order):
    median goodput and its range, SLO attainment and per-service counts of all rounds;
    epara against the baseline with the best median: the median of the per-round
    ratios, each round's ratio, and the verdict (``verdict``)."""
    policies = [r.policy for r in rounds[0]]
    by_policy = {p: [r for rnd in rounds for r in rnd if r.policy == p] for p in policies}
    goodputs = {p: [r.goodput() for r in runs] for p, runs in by_policy.items()}
    systems = {}
    for policy, runs in by_policy.items():
        outcomes = [o for r in runs for o in r.counted]
        per_service = {}
        for s in sorted({o.service for o in outcomes}):
            of = [o for o in outcomes if o.service == s]
            answered = [o.latency_ms for o in of if o.ok]
            per_service[s] = {"requests": len(of), "within_slo": sum(o.within_slo for o in of),
                              "p50_ms": round(statistics.median(answered), 1)
                              if answered else None}
        values = goodputs[policy]
        systems[policy] = {
            "goodput_hz": round(statistics.median(values), 3),
            "goodput_range": [round(min(values), 3), round(max(values), 3)],
            "goodput_per_round": [round(v, 3) for v in values],
            "slo_attainment": round(sum(o.within_slo for o in outcomes)
                                    / max(1, len(outcomes)), 4),
            "per_service": per_service,
            "errors": sorted({o.error for o in outcomes if o.error}),
            # The leader's estimate against what the load generator measured over the
            # last 5 s of each round (epara's leader publishes estimates)
            "estimated_vs_measured": [
                {s: [round(r.estimated[s], 3), round(m, 3)]
                 for s, m in r.measured_attainment().items() if s in r.estimated}
                for r in runs],
            "decisions": [r.decisions for r in runs],
            "not_as_planned": [m for r in runs for m in r.mismatches]}
        warm = [w for r in runs if (w := r.warmup_goodput()) is not None]
        if warm:
            systems[policy]["warmup_goodput_hz"] = round(statistics.median(warm), 3)
    baselines = [p for p in policies if p != "epara"]
    best = max(baselines, key=lambda p: statistics.median(goodputs[p])) \
        if baselines else None
    ratios: list[float | None] = []
    if best is not None and "epara" in goodputs:
        ratios = [round(e / b, 3) if b > 0 else None
                  for e, b in zip(goodputs["epara"], goodputs[best], strict=True)]
    known = [r for r in ratios if r is not None]
    return {"rounds": len(rounds), "systems": systems, "best_baseline": best,
            "ratio_vs_best_baseline": round(statistics.median(known), 3) if known else None,
            "ratios": ratios,
            "ratio_range": [min(known), max(known)] if known else None,
            "verdict": verdict(goodputs["epara"], goodputs[best])
            if best is not None and "epara" in goodputs else None}


def table_lines(summary: dict[str, Any]) -> list[str]:
    rounds = summary["rounds"]
    lines = [f"{'policy':<15} {'goodput/s':>10} {'range':>13} {'SLO%':>7}  per service "
             f"(within SLO / sent, p50 ms){'' if rounds == 1 else f', {rounds} rounds'}"]
    for policy, v in summary["systems"].items():
        per = ", ".join(f"{s} {x['within_slo']}/{x['requests']} ({x['p50_ms']})"
                        for s, x in v["per_service"].items())
        lo, hi = v["goodput_range"]
        lines.append(f"{policy:<15} {v['goodput_hz']:>10.2f} {f'{lo:.2f}-{hi:.2f}':>13} "
                     f"{v['slo_attainment'] * 100:>6.1f}%  {per}")
    ratio = summary["ratio_vs_best_baseline"]
    if summary["best_baseline"] is not None:
        each = ", ".join("n/a" if r is None else f"{r:.2f}x" for r in summary["ratios"])
        lines.append(f"epara / {summary['best_baseline']} goodput: "
                     + (f"{ratio:.2f}x" if ratio is not None else "n/a (baseline goodput 0)")
                     + (f" (median of {rounds} rounds: {each})" if rounds > 1 else "")
                     + f"; verdict: {summary['verdict']}"
                     + (" (medians differ by more than the spread)"
                        if summary["verdict"] != "level" else
                        " (the medians differ by no more than the spread)"))
    warm = {p: v["warmup_goodput_hz"] for p, v in summary["systems"].items()
            if "warmup_goodput_hz" in v}
    if warm:
        lines.append("not counted above, the warm-up's goodput (placements adapting to "
                     "the load they just met): " + ", ".join(f"{p} {g:.2f}/s"
                                                             for p, g in warm.items()))
    est = summary["systems"].get("epara", {}).get("estimated_vs_measured") or []
    if est and est[-1]:
        lines.append("epara's leader, estimated vs measured SLO attainment (last 5 s): "
                     + ", ".join(f"{s} {e * 100:.0f}% vs {m * 100:.0f}%"
                                 for s, (e, m) in est[-1].items()))
    return lines


def run_real_goodput(trace_path: Path | None, seconds: float, nodes: int,
                     store: Path | None, json_out: bool, plot: Path | None,
                     policies: Sequence[str] | None = None, load: float = 1.0,
                     bed_classes: Sequence[str] = (), rounds: int = BENCH_ROUNDS,
                     scenario: str | None = None, warmup: float = 0.0) -> str:
    """Every policy on the same trace, interleaved in ``rounds`` rounds (A B A B ...),
    each run on a fresh cluster. ``bed_classes`` (device class names of
    ``node/lab/testbed.py``, one per host; needs root): the nodes run on an emulated bed of
    namespace hosts, a fresh one per run; else loopback processes. ``scenario`` (a name
    in ``SCENARIOS``): its hosts (an emulated bed), workload and baselines. The built-in
    and scenario traces run ``warmup`` seconds longer; goodput counts the last
    ``seconds`` (a trace file's first ``warmup`` seconds are its warm-up)."""
    from epara.models.store import ModelStore
    from epara.models.zoo import prepare, sample_photo
    from epara.node.lab.testbed import EmulatedBed, have_bed, host
    from epara.node.leader.workloads import read_trace

    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    chosen = SCENARIOS.get(scenario) if scenario is not None else None
    if scenario is not None and chosen is None:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    hosts = [host(c, budget_mb=b) for c, b in chosen.hosts] if chosen is not None \
        else [host(c) for c in bed_classes]
    if policies is None:
        policies = ("epara", *chosen.baselines) if chosen is not None else REAL_POLICIES
    if hosts:
        why = have_bed()
        if why is not None:
            raise RuntimeError(f"no emulated bed here: {why}")
        nodes = len(hosts)
    model_store = ModelStore(store)
    if trace_path:
        trace = read_trace(trace_path)
    elif chosen is not None:
        trace = chosen.trace(warmup + seconds, load, nodes)
    else:
        trace = builtin_trace(warmup + seconds, nodes, load=load)
    for service in sorted({r.service for r in trace}):
        prepare(service, model_store)
    inputs = _Inputs(sample_photo(model_store).read_bytes())
    results: list[list[PolicyResult]] = []
    described: list[str] = []
    for _ in range(rounds):
        results.append([])
        for policy in policies:  # a fresh bed per run: nothing carries over
            with EmulatedBed(hosts) if hosts else contextlib.nullcontext() as bed:
                if bed is not None:
                    described = bed.describe()
                with bed.load_generator() if bed is not None else contextlib.nullcontext():
                    results[-1].append(run_policy(policy, trace, model_store.root, nodes,
                                                  inputs, bed, warmup_s=warmup))
    summary = summarize(results)
    where = (f"EMULATED namespace hosts ({', '.join(h.device.name for h in hosts)}; CPU "
             "quotas and link rates)" if hosts else
             f"{nodes} node processes on this machine (loopback)")
    report: dict[str, Any] = {
        "emulated": bool(hosts), "where": where, "nodes": nodes,
        "scenario": chosen.name if chosen is not None else None,
        "bed": described, "requests": len(trace), "warmup_s": warmup,
        "trace": str(trace_path) if trace_path else
        f"{chosen.name if chosen is not None else 'builtin'}, load {load:g}",
        "routing": "epara (least expected completion) for every policy", **summary}
    if plot is not None:
        plot_results(results, plot, f"real cluster: {where}")
        report["plot"] = str(plot)
    if json_out:
        return json.dumps(report, indent=2)
    label = "EMULATED " if hosts else ""
    lines = [f"real cluster: {where}, {len(trace)} requests ({report['trace']}) over "
             f"{warmup + seconds:.0f} s, goodput over the last {seconds:.0f} s (the first "
             f"{warmup:.0f} s are a warm-up), {rounds} interleaved round(s); routing is "
             "epara's for all",
             *(f"{label}{line}" for line in described),
             *(f"{label}{line}" for line in table_lines(summary))]
    for r in results[-1]:
        lines.append(f"  {r.policy} placement (last round):")
        lines += [f"    {line}" for line in placement_lines(r.placement)]
    return "\n".join(lines)


def plot_results(rounds: Sequence[Sequence[PolicyResult]], path: Path, title: str) -> None:
    """Goodput (median over the rounds, the range as an error bar) and SLO attainment
    per policy, and each policy's goodput over time in its first round (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8),
                             gridspec_kw={"width_ratios": [1, 1, 1.6]})
    names = [r.policy for r in rounds[0]]
    runs = {n: [r for rnd in rounds for r in rnd if r.policy == n] for n in names}
    medians = [statistics.median(r.goodput() for r in runs[n]) for n in names]
    low = [m - min(r.goodput() for r in runs[n]) for m, n in zip(medians, names, strict=True)]
    high = [max(r.goodput() for r in runs[n]) - m for m, n in zip(medians, names, strict=True)]
    axes[0].bar(names, medians, yerr=[low, high], capsize=4, color="#3b7dd8")
    axes[0].set_ylabel(f"goodput (within SLO / s), median of {len(rounds)}")
    axes[1].bar(names, [statistics.median(r.attainment() for r in runs[n]) * 100
                        for n in names], color="#5aa469")
    axes[1].set_ylabel("SLO attainment (%)")
    axes[1].set_ylim(0, 100)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    for n in names:
        times, rates = runs[n][0].goodput_over_time()
        axes[2].plot(times, rates, marker=".", label=n)
    axes[2].set_xlabel("time into the workload (s)")
    axes[2].set_ylabel("goodput (within SLO / s)")
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
