"""A BERT sentence encoder in plain torch, loaded from a ``model.safetensors`` file.

Why not ``transformers``: it is a large dependency (and pulls tokenizers, hub clients) that
a device only running a prepared model never needs. This file is enough to turn the
all-MiniLM-L6-v2 checkpoint into one TorchScript file computing exactly what
sentence-transformers computes for it: BERT encoder, mean pooling over the attention mask,
L2 normalisation. The zoo scripts it once at prepare time; devices load the TorchScript.

The safetensors format is simple enough to read by hand (8-byte little-endian header
length, a JSON header of name -> dtype/shape/offsets, then raw little-endian buffers), so
the ``torch`` extra needs no ``safetensors`` package.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# safetensors dtype codes -> numpy dtypes (little-endian, as the format specifies).
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a ``.safetensors`` file, as torch tensors (copies, CPU)."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"{path}: header length {header_len} exceeds the file size")
    header: dict[str, Any] = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype == "BF16":  # numpy has no bfloat16: reinterpret the raw 16-bit words
            start, end = info["data_offsets"]
            raw = np.frombuffer(data, np.uint16, (end - start) // 2, base + start)
            tensors[name] = torch.from_numpy(raw.astype(np.int16).copy()).view(
                torch.bfloat16).reshape(info["shape"])
            continue
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        start, end = info["data_offsets"]
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        count = (end - start) // np_dtype.itemsize
        array = np.frombuffer(data, np_dtype, count, base + start).reshape(info["shape"])
        tensors[name] = torch.from_numpy(array.copy())
    return tensors


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> BertConfig:
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act 'gelu' is supported, got {data['hidden_act']!r}")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return BertConfig(**{k: data[k] for k in BertConfig.__dataclass_fields__})


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.inter = nn.Linear(h, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // self.heads
        q = self.query(x).view(b, s, self.heads, d).transpose(1, 2)
        k = self.key(x).view(b, s, self.heads, d).transpose(1, 2)
        v = self.value(x).view(b, s, self.heads, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.out(F.gelu(self.inter(x))))


class SentenceEncoder(nn.Module):
    """input_ids, attention_mask int64[batch, seq] -> L2-normalised mean embedding."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.position = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)
        self.emb_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        # Single-segment input: token type 0 everywhere, as sentence-transformers sends.
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.emb_norm(x)
        mask = attention_mask.to(x.dtype)
        # Padding keys get the most negative float added, as transformers' BERT does.
        # (torch.finfo and globals are not scriptable: float32's minimum is spelt out.)
        bias = (1.0 - mask)[:, None, None, :] * -3.4028234663852886e38
        for layer in self.layers:
            x = layer(x, bias)
        summed = (x * mask[:, :, None]).sum(dim=1)
        mean = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(mean, p=2.0, dim=1)


# Checkpoint (transformers BertModel) names -> this module's names, per layer.
_LAYER_NAMES = {
    "attention.self.query": "query", "attention.self.key": "key",
    "attention.self.value": "value", "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "inter",
    "output.dense": "out", "output.LayerNorm": "out_norm",
}


def _rename(weights: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    top = {"embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
           "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "emb_norm"}
    for i in range(layers):
        for src, dst in _LAYER_NAMES.items():
            top[f"encoder.layer.{i}.{src}"] = f"layers.{i}.{dst}"
    state: dict[str, torch.Tensor] = {}
    for src, dst in top.items():
        for param in ("weight", "bias"):
            key = f"{src}.{param}"
            for prefix in ("", "bert."):  # some checkpoints keep the BertModel prefix
                if prefix + key in weights:
                    state[f"{dst}.{param}"] = weights[prefix + key]
                    break
    return state


def load_sentence_encoder(model_dir: Path) -> SentenceEncoder:
    """Build the encoder from ``config.json`` + ``model.safetensors`` in ``model_dir``."""
    cfg = BertConfig.from_json(json.loads((Path(model_dir) / "config.json").read_text()))
    encoder = SentenceEncoder(cfg)
    weights = read_safetensors(Path(model_dir) / "model.safetensors")
    # strict: a missing or misnamed weight must fail here, not give silent garbage.
    encoder.load_state_dict(_rename(weights, cfg.num_hidden_layers), strict=True)
    return encoder.eval()
