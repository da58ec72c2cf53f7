"""Cut a model into K consecutive pipeline stages, each one a model directory of its own.

EPARA runs a model that is too big or too slow for one device as a pipeline: stage i runs
on one device and sends the tensors crossing its cut to the device running stage i+1.
This module finds where a model can be cut cheaply, and writes the stage models.

Positions (ONNX)
    The graph's ``Constant`` nodes are lifted into initializers first (PaddlePaddle's
    exporter, which made text-det, stores every weight as a Constant node); what remains
    are the *compute nodes* in the file's topological order, numbered 0..N-1. Position
    ``p`` (1 <= p <= N-1) is the cut between compute node p-1 and p. A tensor *crosses*
    position p when it is made before p (a graph input or an output of nodes < p) and
    used at or after p (by a node >= p, or as a graph output). Every crossing tensor is an
    output of the stage before the cut and an input of the stage after it, so a skip
    connection that jumps over a whole stage is carried through it unchanged (the stage
    lists it as an input and as an output of the same name).

Positions (TorchScript, ``models/bert.py`` encoders only)
    Position p is the boundary before encoder layer p; the embeddings belong to the first
    stage and the pooling to the last. A general TorchScript module has no ordered node
    list to cut, so other TorchScript models raise ``SplitError``.

The analysis goes into the parent manifest's ``extra["stages"]``; the leader's
partitioner reads it::

    {
      "format": 1,
      "positions": "onnx-nodes" | "bert-layers",
      "reference": {input name: [int, ...]},   # the input sizes the bytes are counted at
      "node_count": N,                          # compute nodes (onnx) or layers (bert)
      "total_flops": int,                       # 2 x multiply-adds of Conv/ConvTranspose/
                                                #   MatMul/Gemm (elementwise ops ignored)
      "total_weight_bytes": int,
      "input_bytes": int, "output_bytes": int,  # the whole model's I/O at the reference
      "cuts": [                                 # candidate cuts, by position
        {"position": p,
         "crossing": [{"name", "dtype", "shape"}, ...],   # shape at the reference size
         "activation_bytes": int,               # sum of the crossing tensors' bytes
         "flops_before": int, "flops_after": int,
         "weight_bytes_before": int, "weight_bytes_after": int},   # a weight used on
        ...                                     #   both sides counts on both sides
      ]
    }

Store layout: ``split_model(store, "text-det", 2)`` (two cuts) writes
``text-det.stage0of3``, ``text-det.stage1of3``, ``text-det.stage2of3``; each is a normal
model directory (task ``stage``) whose ``extra["stage"]`` says
``{"of": "text-det", "index": i, "count": 3, "positions": [a, b]}`` (stage i runs nodes or
layers a..b-1). Chaining: feed each stage the tensors it names as inputs, taken by name
from the outputs of the stages before it (the first stage takes the model's inputs).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from epara.models.manifest import Hints, Manifest, TensorSpec, load_manifest, save_manifest
from epara.models.preparing import (
    check_intact,
    estimate_memory_mb,
    file_sha256,
    install_model,
)
from epara.models.store import ModelStore

__all__ = [
    "STAGES_FORMAT",
    "CutPoint",
    "SplitError",
    "SplitUnavailable",
    "StageAnalysis",
    "TensorSize",
    "analyse_bert",
    "analyse_onnx",
    "balanced_cuts",
    "onnx_stage_analysis",
    "split_model",
    "split_onnx",
    "split_tflite",
    "split_torchscript",
    "stage_name",
    "stage_of",
]

STAGES_FORMAT = 1
MAX_CANDIDATES = 32
BALANCE_SLACK = 0.1  # share of the total FLOPs a stage boundary may move
STAGE_TASK = "stage"
# A 736x1280 page: rapidocr's limit_side_len 736 with a 16:9 frame (the zoo's reference
# request for text-det); 128 tokens for sequence models.
_REFERENCE_IMAGE_HW = (736, 1280)
_REFERENCE_SEQUENCE = 128
# Operators whose cost the FLOP estimate counts: they dominate CNNs and transformers.
_COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class SplitError(ValueError):
    """The model or the requested cuts cannot be split as asked; the message says why."""


class SplitUnavailable(RuntimeError):
    """Splitting this kind of model needs a tool that is not installed here."""


@dataclass(frozen=True)
class TensorSize:
    """A tensor crossing a cut, with its shape at the reference input size."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class CutPoint:
    position: int
    crossing: tuple[TensorSize, ...]
    flops_before: int
    flops_after: int
    weight_bytes_before: int
    weight_bytes_after: int

    @property
    def activation_bytes(self) -> int:
        return sum(t.nbytes for t in self.crossing)

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position,
                "crossing": [t.to_json() for t in self.crossing],
                "activation_bytes": self.activation_bytes,
                "flops_before": self.flops_before, "flops_after": self.flops_after,
                "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after}


@dataclass(frozen=True)
class StageAnalysis:
    """Everything ``extra["stages"]`` records (see the module docstring)."""

    positions: str
    reference: Mapping[str, tuple[int, ...]]
    node_count: int
    total_flops: int
    total_weight_bytes: int
    input_bytes: int
    output_bytes: int
    cuts: tuple[CutPoint, ...]

    def to_json(self) -> dict[str, Any]:
        return {"format": STAGES_FORMAT, "positions": self.positions,
                "reference": {k: list(v) for k, v in self.reference.items()},
                "node_count": self.node_count, "total_flops": self.total_flops,
                "total_weight_bytes": self.total_weight_bytes,
                "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
                "cuts": [c.to_json() for c in self.cuts]}


def stage_name(parent: str, index: int, count: int) -> str:
    return f"{parent}.stage{index}of{count}"


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise SplitUnavailable("splitting an ONNX model needs the onnx package: "
                               "pip install 'epara[split]' (or pip install onnx)") from exc
    return onnx


def _reference_for(specs: Sequence[TensorSpec],
                   given: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """Bind every dynamic dimension: ``given`` where it names the input, else batch 1, a
    736x1280 image for NCHW/NHWC-looking 4-D inputs, and 128 for other dimensions."""
    reference: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if given and spec.name in given:
            shape = tuple(int(d) for d in given[spec.name])
            if len(shape) != len(spec.shape) or any(
                    want is not None and got != want
                    for got, want in zip(shape, spec.shape, strict=True)):
                raise SplitError(f"reference shape {list(shape)} does not fit {spec.describe()}")
            reference[spec.name] = shape
            continue
        dims = list(spec.shape)
        if dims and dims[0] is None:
            dims[0] = 1
        if len(dims) == 4:
            spatial = (2, 3) if dims[1] is not None else (1, 2)  # NCHW when C is fixed
            for axis, size in zip(spatial, _REFERENCE_IMAGE_HW, strict=True):
                if dims[axis] is None:
                    dims[axis] = size
        reference[spec.name] = tuple(_REFERENCE_SEQUENCE if d is None else d for d in dims)
    return reference


# --- ONNX --------------------------------------------------------------------------------

@dataclass
class _OnnxGraph:
    """A model with its Constant nodes lifted into initializers, indexed for cutting."""

    model: Any  # onnx.ModelProto
    nodes: list[Any]  # compute nodes, topological order
    initializers: dict[str, Any]  # name -> TensorProto
    inputs: list[str]  # graph inputs that are not initializers
    outputs: list[str]
    node_inputs: list[set[str]]  # every name a node reads (subgraphs' outer names too)
    producer: dict[str, int]  # tensor -> index of the node making it (-1: graph input)
    last_use: dict[str, int]  # tensor -> last node reading it (N: a graph output)

    @property
    def count(self) -> int:
        return len(self.nodes)

    def crossing(self, position: int) -> list[str]:
        """Tensors made before ``position`` and used at or after it, in making order."""
        return [t for t, made in self.producer.items()
                if made < position <= self.last_use.get(t, -2)]

    def weights_used(self, start: int, stop: int) -> set[str]:
        return {n for i in range(start, stop) for n in self.node_inputs[i]
                if n in self.initializers}


def _outer_names(graph: Any) -> set[str]:
    """Names a subgraph (If/Loop/Scan body) reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used |= _reads(node) - defined
        defined |= set(node.output)
    return used


def _reads(node: Any) -> set[str]:
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            names |= _outer_names(sub)
    return names


def _load_graph(path: Path) -> _OnnxGraph:
    onnx = _import_onnx()
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            # A weight, not a computation: every stage that reads it gets its own copy.
            tensor = numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0])
            initializers[tensor.name] = tensor
        else:
            nodes.append(node)
    inputs = [i.name for i in graph.input if i.name not in initializers]
    outputs = [o.name for o in graph.output]
    node_inputs = [_reads(n) for n in nodes]
    producer = {name: -1 for name in inputs}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node_inputs[index]:
            last_use[name] = index
        for name in node.output:
            if name:
                producer[name] = index
    for name in outputs:
        last_use[name] = len(nodes)
    return _OnnxGraph(model, nodes, initializers, inputs, outputs, node_inputs, producer,
                      last_use)


def _onnx_dtype(elem_type: int) -> str:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _fixed_model(g: _OnnxGraph, reference: Mapping[str, Sequence[int]],
                 extra_outputs: Iterable[str] = ()) -> Any:
    """The lifted model with its inputs fixed to ``reference`` (shape inference then gives
    concrete sizes) and, optionally, intermediate tensors exposed as outputs."""
    onnx = _import_onnx()
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    graph = model.graph
    del graph.node[:]
    graph.node.extend(g.nodes)
    del graph.initializer[:]
    graph.initializer.extend(g.initializers.values())
    del graph.value_info[:]
    kept_inputs = [i for i in graph.input if i.name in g.inputs]
    del graph.input[:]
    for value in kept_inputs:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, reference[value.name], strict=True):
            dim.Clear()
            dim.dim_value = int(size)
        graph.input.append(value)
    for name in extra_outputs:
        graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


def _tensor_sizes(g: _OnnxGraph, reference: Mapping[str, Sequence[int]],
                  names: set[str]) -> dict[str, TensorSize]:
    """dtype and shape of ``names`` at the reference input size: ONNX shape inference
    first; the tensors it cannot size (shapes computed from data) by one onnxruntime run
    on zeros."""
    onnx = _import_onnx()

    inferred = onnx.shape_inference.infer_shapes(_fixed_model(g, reference), data_prop=True)
    sizes: dict[str, TensorSize] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if value.name not in names or not tensor.elem_type or not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if all(d >= 0 for d in dims):
            sizes[value.name] = TensorSize(value.name, _onnx_dtype(tensor.elem_type),
                                           tuple(dims))
    missing = sorted(names - set(sizes))
    if missing:
        import onnxruntime as ort

        model = _fixed_model(g, reference, [m for m in missing if m not in g.outputs])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        feeds = {i.name: np.zeros(reference[i.name], _ORT_NP[i.type]) for i in
                 session.get_inputs()}
        for name, value in zip(missing, session.run(missing, feeds), strict=True):
            sizes[name] = TensorSize(name, value.dtype.name, tuple(value.shape))
    return sizes


_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(double)": np.float64, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
           "tensor(bool)": np.bool_}


def _node_flops(node: Any, sizes: Mapping[str, TensorSize],
                weights: Mapping[str, Any]) -> int:
    """2 x multiply-adds of one Conv/ConvTranspose/MatMul/Gemm; 0 for other operators."""
    if node.op_type not in _COUNTED_OPS:
        return 0

    def shape(name: str) -> tuple[int, ...] | None:
        if name in sizes:
            return sizes[name].shape
        if name in weights:
            return tuple(weights[name].dims)
        return None

    a, b, out = shape(node.input[0]), shape(node.input[1]), shape(node.output[0])
    if a is None or b is None or out is None:
        return 0
    if node.op_type == "Conv":  # weight [Cout, Cin/group, k...]: each output, Cin/g x k
        return 2 * math.prod(out) * math.prod(b[1:])
    if node.op_type == "ConvTranspose":  # weight [Cin, Cout/group, k...]: each input
        return 2 * math.prod(a) * math.prod(b[1:])
    if node.op_type == "MatMul":
        return 2 * math.prod(out) * a[-1]
    trans_a = next((int(x.i) for x in node.attribute if x.name == "transA"), 0)
    return 2 * math.prod(out) * (a[0] if trans_a else a[-1])  # Gemm: [M, K] x [K, N]


def _analyse_graph(g: _OnnxGraph, specs: Sequence[TensorSpec],
                   reference: Mapping[str, Sequence[int]] | None
                   ) -> tuple[StageAnalysis, list[CutPoint]]:
    """The analysis with the chosen candidates, and every position's cut (for ``split``
    at positions that are not candidates)."""
    ref = _reference_for(specs, reference)
    all_tensors = set(g.producer)
    sizes = _tensor_sizes(g, ref, all_tensors)
    flops = [_node_flops(n, sizes, g.initializers) for n in g.nodes]
    prefix = np.concatenate([[0], np.cumsum(flops, dtype=np.int64)])
    total_flops = int(prefix[-1])
    weight_bytes = {name: int(_tensor_nbytes(t)) for name, t in g.initializers.items()}
    first_use = {name: min(i for i, reads in enumerate(g.node_inputs) if name in reads)
                 for name in g.initializers if any(name in r for r in g.node_inputs)}
    last_use = {name: g.last_use[name] for name in first_use}
    every: list[CutPoint] = []
    for p in range(1, g.count):
        crossing = tuple(sizes[t] for t in g.crossing(p))
        before = sum(weight_bytes[w] for w, first in first_use.items() if first < p)
        after = sum(weight_bytes[w] for w, last in last_use.items() if last >= p)
        every.append(CutPoint(p, crossing, int(prefix[p]), total_flops - int(prefix[p]),
                              before, after))
    analysis = StageAnalysis(
        positions="onnx-nodes", reference=ref, node_count=g.count, total_flops=total_flops,
        total_weight_bytes=sum(weight_bytes[w] for w in first_use),
        input_bytes=sum(sizes[n].nbytes for n in g.inputs if n in sizes),
        output_bytes=sum(sizes[n].nbytes for n in g.outputs if n in sizes),
        cuts=_candidates(every, total_flops))
    return analysis, every


def _tensor_nbytes(tensor: Any) -> int:
    return math.prod(tensor.dims) * np.dtype(_onnx_dtype(tensor.data_type)).itemsize


def _candidates(every: Sequence[CutPoint], total_flops: int) -> tuple[CutPoint, ...]:
    """At most MAX_CANDIDATES cuts spread over the model's compute: split the FLOP range
    into equal buckets and keep, in each, the cut with the fewest crossing bytes (then
    the fewest tensors). A partitioner wants cheap cuts *and* a choice of balance
    points; the cheapest cuts overall cluster at the end of a CNN, where maps are small."""
    useful = [c for c in every if c.flops_before > 0 and c.flops_after > 0]
    if total_flops <= 0 or not useful:
        useful = list(every)
        total_flops = max(total_flops, 1)
    buckets: dict[int, CutPoint] = {}
    for cut in useful:
        bucket = min(MAX_CANDIDATES - 1, cut.flops_before * MAX_CANDIDATES // total_flops)
        best = buckets.get(bucket)
        if best is None or (cut.activation_bytes, len(cut.crossing)) < (
                best.activation_bytes, len(best.crossing)):
            buckets[bucket] = cut
    return tuple(sorted(buckets.values(), key=lambda c: c.position))


def analyse_onnx(model_path: Path,
                 reference: Mapping[str, Sequence[int]] | None = None) -> list[CutPoint]:
    """Candidate cut positions of an ONNX model (at most MAX_CANDIDATES, see
    ``_candidates``), with crossing tensors sized at ``reference`` (input name -> shape;
    dynamic dimensions not given: see ``_reference_for``)."""
    return list(onnx_stage_analysis(model_path, reference).cuts)


def onnx_stage_analysis(model_path: Path,
                        reference: Mapping[str, Sequence[int]] | None = None
                        ) -> StageAnalysis:
    """``analyse_onnx`` plus the whole-model totals: what ``extra["stages"]`` holds."""
    from epara.models.introspect import inspect_onnx

    g = _load_graph(Path(model_path))
    return _analyse_graph(g, inspect_onnx(Path(model_path)).inputs, reference)[0]


def _check_cuts(cuts: Sequence[int], count: int, what: str) -> list[int]:
    ordered = sorted(set(int(c) for c in cuts))
    if not ordered:
        raise SplitError("give at least one cut position")
    if ordered[0] < 1 or ordered[-1] > count - 1:
        raise SplitError(f"cut positions must lie in 1..{count - 1} ({what}), "
                         f"got {list(cuts)}")
    return ordered


def _dynamic_dims(g: _OnnxGraph, specs: Sequence[TensorSpec],
                  names: set[str]) -> dict[str, tuple[int | None, ...]]:
    """Per tensor, its shape with the dimensions that follow the input size as None:
    sized at two different reference sizes, a dimension that differs is dynamic."""
    reference = _reference_for(specs, None)
    # Every dynamic dimension grows (batch 1 -> 2, sizes by 32): a dimension that follows
    # the input size then differs between the two, a fixed one does not.
    grown = {s.name: tuple(size if want is not None else (2 if axis == 0 else size + 32)
                           for axis, (size, want) in
                           enumerate(zip(reference[s.name], s.shape, strict=True)))
             for s in specs}
    first = _tensor_sizes(g, reference, names)
    second = _tensor_sizes(g, grown, names)
    return {n: tuple(a if a == b else None for a, b in
                     zip(first[n].shape, second[n].shape, strict=True)) for n in names}


def split_onnx(model_dir: Path, manifest: Manifest, cuts: Sequence[int],
               out_dir: Path) -> list[Path]:
    """Write one stage directory per range between ``cuts`` (compute-node positions, see
    the module docstring) under ``out_dir`` and return them in pipeline order."""
    onnx = _import_onnx()
    from onnx import helper

    model_path = Path(model_dir) / manifest.model_file
    g = _load_graph(model_path)
    ordered = _check_cuts(cuts, g.count, f"{model_path.name} has {g.count} compute nodes")
    bounds = [0, *ordered, g.count]
    count = len(bounds) - 1
    boundary = {p: g.crossing(p) for p in ordered}
    crossing_names = {n for names in boundary.values() for n in names}
    analysis, every = _analyse_graph(g, manifest.inputs,
                                     manifest.extra.get("reference_shapes"))
    at = {c.position: c for c in every}
    sizes = {t.name: t for p in ordered for t in at[p].crossing}
    dims = _dynamic_dims(g, manifest.inputs, crossing_names) if crossing_names else {}
    specs = {**{s.name: s for s in manifest.inputs}, **{s.name: s for s in manifest.outputs},
             **{n: TensorSpec(n, sizes[n].dtype, dims[n]) for n in crossing_names}}
    sha = file_sha256(model_path)
    paths: list[Path] = []
    for index in range(count):
        start, stop = bounds[index], bounds[index + 1]
        in_names = boundary[start] if start else [s.name for s in manifest.inputs]
        out_names = boundary[stop] if stop < g.count else [s.name for s in manifest.outputs]
        weights = g.weights_used(start, stop)

        def value_info(name: str) -> Any:
            spec = specs[name]
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
            # A dynamic dimension stays unnamed: a shared dim_param would tell onnxruntime
            # that maps of different sizes are equal (it then reuses buffers wrongly).
            return helper.make_tensor_value_info(name, elem, list(spec.shape))

        name = stage_name(manifest.name, index, count)
        graph = helper.make_graph(g.nodes[start:stop], name.replace(".", "_"),
                                  [value_info(n) for n in in_names],
                                  [value_info(n) for n in out_names],
                                  initializer=[g.initializers[w] for w in sorted(weights)])
        stage = helper.make_model(graph, opset_imports=list(g.model.opset_import),
                                  ir_version=g.model.ir_version,
                                  producer_name="epara.split")
        onnx.checker.check_model(stage)
        directory = Path(out_dir) / name
        directory.mkdir(parents=True, exist_ok=True)
        file = f"{model_path.stem}.stage{index}of{count}.onnx"
        onnx.save(stage, str(directory / file))
        cross_bytes = sum(sizes[n].nbytes for n in [*in_names, *out_names] if n in sizes)
        stage_flops = (at[stop].flops_before if stop < g.count else analysis.total_flops) - (
            at[start].flops_before if start else 0)
        stage_manifest = Manifest(
            name=name, task=STAGE_TASK, backend="onnx", files={"model": file},
            inputs=tuple(specs[n] for n in in_names),
            outputs=tuple(specs[n] for n in out_names),
            # Intermediate maps inside a stage are a few times the tensors at its borders.
            memory_mb=estimate_memory_mb((directory / file).stat().st_size, 4 * cross_bytes),
            hints=_stage_hints(manifest.hints),
            source={"split_of": manifest.name, "parent_sha256": sha, "cuts": ordered},
            extra={"stage": {"of": manifest.name, "index": index, "count": count,
                             "positions": [start, stop], "flops": stage_flops,
                             "weight_bytes": sum(_tensor_nbytes(g.initializers[w])
                                                 for w in weights),
                             "reference": {k: list(v) for k, v in
                                           analysis.reference.items()}}})
        save_manifest(directory, stage_manifest)
        paths.append(directory)
    return paths


def _stage_hints(parent: Hints) -> Hints:
    """A stage keeps the parent's batching (a batch stays one batch through the pipeline);
    the end-to-end SLO belongs to the pipeline, not to one stage."""
    return replace(parent, slo_ms=None, target_rate_hz=None)


# --- TorchScript (models/bert.py encoders) -----------------------------------------------

_BERT_PARTS = ("word", "position", "token_type", "emb_norm", "layers")
HIDDEN = "hidden_states"


def _load_bert(path: Path) -> Any:
    from epara.models.introspect import load_torchscript

    module = load_torchscript(path)
    names = {n for n, _ in module.named_children()}
    if not set(_BERT_PARTS) <= names:
        raise SplitError(
            f"{path.name}: only TorchScript encoders built by models/bert.py (children "
            f"{', '.join(_BERT_PARTS)}) can be split; a general TorchScript module has no "
            "ordered list of blocks to cut. Export the model to ONNX and split that.")
    return module


def _bert_layers(encoder: Any) -> list[Any]:
    """The layers of a loaded encoder: a scripted ModuleList does not iterate in Python."""
    return [module for _, module in encoder.layers.named_children()]


def _bert_stage_classes() -> tuple[type, type, type]:
    """The three stage modules. Defined on first use: this module must import without
    torch (a device splitting ONNX models may not have it)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def bias_of(mask: torch.Tensor) -> torch.Tensor:
        # As SentenceEncoder.forward: padding keys get float32's most negative value.
        return (1.0 - mask)[:, None, None, :] * -3.4028234663852886e38

    class Head(nn.Module):
        """Embeddings + layers [0, stop): the first stage."""

        def __init__(self, encoder: Any, stop: int) -> None:
            super().__init__()
            self.word, self.position = encoder.word, encoder.position
            self.token_type, self.emb_norm = encoder.token_type, encoder.emb_norm
            self.layers = nn.ModuleList(_bert_layers(encoder)[:stop])

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            # Mirrors SentenceEncoder.forward (tests/test_split.py checks they agree).
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = (self.word(input_ids) + self.position(positions)[None]
                 + self.token_type.weight[0])
            x = self.emb_norm(x)
            bias = bias_of(attention_mask.to(x.dtype))
            for layer in self.layers:
                x = layer(x, bias)
            return x, attention_mask

    class Middle(nn.Module):
        """Layers [start, stop); the mask passes through for the stages after it."""

        def __init__(self, encoder: Any, start: int, stop: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_bert_layers(encoder)[start:stop])

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            bias = bias_of(attention_mask.to(hidden_states.dtype))
            x = hidden_states
            for layer in self.layers:
                x = layer(x, bias)
            return x, attention_mask

    class Tail(nn.Module):
        """Layers [start, end) + mean pooling + L2 normalisation: the last stage."""

        def __init__(self, encoder: Any, start: int) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_bert_layers(encoder)[start:])

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
            mask = attention_mask.to(hidden_states.dtype)
            bias = bias_of(mask)
            x = hidden_states
            for layer in self.layers:
                x = layer(x, bias)
            summed = (x * mask[:, :, None]).sum(dim=1)
            mean = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
            return F.normalize(mean, p=2.0, dim=1)

    return Head, Middle, Tail


def analyse_bert(model_path: Path, batch: int = 1,
                 sequence: int = _REFERENCE_SEQUENCE) -> StageAnalysis:
    """Cuts between the layers of a models/bert.py encoder, sized at [batch, sequence]."""
    encoder = _load_bert(Path(model_path))
    layers = _bert_layers(encoder)
    width = int(encoder.word.weight.shape[1])

    def param_bytes(module: Any) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    def layer_flops(layer: Any) -> int:
        inter = int(layer.inter.weight.shape[0])
        # Q, K, V, output projections and the feed-forward pair, plus QK^T and AV.
        dense = 2 * batch * sequence * width * (4 * width + 2 * inter)
        return dense + 2 * 2 * batch * sequence * sequence * width

    flops = [layer_flops(layer) for layer in layers]
    embed_bytes = sum(param_bytes(getattr(encoder, n)) for n in _BERT_PARTS[:-1])
    sizes = [param_bytes(layer) for layer in layers]
    crossing = (TensorSize(HIDDEN, "float32", (batch, sequence, width)),
                TensorSize("attention_mask", "int64", (batch, sequence)))
    cuts = tuple(CutPoint(p, crossing, sum(flops[:p]), sum(flops[p:]),
                          embed_bytes + sum(sizes[:p]), sum(sizes[p:]))
                 for p in range(1, len(layers)))
    ids = batch * sequence * 8
    return StageAnalysis(positions="bert-layers",
                         reference={"input_ids": (batch, sequence),
                                    "attention_mask": (batch, sequence)},
                         node_count=len(layers), total_flops=sum(flops),
                         total_weight_bytes=embed_bytes + sum(sizes),
                         input_bytes=2 * ids, output_bytes=batch * width * 4, cuts=cuts)


def split_torchscript(model_dir: Path, manifest: Manifest, cuts: Sequence[int],
                      out_dir: Path) -> list[Path]:
    """Stage directories for a models/bert.py encoder cut before the given layers."""
    import torch

    model_path = Path(model_dir) / manifest.model_file
    encoder = _load_bert(model_path)
    layers = len(_bert_layers(encoder))
    ordered = _check_cuts(cuts, layers, f"{model_path.name} has {layers} layers")
    bounds = [0, *ordered, layers]
    count = len(bounds) - 1
    width = int(encoder.word.weight.shape[1])
    hidden = TensorSpec(HIDDEN, "float32", (None, None, width))
    mask = next(s for s in manifest.inputs if s.name == "attention_mask")
    head, middle, tail = _bert_stage_classes()
    sha = file_sha256(model_path)
    paths: list[Path] = []
    for index in range(count):
        start, stop = bounds[index], bounds[index + 1]
        if index == 0:
            stage, inputs, outputs = head(encoder, stop), manifest.inputs, (hidden, mask)
        elif index == count - 1:
            stage, inputs, outputs = tail(encoder, start), (hidden, mask), manifest.outputs
        else:
            stage, inputs, outputs = middle(encoder, start, stop), (hidden, mask), (hidden, mask)
        name = stage_name(manifest.name, index, count)
        directory = Path(out_dir) / name
        directory.mkdir(parents=True, exist_ok=True)
        file = f"{model_path.stem}.stage{index}of{count}.ts"
        # torch 2.13 marks torch.jit deprecated; the torch backend still loads TorchScript.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(stage.eval()).save(str(directory / file))
        weight_bytes = sum(p.numel() * p.element_size() for p in stage.parameters())
        # Activations: as the zoo's minilm estimate, scaled by the share of layers here.
        share = (stop - start) / layers
        whole = manifest.memory_mb - estimate_memory_mb(model_path.stat().st_size, 0)
        save_manifest(directory, Manifest(
            name=name, task=STAGE_TASK, backend="torch", files={"model": file},
            inputs=tuple(inputs), outputs=tuple(outputs),
            memory_mb=estimate_memory_mb(weight_bytes, int(max(whole, 0) * share * 2**20)),
            hints=_stage_hints(manifest.hints),
            source={"split_of": manifest.name, "parent_sha256": sha, "cuts": ordered},
            extra={"stage": {"of": manifest.name, "index": index, "count": count,
                             "positions": [start, stop], "weight_bytes": weight_bytes}}))
        paths.append(directory)
    return paths


# --- TFLite ------------------------------------------------------------------------------

def split_tflite(model_dir: Path, manifest: Manifest, cuts: Sequence[int],
                 out_dir: Path) -> list[Path]:
    """Not available: a .tflite flatbuffer cannot be cut in place (its tensors are laid
    out for the whole graph), each stage has to be converted from the source model."""
    raise SplitUnavailable(
        f"cannot split {manifest.name!r}: splitting a TFLite model means converting each "
        "stage from the source model with the TFLite converter, which epara does not "
        "install (about 2 GB). Install it on a build machine with "
        "'pip install litert-torch' (torch sources) or 'pip install tensorflow' "
        "(Keras/SavedModel sources), convert each stage there, and import the stage "
        "files with 'epara models import'.")


# --- store -------------------------------------------------------------------------------

def balanced_cuts(analysis: StageAnalysis, stages: int) -> list[int]:
    """``stages - 1`` candidate positions, strictly increasing, one per FLOP target
    (k/stages of the total): the candidate with the fewest crossing bytes among those
    within BALANCE_SLACK of the target, else the one nearest to it."""
    if stages < 2:
        raise SplitError("a split needs at least 2 stages")
    candidates = sorted(analysis.cuts, key=lambda c: c.position)
    if len(candidates) < stages - 1:
        raise SplitError(f"the model has only {len(candidates)} candidate cuts; "
                         f"it cannot make {stages} stages")
    chosen: list[int] = []
    remaining = candidates
    for k in range(1, stages):
        target = analysis.total_flops * k / stages
        # Leave enough later candidates for the boundaries still to place.
        usable = remaining[:len(remaining) - (stages - 1 - k)]
        # Within BALANCE_SLACK of the even point, the cheapest crossing wins: a few
        # percent of imbalance costs less than sending a map several times larger.
        near = [c for c in usable
                if abs(c.flops_before - target) <= BALANCE_SLACK * analysis.total_flops]
        best = (min(near, key=lambda c: (c.activation_bytes, abs(c.flops_before - target)))
                if near else min(usable, key=lambda c: abs(c.flops_before - target)))
        chosen.append(best.position)
        remaining = [c for c in remaining if c.position > best.position]
    return chosen


def _analysis_for(model_dir: Path, manifest: Manifest) -> StageAnalysis:
    path = Path(model_dir) / manifest.model_file
    if manifest.backend == "onnx":
        return onnx_stage_analysis(path, manifest.extra.get("reference_shapes"))
    if manifest.backend == "torch":
        return analyse_bert(path)
    raise SplitError(f"{manifest.name}: no cut analysis for backend {manifest.backend!r}")


_SPLITTERS = {"onnx": split_onnx, "torch": split_torchscript, "tflite": split_tflite}


def split_model(store: ModelStore, name: str, cuts: int | Sequence[int], *,
                stream: TextIO | None = None) -> list[Path]:
    """Split the stored model ``name`` and install its stages in ``store``.

    ``cuts``: an int is the number of cuts (stages = cuts + 1), placed to balance FLOPs
    among the analysis' candidates; a list gives the positions. The analysis is written
    into the parent manifest's ``extra["stages"]``. Idempotent: stages already made from
    the same parent file at the same positions are left as they are.
    """
    out = stream if stream is not None else sys.stderr
    parent = store.get(name)
    manifest = parent.manifest
    if manifest.backend == "tflite":
        split_tflite(parent.directory, manifest, [], parent.directory)  # says what to install
    analysis = _analysis_for(parent.directory, manifest)
    if manifest.extra.get("stages") != json.loads(json.dumps(analysis.to_json())):
        manifest = replace(manifest, extra={**manifest.extra, "stages": analysis.to_json()})
        save_manifest(parent.directory, manifest)
    if isinstance(cuts, int):
        if cuts < 1:
            raise SplitError("give at least one cut")
        positions = balanced_cuts(analysis, cuts + 1)
    else:
        positions = sorted(set(int(c) for c in cuts))
        if not positions:
            raise SplitError("give at least one cut position")
    count = len(positions) + 1
    recipe = {"kind": "split", "of": name,
              "parent_sha256": file_sha256(parent.directory / manifest.model_file),
              "cuts": positions}
    with tempfile.TemporaryDirectory(prefix=f".split-{name}.", dir=store.root) as tmp:
        made: list[Path] | None = None

        def build_stage(index: int) -> Callable[[Path], Manifest]:
            def build(staging: Path) -> Manifest:
                nonlocal made
                if made is None:  # one split writes every stage; made only if needed
                    made = _SPLITTERS[manifest.backend](parent.directory, manifest,
                                                        positions, Path(tmp))
                source_dir = made[index]
                for item in source_dir.iterdir():
                    shutil.copy2(item, staging / item.name)
                return load_manifest(staging)
            return build

        return [install_model(store, stage_name(name, i, count), recipe, build_stage(i),
                              stream=out) for i in range(count)]


def stage_of(store: ModelStore, name: str, start: int, stop: int, *,
             stream: TextIO | None = None) -> Path:
    """The stage of the stored model ``name`` that runs positions [start, stop): what a
    node loads for a pipeline stage the leader placed on it.

    A stage of ``name`` already in the store for exactly these positions, cut from the
    parent's current file, is used as it is (one ``split_model`` made, or one prepared
    elsewhere and imported: the only way a TFLite model has stages). Otherwise the stage
    is cut now and installed as ``{name}.part{start}-{stop}``: named by its positions, so
    stages of different plans never overwrite each other, and built once (idempotent, as
    ``split_model``). Raises SplitError for positions the model does not have and
    SplitUnavailable where no stage exists and this kind of model cannot be cut here.
    """
    parent = store.get(name)
    manifest = parent.manifest
    sha = file_sha256(parent.directory / manifest.model_file)
    existing = _stored_stage(store, name, sha, start, stop)
    if existing is not None:
        return existing
    if manifest.backend == "tflite":
        split_tflite(parent.directory, manifest, [], parent.directory)  # says what to do
    if manifest.backend not in _SPLITTERS:
        raise SplitUnavailable(f"cannot cut {name!r}: no splitter for backend "
                               f"{manifest.backend!r}")
    analysis = manifest.extra.get("stages")
    count = int(analysis["node_count"]) if isinstance(analysis, Mapping) \
        and analysis.get("node_count") else _analysis_for(parent.directory, manifest).node_count
    if not 0 <= start < stop <= count or (start, stop) == (0, count):
        raise SplitError(f"{name}: [{start}, {stop}) is not a stage of a model of "
                         f"{count} positions")
    cuts = [p for p in (start, stop) if 0 < p < count]
    recipe = {"kind": "stage", "of": name, "parent_sha256": sha, "positions": [start, stop]}

    def build(staging: Path) -> Manifest:
        with tempfile.TemporaryDirectory(prefix=f".stage-{name}.", dir=store.root) as tmp:
            made = _SPLITTERS[manifest.backend](parent.directory, manifest, cuts, Path(tmp))
            source_dir = made[0 if start == 0 else 1]
            for item in source_dir.iterdir():
                shutil.copy2(item, staging / item.name)
        return load_manifest(staging)

    out = stream if stream is not None else sys.stderr
    return install_model(store, f"{name}.part{start}-{stop}", recipe, build, stream=out)


def _stored_stage(store: ModelStore, name: str, parent_sha: str, start: int,
                  stop: int) -> Path | None:
    """A stage of ``name`` in ``store`` for positions [start, stop), cut from the parent
    file whose sha256 is ``parent_sha``; None if there is none."""
    stored, _ = store.scan()
    for model in stored:
        stage = model.manifest.extra.get("stage")
        if model.manifest.task == STAGE_TASK and isinstance(stage, Mapping) \
                and stage.get("of") == name and stage.get("positions") == [start, stop] \
                and check_intact(model.directory, {"parent_sha256": parent_sha}) is None:
            return model.directory
    return None
