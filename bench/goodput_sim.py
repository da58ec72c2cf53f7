"""Goodput of epara against prior systems in the simulator, and the scheduler's decision
time at scale. Run by hand (not a test):

    python bench/goodput_sim.py [--trace FILE] [--json] [--plot FILE] [--quick] [--jobs N]
    python bench/goodput_sim.py --write-trace FILE [--load 1.0]   # a production-mix trace
    python bench/goodput_sim.py --scale 1000x200                  # decision time

The bench lives in ``epara.node.lab.goodput`` so the installed package can run it
(``epara bench goodput``); this script only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from epara.node.lab.goodput import run_goodput_bench
from epara.node.leader.model import ClusterState, DeviceState, Placement
from epara.node.leader.scheduler import schedule
from epara.node.leader.sim import demand_of
from epara.node.leader.workloads import production_trace, write_trace


def scale(devices: int, services: int) -> str:
    """Decision time of ``schedule`` from scratch, unchanged, and after losing 10%."""
    fleet, catalog, requests = production_trace(1.0, 1, 10.0, devices, services)
    demand = demand_of(requests, 0.0, 10.0)
    alive = ClusterState({d.id: DeviceState(d) for d in fleet})
    dead = {d.id for d in fleet[::10]}
    lost = ClusterState({d.id: DeviceState(d, alive=d.id not in dead) for d in fleet})
    lines = [f"{devices} devices x {services} services, {len(requests) / 10:.0f} req/s"]
    placement = Placement()
    for label, state in (("fresh", alive), ("unchanged", alive), ("10% lost", lost)):
        start, cpu = time.perf_counter(), time.process_time()
        placement, decisions = schedule(placement, state, demand, catalog, 0.0)
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        # CPU time too: on a shared machine the wall clock also counts other work.
        lines.append(f"  {label:<10} {took * 1000:7.1f} ms wall {cpu * 1000:7.1f} ms CPU  "
                     f"{len(decisions):4d} decisions, "
                     f"{sum(1 for _ in placement.units())} units, version {placement.version}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quick", action="store_true", help="shorter runs, two seeds")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--write-trace", type=Path)
    parser.add_argument("--load", type=float, default=1.0)
    parser.add_argument("--scale", help="DEVICESxSERVICES: time the scheduler")
    args = parser.parse_args()
    if args.write_trace:
        write_trace(args.write_trace, production_trace(args.load)[2])
        return
    if args.scale:
        devices, services = (int(x) for x in args.scale.split("x"))
        print(scale(devices, services))
        return
    print(run_goodput_bench(args.trace, args.json, args.plot, args.quick, jobs=args.jobs,
                            progress=lambda line: print(line, file=sys.stderr)))


if __name__ == "__main__":
    main()
