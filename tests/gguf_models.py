"""Small random-weight GGUF files for every supported architecture and quantisation,
written with the ``gguf`` package's ``GGUFWriter`` (lab code: tests and benchmarks only).

``gguf.quants.quantize`` covers F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; the K-quants
(Q4_K, Q5_K, Q6_K) have only de-quantisers there, so ``quantize`` below packs them itself
(a plain min/max fit, not llama.cpp's search; any valid block is a valid test weight, and
the tests check each packing against ``gguf.quants.dequantize``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CORPUS = ("The capital of France is Paris. Once upon a time, there was a little robot who "
          "wanted to see the sea. Water boils at 100 degrees and freezes at 0 degrees. "
          "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2). "
          "The quick brown fox jumps over the lazy dog, then the dog sleeps in the sun.")


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _pack_k_scales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block -> the 12 bytes ``Q4_K.get_scale_min``
    unpacks."""
    sc, mins = sc.astype(np.uint8), mins.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mins[:, :4] & 0x3F) | ((mins[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)
    return out


def _quantize_k(w: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits 4) or Q5_K (bits 5): per 32-weight block q = round((x - min) / scale)."""
    sb = w.reshape(-1, 8, 32).astype(np.float32)
    top = (1 << bits) - 1
    low = np.minimum(sb.min(-1), 0)
    scale = (sb.max(-1) - low) / top
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum((-low).max(-1), 1e-8) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 0, 63)
    mins = np.clip(np.round(-low / dmin[:, None]), 0, 63)
    step = d[:, None] * sc
    q = np.where(step[..., None] > 0, np.round((sb + (dmin[:, None] * mins)[..., None])
                                               / np.where(step > 0, step, 1)[..., None]), 0)
    q = np.clip(q, 0, top).astype(np.uint8).reshape(-1, 4, 2, 32)  # chunks of 64
    qs = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mins)]
    if bits == 5:
        high = (q.reshape(-1, 8, 32) >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
        parts.append(np.bitwise_or.reduce(high, axis=1).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=-1)


def _quantize_q6_k(w: np.ndarray) -> np.ndarray:
    sb = w.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(sb).max(-1) / 31
    d = (np.maximum(np.abs(scale).max(-1), 1e-8) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), -128, 127)
    step = d[:, None] * sc
    q = np.round(sb / np.where(step > 0, step, 1)[..., None]) + 32
    q = np.clip(q, 0, 63).astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128
    ql = (q[..., :64] & 0x0F) | ((q[..., 64:] & 0x0F) << 4)
    hi = (q >> 4).reshape(-1, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = np.bitwise_or.reduce(hi, axis=2).astype(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64),
                           sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=-1)


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [N, K] -> the GGUF bytes of ``qtype`` ([N, row bytes]; floats stay floats)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    w = np.ascontiguousarray(w, np.float32)
    if qtype == "F32":
        return w
    if w.shape[0] > 8192:  # in row chunks: the quantisers' temporaries are several x w
        return np.concatenate([quantize(w[i:i + 8192], qtype)
                               for i in range(0, w.shape[0], 8192)])
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        blocks = (_quantize_q6_k(w) if qtype == "Q6_K"
                  else _quantize_k(w, 4 if qtype == "Q4_K" else 5))
        return blocks.reshape(w.shape[0], -1)
    return gguf_quantize(w, GGMLQuantizationType[qtype])


# --- tokenizers --------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _train_merges(words: list[list[str]], count: int) -> list[tuple[str, str]]:
    """A tiny BPE training run: the most frequent adjacent pair, ``count`` times."""
    merges = []
    for _ in range(count):
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = []
        for word in words:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged.append(out)
        words = merged
    return merges


@dataclass
class Vocab:
    kind: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    bos: int | None = None
    eos: int = 0

    def index(self, token: str) -> int:
        return self.tokens.index(token)


def bpe_vocab(specials: list[str], merges: int = 80) -> Vocab:
    """Byte-level BPE (Llama 3, Qwen2 style): 256 byte symbols, trained merges, specials."""
    spell = _bytes_to_unicode()
    words = [[spell[b] for b in w.encode()] for w in re.findall(r" ?\w+| ?[^\w\s]+", CORPUS)]
    pairs = _train_merges(words, merges)
    tokens = [spell[b] for b in range(256)] + [a + b for a, b in pairs]
    tokens = list(dict.fromkeys(tokens))
    types = [1] * len(tokens) + [3] * len(specials)
    return Vocab("gpt2", tokens + specials, types, merges=[f"{a} {b}" for a, b in pairs],
                 eos=len(tokens))


def spm_vocab(specials: list[str], merges: int = 80, bos: int = 1, eos: int = 2,
              unk: int = 0) -> Vocab:
    """SentencePiece-style (Llama 2, Gemma, Phi-3): specials first (unknown, BOS, EOS...),
    256 byte-fallback tokens, characters, then merged pieces by falling score."""
    words = [list("\u2581" + w) for w in re.findall(r"\S+", CORPUS)]
    pairs = _train_merges(words, merges)
    chars = sorted({c for w in words for c in w})
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = list(dict.fromkeys(chars + [a + b for a, b in pairs]))
    tokens = specials + byte_tokens + pieces
    types = [2 if i == unk else 3 for i in range(len(specials))] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))]
    return Vocab("llama", tokens, types, scores=scores, bos=bos, eos=eos)


# --- models -----------------------------------------------------------------------------

@dataclass
class Spec:
    arch: str
    vocab: Vocab
    layers: int = 2
    hidden: int = 256
    ffn: int = 512
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None  # None: hidden // heads (not written)
    context: int = 256
    tied: bool = True
    qkv_bias: bool = False
    rope_freqs: bool = False  # Llama 3's frequency factors
    linear_rope: float = 0.0
    sliding_window: int = 0
    softcaps: tuple[float, float] = (0.0, 0.0)  # attention, final (Gemma 2)
    attn_scale: float = 0.0  # {arch}.attention.scale; 0: not written
    add_bos: bool | None = None
    chat_template: str | None = None
    pre: str | None = None  # tokenizer.ggml.pre (byte-level BPE only)
    # Tensor-name pattern (regex) -> GGUF type; the first match wins, then "default".
    types: dict[str, str] = field(default_factory=dict)
    vocab_size: int | None = None  # pad the token list to this many (as real files do)
    rope_base: float | None = None
    scale: float = 3.0  # weight magnitude (larger: the layers outweigh the embedding)
    embedding_std: float = 1.0  # Gemma scales embeddings up by sqrt(width): keep them small
    seed: int = 0


def _qtype(spec: Spec, name: str) -> str:
    for pattern, qtype in spec.types.items():
        if pattern != "default" and re.search(pattern, name):
            return qtype
    return spec.types.get("default", "Q8_0")


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for a Llama Q/K matrix (rotate-half -> adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_model(path: Path, spec: Spec) -> Path:
    """Write the GGUF described by ``spec`` (random weights) and return its path."""
    import gguf

    rng = np.random.default_rng(spec.seed)
    hd = spec.head_dim or spec.hidden // spec.heads
    arch, vocab = spec.arch, spec.vocab
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(spec.layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_freq_base(spec.rope_base or (10000.0 if arch != "qwen2" else 1000000.0))
    w.add_layer_norm_rms_eps(1e-6 if arch != "llama" else 1e-5)
    tokens, types = list(vocab.tokens), list(vocab.types)
    if spec.vocab_size:  # padding rows, as Qwen2's 151936 rows hold 151665 real tokens
        tokens += [f"[PAD{i}]" for i in range(len(tokens), spec.vocab_size)]
        types += [5] * (spec.vocab_size - len(types))  # UNUSED
    w.add_vocab_size(len(tokens))
    if spec.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if spec.linear_rope:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.linear_rope)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    if spec.attn_scale:
        w.add_attention_scale(spec.attn_scale)
    if spec.softcaps[0]:
        w.add_attn_logit_softcapping(spec.softcaps[0])
        w.add_final_logit_softcapping(spec.softcaps[1])
    w.add_tokenizer_model(vocab.kind)
    if spec.pre:
        w.add_tokenizer_pre(spec.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if vocab.scores:
        w.add_token_scores(vocab.scores + [0.0] * (len(tokens) - len(vocab.scores)))
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.bos is not None:
        w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    if spec.add_bos is not None:
        w.add_add_bos_token(spec.add_bos)
    if arch in ("gemma", "gemma2"):
        w.add_add_space_prefix(False)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = rng.standard_normal((rows, cols)).astype(np.float32) * (
            spec.scale / np.sqrt(cols))
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            values = permute_qk(values, spec.heads if ".attn_q." in name else spec.kv_heads)
        qtype = _qtype(spec, name)
        data = quantize(values, qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype == "F32"
                     else gguf.GGMLQuantizationType[qtype])

    def vector(name: str, size: int, around: float = 1.0) -> None:
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(size)).astype(np.float32))

    n_vocab = len(tokens)
    w.add_tensor("token_embd.weight", quantize(
        spec.embedding_std * rng.standard_normal((n_vocab, spec.hidden)).astype(np.float32), _qtype(
            spec, "token_embd.weight")),
        raw_dtype=gguf.GGMLQuantizationType[_qtype(spec, "token_embd.weight")])
    if not spec.tied:
        matrix("output.weight", n_vocab, spec.hidden)
    vector("output_norm.weight", spec.hidden)
    if spec.rope_freqs:
        w.add_tensor("rope_freqs.weight", np.linspace(1, 8, hd // 2).astype(np.float32))
    for i in range(spec.layers):
        p = f"blk.{i}"
        vector(f"{p}.attn_norm.weight", spec.hidden)
        vector(f"{p}.ffn_norm.weight", spec.hidden)
        if arch == "gemma2":
            vector(f"{p}.post_attention_norm.weight", spec.hidden)
            vector(f"{p}.post_ffw_norm.weight", spec.hidden)
        if arch == "phi3":
            matrix(f"{p}.attn_qkv.weight", (spec.heads + 2 * spec.kv_heads) * hd, spec.hidden)
            matrix(f"{p}.ffn_up.weight", 2 * spec.ffn, spec.hidden)
        else:
            matrix(f"{p}.attn_q.weight", spec.heads * hd, spec.hidden)
            matrix(f"{p}.attn_k.weight", spec.kv_heads * hd, spec.hidden)
            matrix(f"{p}.attn_v.weight", spec.kv_heads * hd, spec.hidden)
            matrix(f"{p}.ffn_gate.weight", spec.ffn, spec.hidden)
            matrix(f"{p}.ffn_up.weight", spec.ffn, spec.hidden)
        if spec.qkv_bias:
            for t, rows in (("q", spec.heads), ("k", spec.kv_heads), ("v", spec.kv_heads)):
                vector(f"{p}.attn_{t}.bias", rows * hd, around=0.0)
        matrix(f"{p}.attn_output.weight", spec.hidden, spec.heads * hd)
        matrix(f"{p}.ffn_down.weight", spec.hidden, spec.ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get more bits (Q4_K_M)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def qwen25_05b_q4_k_m(seed: int = 0) -> Spec:
    """Qwen2.5-0.5B-Instruct's real shapes with llama.cpp's Q4_K_M choices: rows of 896
    weights are not whole 256-weight super-blocks, so llama.cpp falls back there (Q4_K ->
    Q5_0, Q6_K -> Q8_0) and only ffn_down (rows of 4864) is K-quantised; the tied
    embedding is Q8_0. Random weights."""
    layers = 24
    more = "|".join(str(i) for i in range(layers) if use_more_bits(i, layers))
    return Spec(
        "qwen2", bpe_vocab(CHATML_SPECIALS), pre="qwen2", layers=layers, hidden=896,
        ffn=4864, heads=14, kv_heads=2, context=32768, qkv_bias=True, vocab_size=151936,
        rope_base=1000000.0, scale=3.0, seed=seed,
        types={rf"blk\.({more})\.attn_v": "Q8_0", rf"blk\.({more})\.ffn_down": "Q6_K",
               r"ffn_down": "Q4_K", r"token_embd": "Q8_0", "default": "Q5_0"})


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def requantize(src: Path, dest: Path, mix: str) -> Path:
    """A GGUF's weights de-quantised (``gguf``) and quantised again to a K-quant mix, as
    llama.cpp's ``Q4_K_M`` / ``Q5_K_M`` choose types (rows that are not whole 256-weight
    super-blocks fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); metadata copied."""
    import gguf
    from gguf.quants import dequantize

    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}[mix]
    fallback = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    layers = int(reader.fields[f"{arch}.block_count"].contents())
    writer = gguf.GGUFWriter(str(dest), arch)
    for key, item in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        array = item.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, item.contents(), item.types[0],
                             sub_type=item.types[-1] if array else None)
    for tensor in reader.tensors:
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        if values.ndim == 1 or len(tensor.shape) == 1:
            writer.add_tensor(tensor.name, values.astype(np.float32).reshape(-1))
            continue
        match = re.match(r"blk\.(\d+)\.", tensor.name)
        more = match is not None and use_more_bits(int(match.group(1)), layers)
        qtype = "Q6_K" if (tensor.name in ("output.weight", "token_embd.weight")
                           or (more and re.search(r"attn_v|ffn_down", tensor.name))) else base
        if values.shape[-1] % 256:
            qtype = fallback[qtype]
        writer.add_tensor(tensor.name, quantize(values.reshape(-1, values.shape[-1]), qtype),
                          raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
