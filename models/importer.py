"""Import a user's own model file into the store, with a manifest read from the file.

Usage (the CLI's ``epara models import FILE [--name N] [--input name:dtype:shape ...]``)::

    from epara.models.importer import import_model
    import_model(Path("detector.onnx"), store)                  # ONNX: all from the file
    import_model(Path("seg.tflite"), store, "my-seg")           # TFLite: all from the file
    import_model(Path("prog.pt2"), store)                       # torch.export: from the file
    import_model(Path("enc.ts"), store,                         # TorchScript: describe
                 inputs=["input_ids:int64:?x?", "attention_mask:int64:?x?"])  # the inputs

Supported files, chosen by extension: ``.onnx`` (onnxruntime), ``.tflite`` (LiteRT),
``.pt``/``.ts``/``.torchscript`` (TorchScript), ``.pt2`` (``torch.export`` program),
``.gguf`` (an LLM: Llama, Qwen2, Gemma, Gemma 2 or Phi-3, prepared by
``llm_prepare.import_gguf`` into a text-generation model, see docs/llm.md).
The file is loaded with its runtime to read input/output names, dtypes and shapes
(TorchScript records only argument names: without ``inputs`` the PrepareError lists them
and shows the ``name:dtype:shape`` form to use; its outputs are found by running it).
A dynamic leading dimension on every tensor means requests can be stacked:
``batch_axis=0``. The copy is atomic and idempotent like the zoo's preparations.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from epara.models.introspect import (
    ModelIO,
    inspect_exported,
    inspect_onnx,
    inspect_tflite,
    inspect_torchscript,
)
from epara.models.manifest import Hints, Manifest, TensorSpec
from epara.models.preparing import PrepareError, estimate_memory_mb, file_sha256, install_model
from epara.models.store import ModelStore

# Extension -> (backend, file kind).
KINDS = {
    ".onnx": ("onnx", "onnx"),
    ".tflite": ("tflite", "tflite"),
    ".pt": ("torch", "torchscript"),
    ".ts": ("torch", "torchscript"),
    ".torchscript": ("torch", "torchscript"),
    ".pt2": ("torch", "exported"),
}
IMPORT_RECIPE = "import/1"


def parse_tensor_spec(text: str) -> TensorSpec:
    """``name:dtype:shape`` -> TensorSpec; dims split by ``x`` or ``,``; ``?``, ``-1`` or
    a symbolic name is a dynamic dimension. E.g. ``image:float32:?x3x224x224``,
    ``input_ids:int64:batch,seq``, ``scale:float32:`` (a scalar)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"bad input spec {text!r}: expected name:dtype:shape, "
                         "e.g. image:float32:?x3x224x224")
    name, dtype, shape = parts
    try:
        dtype = np.dtype(dtype).name
    except TypeError as exc:
        raise ValueError(f"bad input spec {text!r}: unknown dtype {dtype!r}") from exc
    dims: list[int | None] = []
    for dim in filter(None, re.split(r"[x,]", shape.strip())):
        dim = dim.strip()
        if re.fullmatch(r"\d+", dim):
            dims.append(int(dim))
        elif dim in ("?", "-1") or re.fullmatch(r"[A-Za-z_]\w*", dim):
            dims.append(None)
        else:
            raise ValueError(f"bad input spec {text!r}: dimension {dim!r} is not a size, "
                             "'?' or a name")
    return TensorSpec(name, dtype, tuple(dims))


def default_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.")
    return name or "model"


def _onnx_external_files(path: Path) -> list[str]:
    """Relative paths of the external-data files an ONNX model references (needs the
    ``onnx`` package; without it, a model with external data fails to load later)."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a non-model
        raise PrepareError(f"{path} is not an ONNX model: {exc}") from exc
    files = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            files.add(info["location"])
    return sorted(files)


def _inspect(kind: str, model: Path, inputs: Sequence[TensorSpec] | None) -> ModelIO:
    if kind == "onnx":
        return inspect_onnx(model)
    if kind == "tflite":
        return inspect_tflite(model)
    if kind == "exported":
        return inspect_exported(model)
    return inspect_torchscript(model, inputs)


def import_model(path: Path, store: ModelStore, name: str | None = None, *,
                 inputs: Sequence[TensorSpec | str] | None = None, task: str = "generic",
                 hints: Hints | None = None, force: bool = False,
                 stream: TextIO | None = None) -> Path:
    """Copy the model file at ``path`` into ``store`` as ``name`` (default: the file's
    stem) with a manifest; return the model directory.

    ``inputs`` (TensorSpecs or ``name:dtype:shape`` strings, one per forward argument in
    order) is for TorchScript only, which does not record shapes. ``hints`` replaces the
    default scheduler hints (latency category; batching when the batch axis is dynamic).
    Raises PrepareError (unknown extension, not a model, missing runtime, specs needed)
    or ValueError (a malformed spec).
    """
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        if inputs is not None or hints is not None or task not in ("generic",
                                                                   "text-generation"):
            raise PrepareError(f"{path.name} is an LLM: it takes no input specs, hints "
                               "or task")
        from epara.models.llm_prepare import import_gguf

        return import_gguf(path, store, name, force=force, stream=stream)
    if suffix not in KINDS:
        hint = (" (.pth is usually a state dict, which needs its Python code: save the "
                "model with torch.jit.script(...).save() or torch.export.save())"
                if suffix == ".pth" else "")
        raise PrepareError(f"cannot import {path.name}: unknown extension {suffix!r}; "
                           f"epara imports {', '.join(KINDS)}, .gguf{hint}")
    backend, kind = KINDS[suffix]
    specs = None if inputs is None else tuple(
        s if isinstance(s, TensorSpec) else parse_tensor_spec(s) for s in inputs)
    if specs is not None and kind != "torchscript":
        raise PrepareError(f"{path.name} declares its own inputs; input specs are only "
                           "for TorchScript files")
    name = name or default_name(path)
    externals = _onnx_external_files(path) if kind == "onnx" else []
    recipe: dict[str, Any] = {
        "kind": "import", "recipe": IMPORT_RECIPE,
        "original": str(path.resolve()), "original_sha256": file_sha256(path),
        "task": task,
        "input_specs": None if specs is None else [s.to_json() for s in specs],
        "hints_given": None if hints is None else hints.to_json(),
    }

    def build(staging: Path) -> Manifest:
        model = staging / path.name
        shutil.copyfile(path, model)
        for rel in externals:
            dest = staging / rel
            if not dest.resolve().is_relative_to(staging.resolve()):
                raise PrepareError(f"{path.name}: external data {rel!r} lies outside "
                                   "the model's folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(path.parent / rel, dest)
            except FileNotFoundError as exc:
                raise PrepareError(f"{path.name} keeps weights in {rel}, which is not "
                                   f"beside it in {path.parent}") from exc
        # Inspect the copy: what is checked is exactly what the store will hold.
        io = _inspect(kind, model, specs)
        batch = io.batch_axis
        chosen = hints or Hints(batch_axis=batch, max_batch=8 if batch is not None else 1)
        size = sum((staging / f).stat().st_size for f in [path.name, *externals])
        # No activation profile for a user's model: assume a few times its I/O tensors.
        io_bytes = sum(int(np.prod([d or 1 for d in s.shape])) * np.dtype(s.dtype).itemsize
                       for s in io.inputs + io.outputs)
        files = {"model": path.name, **{f"data{i}": rel for i, rel in enumerate(externals)}}
        return Manifest(name=name, task=task, backend=backend, files=files,
                        inputs=io.inputs, outputs=io.outputs,
                        memory_mb=estimate_memory_mb(size, 4 * io_bytes * chosen.max_batch),
                        hints=chosen, source={"file_kind": kind})

    out = stream if stream is not None else sys.stderr
    try:
        return install_model(store, name, recipe, build, force=force, stream=out)
    except PrepareError:
        raise
    except (ValueError, RuntimeError) as exc:  # the runtime's own complaint about the file
        raise PrepareError(f"cannot import {path}: {exc}") from exc

