"""SmolLM2 pipelines on the emulated heterogeneous bed: single device vs the partitioner's
pipeline vs a memory-proportional split, measured. Needs root (namespaces, cgroups).

    python bench/pipeline.py [--store DIR] [--tokens 24] [--concurrency 1,4]
                             [--repeat 3] [--json]

Bed (``node/lab/testbed.py``): host 0 server-class (2 CPUs), hosts 1-2 Pi-class (0.4 CPU
each), wired links; every number printed is **emulated**. Placements:

  single   the whole model on the best single device (the server host)
  dp       ``partition(..., "throughput")`` over the bed's devices as the planner sees
           them (``emulated_profiles``: the class's share of this machine's CPU speed)
  dp-lat   ``partition(..., "latency")``, same devices
  prop     ``proportional_split`` by the hosts' memory budgets (llama.cpp RPC / Petals)
  *-300MB  every host's budget cut to 300 MB: SmolLM2 (~540 MB) fits on no single host,
           only pipelines can serve it

How placements are forced: this bench does not go through the leader. It builds the stage
chain directly from the node's own classes (``StageHost`` in a process per host,
``PipelineClient`` + ``RemoteLlmChain`` feeding ``LlmEngine`` in the head's process on the
first stage's host), in the bed's namespaces and cgroups, for each placement. The route,
data plane (CurveZMQ), stages and engine are the ones a node runs; only the choice of
placement is the bench's. The last part reshapes the Pi hosts' links to the Wi-Fi class
and compares ``compress="fp16"`` activations with uncompressed ones: throughput, and the
greedy tokens' agreement with the uncompressed run.

Measured per placement and concurrency N (N sequences added at once, greedy, --tokens
each): TTFT (mean time to each sequence's first token) and decode tokens/s (tokens after
the first, summed over sequences, over the time from the last first token to the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
PORT = 7100
PROMPTS = ["The capital of France is", "Write a haiku about the sea.",
           "List three uses of a brick:", "Explain why the sky is blue in one sentence."]
# The planner's view of one CPU of this machine (FACTS: fp32-class decode is bound by
# memory bandwidth, ~8-16 GB/s; ORT decodes ~30 tokens/s on SmolLM2's 0.27 GFLOP/token).
CPU_GFLOPS = 20.0
CPU_BANDWIDTH_GBS = 8.0


# --- worker processes (run inside a host's namespace and cgroup) -------------------------

def _serve_stages(args: argparse.Namespace) -> None:
    """A stage host: load the given layer ranges, serve them until stdin closes."""
    from epara.models.llm import LlmStage
    from epara.node.dataplane import DataPlane
    from epara.node.pipeline import LlmStageAdapter, StageHost

    async def main() -> None:
        plane = DataPlane(Path(args.credentials), args.ip, PORT)
        await plane.start()
        host = StageHost(plane, args.ip)
        for key in args.stage:
            lo, hi = (int(x) for x in key.split(":"))
            path = Path(args.model) / f"stage_{lo:02d}_{hi:02d}.onnx"
            host.add(key, LlmStageAdapter(await asyncio.to_thread(LlmStage, path,
                                                                  args.threads)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        host.close()
        await plane.stop()

    asyncio.run(main())


def _head(args: argparse.Namespace) -> None:
    """The pipeline's head: engine with the local first stage and the remote rest; runs
    the load and prints one JSON line of measurements."""
    from epara.models.llm import GenerationParams, LlmEngine, LlmStage
    from epara.models.manifest import load_manifest
    from epara.node.dataplane import DataPlane
    from epara.node.pipeline import PipelineClient, RemoteLlmChain, StageRef

    model = Path(args.model)
    lo, hi = (int(x) for x in args.layers.split(":"))
    stages: list[Any] = [LlmStage(model / f"stage_{lo:02d}_{hi:02d}.onnx", args.threads)]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    plane = None
    if args.route:
        plane = DataPlane(Path(args.credentials), args.ip, PORT)
        asyncio.run_coroutine_threadsafe(plane.start(), loop).result(10)
        client = PipelineClient(plane, args.ip)
        refs = []
        for item in args.route:
            ip, key = item.split("/")
            refs.append(StageRef(ip, (ip, PORT), key))
        first = int(refs[0].key.split(":")[0])
        last = int(refs[-1].key.split(":")[1])
        stages.append(RemoteLlmChain(client, refs, range(first, last), loop, lambda _ids: 60.0,
                                     args.compress))
    engine = LlmEngine(model, load_manifest(model), args.threads, stages)
    results = []
    params = GenerationParams(max_tokens=args.tokens)
    engine.add("warm", prompt="Hello", params=GenerationParams(max_tokens=2))
    while engine.active:
        engine.step()
    for n in args.concurrency:
        start = time.perf_counter()
        first_at: dict[str, float] = {}
        tokens: dict[str, list[int]] = {}
        for i in range(n):
            engine.add(f"s{n}-{i}", prompt=PROMPTS[i % len(PROMPTS)], params=params)
        while engine.active:
            for event in engine.step():
                if event.token_id < 0:
                    continue
                first_at.setdefault(event.seq_id, time.perf_counter())
                tokens.setdefault(event.seq_id, []).append(event.token_id)
        end = time.perf_counter()
        decoded = sum(len(t) - 1 for t in tokens.values())
        decode_s = end - max(first_at.values())
        results.append({
            "concurrency": n,
            "ttft_ms": 1000 * sum(t - start for t in first_at.values()) / len(first_at),
            "decode_tok_s": decoded / decode_s if decode_s > 0 else 0.0,
            "tokens": [tokens[f"s{n}-{i}"] for i in range(n)]})
    print(json.dumps(results), flush=True)
    if plane is not None:
        asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(10)


# --- the driver --------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    label: str
    stages: tuple[tuple[int, int, int], ...]  # (host, first layer, end layer)


def emulated_profiles(bed: Any, budgets: Sequence[int]) -> list[Any]:
    """DeviceProfiles of the bed's hosts as the planner would see them: speeds are the
    class's CPU quota times one CPU of this machine (emulated, not a real board)."""
    from epara.node.leader.model import DeviceProfile

    out = []
    for i, spec in enumerate(bed.specs):
        cpus = min(spec.device.cpus, spec.device.threads)
        out.append(DeviceProfile(f"h{i}", spec.device.name, CPU_GFLOPS * cpus,
                                 CPU_BANDWIDTH_GBS * cpus, float(budgets[i]),
                                 link_mbps=spec.link.rate_mbit,
                                 link_latency_ms=spec.link.delay_ms, batch_fixed=0.05))
    return out


def placements(bed: Any, spec: Any, budgets: Sequence[int], suffix: str,
               single: bool) -> list[Placement]:
    from epara.node.leader.partition import partition, proportional_split

    devices = emulated_profiles(bed, budgets)
    free = {d.id: d.mem_mb for d in devices}
    out = []
    if single:
        out.append(Placement(f"single{suffix}", ((0, 0, len(spec.layers)),)))
    for objective, label in (("throughput", "dp"), ("latency", "dp-lat")):
        dp = partition(spec, devices, free, objective, batch=4)
        if dp is not None:
            out.append(Placement(f"{label}{suffix}", tuple(
                (int(s.device[1:]), s.first, s.end) for s in dp.stages)))
    prop = proportional_split(spec, devices, free)
    if prop is not None:
        out.append(Placement(f"prop{suffix}", tuple((int(s.device[1:]), s.first, s.end)
                                                   for s in prop)))
    return out


def run_placement(bed: Any, model: Path, credentials: Path, placement: Placement,
                  tokens: int, concurrency: Sequence[int], compress: str) -> list[dict]:
    base = [sys.executable, str(Path(__file__).resolve()), "--model", str(model),
            "--credentials", str(credentials)]
    head_host, head_lo, head_hi = placement.stages[0]
    workers = []
    try:
        for host_i, lo, hi in placement.stages[1:]:
            worker = subprocess.Popen(
                [*bed.prefix(host_i), *base, "--worker", "stages", "--ip", bed.ip(host_i),
                 "--threads", str(bed.specs[host_i].device.threads),
                 "--stage", f"{lo}:{hi}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            workers.append(worker)
        for worker in workers:
            assert worker.stdout is not None
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError("a stage worker failed to start")
        route = [f"{bed.ip(h)}/{lo}:{hi}" for h, lo, hi in placement.stages[1:]]
        done = subprocess.run(
            [*bed.prefix(head_host), *base, "--worker", "head", "--ip", bed.ip(head_host),
             "--threads", str(bed.specs[head_host].device.threads),
             "--layers", f"{head_lo}:{head_hi}", "--tokens", str(tokens),
             "--compress", compress, "--concurrency", ",".join(map(str, concurrency)),
             *[x for r in route for x in ("--route", r)]],
            capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"head failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def describe(bed: Any, placement: Placement) -> str:
    return " ".join(f"{bed.specs[h].device.name}{h}[{a}:{b}]" for h, a, b in placement.stages)


def drive(args: argparse.Namespace) -> dict[str, Any]:
    from epara.models.llm_graph import build_stages
    from epara.models.manifest import load_manifest
    from epara.models.store import ModelStore
    from epara.models.zoo import prepare
    from epara.node.lab.testbed import LINKS, EmulatedBed, have_bed, host
    from epara.node.planning import catalogue_entry, service_spec
    from epara.peer.security import create_cluster_credentials

    reason = have_bed()
    if reason is not None:
        sys.exit(f"cannot run the emulated bed here: {reason}")
    with tempfile.TemporaryDirectory(prefix="epara-pipeline-") as tmp:
        model = prepare(MODEL, ModelStore(args.store or Path(tmp) / "store"))
        spec = service_spec(MODEL, catalogue_entry(load_manifest(model)))
        credentials = Path(tmp) / "cluster"
        create_cluster_credentials(credentials)
        rows: list[dict[str, Any]] = []
        with EmulatedBed([host("server"), host("pi"), host("pi")]) as bed:
            budgets = [s.budget for s in bed.specs]
            bed_lines = [*bed.describe()[:len(bed.specs)],
                         "(the wifi rows reshape every host's link to the wifi class)"]
            plans = placements(bed, spec, budgets, "", single=True)
            plans += placements(bed, spec, [300] * 3, "-300MB", single=False)
            # Every stage file the plans need, built once here (not by 0.4-CPU workers).
            for p in plans:
                build_stages(model, [lo for _, lo, _ in p.stages[1:]])
            wifi = [p for p in plans if p.label == "dp-300MB"]
            # Rounds in alternating order, reported as medians: the machine's cores are
            # shared, so a slow spell must not land on one placement only.
            for round_ in range(args.repeat):
                order = plans if round_ % 2 == 0 else plans[::-1]
                for i in range(len(bed.specs)):
                    bed.reshape(i, LINKS["wired"])
                for p in order:
                    for r in run_placement(bed, model, credentials, p, args.tokens,
                                           args.concurrency, "none"):
                        rows.append({"placement": p.label, "stages": describe(bed, p),
                                     "link": "wired", "compress": "none", "round": round_,
                                     **r})
                # Activation compression over Wi-Fi-class links, on the tight-budget
                # pipeline.
                for i in range(len(bed.specs)):
                    bed.reshape(i, LINKS["wifi"])
                for p in wifi:
                    modes = ("none", "fp16") if round_ % 2 == 0 else ("fp16", "none")
                    for compress in modes:
                        for r in run_placement(bed, model, credentials, p, args.tokens,
                                               args.concurrency, compress):
                            rows.append({"placement": p.label, "stages": describe(bed, p),
                                         "link": "wifi", "compress": compress,
                                         "round": round_, **r})
            bed_lines += [f"not emulated: {n}" for n in bed.not_emulated]
    return {"emulated": True, "bed": bed_lines, "rows": rows}


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of greedy positions that agree, up to the first divergence and after it
    (a divergence changes every later token's context, so also report the prefix)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b, strict=False)) / n if n else 1.0


def report(result: dict[str, Any]) -> str:
    lines = ["EMULATED bed (cgroup CPU quotas + tc tbf links on one 2-core VM):",
             *[f"  {line}" for line in result["bed"]], "",
             f"{'placement':<13} {'link':<6} {'compress':<8} {'N':>2} {'TTFT ms':>9} "
             f"{'decode tok/s':>12} {'(min-max)':>13} stages"]
    rows = result["rows"]
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["placement"], r["link"], r["compress"], r["concurrency"]),
                          []).append(r)
    for (label, link, compress, n), group in groups.items():
        ttft = sorted(r["ttft_ms"] for r in group)
        rate = sorted(r["decode_tok_s"] for r in group)
        lines.append(f"{label:<13} {link:<6} {compress:<8} {n:>2} "
                     f"{statistics.median(ttft):>9.0f} {statistics.median(rate):>12.2f} "
                     f"{rate[0]:>6.1f}-{rate[-1]:<6.1f} {group[0]['stages']}")
    first = [r for r in rows if r["round"] == 0]
    plain = {r["concurrency"]: r["tokens"] for r in first
             if r["link"] == "wifi" and r["compress"] == "none"}
    for r in first:
        if r["compress"] != "fp16":
            continue
        ref = plain.get(r["concurrency"])
        if ref is not None:
            shares = [agreement(a, b) for a, b in zip(ref, r["tokens"], strict=True)]
            exact = sum(a == b for a, b in zip(ref, r["tokens"], strict=True))
            lines.append(f"fp16 vs uncompressed, N={r['concurrency']}: {exact}/{len(ref)} "
                         f"sequences identical, {100 * min(shares):.0f}% of greedy tokens "
                         "agree at worst")
    lines.append(f"Medians of {1 + max(r['round'] for r in rows)} alternating rounds; the "
                 "single-host rows are the same-run baseline.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 4])
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, in alternating order (medians reported)")
    parser.add_argument("--json", action="store_true")
    # Worker mode (the driver starts these inside the bed).
    parser.add_argument("--worker", choices=["stages", "head"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--credentials", help=argparse.SUPPRESS)
    parser.add_argument("--ip", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--stage", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    parser.add_argument("--route", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--compress", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "stages":
        _serve_stages(args)
    elif args.worker == "head":
        _head(args)
    else:
        result = drive(args)
        print(json.dumps(result, indent=1) if args.json else report(result))


if __name__ == "__main__":
    main()
