"""Decoder graphs (Llama, Qwen2, Gemma, Gemma 2, Phi-3) built directly with ``onnx.helper``
from a shared weight blob.

Preparation (``llm_prepare``) writes every weight once into ``weights.bin`` (page-aligned
entries, indexed by ``weights.json``) in the layout ONNX Runtime consumes. A graph for any
consecutive layer range (a *stage*) is then a few hundred nodes whose initializers point
into that blob as ONNX external data: building a stage is instant and every stage reads
the very same bytes, so chained stages compute what the whole model computes.

Weights stay in the GGUF's own quantisation, computed exactly rather than re-quantised
(``gguf_quant``): every matrix is a sum of exact 4-bit ``MatMulNBits`` terms plus, for
types with a block minimum (Q4_1, Q5_1, Q4_K, Q5_K), a correction ``sum_block(x) @ m``;
float matrices are plain ``MatMul``. ``config.linears`` describes each matrix's layout.
The token embedding gathers rows of the same tables (for a tied head, the head's own
tables: the embedding is stored once) and rebuilds the weights from them.

Stage interface (``B`` sequences, ``S`` new tokens each, a KV pool of ``C`` positions
per sequence slot):

* inputs: ``input_ids`` int64 [B,S] (first stage) or ``hidden_in`` float [B,S,D];
  ``positions`` int64 [B,S] (rotary positions); ``seqlens_k`` int32 [B] (each row's
  cached length plus ``S`` minus 1) and ``total_length`` int32 scalar (the largest cached
  length plus ``S``); for every layer ``l`` of the stage ``past_k.l`` / ``past_v.l``
  float [B,KVH,C,HD]: the rows' slabs of the KV pool (``LlmStage``).
* outputs: ``logits`` float [B,V] for the last position (last stage) or ``hidden_out``
  [B,S,D]; for every layer ``present_k.l`` / ``present_v.l`` [B,KVH,C,HD], bound to the
  very buffers of ``past_k.l`` / ``past_v.l``: the new keys (rotary applied) and values
  are written into the pool in place.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_BIN = "weights.bin"
WEIGHTS_INDEX = "weights.json"
CONFIG_NAME = "config.json"
BLOCK = 32  # GGUF block size of the legacy quantisations and of K-quant sub-blocks
ALIGN = 4096  # page-aligned weights let ONNX Runtime map them instead of copying
OPSET = 21


@dataclass(frozen=True)
class LlamaConfig:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    rope_base: float
    rms_eps: float
    context: int
    arch: str = "llama"  # the GGUF's general.architecture
    key_length: int = 0  # head dimension; 0: hidden // heads
    activation: str = "silu"  # of the gated FFN: "silu" or "gelu_tanh" (Gemma)
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    attn_softcap: float = 0.0  # Gemma 2: scores = cap * tanh(scores / cap); 0: none
    final_softcap: float = 0.0  # Gemma 2, on the logits
    sandwich_norms: bool = False  # Gemma 2: norms after attention and after the FFN too
    sliding_window: int = 0  # keys visible while query - key < window; 0: all
    attn_scale: float = 0.0  # scores' scale; 0: 1 / sqrt(head size)
    sliding_every: int = 1  # layers l with l % sliding_every == 0 slide (Gemma 2: 2)
    # Matrix key (e.g. "blk.0.qkv", "head") -> its layout: N, K, qtype, block,
    # zero_points (one per 4-bit term), offset (block minimum), dense (float matrix).
    linears: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    embedding: str = "head"  # the matrix whose rows the token embedding gathers

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_json(data: dict[str, Any]) -> LlamaConfig:
        return LlamaConfig(**{k: data[k] for k in LlamaConfig.__dataclass_fields__
                              if k in data})


def load_config(model_dir: Path) -> LlamaConfig:
    return LlamaConfig.from_json(json.loads((Path(model_dir) / CONFIG_NAME).read_text()))


def stage_file_name(lo: int, hi: int, int8_activations: bool = False) -> str:
    return f"stage_{lo:02d}_{hi:02d}{'_a8' if int8_activations else ''}.onnx"


class _Builder:
    """Accumulates nodes, initializers (external data) and unique tensor names."""

    def __init__(self, index: dict[str, dict[str, Any]], linears: dict[str, dict[str, Any]],
                 accuracy_level: int) -> None:
        from onnx import helper

        self.helper = helper
        self.index = index
        self.linears = linears
        self.accuracy_level = accuracy_level
        self.nodes: list[Any] = []
        self.inits: dict[str, Any] = {}
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None,
           outputs: int | Sequence[str] = 1, domain: str = "", **attrs: Any) -> Any:
        if isinstance(outputs, int):
            outs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        else:
            outs = list(outputs)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, domain=domain,
                                                **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, key: str) -> str:
        """An initializer that lives in weights.bin (added once per graph)."""
        if key not in self.inits:
            from onnx import TensorProto

            entry = self.index[key]
            tensor = TensorProto()
            tensor.name = key
            tensor.data_type = self.helper.np_dtype_to_tensor_dtype(np.dtype(entry["dtype"]))
            tensor.dims.extend(entry["shape"])
            tensor.data_location = TensorProto.EXTERNAL
            for k, v in (("location", WEIGHTS_BIN), ("offset", str(entry["offset"])),
                         ("length", str(entry["length"]))):
                item = tensor.external_data.add()
                item.key, item.value = k, v
            self.inits[key] = tensor
        return key

    def const(self, value: np.ndarray | float | int | Sequence[int], hint: str = "c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self.name(hint)
        self.inits[name] = numpy_helper.from_array(arr, name)
        return name


def _rms_norm(b: _Builder, x: str, weight_key: str, eps: float) -> str:
    # RMSNorm (x * rsqrt(mean(x^2) + eps) * w, float32) as one fused op. Gemma's "1 + w"
    # is already folded into the GGUF's norm weights by llama.cpp's converter.
    return b.op("SimplifiedLayerNormalization", [x, b.weight(weight_key)], axis=-1,
                epsilon=eps, stash_type=1)


def zero_point_key(zero_point: int, n_dim: int, n_blocks: int) -> str:
    return f"zp4.{zero_point}.{n_dim}.{n_blocks}"


def _linear(b: _Builder, x: str, key: str) -> str:
    """x[..., K] @ W^T for matrix ``key``: a sum of exact 4-bit MatMulNBits terms plus
    ``blocksum(x) @ offset`` where the type has a block minimum; float matrices MatMul."""
    spec = b.linears[key]
    k_dim, n_dim, block = spec["K"], spec["N"], spec["block"]
    if spec["dense"]:
        y = b.op("MatMul", [x, b.weight(f"{key}.w")])
    else:
        y = None
        for i, zero_point in enumerate(spec["zero_points"]):
            term = b.op("MatMulNBits", [x, b.weight(f"{key}.t{i}.q"), b.weight(f"{key}.t{i}.s"),
                                        b.weight(zero_point_key(zero_point, n_dim,
                                                                k_dim // block))],
                        domain="com.microsoft", K=k_dim, N=n_dim, bits=4, block_size=block,
                        accuracy_level=b.accuracy_level)
            y = term if y is None else b.op("Add", [y, term])
        if spec["offset"]:
            blocks = b.op("Reshape", [x, b.const(np.array([0, 0, k_dim // block, block],
                                                          np.int64))])
            sums = b.op("ReduceSum", [blocks, b.const(np.array([-1], np.int64))], keepdims=0)
            y = b.op("Add", [y, b.op("MatMul", [sums, b.weight(f"{key}.m")])])
    bias = f"{key}.bias"
    return b.op("Add", [y, b.weight(bias)]) if bias in b.index else y


def _embed(b: _Builder, cfg: LlamaConfig, ids: str) -> str:
    """Rows of the embedding matrix for token ids [B,S] -> [B,S,D], rebuilt exactly from
    the stored tables (for a tied head: the head's own tables, stored once)."""
    from onnx import TensorProto

    key = cfg.embedding
    spec = cfg.linears[key]
    k_dim, block = spec["K"], spec["block"]
    if spec["dense"]:  # stored [K, V] for the head's MatMul: gather columns
        rows = b.op("Transpose", [b.op("Gather", [b.weight(f"{key}.w"), ids], axis=1)],
                    perm=[1, 2, 0])
    else:
        rows = None
        last = b.const(np.array([-1], np.int64))
        for i, zero_point in enumerate(spec["zero_points"]):
            packed = b.op("Gather", [b.weight(f"{key}.t{i}.q"), ids])  # [B,S,nb,block/2]
            low = b.op("BitwiseAnd", [packed, b.const(np.uint8(0x0F))])
            high = b.op("BitShift", [packed, b.const(np.uint8(4))], direction="RIGHT")
            pairs = b.op("Concat", [b.op("Unsqueeze", [t, last]) for t in (low, high)],
                         axis=-1)  # element 2i, 2i+1
            codes = b.op("Cast", [b.op("Reshape", [pairs, b.const(
                np.array([0, 0, 0, block], np.int64))])], to=TensorProto.FLOAT)
            if zero_point:
                codes = b.op("Sub", [codes, b.const(np.float32(zero_point))])
            scale = b.op("Unsqueeze", [b.op("Gather", [b.weight(f"{key}.t{i}.rows"), ids]),
                                       last])
            term = b.op("Mul", [codes, scale])
            rows = term if rows is None else b.op("Add", [rows, term])
        if spec["offset"]:  # stored [nb, V] for the block-sum MatMul: gather columns
            offset = b.op("Transpose", [b.op("Gather", [b.weight(f"{key}.m"), ids], axis=1)],
                          perm=[1, 2, 0])
            rows = b.op("Add", [rows, b.op("Unsqueeze", [offset, last])])
        rows = b.op("Reshape", [rows, b.const(np.array([0, 0, k_dim], np.int64))])
    if cfg.embed_scale != 1.0:
        rows = b.op("Mul", [rows, b.const(np.float32(cfg.embed_scale))])
    return rows


def _projections(b: _Builder, x: str, p: str, fused: str, parts: Sequence[str],
                 sizes: Sequence[int]) -> list[str]:
    """The outputs of matrices stored fused (one matmul, then Split) or one by one."""
    if f"{p}.{fused}" in b.linears:
        return b.op("Split", [_linear(b, x, f"{p}.{fused}"),
                              b.const(np.array(sizes, np.int64))],
                    outputs=len(sizes), axis=-1)
    return [_linear(b, x, f"{p}.{part}") for part in parts]


def _softcap(b: _Builder, x: str, cap: float) -> str:
    return b.op("Mul", [b.op("Tanh", [b.op("Div", [x, b.const(np.float32(cap))])]),
                        b.const(np.float32(cap))])


def _layer(b: _Builder, cfg: LlamaConfig, layer: int, h: str) -> str:
    """One decoder layer from residual stream ``h`` to the next residual stream.

    Every layer has the same node pattern (norm first, residual add last), so a stage
    boundary between layers changes no fusion and chained stages stay bit-identical.
    """
    hd, nh, nkv = cfg.head_dim, cfg.heads, cfg.kv_heads
    p = f"blk.{layer}"
    x = _rms_norm(b, h, f"{p}.attn_norm", cfg.rms_eps)
    q, k, v = _projections(b, x, p, "qkv", ("q", "k", "v"), (nh * hd, nkv * hd, nkv * hd))
    # Rotary in transformers' rotate-half convention (interleaved=0) from cached tables.
    q, k = (b.op("RotaryEmbedding", [t, "positions", b.weight("rope.cos"), b.weight("rope.sin")],
                 domain="com.microsoft", interleaved=0, num_heads=heads)
            for t, heads in ((q, nh), (k, nkv)))
    # Attention over the KV pool, updated in place: ``past_k.l`` is a slab of the pool
    # [B, KVH, capacity, HD] that ONNX Runtime binds as both past and present, so
    # GroupQueryAttention writes the new keys and values at each row's own length
    # (``seqlens_k``) and reads only that row's positions: no cache is copied, rows of
    # different lengths batch without padding, and a chunk of a long prompt attends to
    # the chunks before it. Gemma 2's score soft-capping and sliding windows are the
    # op's own ``softcap`` and ``local_window_size`` (ONNX Runtime's window W shows keys
    # with query - key < W: transformers' ``sliding_window``, measured against the
    # reference in tests/test_llm_gguf.py).
    attrs: dict[str, Any] = {}
    if cfg.attn_scale:
        attrs["scale"] = float(cfg.attn_scale)
    if cfg.attn_softcap:
        attrs["softcap"] = float(cfg.attn_softcap)
    if cfg.sliding_window and layer % cfg.sliding_every == 0:
        attrs["local_window_size"] = cfg.sliding_window
    ctx = b.op("GroupQueryAttention",
               [q, k, v, f"past_k.{layer}", f"past_v.{layer}", "seqlens_k", "total_length"],
               outputs=[b.name("attn"), f"present_k.{layer}", f"present_v.{layer}"],
               domain="com.microsoft", num_heads=nh, kv_num_heads=nkv, **attrs)[0]
    attn = _linear(b, ctx, f"{p}.o")
    if cfg.sandwich_norms:
        attn = _rms_norm(b, attn, f"{p}.post_attention_norm", cfg.rms_eps)
    # Residual add and the FFN norm in one op; its fourth output is the residual sum.
    x, residual = b.name("ffn_in"), b.name("residual")
    b.op("SkipSimplifiedLayerNormalization", [attn, h, b.weight(f"{p}.ffn_norm")],
         outputs=[x, "", "", residual], domain="com.microsoft", epsilon=cfg.rms_eps)
    h = residual
    gate, up = _projections(b, x, p, "gateup", ("gate", "up"), (cfg.ffn, cfg.ffn))
    if cfg.activation == "gelu_tanh":
        gate = b.op("Gelu", [gate], approximate="tanh")
    else:
        gate = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    out = _linear(b, b.op("Mul", [gate, up]), f"{p}.down")
    if cfg.sandwich_norms:
        out = _rms_norm(b, out, f"{p}.post_ffw_norm", cfg.rms_eps)
    return b.op("Add", [h, out])


def build_stage_model(model_dir: Path, lo: int, hi: int, int8_activations: bool = False,
                      ) -> Any:
    """The ONNX model (an ``onnx.ModelProto``) for layers ``lo..hi-1``.

    ``int8_activations``: the 4-bit matmuls quantise their inputs to int8 per block
    (``MatMulNBits`` accuracy level 4). Faster, most at batch > 1, but no longer exact:
    greedy output drifts from the float32 reference (see bench/llm_decode.py). Default:
    float32 arithmetic on the exact de-quantised weights (accuracy level 1).
    """
    from onnx import TensorProto, helper

    cfg = load_config(model_dir)
    if not 0 <= lo < hi <= cfg.layers:
        raise ValueError(f"bad layer range {lo}..{hi} for {cfg.layers} layers")
    index = json.loads((Path(model_dir) / WEIGHTS_INDEX).read_text())
    b = _Builder(index, cfg.linears, accuracy_level=4 if int8_activations else 1)
    first, last = lo == 0, hi == cfg.layers
    hd, nkv = cfg.head_dim, cfg.kv_heads
    inputs = []
    if first:
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                    ["batch", "seq"]))
        h = _embed(b, cfg, "input_ids")
    else:
        inputs.append(helper.make_tensor_value_info("hidden_in", TensorProto.FLOAT,
                                                    ["batch", "seq", cfg.hidden]))
        h = "hidden_in"
    inputs.append(helper.make_tensor_value_info("positions", TensorProto.INT64,
                                                ["batch", "seq"]))
    inputs.append(helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]))
    inputs.append(helper.make_tensor_value_info("total_length", TensorProto.INT32, []))
    outputs = []
    for layer in range(lo, hi):
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(
                f"past_{kind}.{layer}", TensorProto.FLOAT, ["batch", nkv, "capacity", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present_{kind}.{layer}", TensorProto.FLOAT, ["batch", nkv, "capacity", hd]))

    for layer in range(lo, hi):
        h = _layer(b, cfg, layer, h)

    if last:
        tail = b.op("Slice", [h, b.const(np.array([-1], np.int64)),
                              b.const(np.array([np.iinfo(np.int64).max], np.int64)),
                              b.const(np.array([1], np.int64))])
        tail = b.op("Squeeze", [_rms_norm(b, tail, "output_norm", cfg.rms_eps),
                                b.const(np.array([1], np.int64))])
        logits = _linear(b, tail, "head")
        if cfg.final_softcap:
            logits = _softcap(b, logits, cfg.final_softcap)
        b.op("Identity", [logits], outputs=["logits"])
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                        ["batch", cfg.vocab]))
    else:
        b.op("Identity", [h], outputs=["hidden_out"])
        outputs.insert(0, helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT,
                                                        ["batch", "seq", cfg.hidden]))
    graph = helper.make_graph(b.nodes, f"{cfg.arch}_{lo}_{hi}", inputs, outputs,
                              list(b.inits.values()))
    return helper.make_model(graph, producer_name="epara",
                             opset_imports=[helper.make_opsetid("", OPSET),
                                            helper.make_opsetid("com.microsoft", 1)])


def build_stages(model_dir: Path, cuts: Sequence[int], int8_activations: bool = False,
                 ) -> list[Path]:
    """Write one graph per stage for cut points ``cuts`` (a cut c: after layer c-1).

    ``cuts=[]`` gives the whole model as one stage. Graph files are small (the weights
    stay in the shared ``weights.bin``); an existing file for the same range is reused.
    """
    import onnx

    cfg = load_config(model_dir)
    bounds = [0, *sorted(cuts), cfg.layers]
    if len(set(bounds)) != len(bounds) or any(not 0 < c < cfg.layers for c in cuts):
        raise ValueError(f"cuts must be distinct layer indices in 1..{cfg.layers - 1}, "
                         f"got {list(cuts)}")
    paths = []
    for lo, hi in itertools.pairwise(bounds):
        path = Path(model_dir) / stage_file_name(lo, hi, int8_activations)
        if not path.exists():
            # Per-process temp name: nodes sharing a store may build the same stage at once.
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            onnx.save_model(build_stage_model(model_dir, lo, hi, int8_activations), str(tmp))
            tmp.replace(path)
        paths.append(path)
    return paths


def stage_range(path: Path) -> tuple[int, int]:
    """Layer range of a stage file written by ``build_stages``."""
    _, lo, hi = Path(path).stem.split("_")[:3]
    return int(lo), int(hi)


def export_stage(model_dir: Path, lo: int, hi: int, dest: Path,
                 int8_activations: bool = False) -> Path:
    """A self-contained directory for layers ``lo..hi-1``: graph, config and only the
    weights that stage reads (what a device needs to host it; the rest of weights.bin
    stays behind). Returns the graph's path in ``dest``; ``dest`` is replaced whole.
    """
    import onnx

    model_dir, dest = Path(model_dir), Path(dest)
    index = json.loads((model_dir / WEIGHTS_INDEX).read_text())
    used = [t.name for t in build_stage_model(model_dir, lo, hi).graph.initializer
            if t.name in index]
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        subset: dict[str, dict[str, Any]] = {}
        copied: dict[int, int] = {}  # source offset -> new offset: aliases stay aliases
        with open(model_dir / WEIGHTS_BIN, "rb") as src, open(work / WEIGHTS_BIN, "wb") as out:
            for key in used:
                entry = index[key]
                if entry["offset"] not in copied:
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    copied[entry["offset"]] = out.tell()
                    src.seek(entry["offset"])
                    out.write(src.read(entry["length"]))
                subset[key] = {**entry, "offset": copied[entry["offset"]]}
        (work / WEIGHTS_INDEX).write_text(json.dumps(subset, indent=1) + "\n")
        shutil.copy(model_dir / CONFIG_NAME, work / CONFIG_NAME)
        name = stage_file_name(lo, hi, int8_activations)
        onnx.save_model(build_stage_model(work, lo, hi, int8_activations), str(work / name))
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest / name
