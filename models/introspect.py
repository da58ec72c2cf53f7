"""Read a model file's inputs and outputs by loading it with the runtime that will run it.

Why the runtime and not a file parser: what matters is what the backend will see (LiteRT's
tensor names, onnxruntime's dynamic dimensions), and loading proves the file runs here.

- ONNX and TFLite files declare names, dtypes and shapes; dynamic dimensions become None.
- An exported program (``.pt2``) declares them too (symbolic dimensions become None).
- TorchScript declares only argument names: the caller passes the input specs; outputs
  are found by running the module twice on zeros with different sizes for the dynamic
  input dimensions (an output dimension that changes between the runs is dynamic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from epara.models.manifest import TensorSpec
from epara.models.preparing import PrepareError

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batch_axis(self) -> int | None:
        """0 when every input and output has a dynamic leading dimension."""
        specs = self.inputs + self.outputs
        if specs and all(s.shape and s.shape[0] is None for s in specs):
            return 0
        return None


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)


def inspect_onnx(path: Path) -> ModelIO:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise PrepareError("inspecting an ONNX model needs onnxruntime: "
                           "pip install 'epara[onnx]'") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise PrepareError(f"{path} is not an ONNX model onnxruntime can load: {exc}") from exc

    def spec(arg: Any) -> TensorSpec:
        if arg.type not in _ORT_TYPES:
            raise PrepareError(f"{path}: tensor {arg.name!r} has type {arg.type}, "
                               "which epara cannot pass (tensors only)")
        return TensorSpec(arg.name, _ORT_TYPES[arg.type], _dims(arg.shape))

    return ModelIO(tuple(spec(a) for a in session.get_inputs()),
                   tuple(spec(a) for a in session.get_outputs()))


def inspect_tflite(path: Path) -> ModelIO:
    from epara.models.backends.tflite_backend import _interpreter_module

    module, runtime = _interpreter_module()
    if module is None:
        raise PrepareError(f"inspecting a TFLite model needs LiteRT ({runtime}): "
                           "pip install 'epara[tflite]'")
    try:
        interp = module.Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise PrepareError(f"{path} is not a TFLite model LiteRT can load: {exc}") from exc

    def spec(detail: dict[str, Any]) -> TensorSpec:
        shape = detail.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = detail["shape"]
        return TensorSpec(detail["name"], np.dtype(detail["dtype"]).name,
                          _dims([int(d) for d in shape]))

    return ModelIO(tuple(spec(d) for d in interp.get_input_details()),
                   tuple(spec(d) for d in interp.get_output_details()))


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise PrepareError("inspecting a torch model needs torch: install torch==2.13.0 "
                           "(CPU wheel) then 'epara[torch]'") from exc
    return torch


def torchscript_arg_names(module: Any) -> list[str]:
    """Argument names of a TorchScript module's ``forward`` (without ``self``)."""
    return [a.name for a in module.forward.schema.arguments if a.name != "self"]


def load_torchscript(path: Path) -> Any:
    torch = _import_torch()
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch raises many types for a bad file
        raise PrepareError(
            f"{path} is not a TorchScript file torch can load ({exc}). A file saved with "
            "torch.save (a pickled module or state dict) cannot run without its Python "
            "code: save it with torch.jit.script(...).save() or torch.export.save()"
        ) from exc


def _probe(spec: TensorSpec, dynamic: int) -> np.ndarray:
    shape = [dynamic if d is None else d for d in spec.shape]
    return np.zeros(shape, dtype=spec.dtype)


def _flat(result: Any) -> tuple[list[str] | None, list[Any]]:
    if isinstance(result, dict):
        return [str(k) for k in result], list(result.values())
    if isinstance(result, (tuple, list)):
        values = [leaf for item in result for leaf in _flat(item)[1]]
        return None, values
    return None, [result]


def inspect_torchscript(path: Path, inputs: Sequence[TensorSpec] | None) -> ModelIO:
    """TorchScript: ``inputs`` (one spec per forward argument, in order) are required
    unless the module has none; the PrepareError lists the argument names to describe."""
    torch = _import_torch()
    module = load_torchscript(path)
    names = torchscript_arg_names(module)
    if inputs is None:
        example = " ".join(f"--input {n}:float32:?x3x224x224" for n in names[:2])
        raise PrepareError(
            f"{path} is TorchScript, which does not record input shapes or dtypes. Describe "
            f"each argument of forward({', '.join(names)}) as name:dtype:shape, e.g. "
            f"{example} ('?' marks a dynamic dimension)")
    given = [s.name for s in inputs]
    if given != names:
        raise PrepareError(f"{path}: forward takes ({', '.join(names)}), the input specs "
                           f"name ({', '.join(given)}): give one spec per argument, in order")
    # Two probe runs with different sizes for the dynamic dims show which output dims follow.
    runs = []
    for size in (2, 3):
        args = [torch.from_numpy(_probe(s, size)) for s in inputs]
        try:
            with torch.inference_mode():
                runs.append(_flat(module(*args)))
        except Exception as exc:  # the module's own errors: report them as they are
            raise PrepareError(f"{path}: running forward on zero inputs shaped "
                               f"{[list(a.shape) for a in args]} failed: {exc}") from exc
    keys, first = runs[0]
    _, second = runs[1]
    outputs = []
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if not isinstance(a, torch.Tensor):
            raise PrepareError(f"{path}: output {i} is a {type(a).__name__}, not a tensor")
        dims = tuple(x if x == y else None for x, y in zip(a.shape, b.shape, strict=True))
        name = keys[i] if keys else ("output" if len(first) == 1 else f"output_{i}")
        outputs.append(TensorSpec(name, str(a.dtype).removeprefix("torch."), dims))
    return ModelIO(tuple(inputs), tuple(outputs))


def inspect_exported(path: Path) -> ModelIO:
    """A ``torch.export`` program (``.pt2``): names, dtypes and shapes from its graph."""
    torch = _import_torch()
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a bad file
        raise PrepareError(f"{path} is not an exported program torch can load: {exc}") from exc

    def spec(name: str, value: Any) -> TensorSpec:
        if not isinstance(value, torch.Tensor):
            raise PrepareError(f"{path}: {name} is a {type(value).__name__}, not a tensor")
        dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        return TensorSpec(name, str(value.dtype).removeprefix("torch."), dims)

    sig = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = tuple(spec(n, nodes[n].meta.get("val")) for n in sig.user_inputs)
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = {getattr(a, "name", None): a.meta.get("val") for a in output_node.args[0]}
    # Output node names are generated ("add_1"): name them by position instead.
    count = len(sig.user_outputs)
    outputs = tuple(spec("output" if count == 1 else f"output_{i}", values.get(n))
                    for i, n in enumerate(sig.user_outputs))
    return ModelIO(inputs, outputs)
