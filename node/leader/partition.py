"""Cutting a model into pipeline stages over devices (pure).

``partition`` chooses the stage count, the cut points and the device of each stage by
dynamic programming over (layers placed so far, devices used so far, device of the last
stage). Devices with the same profile and free memory are interchangeable, so the DP
counts them per group instead of tracking subsets: exact, and small at edge sizes.

Objectives: ``throughput`` minimises the bottleneck (the slowest stage or link, with full
micro-batches); ``latency`` minimises one pass's end-to-end time (all stages and links in
turn, batch 1). Ties go to fewer stages: fewer devices, fewer hops, less to fail.

``proportional_split`` is the baseline that llama.cpp RPC and Petals-style systems use:
every device gets a share of the layers in proportion to its memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from epara.node.leader.estimate import stage_cost
from epara.node.leader.model import DeviceProfile, ServiceSpec, Stage

Objective = Literal["throughput", "latency"]
EPS = 1e-12


@dataclass(frozen=True)
class Partition:
    stages: tuple[Stage, ...]
    objective: Objective
    value_s: float  # bottleneck step (throughput) or one pass end to end (latency)
    left_out: tuple[str, ...]  # devices offered but not used
    reason: str


def link_s(a: DeviceProfile, b: DeviceProfile, mb: float) -> float:
    """Moving ``mb`` megabytes from ``a`` to ``b``: the slower link and latency decide."""
    return 0.0 if a.id == b.id else _hop(a, b, mb)


def _hop(a: DeviceProfile, b: DeviceProfile, mb: float) -> float:
    # Between two distinct devices (in the DP, two members of one group share a profile).
    return max(a.link_latency_ms, b.link_latency_ms) / 1000 + \
        mb * 8 / min(a.link_mbps, b.link_mbps)


def _pass_gflop(spec: ServiceSpec) -> float:
    # LLM decode dominates a request's time; one vision pass is the whole request.
    return spec.gflop_per_token if spec.is_llm else spec.gflop


def stage_time(spec: ServiceSpec, device: DeviceProfile, first: int, end: int,
               batch: int) -> float:
    return stage_cost(spec, device, first, end).time(batch * _pass_gflop(spec))


def plan_value(spec: ServiceSpec, stages: Sequence[tuple[DeviceProfile, int, int]],
               objective: Objective, batch: int) -> float:
    """The objective of an explicit plan, (device, first, end) per stage; used by the DP's
    tests (brute force) and to explain plans."""
    b = batch if objective == "throughput" else 1
    parts = [stage_time(spec, d, a, e, b) for d, a, e in stages]
    parts += [link_s(stages[i][0], stages[i + 1][0], spec.layers[stages[i][2] - 1].out_mb * b)
              for i in range(len(stages) - 1)]
    return max(parts) if objective == "throughput" else sum(parts)


def partition(spec: ServiceSpec, devices: Sequence[DeviceProfile],
              free_mb: Mapping[str, float], objective: Objective, batch: int = 1,
              max_stages: int = 6, max_cuts: int | None = None,
              memory_steps: int | None = None) -> Partition | None:
    """The best plan for ``spec`` over (a subset of) ``devices``; None if nothing fits.

    ``max_cuts`` limits the candidate cut points to about that many evenly spaced ones
    (exact over those): a 60-layer model need not be cut between every pair of layers
    to find a good plan, and the DP's time grows with the square of the cut points.
    ``memory_steps`` counts free memory in steps of 1/``memory_steps`` of the model
    (rounded down) when grouping devices; None: exact.
    """
    n = len(spec.layers)
    if n == 0:
        return None
    stride = 1 if max_cuts is None or n <= max_cuts else -(-n // max_cuts)
    b = batch if objective == "throughput" else 1
    # Interchangeable devices form one group; the DP counts how many of each it uses.
    # With memory_steps, devices whose free memory differs by crumbs share a group:
    # otherwise each is a group of its own, and the DP's states grow with the product
    # of the group sizes.
    step = spec.memory_mb / memory_steps if memory_steps else 0.0
    groups: dict[tuple[object, ...], list[DeviceProfile]] = {}
    for d in sorted(devices, key=lambda d: d.id):
        room = free_mb.get(d.id, d.mem_mb)
        if step > 0:
            room = step * ((room + EPS) // step)
        groups.setdefault((d.profile_key(), room), []).append(d)
    reps = [members[0] for members in groups.values()]
    sizes = [len(members) for members in groups.values()]
    free = [float(key[1]) for key in groups]  # type: ignore[arg-type]
    weight = [0.0, *accumulate(layer.weight_mb for layer in spec.layers)]
    share = [0.0, *accumulate(layer.compute_share for layer in spec.layers)]
    work = max(0.0, spec.memory_mb - spec.weights)

    def memory(first: int, end: int) -> float:
        return weight[end] - weight[first] + work * (share[end] - share[first])

    # Stage times per group and range, computed once: the DP revisits them many times.
    times: list[dict[tuple[int, int], float]] = []
    cuts = [*range(0, n, stride), n]
    for g, rep in enumerate(reps):
        table = {}
        for first in cuts[:-1]:
            for end in (c for c in cuts if c > first):
                if memory(first, end) > free[g] + EPS:
                    break
                table[first, end] = stage_time(spec, rep, first, end, b)
        times.append(table)
    combine = max if objective == "throughput" else (lambda x, y: x + y)
    State = tuple[int, tuple[int, ...], int]  # layers done, used per group, last group
    best: dict[State, tuple[float, int]] = {}
    back: dict[State, tuple[State | None, int]] = {}
    start_counts = tuple(0 for _ in reps)
    frontier: dict[int, list[State]] = {0: []}
    # Layer index grows along every transition, so processing states by it is topological.
    for first in cuts[:-1]:
        states: list[State | None] = [None] if first == 0 else list(frontier.get(first, []))
        for state in states:
            if state is None:
                value, count, counts, last = 0.0, 0, start_counts, -1
            else:
                value, count = best[state]
                _, counts, last = state
            if count >= max_stages:
                continue
            for g in range(len(reps)):
                if counts[g] >= sizes[g]:
                    continue
                hop = 0.0 if last < 0 else _hop(
                    reps[last], reps[g], spec.layers[first - 1].out_mb * b)
                new_counts = (*counts[:g], counts[g] + 1, *counts[g + 1:])
                for end in (c for c in cuts if c > first):
                    t = times[g].get((first, end))
                    if t is None:
                        break  # longer ranges need even more memory
                    total = combine(combine(value, hop), t)
                    key = (end, new_counts, g)
                    old = best.get(key)
                    if old is None or (total, count + 1) < (old[0] - EPS, old[1]):
                        if old is None and end < n:
                            frontier.setdefault(end, []).append(key)
                        best[key] = (total, count + 1)
                        back[key] = (state, first)
    finals = [k for k in best if k[0] == n]
    if not finals:
        return None
    final = min(finals, key=lambda k: (round(best[k][0], 12), best[k][1], k[1]))
    # Walk back, then give each group's slots to its members in id order.
    chain: list[tuple[int, int, int]] = []
    key: State | None = final
    while key is not None:
        prev, first = back[key]
        chain.append((key[2], first, key[0]))
        key = prev
    chain.reverse()
    taken = [0 for _ in reps]
    members = list(groups.values())
    stages = []
    for g, first, end in chain:
        device = members[g][taken[g]]
        taken[g] += 1
        stages.append(Stage(device.id, first, end, memory(first, end)))
    used = {s.device for s in stages}
    left_out = tuple(sorted(d.id for d in devices if d.id not in used))
    value = best[final][0]
    what = "bottleneck step" if objective == "throughput" else "one pass end to end"
    reason = (f"{len(stages)} stage(s) over {', '.join(s.device for s in stages)}: "
              f"{what} {value * 1000:.1f} ms")
    if left_out:
        reason += (f"; left out {', '.join(left_out)}: adding them would not lower the "
                   f"{what} (slower devices, extra links, or not enough memory)")
    return Partition(tuple(stages), objective, value, left_out, reason)


def proportional_split(spec: ServiceSpec, devices: Sequence[DeviceProfile],
                       free_mb: Mapping[str, float]) -> tuple[Stage, ...] | None:
    """Layers in proportion to each device's free memory, in the given device order
    (the llama.cpp RPC / Petals-style split); None if a share does not fit its device."""
    n = len(spec.layers)
    if n == 0 or not devices:
        return None
    total = sum(free_mb.get(d.id, d.mem_mb) for d in devices)
    if total <= 0:
        return None
    stages = []
    first = 0
    acc = 0.0
    for i, d in enumerate(devices):
        acc += free_mb.get(d.id, d.mem_mb)
        end = n if i == len(devices) - 1 else min(n, round(n * acc / total))
        if end <= first:
            continue
        mem = spec.stage_memory_mb(first, end)
        if mem > free_mb.get(d.id, d.mem_mb) + EPS:
            return None
        stages.append(Stage(d.id, first, end, mem))
        first = end
    return tuple(stages)
