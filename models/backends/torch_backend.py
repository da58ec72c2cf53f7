"""PyTorch backend: TorchScript (``.pt``/``.ts``) or exported programs (``.pt2``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from epara.models.backends import (
    Backend,
    BackendInfo,
    BackendUnavailable,
    Session,
    outputs_by_name,
    pick_target,
)
from epara.models.manifest import Manifest


def _flatten(result: Any) -> list[Any]:
    if isinstance(result, dict):
        return list(result.values())
    if isinstance(result, (tuple, list)):
        return [leaf for item in result for leaf in _flatten(item)]
    return [result]


class TorchSession(Session):
    def __init__(self, module, manifest: Manifest, target: str) -> None:
        self._module = module
        self._manifest = manifest
        self.target = target
        self._device = "cuda" if target == "cuda" else "cpu"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # Tensors decoded from the wire are read-only views; torch needs writable memory.
        args = [torch.from_numpy(np.require(inputs[s.name], requirements=["C", "W"]))
                .to(self._device) for s in self._manifest.inputs]
        with torch.inference_mode():
            result = self._module(*args)
        values = [t.detach().to("cpu").numpy() for t in _flatten(result)]
        return outputs_by_name(self._manifest, values)


class TorchBackend(Backend):
    name = "torch"

    def info(self) -> BackendInfo:
        try:
            import torch
        except ImportError as exc:
            return BackendInfo(self.name, False, f"torch not installed ({exc})", ())
        targets = ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",)
        return BackendInfo(self.name, True, f"torch {torch.__version__}", targets)

    def load(self, model_dir: Path, manifest: Manifest, target: str | None = None,
             threads: int | None = None) -> Session:
        info = self.info()
        target = pick_target(info, target)
        import torch

        if threads:
            torch.set_num_threads(threads)
        path = Path(model_dir) / manifest.model_file
        device = "cuda" if target == "cuda" else "cpu"
        try:
            if path.suffix == ".pt2":
                module = torch.export.load(str(path)).module().to(device)
            else:
                module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # torch raises many types for a bad file
            raise BackendUnavailable(f"torch cannot load {manifest.model_file}: {exc}") from exc
        return TorchSession(module, manifest, target)


BACKEND = TorchBackend()
