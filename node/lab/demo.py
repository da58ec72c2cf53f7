"""``epara demo``: a small cluster on this machine serving real models to a workload.

With no configuration it starts a few node processes with fresh cluster credentials —
as namespace hosts with emulated device classes (``node/lab/testbed.py``: a server-, a
Jetson- and a Pi-class host with CPU quotas and shaped links) when run as root where the
bed works, else as loopback processes, and it says which and why — lets them discover
each other and elect a leader, prepares the LLM (smollm2-135m) and person segmentation
(selfie-seg), and replays the same production-like trace (``loadgen.builtin_trace``)
twice: under epara's placement and under a baseline's (``replicate-all``: every service
on every node), each on a fresh cluster. A live line shows progress; the end is a goodput
and SLO table with the ratio, a plot (PNG), the photo's mask, and a shutdown that leaves
no process, namespace or cgroup behind, also on Ctrl-C or SIGTERM. Each run's dashboard
URL is printed while it lasts. ``--stay``: then one more epara cluster with HTTP on every
node stays up, with commands to paste (status, plan, doctor, metrics, the OpenAI API,
the dashboard), until Ctrl-C or SIGTERM.

Cluster start, replay and reporting are ``node/lab/loadgen.py``'s (shared with
``epara bench goodput --real``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from epara.node.client import Client
from epara.node.httpapi import load_or_create_token
from epara.node.lab.loadgen import (
    SCENARIOS,
    NodeProc,
    PolicyResult,
    Scenario,
    Watch,
    _check_running,
    _Inputs,
    interrupts_handled_by,
    plot_results,
    run_policy,
    running_cluster,
    summarize,
    table_lines,
)

if TYPE_CHECKING:
    from epara.models.store import ModelStore
    from epara.node.lab.testbed import EmulatedBed

DEMO_MODELS = SCENARIOS["default"].services
# Rounds of the comparison (epara, then each baseline, on fresh clusters, A B A B): two
# keep the default demo near two minutes; ``epara bench goodput --real`` runs three.
DEMO_ROUNDS = 2


class Console(Watch):
    """Lasting lines, and one live status line (redrawn in place on a terminal; on a
    pipe, printed at most every few seconds)."""

    def __init__(self, stream: TextIO = sys.stdout, indent: str = "   ") -> None:
        self.stream = stream
        self.indent = indent
        self.tty = stream.isatty()
        self._shown = False
        self._last = 0.0

    def line(self, text: str) -> None:
        self._clear()
        print(f"{self.indent}{text}", file=self.stream, flush=True)

    def status(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.indent}{text}")
            self.stream.flush()
            self._shown = True
        elif time.monotonic() - self._last >= 3.0:
            self._last = time.monotonic()
            print(f"{self.indent}{text}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False


def where_to_run(loopback: bool) -> tuple[bool, str]:
    """(use the emulated bed, why), said to the user as is."""
    import os

    from epara.node.lab.testbed import have_bed

    if loopback:
        return False, "loopback processes (--loopback)"
    if os.geteuid() != 0:
        return False, "loopback processes (not root: namespace hosts need root)"
    reason = have_bed()
    if reason is not None:
        return False, f"loopback processes (root, but no emulated bed here: {reason})"
    return True, "namespace hosts with emulated device classes (root)"


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM, and SIGINT even where the shell started us ignoring it (a background job),
    raise KeyboardInterrupt: the demo then stops what it started."""
    with interrupts_handled_by(signal.default_int_handler):
        yield


@contextlib.contextmanager
def _maybe_bed(use: bool, nodes: int, scenario: Scenario) -> Iterator[EmulatedBed | None]:
    """The scenario's hosts (cycled to ``nodes``) on an emulated bed, with this process
    (the load generator) in a cgroup of its own; None on loopback."""
    if not use:
        yield None
        return
    from epara.node.lab.testbed import EmulatedBed, host

    classes = [scenario.hosts[i % len(scenario.hosts)] for i in range(nodes)]
    hosts = [host(device, budget_mb=budget) for device, budget in classes]
    with EmulatedBed(hosts) as bed, bed.load_generator():
        yield bed
    # Teardown checked, not assumed: the demo promises to leave nothing behind.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=10).stdout
    left = [g.name for g in (*bed.groups, bed.loadgen_group) if g.exists()] + \
        [ns for ns in (bed.lab.bridge_ns, *bed.lab.hosts) if ns in listed]
    if left:
        print(f"   warning: left behind: {', '.join(left)}", flush=True)


def epara_command() -> str:
    """How to run ``epara`` from a shell: the bare name where it is on PATH and is this
    installation's, else this installation's script, else ``python -m``."""
    script = Path(sys.executable).parent / "epara"
    on_path = shutil.which("epara")
    if on_path is not None and Path(on_path) == script:
        return "epara"
    if script.exists():
        return str(script)
    return f"{sys.executable} -m epara.node.cli"


@dataclass
class Endpoint:
    """How to reach one running node from this machine's shell."""

    node: str
    socket: Path
    http: str  # the URL this machine reaches (a forward on namespace hosts)
    served: str  # the URL the node serves on
    namespace: str | None = None  # the node's network namespace, on namespace hosts
    ip: str = "127.0.0.1"
    token: str | None = None  # HTTP bearer token (namespace hosts serve off loopback)

    @property
    def dashboard(self) -> str:
        return f"{self.http}/" + (f"#token={self.token}" if self.token else "")


def endpoints(cluster: list[NodeProc], bed: EmulatedBed | None) -> list[Endpoint]:
    """Each node's socket and HTTP URL. On namespace hosts the HTTP endpoint listens on
    the host's namespace address, which the root namespace has no route to: the demo
    forwards a port on 127.0.0.1 to it (``EmulatedBed.forward``)."""
    found = []
    for i, node in enumerate(cluster):
        with Client(node.socket, timeout=10) as client:
            served = client.status()["http"]
        if bed is None:
            found.append(Endpoint(node.name, node.socket, served, served))
        else:
            forward = bed.forward(i, int(served.rsplit(":", 1)[1]))
            token = load_or_create_token(node.socket.parent.parent / "http.token")
            found.append(Endpoint(node.name, node.socket, f"http://127.0.0.1:{forward.port}",
                                  served, bed.lab.hosts[i], bed.ip(i), token))
    return found


def stay_hints(points: list[Endpoint], leader: str, credentials: Path) -> list[str]:
    """Copy-pasteable commands against the running cluster."""
    epara = epara_command()
    lines = [f"{'node':<9} {'socket':<52} HTTP"]
    for p in points:
        how = (f"{p.http} (forwarded by the demo to {p.served} in namespace {p.namespace})"
               if p.namespace else p.http)
        lines.append(f"{p.node:<9} {p.socket!s:<52} {how}"
                     + ("   <- leader" if p.node == leader else ""))
    first = points[0]
    url = first.http
    ask = ('{"model": "smollm2-135m", "messages": [{"role": "user", "content": '
           '"Name a colour."}], "max_tokens": 16}')
    auth = f" -H 'Authorization: Bearer {first.token}'" if first.token else ""
    python = (f"{sys.executable} -c \"import openai; print(openai.OpenAI(base_url='{url}/v1',"
              f" api_key='{first.token or 'none'}').chat.completions.create("
              "model='smollm2-135m', messages=["
              "{'role': 'user', 'content': 'Name a colour.'}], max_tokens=16)"
              ".choices[0].message.content)\"")
    doctor = (f"{epara} doctor --cluster {credentials} --socket {first.socket} "
              f"--interface {first.ip}")
    if first.namespace:  # mDNS adverts are only seen inside the bed's network
        doctor = f"ip netns exec {first.namespace} {doctor}"
    lines += [
        "try (every node answers for the whole cluster; any node's socket or URL works):",
        f"  {epara} status --socket {first.socket}",
        f"  {epara} plan --socket {first.socket}",
        f"  {doctor}",
        f"  curl -s{auth} {url}/metrics | grep '^epara_' | grep -v _bucket",
        f"  curl -s{auth} {url}/v1/models",
        f"  curl -s{auth} {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{ask}'",
        f"  {python}",
        f"  dashboard: {first.dashboard}",
    ]
    if first.token:
        lines.append(f"  HTTP token (off loopback every node needs it): {first.token}")
    if first.namespace:
        lines.append(f"  inside the bed: ip netns exec {first.namespace} curl -s{auth} "
                     f"{first.served}/metrics")
    return lines


def run_demo(nodes: int = 3, seconds: float = 20.0, out_dir: Path = Path("epara-demo"),
             store: Path | None = None, loopback: bool = False, load: float = 2.0,
             stay: bool = False, rounds: int = DEMO_ROUNDS,
             scenario: str = "default", warmup: float = 0.0) -> int:
    from epara.models.store import ModelStore

    began = time.monotonic()
    console = Console()
    use_bed, why = where_to_run(loopback)
    model_store = ModelStore(store)
    chosen = SCENARIOS[scenario]
    print(f"epara demo: {nodes} nodes as {why}; scenario {chosen.name}: {chosen.about}")
    if chosen.name != "default" and not use_bed:
        print("   (the scenario's device classes and memory budgets need the emulated bed: "
              "on loopback only its workload and baselines apply)")
    try:
        with _signals_as_interrupt():
            return _run(nodes, seconds, out_dir, model_store, use_bed, load, console, began,
                        stay, rounds, chosen, warmup)
    except RuntimeError as exc:
        print(f"\nerror: {exc}\nevery node stopped"
              + (", namespaces and cgroups removed" if use_bed else ""), flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every node stopped"
              + (", namespaces and cgroups removed" if use_bed else ""), flush=True)
        return 130


def _run(nodes: int, seconds: float, out_dir: Path, model_store: ModelStore, use_bed: bool,
         load: float, console: Console, began: float, stay: bool, rounds: int,
         scenario: Scenario, warmup: float) -> int:
    from epara.models.zoo import prepare, sample_photo

    services = scenario.services
    print(f"1. preparing models {', '.join(services)} in {model_store.root}", flush=True)
    for name in services:
        started = time.monotonic()
        prepare(name, model_store, stream=sys.stdout)
        console.line(f"{name}: ready ({time.monotonic() - started:.1f} s)")
    photo = sample_photo(model_store).read_bytes()
    inputs = _Inputs(photo)
    trace = scenario.trace(warmup + seconds, load, nodes)
    counts = {s: sum(r.service == s for r in trace) for s in services}
    slos = {r.service: r.slo_ms for r in trace}
    print(f"2. workload: {len(trace)} requests over {warmup + seconds:.0f} s, sent open-loop "
          "to every node: " + ", ".join(
              f"{s} {counts[s]} (SLO {slos.get(s, 0):.0f} ms)" for s in services)
          + "; camera streams at 10 fps, chat turns of 16 tokens", flush=True)
    if warmup > 0:
        print(f"   goodput counts the last {seconds:.0f} s: the first {warmup:.0f} s are a "
              "warm-up for every policy, in which placements meet the load (their goodput "
              "is reported apart)", flush=True)
    policies = ("epara", *scenario.baselines)
    print(f"   {rounds} round(s) of {', '.join(policies)}, interleaved on fresh clusters"
          + (" (fewer than the 3 of `epara bench goodput --real`, to keep the demo short: "
             "read the verdict with that in mind)" if rounds < 3 else ""), flush=True)
    results: list[list[PolicyResult]] = []
    written: dict[str, str] = {}
    out_dir.mkdir(parents=True, exist_ok=True)

    def keep_mask(cluster: list[NodeProc]) -> None:
        from epara.models.imaging import encode_png

        with Client(cluster[0].socket, timeout=30) as client:
            result = client.segment("selfie-seg", photo, overlay=True)
        (out_dir / "mask.png").write_bytes(encode_png(result["mask"]))
        (out_dir / "overlay.png").write_bytes(result["overlay_png"])
        written["mask"] = f"{result['coverage'] * 100:.0f}% of the photo is the person"

    runs = [(r, policy) for r in range(rounds) for policy in policies]
    with _maybe_bed(use_bed, nodes, scenario) as bed:
        label = "EMULATED " if bed is not None else ""
        if bed is not None:
            for line in bed.describe():
                console.line(f"{label}{line}")
        for number, (round_index, policy) in enumerate(runs, start=1):
            role = "epara's placement" if policy == "epara" else f"baseline {policy}"
            if number == 1 or round_index != runs[number - 2][0]:
                results.append([])
            print(f"3.{number} round {round_index + 1}/{rounds}, {role}: a fresh cluster "
                  f"of {nodes} nodes", flush=True)
            started = time.monotonic()
            forwards = len(bed.forwards) if bed is not None else 0

            def show_dashboard(cluster: list[NodeProc], bed: EmulatedBed | None = bed) -> None:
                point = endpoints(cluster[:1], bed)[0]
                console.line(f"dashboard while this run lasts: {point.dashboard}"
                             + (f" (forwarded to {point.served} in namespace "
                                f"{point.namespace})" if point.namespace else ""))

            first_epara = policy == "epara" and round_index == 0
            results[-1].append(run_policy(policy, trace, model_store.root, nodes, inputs,
                                          bed, console, keep_mask if first_epara else None,
                                          show_dashboard, http=True, warmup_s=warmup))
            if bed is not None:  # this run's forwards end with its nodes
                for forward in bed.forwards[forwards:]:
                    forward.close()
                del bed.forwards[forwards:]
            console.line(f"done in {time.monotonic() - started:.0f} s; nodes stopped")
        summary = summarize(results)
        where = "namespace hosts, EMULATED device classes" if use_bed else "loopback processes"
        print(f"5. results ({nodes} nodes, {where}; same trace, epara's routing for all; "
              f"goodput is the median of {rounds} round(s), with its range):", flush=True)
        for line in table_lines(summary):
            console.line(f"{label}{line}")
        for problem in (p for v in summary["systems"].values() for p in v["not_as_planned"]):
            console.line(f"warning: a node did not run its placement: {problem}")
        plot = out_dir / "goodput.png"
        try:
            plot_results(results, plot, f"epara demo: {nodes} nodes ({where})")
        except ImportError:
            console.line("no plot: matplotlib is not installed (pip install 'epara[bench]')")
        (out_dir / "report.json").write_text(json.dumps(
            {"nodes": nodes, "emulated": use_bed, "scenario": scenario.name,
             "bed": bed.describe() if bed is not None else [], "seconds": seconds,
             "warmup_s": warmup,
             "requests": len(trace), **summary,
             "placement": {r.policy: r.placement for r in results[-1]}}, indent=2))
        print(f"6. wrote {plot if plot.exists() else 'no plot'}, {out_dir / 'report.json'}, "
              f"{out_dir / 'mask.png'} and {out_dir / 'overlay.png'} "
              f"({written.get('mask', 'no mask')})", flush=True)
        if stay:
            _stay(nodes, model_store, inputs, bed, console, services)
    print(f"{8 if stay else 7}. stopped every node"
          f"{', removed namespaces and cgroups' if use_bed else ''}; nothing left running "
          f"(demo took {time.monotonic() - began:.0f} s)", flush=True)
    return 0


def _stay(nodes: int, model_store: ModelStore, inputs: _Inputs, bed: EmulatedBed | None,
          console: Console, services: tuple[str, ...]) -> None:
    """A fresh epara cluster with HTTP on every node, up until Ctrl-C or SIGTERM."""
    print(f"7. --stay: a fresh cluster of {nodes} nodes under epara's placement, HTTP on "
          "every node", flush=True)
    with running_cluster("epara", model_store.root, nodes, services, inputs, bed, console,
                         http=True, prefix="epara-demo-") as cluster:
        points = endpoints(cluster, bed)
        with Client(cluster[0].socket, timeout=10) as client:
            leader = client.status()["cluster"]["leader"]
        credentials = cluster[0].socket.parent.parent / "cluster"
        for line in stay_hints(points, leader, credentials):
            console.line(line)
        print("   the cluster stays up until Ctrl-C (or SIGTERM), which stops every node",
              flush=True)
        try:
            while True:
                _check_running(cluster)
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.line("stopping the cluster")
