"""Device fleets, a service catalogue and trace generators for the simulator (pure).

Every figure below is an assumption with its source; docs/epara-core.md collects them.
Speeds are *effective batch-1* figures (what a single inference achieves), not peaks:
  server  NVIDIA T4 (16 GB, 320 GB/s, 65 TFLOPS fp16 peak). YOLOv8n TensorRT fp16 runs in
          ~1.5 ms (Ultralytics' published T4 speed column), 8.7 GFLOP / 1.5 ms ≈ 6 TFLOPS.
          ResNet-50 on T4 goes from ~1,000 img/s at batch 1 to ~4,500 img/s at large batch
          (NVIDIA's published inference figures): a step's fixed share ≈ 0.75.
  jetson  Jetson Orin NX 16 GB (102 GB/s shared LPDDR5, 100 TOPS int8 sparse). YOLOv8n
          TensorRT fp16 ≈ 4.5 ms (Ultralytics' Jetson guide) → ~2 TFLOPS effective.
  nano    Jetson Orin Nano 8 GB (68 GB/s, 40 TOPS int8 sparse): ~60% of the NX; Llama-3-8B
          int4 decodes at ~10-20 tokens/s (jetson-ai-lab benchmarks) → ~45 GB/s effective.
  pi, pi4g Raspberry Pi 5 8 GB / 4 GB (4x Cortex-A76 2.4 GHz, LPDDR4X 17 GB/s peak).
          YOLOv8n ONNX ≈ 130-150 ms (Ultralytics' Raspberry Pi guide) → ~60 GFLOPS; llama.cpp
          runs a 1B int4 model (0.8 GB) at ~10 tokens/s → ~8 GB/s effective. A CPU step
          scales almost linearly with batch (XNNPACK already uses every core on one input).
Usable memory leaves room for the OS and the runtime (CUDA on Jetsons shares system RAM).
Traces follow docs/trace-format.md: one JSON object per request.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from epara.node.leader.model import DeviceProfile, Layer, ServiceSpec

DEVICE_KINDS: dict[str, DeviceProfile] = {
    "server": DeviceProfile("server", "server", 6000.0, 220.0, 15000.0, "cuda", 10000.0, 0.2,
                            batch_fixed=0.75),
    "jetson": DeviceProfile("jetson", "embedded", 2000.0, 70.0, 13000.0, "jetson", 1000.0,
                            0.5, batch_fixed=0.6),
    "nano": DeviceProfile("nano", "embedded", 1200.0, 45.0, 6000.0, "jetson", 1000.0, 0.5,
                          batch_fixed=0.6),
    "pi": DeviceProfile("pi", "microcomputer", 60.0, 8.0, 6500.0, "", 1000.0, 0.5,
                        batch_fixed=0.05),
    "pi4g": DeviceProfile("pi4g", "microcomputer", 60.0, 8.0, 2800.0, "", 1000.0, 0.5,
                          batch_fixed=0.05),
}
# A mostly-Pi/Jetson edge cloud with a couple of GPU servers (shares of the fleet).
PRODUCTION_FLEET = (("server", 0.05), ("jetson", 0.10), ("nano", 0.20), ("pi", 0.35),
                    ("pi4g", 0.30))


def fleet(n: int, mix: Sequence[tuple[str, float]] = PRODUCTION_FLEET) -> list[DeviceProfile]:
    """``n`` devices in the given proportions (at least one of each kind named)."""
    counts = [max(1, round(n * share)) for _, share in mix]
    counts[-1] = max(1, n - sum(counts[:-1]))
    out = []
    for (kind, _), count in zip(mix, counts, strict=True):
        base = DEVICE_KINDS[kind]
        out += [replace(base, id=f"{kind}-{i:04d}") for i in range(count)]
    return out


def _layers(n: int, weight_mb: float, out_mb: float) -> tuple[Layer, ...]:
    return tuple(Layer(weight_mb / n, 1.0 / n, out_mb) for _ in range(n))


def _llm(name: str, params_b: float, weight_mb: float, memory_mb: float, layers: int,
         hidden: int, slo_ms: float, per_token_ms: float, tokens: float,
         max_batch: int = 8) -> ServiceSpec:
    # 2 FLOPs per parameter per token; a 256-token prompt is the prefill pass. Between
    # stages travels one hidden state per token (fp16).
    return ServiceSpec(
        name, memory_mb=memory_mb, weight_mb=weight_mb, gflop=2 * params_b * 256,
        gflop_per_token=2 * params_b, mean_output_tokens=tokens, slo_ms=slo_ms,
        slo_ms_per_token=per_token_ms, max_batch=max_batch, overhead_ms=2.0,
        input_mb=0.002, layers=_layers(layers, weight_mb, hidden * 2 / 1e6))


# Templates. Vision/text costs: published FLOPs and parameter counts (fp16 weights on
# accelerators; memory adds runtime and activations). LLM sizes: GGUF Q4_K_M files for
# int4, 2 bytes per parameter for fp16; memory adds a KV cache for a batch of 8 at ~1k
# context. SLOs: interactive vision 100-300 ms; chat: time to first token 1-3 s and a
# per-token budget near reading speed (~5-7 tokens/s), looser for the big "deep answer"
# tier; streams must finish a frame within a few frame periods.
TEMPLATES: dict[str, ServiceSpec] = {
    # Chats (latency-sensitive): SmolLM2-135M fp16, SmolLM2-360M fp16, Llama-3.2-1B int4,
    # Llama-3.2-3B int4, Llama-3-8B int4, Qwen2.5-14B int4 (fits a 16 GB Orin NX or a T4
    # only), Qwen2.5-32B int4 (19.9 GB: fits no single device; 2-4 devices pipelined).
    "chat-135m": _llm("chat-135m", 0.135, 270, 400, 30, 576, 1000, 100, 80),
    "chat-360m": _llm("chat-360m", 0.36, 720, 900, 32, 960, 1000, 120, 100),
    "chat-1b": _llm("chat-1b", 1.2, 800, 1300, 16, 2048, 1500, 150, 120),
    "chat-3b": _llm("chat-3b", 3.2, 2000, 2700, 28, 3072, 2000, 150, 150),
    "chat-8b": _llm("chat-8b", 8.0, 4900, 5800, 32, 4096, 2000, 150, 150),
    "chat-14b": _llm("chat-14b", 14.7, 9000, 10500, 48, 5120, 3000, 250, 150),
    "chat-32b": _llm("chat-32b", 32.8, 19900, 22000, 64, 5120, 4000, 400, 150),
    # Frequency-sensitive camera streams: DeepLabv3-MobileNetV2 at 513x513 (~5.5 GFLOP),
    # MediaPipe selfie segmentation at 256x256 (~0.3 GFLOP), YOLOv8s detection at 640
    # (28.6 GFLOP).
    "seg-stream": ServiceSpec(
        "seg-stream", memory_mb=150, weight_mb=10, gflop=5.5, category="frequency",
        target_rate_hz=15, slo_ms=200, max_batch=32, overhead_ms=1.0, input_mb=0.6,
        layers=_layers(8, 10, 0.4)),
    "selfie-stream": ServiceSpec(
        "selfie-stream", memory_mb=30, weight_mb=1, gflop=0.3, category="frequency",
        target_rate_hz=30, slo_ms=100, max_batch=32, overhead_ms=0.5, input_mb=0.2),
    "det-stream": ServiceSpec(
        "det-stream", memory_mb=200, weight_mb=22, gflop=28.6, category="frequency",
        target_rate_hz=10, slo_ms=300, max_batch=32, overhead_ms=1.0, input_mb=0.6,
        layers=_layers(8, 22, 0.8)),
    # Latency-sensitive requests: MobileNetV2 classification (0.6 GFLOP), YOLOv8n on a
    # photo (8.7 GFLOP), MiniLM-L6 sentence embeddings (128 tokens, ~1.4 GFLOP), BERT-mini
    # intent classification (~0.3 GFLOP), keyword spotting (DS-CNN, ~0.05 GFLOP).
    "classify": ServiceSpec("classify", memory_mb=40, weight_mb=14, gflop=0.6, slo_ms=100,
                            max_batch=32, overhead_ms=0.5, input_mb=0.15),
    "detect": ServiceSpec("detect", memory_mb=80, weight_mb=12, gflop=8.7, slo_ms=300,
                          max_batch=32, overhead_ms=1.0, input_mb=0.6),
    "embed": ServiceSpec("embed", memory_mb=150, weight_mb=90, gflop=1.4, slo_ms=100,
                         max_batch=32, overhead_ms=0.5, input_mb=0.002),
    "intent": ServiceSpec("intent", memory_mb=60, weight_mb=45, gflop=0.3, slo_ms=50,
                          max_batch=32, overhead_ms=0.3, input_mb=0.002),
    "kws": ServiceSpec("kws", memory_mb=10, weight_mb=1, gflop=0.05, slo_ms=50,
                       max_batch=32, overhead_ms=0.3, input_mb=0.03),
}
# How often each kind appears among the catalogue's services: many small vision and text
# models (fine-tunes per customer or site), a quarter LLM chats, some camera pipelines.
KIND_SHARE = (("classify", 0.16), ("detect", 0.10), ("embed", 0.10), ("intent", 0.08),
              ("kws", 0.06), ("seg-stream", 0.08), ("selfie-stream", 0.04),
              ("det-stream", 0.08), ("chat-135m", 0.04), ("chat-360m", 0.04),
              ("chat-1b", 0.06), ("chat-3b", 0.06), ("chat-8b", 0.05), ("chat-14b", 0.03),
              ("chat-32b", 0.02))
# Relative request rate of one service of a kind at equal popularity: a chat turn is a
# person typing, an image or text request is often an automated call.
KIND_RATE = {"chat": 0.1}


def kind_of(name: str) -> str:
    """The template a catalogue service was drawn from (names are ``kind-NNN``)."""
    return name.rsplit("-", 1)[0]


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


def generate(services: Mapping[str, ServiceSpec], shape: WorkloadShape, seed: int = 0,
             devices: int = 0) -> list[Request]:
    """A production-like trace: Zipf popularity, ON/OFF bursts, an optional diurnal
    cycle, steady camera streams, LLM answers of lognormal length."""
    rng = random.Random(seed)
    names = sorted(services)
    streams = [n for n in names if services[n].target_rate_hz]
    others = [n for n in names if not services[n].target_rate_hz]
    rng.shuffle(others)  # popularity rank independent of the name
    rng.shuffle(streams)
    weights = [KIND_RATE.get(kind_of(n).split("-")[0], 1.0) / (i + 1) ** shape.zipf_s
               for i, n in enumerate(others)]
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


# A trace replayed with `epara bench goodput --trace` runs on the production fleet of this
# size, its services drawn from this catalogue (what `bench/goodput_sim.py --write-trace`
# writes from; docs/trace-format.md).
TRACE_DEVICES, TRACE_SERVICES = 40, 150


def production_trace(load: float = 1.0, seed: int = 1, duration_s: float = 60.0,
                     devices: int = TRACE_DEVICES, services: int = TRACE_SERVICES
                     ) -> tuple[list[DeviceProfile], dict[str, ServiceSpec], list[Request]]:
    """The production mix at the trace format's sizes: fleet, catalogue and trace (500
    requests/s and 40 camera streams per 40 devices at x1)."""
    catalog = catalogue(services, seed)
    shape = WorkloadShape(duration_s=duration_s, rate_hz=500.0 * load * devices / 40,
                          streams=max(1, round(40 * load * devices / 40)),
                          diurnal_period_s=duration_s, diurnal_depth=0.4)
    return fleet(devices), catalog, generate(catalog, shape, seed, devices)


# --- the benchmark mixes ---------------------------------------------------------------------

@dataclass(frozen=True)
class Mix:
    """A workload family: a fleet, a catalogue drawn per seed, and the traffic at load x1
    (the bench scales it by a load multiplier to find each system's goodput)."""

    name: str
    devices: int
    fleet: tuple[tuple[str, float], ...]
    services: int
    kinds: tuple[tuple[str, float], ...]
    rate_hz: float  # non-stream requests per second at x1
    streams: int  # camera streams at x1
    target: float = 0.90  # the attainment the headline goodput keeps
    stream_hz: float | None = None  # every stream at this frame rate (None: the template's)
    slo_scale: Mapping[str, float] | None = None  # kind -> SLO multiplier
    diurnal: bool = False
    note: str = ""

    def catalogue(self, seed: int) -> dict[str, ServiceSpec]:
        out = catalogue(self.services, seed, self.kinds)
        for name, spec in out.items():
            if self.stream_hz and spec.target_rate_hz:
                spec = replace(spec, target_rate_hz=self.stream_hz)
            scale = (self.slo_scale or {}).get(kind_of(name))
            if scale:
                spec = replace(spec, slo_ms=spec.slo_ms * scale)
            out[name] = spec
        return out

    def trace(self, load: float, seed: int, duration_s: float,
              services: Mapping[str, ServiceSpec] | None = None) -> list[Request]:
        shape = WorkloadShape(duration_s=duration_s, rate_hz=self.rate_hz * load,
                              streams=max(0, round(self.streams * load)),
                              diurnal_period_s=duration_s if self.diurnal else 0.0,
                              diurnal_depth=0.4)
        return generate(services or self.catalogue(seed), shape, seed, self.devices)


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("production", 12, PRODUCTION_FLEET, 30, KIND_SHARE, 150.0, 12, diurnal=True,
        note="Zipf over many services, bursts, a diurnal swing, camera streams, chats "
             "of every size, on a mostly Pi/Jetson fleet"),
    Mix("edge-llm", 12, (("jetson", 0.2), ("nano", 0.3), ("pi", 0.3), ("pi4g", 0.2)), 12,
        (("chat-1b", 0.15), ("chat-3b", 0.15), ("chat-8b", 0.2), ("chat-14b", 0.15),
         ("chat-32b", 0.05), ("classify", 0.1), ("embed", 0.1), ("kws", 0.1)), 30.0, 0,
        note="chats carry most device-seconds; the 8B-32B tiers need pipelines on 4-8 GB "
             "devices"),
    Mix("camera", 12, (("jetson", 0.15), ("nano", 0.25), ("pi", 0.6)), 10,
        (("selfie-stream", 0.3), ("seg-stream", 0.3), ("det-stream", 0.2),
         ("classify", 0.1), ("detect", 0.1)), 20.0, 16, stream_hz=30.0,
        note="dozens of 30 fps camera streams that only accelerator batching sustains"),
    Mix("latency-critical", 12, PRODUCTION_FLEET, 20,
        (("kws", 0.2), ("intent", 0.2), ("classify", 0.2), ("embed", 0.1),
         ("chat-3b", 0.15), ("chat-8b", 0.15)), 150.0, 0, target=0.99,
        slo_scale={"classify": 0.5, "embed": 0.5, "intent": 0.4, "kws": 0.4},
        note="20-50 ms models beside multi-second chat prefills, judged at 99%"),
)}
