"""How busy this device's CPUs are, as the leader's plans need it.

The planner's estimates count the work it models (runs, node work around them) at the
rates it routes. A device also does work it does not model: relaying other nodes'
requests, the API's own parsing and encoding, and other applications on the same cores.
A node measures how busy its CPUs are and publishes it (state record ``cpu_busy``); the
scheduler treats what its estimates do not explain as background load on that device
(``scheduler.background_load``).

What is measured: under a CPU quota (a container, a cgroup; the emulated bed's hosts),
this process's CPU time over its allowance (the quota is the device: nothing else runs
there that the node could see); without one, the whole machine's busy share from
``/proc/stat`` (other applications included).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 3.0  # busy share over about this long
MIN_SPAN_S = 1.0  # no figure from a shorter span (a publish period is 0.2 s)


def _proc_stat_busy_idle() -> tuple[float, float] | None:
    """Busy and idle jiffies of all CPUs since boot, or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    values = [float(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, idle


class CpuMeter:
    """Busy share of the device's CPUs over the last ``WINDOW_S`` (0..1).

    ``quota_cpus``: the CPUs this node may use under a quota, None for none. The clocks
    are parameters so that tests can drive them."""

    def __init__(self, quota_cpus: float | None,
                 clock: Callable[[], float] = time.monotonic,
                 process_clock: Callable[[], float] = time.process_time,
                 machine: Callable[[], tuple[float, float] | None] = _proc_stat_busy_idle
                 ) -> None:
        self.quota_cpus = quota_cpus if quota_cpus is not None and quota_cpus > 0 else None
        self._clock = clock
        self._process_clock = process_clock
        self._machine = machine
        # (when, busy, total): busy and total in CPU seconds (quota) or jiffies (machine)
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=64)

    def _reading(self, now: float) -> tuple[float, float] | None:
        if self.quota_cpus is not None:
            return self._process_clock(), now * self.quota_cpus
        counts = self._machine()
        if counts is None:
            return None
        busy, idle = counts
        return busy, busy + idle

    def busy(self) -> float | None:
        """Sample now; the busy share since the oldest sample within the window, or None
        until the samples span ``MIN_SPAN_S``."""
        now = self._clock()
        reading = self._reading(now)
        if reading is None:
            return None
        self._samples.append((now, *reading))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()
        then, busy0, total0 = self._samples[0]
        _, busy1, total1 = self._samples[-1]
        if now - then < MIN_SPAN_S or total1 <= total0:
            return None
        return min(1.0, max(0.0, (busy1 - busy0) / (total1 - total0)))


def device_meter() -> CpuMeter:
    """The meter for this process: its quota if it has one."""
    from epara.peer.capabilities import cpu_quota

    quota = cpu_quota()
    cores = os.cpu_count() or 1
    return CpuMeter(quota if quota is not None and quota < cores else None)
