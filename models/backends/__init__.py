"""One interface over the inference runtimes a device may have.

Each backend module imports its runtime lazily, so a device installs only the runtimes
it can run (a Raspberry Pi: LiteRT/TFLite only) and the others are reported unavailable.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epara.models.manifest import Manifest


class BackendUnavailable(RuntimeError):
    """The runtime this backend needs is not installed (or cannot run) here."""


@dataclass(frozen=True)
class BackendInfo:
    """What a backend can run on, on this device."""

    name: str
    available: bool
    runtime: str  # package and version, or why it is missing
    targets: tuple[str, ...]  # best first: e.g. ("tensorrt", "cuda", "cpu")


class Session(ABC):
    """A loaded model, ready to run. Not thread-safe: one caller at a time."""

    target: str

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named inputs; return named outputs."""

    def run_by(self, inputs: Mapping[str, np.ndarray],
               deadline: float | None) -> dict[str, np.ndarray]:
        """``run`` for a caller whose answer is useless after ``deadline``
        (``time.monotonic()``; None: no deadline). A local session simply runs; a session
        that waits on other devices (a pipeline's remote stages) waits no longer."""
        return self.run(inputs)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the runtime holds."""


class Backend(ABC):
    name: str

    @abstractmethod
    def info(self) -> BackendInfo:
        """Report availability and the targets this device offers, best first."""

    @abstractmethod
    def load(self, model_dir: Path, manifest: Manifest, target: str | None = None,
             threads: int | None = None) -> Session:
        """Load the model file named by the manifest. ``target`` None picks the best."""


_MODULES = {"onnx": "onnxruntime_backend", "tflite": "tflite_backend", "torch": "torch_backend"}


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise KeyError(f"unknown backend {name!r}; epara has {', '.join(_MODULES)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.BACKEND


def all_backend_info() -> list[BackendInfo]:
    return [get_backend(name).info() for name in _MODULES]


def pick_target(info: BackendInfo, wanted: str | None) -> str:
    if not info.available:
        raise BackendUnavailable(f"backend {info.name} is not available: {info.runtime}")
    if wanted is None:
        return info.targets[0]
    if wanted not in info.targets:
        raise BackendUnavailable(f"backend {info.name} cannot run on {wanted!r} here; "
                                 f"it offers {', '.join(info.targets)}")
    return wanted


def outputs_by_name(manifest: Manifest, values: list[np.ndarray]) -> dict[str, np.ndarray]:
    if len(values) != len(manifest.outputs):
        raise RuntimeError(f"model {manifest.name} produced {len(values)} outputs, "
                           f"its manifest declares {len(manifest.outputs)}")
    return {spec.name: np.asarray(v) for spec, v in zip(manifest.outputs, values, strict=True)}
