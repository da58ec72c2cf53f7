"""ONNX Runtime backend: CPU everywhere; CUDA and TensorRT on servers and Jetsons."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

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

# Execution providers by target name, in order of preference.
_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class OnnxSession(Session):
    def __init__(self, session, manifest: Manifest, target: str) -> None:
        self._session = session
        self._manifest = manifest
        self.target = target
        self._output_names = [spec.name for spec in manifest.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, dict(inputs))
        return outputs_by_name(self._manifest, values)


class OnnxBackend(Backend):
    name = "onnx"

    def info(self) -> BackendInfo:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return BackendInfo(self.name, False, f"onnxruntime not installed ({exc})", ())
        offered = set(ort.get_available_providers())
        targets = tuple(t for t, p in _PROVIDERS.items() if p in offered)
        return BackendInfo(self.name, True, f"onnxruntime {ort.__version__}", targets)

    def load(self, model_dir: Path, manifest: Manifest, target: str | None = None,
             threads: int | None = None) -> Session:
        info = self.info()
        target = pick_target(info, target)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Fall back to CPU for operators the accelerator provider cannot place.
        providers = [_PROVIDERS[target]] + (["CPUExecutionProvider"] if target != "cpu" else [])
        try:
            session = ort.InferenceSession(str(Path(model_dir) / manifest.model_file),
                                           sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendUnavailable(f"onnxruntime cannot load {manifest.model_file}: {exc}") \
                from exc
        return OnnxSession(session, manifest, target)


BACKEND = OnnxBackend()
