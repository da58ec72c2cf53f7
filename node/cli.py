"""The ``epara`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from epara.node.client import Client, Done, EparaError
from epara.node.leader.policies import POLICIES
from epara.node.leader.workloads import TRACE_DEVICES, TRACE_SERVICES

# Seconds of workload before the measured part, in `epara demo` and `epara bench goodput
# --real`: placements meet the load first, and goodput is what they sustain after.
WARMUP_S = 15.0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except EparaError as exc:
        print(f"epara: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`epara plan | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epara", description=__doc__)
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(title="commands")

    node = sub.add_parser("node", help="run the node daemon on this device")
    node.add_argument("--store", type=Path, help="model store (default: $EPARA_MODEL_STORE "
                      "or ~/.cache/epara/models)")
    _socket_arg(node)
    node.add_argument("--socket-group", help="also let this group use the socket")
    node.add_argument("--model", action="append", default=[],
                      help="serve only this model (repeatable; default: all in the store)")
    node.add_argument("--threads", type=int, help="threads per model runtime")
    node.add_argument("--max-frame-mb", type=float, default=64.0,
                      help="largest request accepted (MiB)")
    node.add_argument("--max-inflight", type=int, default=64,
                      help="requests in flight per local connection; more get `overloaded`")
    node.add_argument("--max-buffered-mb", type=float, default=256.0,
                      help="bytes all local connections may buffer together (MiB); past it "
                      "new requests get `overloaded`")
    node.add_argument("--frame-timeout", type=float, default=10.0,
                      help="seconds a started frame may take to arrive whole")
    node.add_argument("--node-id", default=os.environ.get("EPARA_NODE_ID") or None,
                      help="default: $EPARA_NODE_ID, else hostname and machine id")
    node.add_argument("--cluster", type=Path, help="cluster credentials directory (default: "
                      "$EPARA_CLUSTER_DIR or ~/.config/epara/cluster); without credentials "
                      "the node runs alone")
    node.add_argument("--standalone", action="store_true",
                      help="do not join a cluster even if credentials exist")
    node.add_argument("--interface", action="append", default=[], metavar="IP",
                      help="address to advertise and listen on (repeatable; default: all)")
    node.add_argument("--port", type=int, default=7370, help="cluster control port")
    node.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                      help="static peer, for networks that block multicast (repeatable)")
    node.add_argument("--no-mdns", action="store_true", help="find peers only via --peer")
    node.add_argument("--never-lead", action="store_true",
                      help="never become the cluster leader")
    node.add_argument("--device-class", choices=("server", "embedded", "microcomputer"),
                      help="advertise this device class instead of the one probed from "
                      "the hardware")
    node.add_argument("--memory-budget-mb", type=float,
                      help="memory models may use on this device (default: free memory)")
    node.add_argument("--placement-policy", default="epara",
                      choices=sorted(POLICIES),
                      help="what this node places by when it leads (baselines exist to "
                      "measure epara against them)")
    node.add_argument("--http-port", type=int, metavar="PORT",
                      help="serve HTTP on this port: OpenAI-compatible /v1 API, /metrics and "
                      "the dashboard (default: off; 0 picks a free port; docs/http.md)")
    node.add_argument("--http-host", default="127.0.0.1", metavar="IP",
                      help="address of the HTTP endpoint (default 127.0.0.1; any other "
                      "needs --http-token-file)")
    node.add_argument("--http-token-file", type=Path, metavar="FILE",
                      help="bearer token clients must send (created, mode 0600, if absent); "
                      "required when --http-host is not loopback")
    node.add_argument("--http-max-connections", type=int, default=64, metavar="N",
                      help="HTTP connections open at once; more get 503 (default 64)")
    node.add_argument("--http-max-body-kb", type=int, default=1024, metavar="KIB",
                      help="largest HTTP request body; larger get 413 (default 1024 KiB)")
    node.add_argument("--http-request-timeout", type=float, default=10.0, metavar="S",
                      help="seconds an HTTP request may take to arrive whole, from its "
                      "first byte; slower get 408 (default 10)")
    node.set_defaults(run=_cmd_node)

    cluster = sub.add_parser("cluster", help="cluster credentials")
    csub = cluster.add_subparsers(title="cluster commands")
    init = csub.add_parser("init", help="create the cluster's credentials")
    init.add_argument("--dir", type=Path, help="where (default: $EPARA_CLUSTER_DIR or "
                      "~/.config/epara/cluster)")
    init.add_argument("--force", action="store_true", help="replace existing credentials")
    init.add_argument("--authority", type=Path, metavar="DIR", help="per-device identity: "
                      "create the signing authority in DIR (keep it off the devices); keeps "
                      "--dir's cluster key if it has one (the upgrade of a shared-key cluster)")
    init.set_defaults(run=_cmd_cluster_init)
    admit = csub.add_parser("admit", help="give a device its own key and certificate")
    admit.add_argument("node_id", metavar="ID")
    admit.add_argument("--authority", type=Path, required=True, metavar="DIR")
    admit.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="the device's credentials directory (its node.key is kept and "
                       "signed if it already has one)")
    admit.set_defaults(run=_cmd_cluster_admit)
    revoke = csub.add_parser("revoke", help="shut a device out (no re-keying of others)")
    revoke.add_argument("node_id", metavar="ID")
    revoke.add_argument("--authority", type=Path, required=True, metavar="DIR")
    revoke.set_defaults(run=_cmd_cluster_revoke)

    models = sub.add_parser("models", help="list served models; prepare or import models")
    _socket_arg(models)
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=_cmd_models)
    msub = models.add_subparsers(title="model commands")
    store = msub.add_parser("store", help="list the models in the local store")
    store.add_argument("--store", type=Path)
    store.add_argument("--json", action="store_true")
    store.set_defaults(run=_cmd_models_store)
    prepare = msub.add_parser("prepare", help="prepare a shipped model into the store")
    prepare.add_argument("name", nargs="+", help="model names (see `epara models prepare "
                         "--list`)")
    prepare.add_argument("--store", type=Path)
    prepare.add_argument("--force", action="store_true", help="prepare again from scratch")
    prepare.set_defaults(run=_cmd_models_prepare)
    split = msub.add_parser("split", help="cut a prepared model into pipeline stages")
    split.add_argument("name")
    how = split.add_mutually_exclusive_group(required=True)
    how.add_argument("--cuts", type=int, help="number of cuts, placed to balance compute")
    how.add_argument("--at", type=int, nargs="+", metavar="POS", help="cut positions")
    split.add_argument("--store", type=Path)
    split.set_defaults(run=_cmd_models_split)
    imp = msub.add_parser("import",
                          help="import your own .onnx, .tflite, torch or .gguf (LLM) file")
    imp.add_argument("file", type=Path)
    imp.add_argument("--name", help="model name (default: the file's stem)")
    imp.add_argument("--store", type=Path)
    imp.add_argument("--input", action="append", default=[], metavar="NAME:DTYPE:SHAPE",
                     help="declare an input a torch file cannot describe, e.g. "
                     "x:float32:?x3x224x224 (repeatable)")
    imp.add_argument("--task", default="generic", help="e.g. segmentation, embedding")
    imp.set_defaults(run=_cmd_models_import)

    infer = sub.add_parser("infer", help="run a model on tensors from .npy files")
    infer.add_argument("model")
    infer.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy")
    infer.add_argument("--random", action="store_true",
                       help="fill missing inputs with random data of the declared shape")
    infer.add_argument("--deadline-ms", type=float)
    infer.add_argument("--out", type=Path, help="save the outputs to this .npz file")
    infer.add_argument("--json", action="store_true")
    _socket_arg(infer)
    infer.set_defaults(run=_cmd_infer)

    seg = sub.add_parser("segment", help="segment an image (person or text mask)")
    seg.add_argument("image", type=Path)
    seg.add_argument("--model", default="selfie-seg")
    seg.add_argument("--out", type=Path, default=Path("mask.png"), help="mask PNG to write")
    seg.add_argument("--overlay", type=Path, help="also write the image with the mask tinted")
    seg.add_argument("--threshold", type=float)
    seg.add_argument("--deadline-ms", type=float)
    _socket_arg(seg)
    seg.set_defaults(run=_cmd_segment)

    gen = sub.add_parser("generate", help="stream text from a language model")
    gen.add_argument("model")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user chat message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--deadline-ms", type=float)
    _socket_arg(gen)
    gen.set_defaults(run=_cmd_generate)

    demo = sub.add_parser("demo", help="a small cluster on this machine: the LLM and "
                          "segmentation under a workload, epara vs a baseline")
    demo.add_argument("--nodes", type=int, default=3, help="node processes (hosts)")
    demo.add_argument("--seconds", type=float, default=20.0,
                      help="length of the workload, per policy")
    demo.add_argument("--load", type=float, default=2.0,
                      help="scale the workload's rates")
    demo.add_argument("--out", type=Path, default=Path("epara-demo"),
                      help="where the plot, report and mask go")
    demo.add_argument("--store", type=Path, help="the model store (default: "
                      "$EPARA_MODEL_STORE or ~/.cache/epara/models)")
    demo.add_argument("--loopback", action="store_true", help="loopback processes even "
                      "as root (no namespace hosts with emulated device classes)")
    demo.add_argument("--rounds", type=int, default=2, help="rounds of the comparison, "
                      "policies interleaved A B A B (the bench runs 3)")
    demo.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds of workload "
                      "before the measured --seconds, for every policy: goodput counts "
                      "what follows (the warm-up's is reported apart)")
    demo.add_argument("--scenario", choices=("default", "case-study"), default="default",
                      help="case-study: the paper's case study (server-, Jetson- and "
                      "Pi-class hosts whose memory holds no whole LLM; camera streams and "
                      "a latency-critical model; baselines replicate-all and pipeline-all)")
    demo.add_argument("--stay", action="store_true", help="after the comparison, keep an "
                      "epara cluster running with HTTP on every node, print how to reach "
                      "it (status, plan, doctor, metrics, dashboard, OpenAI API), and stop "
                      "it on Ctrl-C or SIGTERM")
    demo.set_defaults(run=_cmd_demo)

    doctor = sub.add_parser("doctor", help="why a node is not discovered or cannot join")
    doctor.add_argument("--cluster", type=Path, help="credentials directory (default: "
                        "$EPARA_CLUSTER_DIR or ~/.config/epara/cluster)")
    doctor.add_argument("--interface", action="append", default=[], metavar="IP",
                        help="listen for adverts on this address (default: all)")
    doctor.add_argument("--seconds", type=float, default=3.0, help="how long to listen")
    doctor.add_argument("--json", action="store_true")
    _socket_arg(doctor)
    doctor.set_defaults(run=_cmd_doctor)

    plan = sub.add_parser("plan", help="the leader's placement: per service its category, "
                          "parallel mode, where it runs, and why")
    plan.add_argument("--json", action="store_true")
    _socket_arg(plan)
    plan.set_defaults(run=_cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(title="benchmarks")
    goodput = bsub.add_parser("goodput", help="epara vs baseline serving strategies "
                              "(simulator), goodput and SLO attainment")
    goodput.add_argument("--trace", type=Path, help="replay this JSONL trace "
                         "(docs/trace-format.md) instead of the built-in workload suite")
    goodput.add_argument("--json", action="store_true")
    goodput.add_argument("--plot", type=Path, help="write a PNG plot here")
    goodput.add_argument("--quick", action="store_true", help="a shorter suite")
    goodput.add_argument("--real", action="store_true", help="measure a real cluster of "
                         "node processes on this machine under each placement policy, "
                         "instead of the simulator")
    goodput.add_argument("--seconds", type=float, default=30.0,
                         help="with --real: length of the built-in trace")
    goodput.add_argument("--nodes", type=int, default=3, help="with --real: node processes")
    goodput.add_argument("--bed", help="with --real: run the nodes on an EMULATED bed of "
                         "namespace hosts of these device classes (comma list of server, "
                         "jetson, pi; needs root) instead of loopback")
    goodput.add_argument("--load", type=float, default=1.0,
                         help="with --real: scale the built-in trace's rates")
    goodput.add_argument("--policies", help="with --real: placement policies to compare "
                         "(comma list; default epara,one-replica,replicate-all, or epara "
                         "and the scenario's baselines)")
    goodput.add_argument("--store", type=Path, help="with --real: the model store")
    goodput.add_argument("--rounds", type=int, default=3, help="with --real: rounds, the "
                         "policies interleaved A B A B; the median and range are reported")
    goodput.add_argument("--warmup", type=float, default=WARMUP_S, help="with --real: "
                         "seconds of workload before the measured --seconds (not counted; "
                         "its goodput is reported apart)")
    goodput.add_argument("--scenario", choices=("default", "case-study"),
                         help="with --real: a scenario's hosts (an EMULATED bed, needs "
                         "root), workload and baselines (see `epara demo --help`)")
    goodput.add_argument("--devices", type=int, default=TRACE_DEVICES,
                         help="with --trace: the fleet (production mix) it replays on")
    goodput.add_argument("--services", type=int, default=TRACE_SERVICES,
                         help="with --trace: the built-in catalogue size its services "
                         "come from (bench/goodput_sim.py --write-trace writes from "
                         f"{TRACE_SERVICES})")
    goodput.add_argument("--jobs", type=int, default=2,
                         help="simulator processes (one (mix, seed) each)")
    goodput.set_defaults(run=_cmd_bench_goodput)

    status = sub.add_parser("status", help="show the node's state")
    status.add_argument("--json", action="store_true")
    _socket_arg(status)
    status.set_defaults(run=_cmd_status)

    # Commands other packages of epara add (``epara firmware``), found through their
    # entry points, so this module and theirs do not import each other.
    for command in entry_points(group="epara.commands"):
        command.load()(sub)
    return parser


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, help="node socket (default: $EPARA_SOCKET, "
                        "$XDG_RUNTIME_DIR/epara/node.sock or /tmp/epara-UID/node.sock)")


# --- node ---------------------------------------------------------------------------


def _cmd_node(args: argparse.Namespace) -> int:
    import grp

    from epara.node.daemon import NodeConfig, default_cluster_dir, run_node
    from epara.node.httpapi import HttpLimits, is_loopback
    from epara.node.localsock import SocketLimits
    from epara.peer.member import MemberConfig

    try:
        limits = SocketLimits(max_frame_bytes=int(args.max_frame_mb * 1024 * 1024),
                              max_inflight=args.max_inflight,
                              max_buffered_bytes=int(args.max_buffered_mb * 1024 * 1024),
                              frame_timeout_s=args.frame_timeout)
        http_limits = HttpLimits(max_connections=args.http_max_connections,
                                 max_body_bytes=args.http_max_body_kb * 1024,
                                 request_timeout_s=args.http_request_timeout)
    except ValueError as exc:
        print(f"epara: {exc}", file=sys.stderr)
        return 2
    config = NodeConfig(store=args.store, models=tuple(args.model), threads=args.threads,
                        socket_limits=limits,
                        node_id=args.node_id, memory_budget_mb=args.memory_budget_mb,
                        http_port=args.http_port, http_host=args.http_host,
                        http_token_file=args.http_token_file, http_limits=http_limits,
                        placement_policy=args.placement_policy)
    if args.http_port is not None and args.http_token_file is None and \
            not is_loopback(args.http_host):
        print(f"epara: --http-host {args.http_host} is not loopback: give "
              "--http-token-file FILE (a bearer token is created there if absent)",
              file=sys.stderr)
        return 2
    cluster_dir = args.cluster or default_cluster_dir()
    if args.standalone:
        pass
    elif (cluster_dir / "cluster.key").exists() or (cluster_dir / "node.cert").exists():
        # The shared key, or a device's own identity (which needs no cluster key).
        config.cluster_dir = cluster_dir
        config.member = MemberConfig(
            interfaces=tuple(args.interface) or None, control_port=args.port,
            seeds=tuple(args.peer), mdns=not args.no_mdns, never_lead=args.never_lead,
            device_class=args.device_class)
    elif args.cluster:
        print(f"epara: no cluster credentials in {cluster_dir}; create them with "
              f"`epara cluster init --dir {cluster_dir}`", file=sys.stderr)
        return 1
    else:
        print(f"epara: no cluster credentials in {cluster_dir}: running alone "
              "(`epara cluster init` creates them)", file=sys.stderr)
    if args.socket:
        config.socket_path = args.socket
    if args.socket_group:
        config.socket_group = grp.getgrnam(args.socket_group).gr_gid
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("epara").setLevel(logging.INFO)
    run_node(config)
    return 0


def _cmd_cluster_init(args: argparse.Namespace) -> int:
    from epara.node.daemon import default_cluster_dir
    from epara.peer.cli import cluster_init, format_cluster_init
    from epara.peer.security import CredentialsError

    directory = args.dir or default_cluster_dir()
    if args.authority is not None:
        from epara.peer.cli import authority_init

        try:
            print(authority_init(args.authority, directory))
        except CredentialsError as exc:
            print(f"epara: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        print(format_cluster_init(cluster_init(directory, overwrite=args.force)))
    except CredentialsError:
        print(f"epara: {directory} already holds cluster credentials (--force replaces "
              "them, and every node must then get the new ones)", file=sys.stderr)
        return 1
    return 0


def _cmd_cluster_admit(args: argparse.Namespace) -> int:
    from epara.peer.cli import admit
    from epara.peer.security import CredentialsError

    try:
        print(admit(args.authority, args.node_id, args.out))
    except CredentialsError as exc:
        print(f"epara: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_cluster_revoke(args: argparse.Namespace) -> int:
    from epara.peer.cli import revoke
    from epara.peer.security import CredentialsError

    try:
        print(revoke(args.authority, args.node_id))
    except CredentialsError as exc:
        print(f"epara: {exc}", file=sys.stderr)
        return 1
    return 0


# --- models -------------------------------------------------------------------------


def _cmd_models(args: argparse.Namespace) -> int:
    with Client(args.socket) as node:
        models = node.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("this node serves no models (prepare some: epara models prepare --help)")
    for m in models:
        ins = ", ".join(_spec(s) for s in m["inputs"])
        print(f"{m['name']:<16} {m['task']:<16} {m['backend']}/{m['target']:<10} "
              f"{m['hints']['category']:<9} in: {ins}")
    return 0


def _spec(spec: dict[str, Any]) -> str:
    dims = ",".join("?" if d is None else str(d) for d in spec["shape"])
    return f"{spec['name']}:{spec['dtype']}[{dims}]"


def _cmd_models_store(args: argparse.Namespace) -> int:
    from epara.models.store import ModelStore

    store = ModelStore(args.store)
    good, broken = store.scan()
    if args.json:
        print(json.dumps({"store": str(store.root),
                          "models": [m.manifest.to_json() for m in good],
                          "broken": {b.directory.name: b.reason for b in broken}}, indent=2))
        return 0
    print(f"model store: {store.root}")
    for m in good:
        print(f"  {m.manifest.name:<16} {m.manifest.task:<16} {m.manifest.backend:<7} "
              f"{m.manifest.memory_mb:8.1f} MB")
    for b in broken:
        print(f"  {b.directory.name:<16} BROKEN: {b.reason}")
    return 0


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from epara.models.store import ModelStore
    from epara.models.zoo import PREPARERS, PrepareError

    store = ModelStore(args.store)
    unknown = [n for n in args.name if n not in PREPARERS]
    if unknown:
        print(f"epara: unknown model {', '.join(unknown)}; shipped models: "
              f"{', '.join(sorted(PREPARERS))}", file=sys.stderr)
        return 2
    for name in args.name:
        try:
            path = PREPARERS[name].prepare(store, force=args.force)
        except PrepareError as exc:
            print(f"epara: cannot prepare {name}: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: ready in {path}")
    return 0


def _cmd_models_split(args: argparse.Namespace) -> int:
    from epara.models.split import SplitError, SplitUnavailable, split_model
    from epara.models.store import ModelStore

    try:
        stages = split_model(ModelStore(args.store), args.name, args.cuts or args.at)
    except (SplitError, SplitUnavailable, FileNotFoundError) as exc:
        print(f"epara: cannot split {args.name}: {exc}", file=sys.stderr)
        return 1
    for path in stages:
        print(f"stage {path.name}: {path}")
    return 0


def _cmd_models_import(args: argparse.Namespace) -> int:
    from epara.models.importer import import_model
    from epara.models.store import ModelStore
    from epara.models.zoo import PrepareError

    try:
        path = import_model(args.file, ModelStore(args.store), name=args.name,
                            inputs=args.input or None, task=args.task)
    except (PrepareError, ValueError) as exc:
        print(f"epara: cannot import {args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"imported into {path}")
    return 0


# --- requests -----------------------------------------------------------------------


def _cmd_infer(args: argparse.Namespace) -> int:
    inputs: dict[str, np.ndarray] = {}
    for item in args.input:
        name, sep, file = item.partition("=")
        if not sep:
            print(f"epara: --input takes NAME=FILE.npy, got {item!r}", file=sys.stderr)
            return 2
        inputs[name] = np.load(file, allow_pickle=False)
    with Client(args.socket) as node:
        if args.random:
            specs = next((m["inputs"] for m in node.models() if m["name"] == args.model), None)
            if specs is None:
                raise EparaError("unknown_model", f"no model named {args.model!r} is served")
            inputs = {**_random_inputs(specs), **inputs}
        outputs, timing = node.infer_timed(args.model, inputs, deadline_ms=args.deadline_ms)
    if args.out:
        np.savez(args.out, **outputs)
    summary = {name: {"dtype": a.dtype.name, "shape": list(a.shape),
                      "min": float(a.min()) if a.size else None,
                      "max": float(a.max()) if a.size else None,
                      "mean": float(a.mean()) if a.size else None}
               for name, a in outputs.items()}
    if args.json:
        print(json.dumps({"outputs": summary, "timing": timing}, indent=2))
    else:
        for name, s in summary.items():
            print(f"{name}: {s['dtype']}{s['shape']} min={s['min']:.4g} max={s['max']:.4g} "
                  f"mean={s['mean']:.4g}")
        print(f"queue {timing.get('queue_ms', 0):.2f} ms, compute {timing.get('compute_ms', 0):.2f}"
              f" ms, batch {timing.get('batch', 1)}")
        if args.out:
            print(f"saved {args.out}")
    return 0


def _random_inputs(specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in specs:
        shape = [1 if d is None else d for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            inputs[spec["name"]] = rng.random(shape, dtype=np.float64).astype(dtype)
        else:
            inputs[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
    return inputs


def _cmd_segment(args: argparse.Namespace) -> int:
    from epara.models.imaging import encode_png

    try:
        data = args.image.read_bytes()
    except OSError as exc:
        print(f"epara: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 1
    with Client(args.socket) as node:
        result = node.segment(args.model, data, overlay=args.overlay is not None,
                              threshold=args.threshold, deadline_ms=args.deadline_ms)
    args.out.write_bytes(encode_png(result["mask"]))
    if args.overlay is not None:
        args.overlay.write_bytes(result["overlay_png"])
    timing = result["timing"]
    height, width = result["mask"].shape
    print(f"mask {width}x{height}, {result['coverage'] * 100:.1f}% of the image, "
          f"compute {timing['compute_ms']:.1f} ms -> {args.out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    for name in ("top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.stop:
        params["stop"] = args.stop
    chat = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat \
        else {"prompt": args.prompt}
    with Client(args.socket) as node:
        for item in node.generate(args.model, deadline_ms=args.deadline_ms, **chat, **params):
            if isinstance(item, Done):
                print(f"\n[{item.finish_reason}; {item.usage.get('completion_tokens')} tokens "
                      f"in {item.usage.get('elapsed_ms', 0) / 1000:.2f} s]", file=sys.stderr)
            else:
                print(item.text, end="", flush=True)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from epara.node.daemon import default_cluster_dir
    from epara.node.doctor import diagnose, render

    findings = diagnose(args.cluster or default_cluster_dir(), args.interface or None,
                        args.socket, args.seconds)
    print(render(findings, args.json))
    return 1 if any(f.status == "fail" for f in findings) else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    with Client(args.socket) as node:
        status = node.status()
    plan = status.get("plan")
    if plan is None:
        print("epara: this node is not in a cluster: there is no placement", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    placement = plan["placement"]
    cluster = status["cluster"] or {}
    ready = {unit for m in cluster.get("members", [])
             for unit in (m.get("state") or {}).get("ready") or ()}
    print(f"placement v{placement['version']} (leader {cluster.get('leader')}, "
          f"term {cluster.get('term')})")
    if not placement["services"]:
        print("  nothing placed yet")
    from epara.node.leader.model import Placement

    for _, plan in sorted(Placement.from_dict(placement).plans.items()):
        print(f"\n{plan.service}: {plan.category}, {plan.mode}")
        for unit in plan.units:
            stages = " -> ".join(f"{s.device}[{s.first}:{s.end}]" if s.end else s.device
                                 for s in unit.stages)
            state = "ready" if unit.id in ready else "loading"
            print(f"  {stages:<40} batch {unit.max_batch:<3} {state}")
        print(f"  why: {plan.reason}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo = _lab("demo").run_demo

    if args.nodes < 2 or args.seconds <= 0 or args.load <= 0 or args.rounds < 1 or \
            not 0 <= args.warmup <= 600:
        raise SystemExit("epara demo: --nodes must be at least 2, --rounds at least 1, "
                         "--seconds and --load positive, --warmup 0 to 600")
    return run_demo(args.nodes, args.seconds, args.out, args.store, args.loopback,
                    args.load, args.stay, args.rounds, args.scenario, args.warmup)


def _lab(module: str) -> Any:
    """A module of the lab subpackage, or a clear exit where it is not installed."""
    import importlib

    try:
        return importlib.import_module(f"epara.node.lab.{module}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("epara.node.lab"):
            raise SystemExit("this command needs epara's lab code (epara.node.lab), which "
                             "device bundles leave out: run it where epara is installed "
                             "from a source checkout or a full wheel") from None
        raise


def _cmd_bench_goodput(args: argparse.Namespace) -> int:
    if args.real:
        run_real_goodput = _lab("loadgen").run_real_goodput
        if args.rounds < 1 or not 0 <= args.warmup <= 600:
            raise SystemExit("epara bench goodput: --rounds must be at least 1, --warmup "
                             "0 to 600")
        print(run_real_goodput(args.trace, args.seconds, args.nodes, args.store, args.json,
                               args.plot, args.policies.split(",") if args.policies else None,
                               args.load, args.bed.split(",") if args.bed else (),
                               args.rounds, args.scenario, args.warmup))
        return 0
    run_goodput_bench = _lab("goodput").run_goodput_bench

    if args.devices < 1 or args.services < 1 or args.jobs < 1:
        raise SystemExit("epara bench goodput: --devices, --services and --jobs must be "
                         "at least 1")
    try:
        print(run_goodput_bench(args.trace, args.json, args.plot, args.quick, args.devices,
                                args.services, args.jobs,
                                progress=lambda line: print(line, file=sys.stderr)))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"epara bench goodput: {exc}") from None
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    with Client(args.socket) as node:
        status = node.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"node {status['node_id']} (epara {status['version']}, pid {status['pid']}, "
          f"up {status['uptime_s']:.0f} s)")
    print(f"socket {status['socket']}, store {status['model_store']}")
    for b in status["backends"]:
        state = ", ".join(b["targets"]) if b["available"] else "unavailable"
        print(f"  backend {b['name']:<7} {state:<20} {b['runtime']}")
    for s in status["services"]:
        p50 = s.get("latency_ms_p50") or s.get("ttft_ms_p50")
        print(f"  model {s['model']:<16} queue {s['queue_depth']:<4} served {s['served']:<6} "
              f"refused {s['refused']:<4} p50 {'-' if p50 is None else f'{p50:.1f} ms'}")
    for name, why in status["unavailable"].items():
        print(f"  not served: {name}: {why}")
    if status.get("cluster"):
        from epara.peer.cli import format_status
        from epara.peer.membership import view_from_dict

        print()
        print(format_status(view_from_dict(status["cluster"])))
    else:
        print("not in a cluster (standalone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
