"""Goodput of epara against the baselines in the simulator, and the scheduler's decision
time at scale. Run by hand (not a test):

    python bench/goodput_sim.py [--trace FILE] [--json] [--plot FILE] [--quick]
    python bench/goodput_sim.py --write-trace FILE [--load 1.0]   # a production-mix trace
    python bench/goodput_sim.py --scale 1000x200                  # decision time

The simulation core lives in ``epara.node.leader.sim`` so the installed package can run it
(``epara bench goodput``); this script only parses arguments.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from epara.node.leader.model import ClusterState, DeviceState, Placement
from epara.node.leader.scheduler import schedule
from epara.node.leader.sim import demand_of, production_workload, run_goodput_bench
from epara.node.leader.workloads import write_trace


def scale(devices: int, services: int) -> str:
    """Decision time of ``schedule`` from scratch, unchanged, and after losing 10%."""
    w = production_workload(1.0, devices=devices, services=services, duration_s=10.0)
    demand = demand_of(w.requests, 0.0, 10.0)
    alive = ClusterState({d.id: DeviceState(d) for d in w.devices})
    dead = {d.id for d in w.devices[::10]}
    lost = ClusterState({d.id: DeviceState(d, alive=d.id not in dead) for d in w.devices})
    lines = [f"{devices} devices x {services} services, {len(w.requests) / 10:.0f} req/s"]
    placement = Placement()
    for label, state in (("fresh", alive), ("unchanged", alive), ("10% lost", lost)):
        start = time.perf_counter()
        placement, decisions = schedule(placement, state, demand, w.services, 0.0)
        took = time.perf_counter() - start
        lines.append(f"  {label:<10} {took * 1000:7.1f} ms  {len(decisions):4d} decisions, "
                     f"{sum(1 for _ in placement.units())} units, version {placement.version}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer loads")
    parser.add_argument("--write-trace", type=Path)
    parser.add_argument("--load", type=float, default=1.0)
    parser.add_argument("--scale", help="DEVICESxSERVICES: time the scheduler")
    args = parser.parse_args()
    if args.write_trace:
        write_trace(args.write_trace, production_workload(args.load).requests)
        return
    if args.scale:
        devices, services = (int(x) for x in args.scale.split("x"))
        print(scale(devices, services))
        return
    print(run_goodput_bench(args.trace, args.json, args.plot, quick=args.quick))


if __name__ == "__main__":
    main()
