"""LiteRT (TFLite) backend: the CPU path of microcomputers, delegates where present.

``ai_edge_litert`` is the maintained runtime and works beside numpy 2; old devices
that only have ``tflite_runtime`` still work through the fallback import.
"""

from __future__ import annotations

import ctypes.util
import os
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

# Delegate shared libraries by target, as the vendors ship them.
_DELEGATES = {
    "edgetpu": "libedgetpu.so.1",
    "gpu": "libtensorflowlite_gpu_delegate.so",
}


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter

        return interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter

        return interpreter, "tflite-runtime"
    except ImportError:
        return None, "neither ai-edge-litert nor tflite-runtime is installed"


def _delegate_present(library: str) -> bool:
    if ctypes.util.find_library(library.removeprefix("lib").split(".so")[0]):
        return True
    return any(Path(d, library).exists() for d in ("/usr/lib", "/usr/local/lib",
                                                    "/usr/lib/aarch64-linux-gnu"))


class TfliteSession(Session):
    def __init__(self, interpreter, manifest: Manifest, target: str) -> None:
        self._interpreter = interpreter
        self._manifest = manifest
        self.target = target
        self._inputs = {d["name"]: d for d in interpreter.get_input_details()}
        self._outputs = {d["name"]: d for d in interpreter.get_output_details()}
        missing = [s.name for s in manifest.inputs if s.name not in self._inputs]
        missing += [s.name for s in manifest.outputs if s.name not in self._outputs]
        if missing:
            raise BackendUnavailable(f"{manifest.model_file} has no tensors named "
                                     f"{', '.join(missing)}")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interpreter
        resized = False
        for name, value in inputs.items():
            detail = self._inputs[name]
            if tuple(detail["shape"]) != value.shape:
                # Dynamic batching stacks requests: grow the batch axis to fit.
                interp.resize_tensor_input(detail["index"], list(value.shape))
                resized = True
        if resized:
            interp.allocate_tensors()
            self._inputs = {d["name"]: d for d in interp.get_input_details()}
            self._outputs = {d["name"]: d for d in interp.get_output_details()}
        for name, value in inputs.items():
            interp.set_tensor(self._inputs[name]["index"], np.ascontiguousarray(value))
        interp.invoke()
        # get_tensor copies: the interpreter reuses its buffers on the next invoke.
        values = [interp.get_tensor(self._outputs[s.name]["index"])
                  for s in self._manifest.outputs]
        return outputs_by_name(self._manifest, values)


class TfliteBackend(Backend):
    name = "tflite"

    def info(self) -> BackendInfo:
        module, runtime = _interpreter_module()
        if module is None:
            return BackendInfo(self.name, False, runtime, ())
        targets = tuple(t for t, lib in _DELEGATES.items() if _delegate_present(lib))
        return BackendInfo(self.name, True, runtime, (*targets, "cpu"))

    def load(self, model_dir: Path, manifest: Manifest, target: str | None = None,
             threads: int | None = None) -> Session:
        info = self.info()
        target = pick_target(info, target)
        module, _ = _interpreter_module()
        delegates = []
        if target != "cpu":
            delegates = [module.load_delegate(_DELEGATES[target])]
        try:
            interp = module.Interpreter(
                model_path=str(Path(model_dir) / manifest.model_file),
                num_threads=threads or os.cpu_count() or 1,
                experimental_delegates=delegates or None,
            )
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendUnavailable(f"LiteRT cannot load {manifest.model_file}: {exc}") from exc
        return TfliteSession(interp, manifest, target)


BACKEND = TfliteBackend()
