"""Device fleets, a service catalogue and trace generators for the simulator (pure).

Speeds are effective (sustained) figures derived from published specs, roughly a quarter
to a half of peak, in line with what ``peer/capabilities.py`` measures on CPUs:
  server  NVIDIA T4 edge server: 65 TFLOPS fp16 peak, 320 GB/s, 16 GB
  jetson  Jetson Orin NX 8 GB: ~25 TFLOPS fp16 peak (GPU), 102 GB/s shared LPDDR5
  pi      Raspberry Pi 5 8 GB: ~30 GFLOPS fp32 NEON measured, 17 GB/s peak LPDDR4X
Traces follow docs/trace-format.md: one JSON object per request.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from epara.node.leader.model import DeviceProfile, Layer, ServiceSpec

DEVICE_KINDS: dict[str, DeviceProfile] = {
    "server": DeviceProfile("server", "server", 16000.0, 250.0, 14000.0, "cuda", 10000.0, 0.2),
    "jetson": DeviceProfile("jetson", "embedded", 2500.0, 55.0, 5500.0, "jetson", 1000.0, 0.5),
    "pi": DeviceProfile("pi", "microcomputer", 25.0, 8.0, 6000.0, "", 1000.0, 0.5),
}
PRODUCTION_FLEET = (("server", 0.05), ("jetson", 0.25), ("pi", 0.70))


def fleet(n: int, mix: Sequence[tuple[str, float]] = PRODUCTION_FLEET) -> list[DeviceProfile]:
    """``n`` devices in the given proportions (at least one of each kind named)."""
    counts = [max(1, round(n * share)) for _, share in mix]
    counts[-1] = max(1, n - sum(counts[:-1]))
    out = []
    for (kind, _), count in zip(mix, counts, strict=True):
        base = DEVICE_KINDS[kind]
        out += [DeviceProfile(f"{kind}-{i:04d}", base.device_class, base.gflops,
                              base.mem_bandwidth_gbs, base.mem_mb, base.accelerator,
                              base.link_mbps, base.link_latency_ms) for i in range(count)]
    return out


def _layers(n: int, weight_mb: float, out_mb: float) -> tuple[Layer, ...]:
    return tuple(Layer(weight_mb / n, 1.0 / n, out_mb) for _ in range(n))


# Templates: (kind, spec). Costs from the models' published sizes: FLOPs per pass, Q4
# weights for LLMs (2 FLOPs per parameter per token, 256-token prompts).
TEMPLATES: dict[str, ServiceSpec] = {
    "chat-1b": ServiceSpec(
        "chat-1b", memory_mb=1400, weight_mb=800, gflop=2.5 * 256, gflop_per_token=2.5,
        mean_output_tokens=120, slo_ms=1500, slo_ms_per_token=60, max_batch=16,
        overhead_ms=2.0, input_mb=0.002, layers=_layers(16, 800, 0.008)),
    "chat-8b": ServiceSpec(
        "chat-8b", memory_mb=6500, weight_mb=4900, gflop=16 * 256, gflop_per_token=16,
        mean_output_tokens=150, slo_ms=2000, slo_ms_per_token=100, max_batch=16,
        overhead_ms=3.0, input_mb=0.002, layers=_layers(32, 4900, 0.016)),
    "chat-30b": ServiceSpec(
        "chat-30b", memory_mb=20000, weight_mb=18000, gflop=60 * 256, gflop_per_token=60,
        mean_output_tokens=150, slo_ms=3000, slo_ms_per_token=150, max_batch=8,
        overhead_ms=4.0, input_mb=0.002, layers=_layers(60, 18000, 0.026)),
    "seg-stream": ServiceSpec(
        "seg-stream", memory_mb=120, weight_mb=20, gflop=6.0, category="frequency",
        target_rate_hz=15, slo_ms=250, max_batch=8, overhead_ms=1.0, input_mb=0.6,
        layers=_layers(8, 20, 0.4)),
    "classify": ServiceSpec("classify", memory_mb=40, weight_mb=14, gflop=0.6, slo_ms=100,
                            max_batch=8, overhead_ms=0.5, input_mb=0.15),
    "detect": ServiceSpec("detect", memory_mb=80, weight_mb=12, gflop=8.7, slo_ms=200,
                          max_batch=8, overhead_ms=1.0, input_mb=0.6),
    "embed": ServiceSpec("embed", memory_mb=150, weight_mb=90, gflop=2.0, slo_ms=100,
                         max_batch=16, overhead_ms=0.5, input_mb=0.002),
    "ocr": ServiceSpec("ocr", memory_mb=60, weight_mb=5, gflop=5.0, slo_ms=300,
                       max_batch=4, overhead_ms=1.0, input_mb=0.3),
    "kws": ServiceSpec("kws", memory_mb=10, weight_mb=1, gflop=0.05, slo_ms=50,
                       max_batch=16, overhead_ms=0.3, input_mb=0.03),
}
# How often each kind appears among the catalogue's services (production-like mix).
KIND_SHARE = (("classify", 0.2), ("detect", 0.15), ("embed", 0.15), ("ocr", 0.1),
              ("kws", 0.1), ("seg-stream", 0.15), ("chat-1b", 0.1), ("chat-8b", 0.04),
              ("chat-30b", 0.01))


def catalogue(n: int, seed: int = 0,
              kinds: Sequence[tuple[str, float]] = KIND_SHARE) -> dict[str, ServiceSpec]:
    """``n`` services drawn from the templates (variants: fine-tunes of the same size)."""
    rng = random.Random(seed)
    names, weights = zip(*kinds, strict=True)
    out: dict[str, ServiceSpec] = {}
    # Every kind at least once (if n allows), then by share.
    picks = list(names[:n]) + rng.choices(names, weights, k=max(0, n - len(names)))
    rng.shuffle(picks)
    for i, kind in enumerate(picks):
        base = TEMPLATES[kind]
        name = f"{kind}-{i:03d}"
        out[name] = replace(base, name=name)
    return out


@dataclass(frozen=True)
class Request:
    t: float
    service: str
    slo_ms: float
    output_tokens: int = 0
    input_size: float = 0.0  # MB
    origin: int = -1  # index of the receiving device, -1: chosen by the simulator

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"t": round(self.t, 6), "service": self.service,
                                  "input_size": self.input_size, "slo_ms": self.slo_ms}
        if self.output_tokens:
            out["output_tokens"] = self.output_tokens
        if self.origin >= 0:
            out["origin"] = self.origin
        return out

    @staticmethod
    def from_json(data: dict[str, object]) -> Request:
        return Request(float(data["t"]), str(data["service"]),  # type: ignore[arg-type]
                       float(data["slo_ms"]),  # type: ignore[arg-type]
                       int(data.get("output_tokens", 0)),  # type: ignore[call-overload]
                       float(data.get("input_size", 0.0)),  # type: ignore[arg-type]
                       int(data.get("origin", -1)))  # type: ignore[call-overload]


def write_trace(path: Path, requests: Iterable[Request]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for r in requests:
            handle.write(json.dumps(r.to_json()) + "\n")


def read_trace(path: Path) -> list[Request]:
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                out.append(Request.from_json(json.loads(line)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad trace line: {exc}") from None
    out.sort(key=lambda r: r.t)
    return out


@dataclass(frozen=True)
class WorkloadShape:
    duration_s: float = 60.0
    rate_hz: float = 200.0  # mean requests per second over the non-stream services
    streams: int = 20  # camera streams over the stream services
    zipf_s: float = 1.1  # popularity skew across services
    burst_on_s: float = 4.0  # MMPP: mean ON and OFF period
    burst_high: float = 1.7  # rate multiplier while ON (OFF gets 2 - this)
    diurnal_period_s: float = 0.0  # 0: none; else a sine of this period
    diurnal_depth: float = 0.5


def generate(services: dict[str, ServiceSpec], shape: WorkloadShape, seed: int = 0,
             devices: int = 0) -> list[Request]:
    """A production-like trace: Zipf popularity, ON/OFF bursts, an optional diurnal
    cycle, steady camera streams, LLM answers of lognormal length."""
    rng = random.Random(seed)
    names = sorted(services)
    streams = [n for n in names if services[n].target_rate_hz]
    others = [n for n in names if not services[n].target_rate_hz]
    rng.shuffle(others)  # popularity rank independent of the name
    rng.shuffle(streams)
    weights = [1 / (i + 1) ** shape.zipf_s for i in range(len(others))]
    total = sum(weights)
    out: list[Request] = []
    peak = 1 + (shape.diurnal_depth if shape.diurnal_period_s else 0.0)
    for name, w in zip(others, weights, strict=True):
        spec = services[name]
        mean = shape.rate_hz * w / total
        t, on = 0.0, rng.random() < 0.5
        switch = rng.expovariate(1 / shape.burst_on_s)
        while True:
            level = shape.burst_high if on else 2 - shape.burst_high
            t += rng.expovariate(mean * level * peak) if mean > 0 else shape.duration_s
            while t > switch:  # the state changed meanwhile: restart from the switch
                on = not on
                t = switch + rng.expovariate(mean * (shape.burst_high if on else
                                                     2 - shape.burst_high) * peak)
                switch += rng.expovariate(1 / shape.burst_on_s)
            if t >= shape.duration_s:
                break
            if shape.diurnal_period_s:
                phase = math.sin(2 * math.pi * t / shape.diurnal_period_s)
                if rng.random() > (1 + shape.diurnal_depth * phase) / peak:
                    continue  # thinning: the cycle's trough keeps fewer arrivals
            tokens = 0
            if spec.is_llm:
                tokens = max(1, min(1024, round(rng.lognormvariate(
                    math.log(spec.mean_output_tokens) - 0.32, 0.8))))
            out.append(Request(t, name, spec.deadline_ms(tokens) if tokens else spec.slo_ms,
                               tokens, spec.input_mb,
                               rng.randrange(devices) if devices else -1))
    # Streams: Zipf over stream services too (a few services carry most cameras).
    sweights = [1 / (i + 1) ** shape.zipf_s for i in range(len(streams))]
    for _ in range(shape.streams if streams else 0):
        name = rng.choices(streams, sweights)[0]
        spec = services[name]
        period = 1 / (spec.target_rate_hz or 10.0)
        origin = rng.randrange(devices) if devices else -1
        t = rng.random() * period
        while t < shape.duration_s:
            jitter = rng.uniform(-0.05, 0.05) * period
            out.append(Request(max(0.0, t + jitter), name, spec.slo_ms, 0, spec.input_mb,
                               origin))
            t += period
    out.sort(key=lambda r: (r.t, r.service))
    return out
