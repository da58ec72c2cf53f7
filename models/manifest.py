"""What a model is: the manifest file that sits beside the model's files.

A model directory holds ``manifest.json`` and the files it names. The manifest says what
the model computes (task), what it takes and gives (tensor specs), which backend runs it,
how much memory it needs, and hints for the scheduler (category, SLO, batching).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
BACKEND_NAMES = ("onnx", "tflite", "torch")
Category = Literal["latency", "frequency"]
Dim = int | None  # None: any size (a dynamic or symbolic dimension)


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent with its files."""


class InputError(ValueError):
    """Inputs that do not match a model's declared tensors."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TensorSpec:
        try:
            name, dtype, shape = data["name"], data["dtype"], data["shape"]
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"tensor spec needs name, dtype and shape: {data!r}") from exc
        try:
            np.dtype(dtype)
        except TypeError as exc:
            raise ManifestError(f"tensor {name!r}: unknown dtype {dtype!r}") from exc
        dims: list[Dim] = []
        for d in shape:
            if d is None or isinstance(d, str) or (isinstance(d, int) and d < 0):
                dims.append(None)
            elif isinstance(d, int):
                dims.append(d)
            else:
                raise ManifestError(f"tensor {name!r}: bad dimension {d!r}")
        return TensorSpec(str(name), str(np.dtype(dtype).name), tuple(dims))


@dataclass(frozen=True)
class Hints:
    """What the scheduler should know about the service built from this model."""

    category: Category = "latency"
    slo_ms: float | None = None  # latency-sensitive: per-request deadline target
    target_rate_hz: float | None = None  # frequency-sensitive: stream rate target
    batch_axis: int | None = None  # axis along which requests can be stacked, if any
    max_batch: int = 1
    max_wait_ms: float = 2.0
    max_queue: int = 256

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Hints:
        known = {k: v for k, v in data.items() if k in Hints.__dataclass_fields__}
        hints = Hints(**known)
        if hints.category not in ("latency", "frequency"):
            raise ManifestError(f"hints.category must be 'latency' or 'frequency', "
                                f"got {hints.category!r}")
        if hints.max_batch < 1 or hints.max_queue < 1 or hints.max_wait_ms < 0:
            raise ManifestError("hints: max_batch and max_queue must be >= 1, "
                                "max_wait_ms >= 0")
        return hints


@dataclass(frozen=True)
class Manifest:
    name: str
    task: str
    backend: str
    files: Mapping[str, str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    memory_mb: float
    hints: Hints = field(default_factory=Hints)
    source: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # task-specific settings

    @property
    def model_file(self) -> str:
        return self.files["model"]

    def input_spec(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def with_hints(self, **changes: Any) -> Manifest:
        return replace(self, hints=replace(self.hints, **changes))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "task": self.task,
            "backend": self.backend,
            "files": dict(self.files),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "memory_mb": self.memory_mb,
            "hints": self.hints.to_json(),
            "source": dict(self.source),
            "extra": dict(self.extra),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise ManifestError("a manifest must be a JSON object")
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format {data.get('format')!r} is not supported "
                                f"(this epara reads format {MANIFEST_FORMAT})")
        try:
            manifest = Manifest(
                name=str(data["name"]),
                task=str(data.get("task", "generic")),
                backend=str(data["backend"]),
                files=dict(data["files"]),
                inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
                memory_mb=float(data.get("memory_mb", 0.0)),
                hints=Hints.from_json(data.get("hints", {})),
                source=dict(data.get("source", {})),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has a bad field: {exc}") from exc
        if manifest.backend not in BACKEND_NAMES:
            raise ManifestError(f"unknown backend {manifest.backend!r}; "
                                f"expected one of {', '.join(BACKEND_NAMES)}")
        if "model" not in manifest.files:
            raise ManifestError("files.model must name the model file")
        if not manifest.name or "/" in manifest.name:
            raise ManifestError(f"bad model name {manifest.name!r}")
        return manifest


def load_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    manifest = Manifest.from_json(data)
    for role, rel in manifest.files.items():
        if not (Path(model_dir) / rel).exists():
            raise ManifestError(f"{path}: file {rel!r} ({role}) is missing")
    return manifest


def save_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Match request tensors to a model's specs; raise InputError naming what is wrong."""
    if not isinstance(inputs, Mapping):
        raise InputError("inputs must be a map from input name to tensor")
    expected = {s.name for s in specs}
    unknown = sorted(set(inputs) - expected)
    missing = sorted(expected - set(inputs))
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(map(str, unknown))}")
        raise InputError(f"{'; '.join(parts)}; the model takes "
                         f"{'; '.join(s.describe() for s in specs)}")
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise InputError(f"input {spec.name!r} must be a tensor, got {type(value).__name__}")
        if value.dtype.name != spec.dtype:
            if spec.dtype == "bool" and value.dtype == np.uint8:
                value = value.astype(np.bool_)
            else:
                raise InputError(f"input {spec.name!r} has dtype {value.dtype.name}, "
                                 f"expected {spec.describe()}")
        if value.ndim != len(spec.shape) or any(
            want is not None and got != want
            for got, want in zip(value.shape, spec.shape, strict=True)
        ):
            raise InputError(f"input {spec.name!r} has shape {list(value.shape)}, "
                             f"expected {spec.describe()}")
        checked[spec.name] = value
    return checked
