"""What this device can do: hardware, runtimes, and two short measured speeds.

The slow parts (the matmul and copy benchmarks, importing runtimes to list providers)
are cached per boot in ``<cache_dir>/capabilities-<boot id>.json``: hardware and
installed packages rarely change without a reboot, and a restarting node should rejoin
in well under a second. Free memory and battery are read live on every call.

A speed measured while the machine is busy is a fraction of the device's (a probe at
load 35 on 2 cores saw 2 GFLOP/s of ~140), so the cache records the load per core each
speed was measured at. Measured at a quiet moment, a speed stands for the boot;
otherwise ``speed_probe_due`` (pure) asks for another measurement once the machine is
quieter than at the quietest one so far, at most once a minute, and the device keeps
the best it has seen (``best_speed``): a busy machine makes a benchmark slower, never
faster. A running member re-checks each heartbeat and republishes a better figure;
peers refetch a record whose headline no longer matches it (``record_outdated``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: speeds carry the load they were measured at
# A speed measured at or under this load per core is the device's (for the boot). Half a
# core's worth of other work costs a multi-threaded matmul little; 2 runnable tasks per
# core already halve it.
QUIET_LOAD_PER_CORE = 0.5
REPROBE_AFTER_S = 60.0  # at most one re-measurement a minute while none was quiet
RUNTIME_MODULES = ("onnxruntime", "ai_edge_litert", "tflite_runtime", "torch")

# Runs in a child process: importing a runtime can take seconds (torch), allocate
# hundreds of MB, or crash (tflite_runtime with numpy 2); none of that should touch the
# node. It prints one JSON object: module -> {"version", "providers"}.
_PROBE_SCRIPT = r"""
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
    except Exception:
        continue
    info = {"version": str(getattr(mod, "__version__", "") or ""), "providers": []}
    try:
        if name == "onnxruntime":
            info["providers"] = list(mod.get_available_providers())
        elif name == "torch":
            info["providers"] = ["cpu"]
            if mod.cuda.is_available():
                info["providers"].append("cuda")
            mps = getattr(getattr(mod, "backends", None), "mps", None)
            if mps is not None and mps.is_available():
                info["providers"].append("mps")
        else:
            info["providers"] = ["cpu"]
    except Exception:
        pass
    out[name] = info
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "cuda", "jetson", "npu"
    name: str
    memory_mb: int = 0


@dataclass(frozen=True)
class Runtime:
    name: str
    version: str
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Capabilities:
    hostname: str
    machine: str
    cpu_model: str
    cpu_cores: int
    mem_total_mb: int
    mem_free_mb: int
    accelerators: tuple[Accelerator, ...]
    runtimes: tuple[Runtime, ...]
    gflops: float
    mem_bandwidth_gbs: float
    device_class: str  # "server" | "embedded" | "microcomputer"
    power_source: str  # "mains" | "battery" | "unknown"
    battery_percent: int | None = None
    board_model: str = ""  # device-tree model (Jetson, Raspberry Pi), "" elsewhere
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        fields = dict(data)
        fields["accelerators"] = tuple(Accelerator(**a) for a in data.get("accelerators", ()))
        fields["runtimes"] = tuple(
            Runtime(r["name"], r["version"], tuple(r.get("providers", ())))
            for r in data.get("runtimes", ()))
        return cls(**fields)

    def headline(self) -> dict[str, Any]:
        """The few numbers that fit an mDNS TXT record (everything else: ask the node)."""
        return {
            "cls": self.device_class,
            "cpu": self.cpu_cores,
            "mem": self.mem_total_mb,
            "gf": round(self.gflops, 1),
            "acc": ",".join(sorted({a.kind for a in self.accelerators})),
        }


# --- probes (each tolerant of missing files: embedded boards expose different things) ---

def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id").strip() or "unknown-boot"


def meminfo() -> tuple[int, int]:
    """(total, available) in MiB from /proc/meminfo; (0, 0) when absent."""
    values: dict[str, int] = {}
    for line in _read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0])  # kB
    total = values.get("MemTotal", 0)
    free = values.get("MemAvailable", values.get("MemFree", 0))
    return total // 1024, free // 1024


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        # x86 says "model name"; many ARM kernels only say "Hardware" or "Model".
        if key.strip() in ("model name", "Hardware", "Model", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def board_model() -> str:
    return _read("/proc/device-tree/model").strip("\x00\n ")


def cuda_devices() -> tuple[Accelerator, ...]:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        devices = []
        for line in out.splitlines():
            name, _, mem = line.rpartition(",")
            if name.strip():
                devices.append(Accelerator("cuda", name.strip(),
                                           int(float(mem)) if mem.strip() else 0))
        if devices:
            return tuple(devices)
    # Without nvidia-smi the driver still lists its GPUs (no memory size there).
    gpus = Path("/proc/driver/nvidia/gpus")
    found = []
    if gpus.is_dir():
        for entry in sorted(gpus.iterdir()):
            info = _read(str(entry / "information"))
            name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                         if line.startswith("Model:")), "NVIDIA GPU")
            found.append(Accelerator("cuda", name))
    return tuple(found)


def jetson(model: str) -> Accelerator | None:
    release = _read("/etc/nv_tegra_release")
    if release or "jetson" in model.lower() or "tegra" in model.lower():
        name = model or release.split(",")[0].strip("# \n") or "Jetson"
        return Accelerator("jetson", name)
    return None


def npus() -> tuple[Accelerator, ...]:
    found: list[Accelerator] = []
    dev = Path("/dev")
    for pattern, name in (("apex_*", "Google Coral Edge TPU"), ("hailo*", "Hailo"),
                          ("rknpu*", "Rockchip NPU"), ("accel/accel*", "NPU (accel)")):
        found.extend(Accelerator("npu", f"{name} ({p.name})") for p in sorted(dev.glob(pattern)))
    return tuple(found)


def power() -> tuple[str, int | None]:
    """("mains"|"battery"|"unknown", battery percent or None) from /sys/class/power_supply."""
    root = Path("/sys/class/power_supply")
    if not root.is_dir():
        return "unknown", None
    on_mains = None
    battery: int | None = None
    for supply in sorted(root.iterdir()):
        kind = _read(str(supply / "type")).strip()
        if kind == "Battery":
            capacity = _read(str(supply / "capacity")).strip()
            if capacity.isdigit():
                battery = int(capacity)
        elif kind in ("Mains", "USB", "USB_C", "USB_PD") and _read(
                str(supply / "online")).strip() == "1":
            on_mains = True
    if on_mains or (battery is None and on_mains is None):
        return ("mains" if on_mains else "unknown"), battery
    return "battery", battery


def classify_device(machine: str, board: str, accelerators: tuple[Accelerator, ...],
                    mem_total_mb: int) -> str:
    """Device class from hardware facts (pure).

    server: a discrete CUDA GPU, or an x86 machine with at least 2 GiB;
    embedded: an edge accelerator (Jetson, NPU) or any other ARM/RISC-V board with
    enough memory to serve a model; microcomputer: a single-board computer without an
    accelerator and with less than 4 GiB, or any device under 2 GiB.
    """
    kinds = {a.kind for a in accelerators}
    if "cuda" in kinds and "jetson" not in kinds:
        return "server"
    if "jetson" in kinds or "npu" in kinds:
        return "embedded"
    if mem_total_mb and mem_total_mb < 2048:
        return "microcomputer"
    if machine in ("x86_64", "AMD64", "i686"):
        return "server"
    if board and mem_total_mb < 4096:
        return "microcomputer"
    return "embedded"


# --- speeds under load (decisions pure; measuring in the functions after) ---

@dataclass(frozen=True)
class SpeedSample:
    """The best speeds measured this boot, and how loaded the machine was."""

    gflops: float
    mem_bandwidth_gbs: float
    load_per_core: float  # the least load per core any measurement so far was taken at
    measured_at: float  # wall-clock seconds of the latest measurement

    @property
    def quiet(self) -> bool:
        return self.load_per_core <= QUIET_LOAD_PER_CORE

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SpeedSample | None:
        """The sample in a cache or capability record; None when absent or malformed."""
        if not isinstance(data, dict):
            return None
        try:
            values = [float(data[k]) for k in ("gflops", "mem_bandwidth_gbs",
                                               "load_per_core", "measured_at")]
        except (KeyError, TypeError, ValueError):
            return None
        if not all(math.isfinite(v) and v >= 0 for v in values):
            return None
        return cls(*values)


def speed_probe_due(best: SpeedSample | None, load_per_core_now: float, now: float) -> bool:
    """Whether to measure the speeds again: never measured; or every measurement so far
    was taken under load, the last one at least REPROBE_AFTER_S ago, and the machine is
    quieter now than at the quietest of them (a clock step back counts as time passed)."""
    if best is None:
        return True
    if best.quiet:
        return False
    if 0 <= now - best.measured_at < REPROBE_AFTER_S:
        return False
    return load_per_core_now < best.load_per_core


def best_speed(best: SpeedSample | None, new: SpeedSample) -> SpeedSample:
    """Fold a new measurement in: the fastest of each speed (load only ever slows a
    benchmark), the quietest load seen, the newest time (which paces re-measuring)."""
    if best is None:
        return new
    return SpeedSample(max(best.gflops, new.gflops),
                       max(best.mem_bandwidth_gbs, new.mem_bandwidth_gbs),
                       min(best.load_per_core, new.load_per_core), new.measured_at)


def record_outdated(capabilities: Any, headline: Any) -> bool:
    """Whether a peer's fetched capability record is older than the headline it
    publishes with every state record (its speed was re-measured since the fetch)."""
    if not isinstance(capabilities, dict) or not isinstance(headline, dict):
        return False
    published, held = headline.get("gf"), capabilities.get("gflops")
    if not isinstance(published, (int, float)) or not isinstance(held, (int, float)):
        return False
    return round(float(held), 1) != round(float(published), 1)


def load_per_core() -> float:
    """Other work competing for this device's cores now: the larger of the 1-minute load
    average (slow to rise) and the tasks runnable at this instant besides this one (a
    burst that started seconds ago), per usable core."""
    fields = _read("/proc/loadavg").split()
    try:
        average = float(fields[0])
        runnable = max(0, int(fields[3].split("/")[0]) - 1)
    except (IndexError, ValueError):
        try:
            average, runnable = os.getloadavg()[0], 0
        except OSError:
            return 0.0
    return max(average, runnable) / usable_cores()


def measure_speed() -> SpeedSample:
    load = load_per_core()  # before: the benchmark's own threads are not other work
    gflops, bandwidth = measure_gflops(), measure_bandwidth()
    # The busier of before and after: a load that arrives mid-measurement counts too.
    return SpeedSample(gflops, bandwidth, max(load, load_per_core()), time.time())


# --- measurements ---

def cpu_quota() -> float | None:
    """CPUs this process may use under a CFS bandwidth limit (a container's --cpus, a
    cgroup's quota), or None when unlimited. Short benchmarks run at full speed inside
    a quota's period, so measured speed alone overstates a limited node."""
    for line in _read("/proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: cpu.max is "quota period" or "max period"
            fields = _read(f"/sys/fs/cgroup{path}/cpu.max").split()
            if len(fields) == 2 and fields[0] != "max":
                return int(fields[0]) / int(fields[1])
        elif "cpu" in controllers.split(","):
            root = "/sys/fs/cgroup/" + controllers
            quota = _read(f"{root}{path}/cpu.cfs_quota_us").strip()
            period = _read(f"{root}{path}/cpu.cfs_period_us").strip()
            if quota and period and int(quota) > 0:
                return int(quota) / int(period)
    return None


def measure_gflops(seconds: float = 0.2) -> float:
    """Sustained float32 matmul speed (GFLOP/s), best of repeated runs in ~``seconds``."""
    n = 256
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b  # warm up BLAS threads outside the timed loop
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 / elapsed / 1e9)
    return best


def measure_bandwidth(seconds: float = 0.1) -> float:
    """Memory copy bandwidth (GB/s, read+write counted), 32 MiB buffers beyond caches."""
    src = np.ones(8 * 1024 * 1024, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        np.copyto(dst, src)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * src.nbytes / elapsed / 1e9)
    return best


def probe_runtimes(timeout: float = 60.0) -> tuple[Runtime, ...]:
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, *RUNTIME_MODULES],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
        found = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("runtime probe failed: %s", exc)
        found = {}
    return tuple(Runtime(name, info.get("version", ""), tuple(info.get("providers", ())))
                 for name, info in sorted(found.items()))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "epara"


def _cache_path(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / f"capabilities-{boot_id()}.json"


def _measured(cache_dir: Path | None) -> dict[str, Any]:
    """The slow, per-boot part: speeds, runtimes, accelerators (cached); the speeds
    measured again when ``speed_probe_due`` says so, keeping the best."""
    cache = _cache_path(cache_dir)
    data: dict[str, Any] | None = None
    try:
        data = json.loads(cache.read_text())
        if not isinstance(data, dict) or data.get("cache_version") != CACHE_VERSION:
            data = None
    except (OSError, ValueError):
        pass
    best = SpeedSample.from_json(data.get("speed")) if data else None
    if data is not None and best is not None and \
            not speed_probe_due(best, load_per_core(), time.time()):
        return data
    if data is None or best is None:
        data = {"cache_version": CACHE_VERSION,
                "runtimes": [asdict(r) for r in probe_runtimes()],
                "accelerators": [asdict(a) for a in cuda_devices()]}
    merged = best_speed(best, measure_speed())
    if best is not None and merged.gflops > best.gflops:
        log.info("capability probe: %.1f GFLOP/s at load %.2f per core (was %.1f)",
                 merged.gflops, merged.load_per_core, best.gflops)
    data["speed"] = merged.to_json()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, cache)
    except OSError as exc:
        log.debug("cannot cache capabilities at %s: %s", cache, exc)
    return data


def probe(cache_dir: Path | None = None) -> Capabilities:
    """Measure this device (fast after the first call of a boot)."""
    measured = _measured(cache_dir)
    board = board_model()
    accelerators = tuple(Accelerator(**a) for a in measured["accelerators"])
    tegra = jetson(board)
    if tegra is not None:
        accelerators += (tegra,)
    accelerators += npus()
    total, free = meminfo()
    source, battery = power()
    machine = platform.machine()
    cores = usable_cores()
    speed = SpeedSample.from_json(measured["speed"])
    assert speed is not None  # _measured wrote it
    gflops = speed.gflops
    quota = cpu_quota()
    if quota is not None and quota < cores:
        # The matmul benchmark used every core; under a quota the node sustains only
        # its share (the measurement is cached per boot, the quota applies on top).
        gflops *= quota / cores
        cores = max(1, math.ceil(quota))
    return Capabilities(
        hostname=platform.node(),
        machine=machine,
        cpu_model=cpu_model(),
        cpu_cores=cores,
        mem_total_mb=total,
        mem_free_mb=free,
        accelerators=accelerators,
        runtimes=tuple(Runtime(r["name"], r["version"], tuple(r["providers"]))
                       for r in measured["runtimes"]),
        gflops=round(gflops, 2),
        mem_bandwidth_gbs=round(speed.mem_bandwidth_gbs, 2),
        device_class=classify_device(machine, board, accelerators, total),
        power_source=source,
        battery_percent=battery,
        board_model=board,
        # How settled the speeds are (docs/peer.md): a member re-measures from this.
        extra={"speed": speed.to_json()},
    )


if __name__ == "__main__":
    print(json.dumps(probe().to_dict(), indent=2))
