"""An independent reference for the GGUF LLM path: a plain float64 numpy forward pass.

Written from each architecture's published definition (the transformers modelling code
and llama.cpp's graph for the GGUF conventions), not from epara's graph code: weights are
de-quantised by the ``gguf`` package; rotary embeddings are applied the way llama.cpp
applies them to a GGUF's own weights (adjacent pairs for ``llama``, whose Q/K rows
llama.cpp's converter permutes, halves for the others), so epara's row un-permutation is
checked too, not shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class _Weights:
    """De-quantised (float64) weights by name, de-quantised when used: a 0.5B model's
    would not fit in memory at once."""

    def __init__(self, reader: Any, dequantize: Any, cache: bool) -> None:
        self._tensors = {t.name: t for t in reader.tensors}
        self._dequantize = dequantize
        # De-quantised GGUF weights are float32 values: a float32 cache loses nothing.
        self._cache: dict[str, np.ndarray] | None = {} if cache else None

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _rows(self, name: str, index: Any) -> np.ndarray:
        t = self._tensors[name]
        raw = np.asarray(t.data)
        shape = [int(d) for d in reversed(t.shape)]
        if len(shape) == 1:
            return self._dequantize(raw, t.tensor_type).astype(np.float64).reshape(shape)
        rows = raw.reshape(shape[0], -1)[index]
        return self._dequantize(rows, t.tensor_type).astype(np.float64).reshape(
            -1, shape[1])

    def __getitem__(self, name: str) -> np.ndarray:
        if self._cache is None:
            return self._rows(name, slice(None))
        if name not in self._cache:
            self._cache[name] = self._rows(name, slice(None)).astype(np.float32)
        return self._cache[name].astype(np.float64)

    def rows(self, name: str, ids: list[int]) -> np.ndarray:
        return self._rows(name, np.asarray(ids))

    def times_transposed(self, x: np.ndarray, name: str, chunk: int = 16384) -> np.ndarray:
        """x @ W.T, W de-quantised a block of rows at a time (cached as float32 blocks
        when caching)."""
        rows = int(self._tensors[name].shape[-1])
        out = []
        for i in range(0, rows, chunk):
            key = f"{name}[{i}]"
            if self._cache is None:
                block = self._rows(name, slice(i, i + chunk))
            else:
                if key not in self._cache:
                    self._cache[key] = self._rows(name, slice(i, i + chunk)).astype(np.float32)
                block = self._cache[key].astype(np.float64)
            out.append(x @ block.T)
        return np.concatenate(out, axis=-1)


class Reference:
    def __init__(self, path: Path, cache: bool = False) -> None:
        """``cache``: keep the de-quantised matrices (float32) between forward passes
        (faster greedy runs; a 0.5B model's take 2 GB)."""
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(str(path))
        self.arch = str(reader.fields["general.architecture"].contents())
        self.meta = {k: f.contents() for k, f in reader.fields.items()
                     if k.startswith(self.arch + ".")}
        self.w = _Weights(reader, dequantize, cache)

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def forward(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] for a sequence starting at position 0."""
        arch, w = self.arch, self.w
        hidden, heads = int(self.get("embedding_length")), int(self.get("attention.head_count"))
        kv_heads = int(self.get("attention.head_count_kv", heads))
        hd = int(self.get("attention.key_length", hidden // heads))
        eps = float(self.get("attention.layer_norm_rms_epsilon"))
        base = float(self.get("rope.freq_base", 10000.0))
        gemma = arch in ("gemma", "gemma2")
        n = len(ids)

        def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
            # Gemma's norm multiplies by (1 + w); llama.cpp's converter stores 1 + w.
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

        inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
        if "rope_freqs.weight" in w:  # Llama 3: llama.cpp divides each frequency
            inv = inv / w["rope_freqs.weight"]
        positions = np.arange(n, dtype=np.float64)
        if self.get("rope.scaling.type") == "linear":
            positions = positions / float(self.get("rope.scaling.factor"))
        angles = positions[:, None] * inv[None]  # [n, hd/2]
        cos, sin = np.cos(angles), np.sin(angles)

        def rope(x: np.ndarray) -> np.ndarray:  # [heads, n, hd]
            if arch == "llama":  # llama.cpp's "normal" rotary: adjacent pairs
                a, b = x[..., 0::2], x[..., 1::2]
                out = np.empty_like(x)
                out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
                return out
            a, b = x[..., :hd // 2], x[..., hd // 2:]  # "neox": the two halves
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

        def act(x: np.ndarray) -> np.ndarray:
            if gemma:  # gelu_pytorch_tanh
                return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
            return x / (1 + np.exp(-x))

        def cap(x: np.ndarray, value: float | None) -> np.ndarray:
            return x if not value else value * np.tanh(x / value)

        window = int(self.get("attention.sliding_window", 0) or 0)
        h = w.rows("token_embd.weight", ids)
        if gemma:
            h = h * np.sqrt(hidden)
        for i in range(int(self.get("block_count"))):
            p = f"blk.{i}"
            x = rms(h, w[f"{p}.attn_norm.weight"])
            if f"{p}.attn_qkv.weight" in w:  # Phi-3
                q, k, v = np.split(x @ w[f"{p}.attn_qkv.weight"].T,
                                   [heads * hd, (heads + kv_heads) * hd], -1)
            else:
                q, k, v = (x @ w[f"{p}.attn_{t}.weight"].T for t in "qkv")
                if f"{p}.attn_q.bias" in w:  # Qwen2
                    q, k, v = (y + w[f"{p}.attn_{t}.bias"]
                               for y, t in zip((q, k, v), "qkv", strict=True))
            q = rope(q.reshape(n, heads, hd).transpose(1, 0, 2))
            k = rope(k.reshape(n, kv_heads, hd).transpose(1, 0, 2))
            v = v.reshape(n, kv_heads, hd).transpose(1, 0, 2)
            k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
            scale = float(self.get("attention.scale", 0.0)) or 1 / np.sqrt(hd)
            scores = cap(q @ k.transpose(0, 2, 1) * scale,
                         self.get("attn_logit_softcapping") if arch == "gemma2" else None)
            distance = np.arange(n)[:, None] - np.arange(n)[None]
            visible = distance >= 0
            # Gemma 2: even layers slide; Phi-3: every layer.
            if window and (arch == "phi3" or (arch == "gemma2" and i % 2 == 0)):
                visible &= distance < window
            scores = np.where(visible, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            ctx = (probs / probs.sum(-1, keepdims=True)) @ v
            out = ctx.transpose(1, 0, 2).reshape(n, -1) @ w[f"{p}.attn_output.weight"].T
            if arch == "gemma2":
                out = rms(out, w[f"{p}.post_attention_norm.weight"])
            h = h + out
            x = rms(h, w[f"{p}.ffn_norm.weight"])
            if f"{p}.ffn_gate.weight" in w:
                gate, up = x @ w[f"{p}.ffn_gate.weight"].T, x @ w[f"{p}.ffn_up.weight"].T
            else:  # Phi-3: gate and up in one matrix, gate first
                gate, up = np.split(x @ w[f"{p}.ffn_up.weight"].T, 2, -1)
            out = (act(gate) * up) @ w[f"{p}.ffn_down.weight"].T
            if arch == "gemma2":
                out = rms(out, w[f"{p}.post_ffw_norm.weight"])
            h = h + out
        head = "output.weight" if "output.weight" in w else "token_embd.weight"
        logits = w.times_transposed(rms(h, w["output_norm.weight"]), head)
        return cap(logits, self.get("final_logit_softcapping") if arch == "gemma2" else None)

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        out: list[int] = []
        for _ in range(steps):
            out.append(int(self.forward(ids + out)[-1].argmax()))
        return out
