"""Observed demand: what a service's recent arrivals say about the load to plan for (pure).

One function for the node's rate meter and the simulator's leader, so the simulator
plans from exactly what a real leader would see. Besides the mean rate it reports the
rate bursts reach: arrivals come in ON/OFF bursts and daily swings lasting seconds to
hours, far longer than one request's service time, so a queueing formula fed the mean
alone sizes a service for its average second and misses its busy ones. ``peak_hz`` is
the mean plus one standard deviation of the per-second counts (about the 84th
percentile of a second's arrivals): the scheduler sizes capacity for it and values the
result at the mean.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from epara.node.leader.model import ServiceDemand

BIN_S = 1.0  # per-second counts: the time scale of bursts the scheduler must absorb
WINDOW_S = 5.0  # how far back a node and the simulated leader look


def observe(arrivals: Sequence[float], now: float, window_s: float,
            tokens: Sequence[int] = ()) -> ServiceDemand | None:
    """Demand from the arrival times in ``(now - window_s, now]`` (sorted), or None when
    there were none. ``tokens``: output lengths of recent LLM requests."""
    recent = [t for t in arrivals if now - window_s < t <= now]
    if not recent:
        return None
    rate = len(recent) / window_s
    gaps = [b - a for a, b in itertools.pairwise(recent)]
    cv = 1.0
    if len(gaps) > 2:
        mean = sum(gaps) / len(gaps)
        var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
        cv = math.sqrt(var) / mean if mean > 0 else 1.0
    bins = max(1, round(window_s / BIN_S))
    counts = [0] * bins
    for t in recent:
        counts[min(bins - 1, int((t - (now - window_s)) / window_s * bins))] += 1
    per_s = [c / (window_s / bins) for c in counts]
    std = math.sqrt(sum((c - rate) ** 2 for c in per_s) / bins)
    return ServiceDemand(rate, cv, sum(tokens) / len(tokens) if tokens else None,
                         rate + std)
