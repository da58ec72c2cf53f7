"""GGUF weight matrices as sums of exact 4-bit ``MatMulNBits`` terms.

Every block quantisation GGUFs ship in is, per block of 16 or 32 weights, an affine map
of small integer codes. Writing the codes in 4-bit pieces turns any of them into a sum of
terms that ONNX Runtime's fast 4-bit ``MatMulNBits`` computes from the very same values::

    W[n, block] = sum_t scale_t[n, block] * (code_t[n, i] - zp_t) + offset[n, block]

| GGUF type | block | terms (code, scale, zero point)             | offset   |
|-----------|-------|---------------------------------------------|----------|
| Q4_0      | 32    | (q, d, 8)                                   |          |
| Q4_1      | 32    | (q, d, 0)                                   | m        |
| Q5_0      | 32    | (q & 15, d, 0), (q >> 4, 16d, 1)            |          |
| Q5_1      | 32    | (q & 15, d, 0), (q >> 4, 16d, 0)            | m        |
| Q8_0      | 32    | (q >> 4 + 8, 16d, 8), (q & 15, d, 0)        |          |
| Q4_K      | 32    | (q, d*sc, 0)                                | -dmin*m  |
| Q5_K      | 32    | (q & 15, d*sc, 0), (q >> 4, 16*d*sc, 0)     | -dmin*m  |
| Q6_K      | 16    | (q & 15, d*sc, 0), (q >> 4, 16*d*sc, 2)     |          |
| F32/F16/BF16 | -  | none: a dense float32 matrix                |          |

Each scale is the float32 product the ``gguf`` package's de-quantiser forms itself, and a
code times a scale is exact in float32, so the terms add up to exactly the weights
``gguf.quants.dequantize`` returns (the tests check that bit for bit). The offset is the
block's additive constant, computed as ``blocksum(x) @ offset``: ``MatMulNBits``' float
zero points would do it too but take a de-quantising path about 10x slower.

Why not ``gguf.quants`` alone: it returns float weights, and float weights in ONNX
Runtime cost 8x the memory traffic of 4-bit ones; ``MatMulNBits`` needs the integer
codes and the scales, which only the block layout gives. 8-bit ``MatMulNBits`` would
hold a Q8_0 block in one term but runs a de-quantising fallback on CPU (125 ms against
2.3 ms for the two 4-bit halves, measured on SmolLM2's LM head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

QK_K = 256  # K-quant super-block


@dataclass
class Term:
    codes: np.ndarray  # uint8 [N, K], values 0..15
    scales: np.ndarray  # float32 [N, K // block]
    zero_point: int


@dataclass
class Decomposed:
    """A weight matrix W [N, K] (GGUF's row-major [out, in]) as exact 4-bit terms."""

    qtype: str
    block: int
    terms: list[Term] = field(default_factory=list)
    offset: np.ndarray | None = None  # float32 [N, K // block]
    dense: np.ndarray | None = None  # float32 [N, K]: F32, F16, BF16

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return self.dense.shape  # type: ignore[return-value]
        return self.terms[0].codes.shape  # type: ignore[return-value]

    def signature(self) -> tuple[Any, ...]:
        """Matrices with one signature can be stacked along N into one fused matmul."""
        return (self.dense is not None, self.block,
                tuple(t.zero_point for t in self.terms), self.offset is not None)

    def reconstruct(self) -> np.ndarray:
        """W in float32, from the terms (what the graph computes with)."""
        if self.dense is not None:
            return self.dense
        n, k = self.shape
        w = np.zeros((n, k // self.block, self.block), np.float32)
        for t in self.terms:
            codes = t.codes.reshape(n, -1, self.block).astype(np.float32) - t.zero_point
            w += codes * t.scales[..., None]
        if self.offset is not None:
            w += self.offset[..., None]
        return w.reshape(n, k)

    def rows(self, index: np.ndarray | slice) -> Decomposed:
        """The same decomposition for a selection/permutation of rows."""
        return Decomposed(
            self.qtype, self.block,
            [Term(t.codes[index], t.scales[index], t.zero_point) for t in self.terms],
            None if self.offset is None else self.offset[index],
            None if self.dense is None else self.dense[index])


def stack(parts: list[Decomposed]) -> Decomposed:
    """Row-wise concatenation of matrices with one signature (fused Q/K/V, gate/up)."""
    if len({p.signature() for p in parts}) != 1:
        raise ValueError("only matrices of one quantisation layout can be stacked")
    first = parts[0]
    terms = [Term(np.concatenate([p.terms[i].codes for p in parts]),
                  np.concatenate([p.terms[i].scales for p in parts]), t.zero_point)
             for i, t in enumerate(first.terms)]
    offset = None if first.offset is None else np.concatenate([p.offset for p in parts])
    dense = None if first.dense is None else np.concatenate([p.dense for p in parts])
    return Decomposed(first.qtype, first.block, terms, offset, dense)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields [..., 2 bytes] -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[..., 16 bytes] -> [..., 32] codes: element j in byte j's low nibble, j+16 high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4-byte little-endian mask [..., 4] -> [..., 32] bits (bit j: element j)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def decompose(raw: np.ndarray, qtype: str, k: int) -> Decomposed:
    """GGUF tensor bytes (rows of one output each: [N, row bytes], or the float array
    the reader gives for float types) -> exact terms. ``k``: the row length in weights."""
    if qtype in ("F32", "F16", "BF16"):
        if qtype == "BF16":
            dense = (np.asarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            dense = np.asarray(raw).astype(np.float32)
        return Decomposed(qtype, k, dense=dense.reshape(-1, k))
    n = raw.shape[0]
    raw = np.asarray(raw, np.uint8).reshape(n, -1)
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[qtype]
        b = raw.reshape(n, -1, size)
        d = _f16(b[..., 0:2])
        flat = lambda a: np.ascontiguousarray(a.reshape(n, -1))  # noqa: E731
        if qtype == "Q8_0":
            q = b[..., 2:].view(np.int8).astype(np.int16)
            return Decomposed(qtype, 32, [Term(flat((q >> 4) + 8).astype(np.uint8), 16 * d, 8),
                                          Term(flat(q & 0x0F).astype(np.uint8), d, 0)])
        if qtype == "Q4_0":
            return Decomposed(qtype, 32, [Term(flat(_nibbles32(b[..., 2:])), d, 8)])
        if qtype == "Q4_1":
            return Decomposed(qtype, 32, [Term(flat(_nibbles32(b[..., 4:])), d, 0)],
                              offset=_f16(b[..., 2:4]))
        start = 2 if qtype == "Q5_0" else 4
        low = flat(_nibbles32(b[..., start + 4:]))
        high = flat(_high_bits32(b[..., start:start + 4]))
        if qtype == "Q5_0":
            return Decomposed(qtype, 32, [Term(low, d, 0), Term(high, 16 * d, 1)])
        return Decomposed(qtype, 32, [Term(low, d, 0), Term(high, 16 * d, 0)],
                          offset=_f16(b[..., 2:4]))
    if qtype in ("Q4_K", "Q5_K"):
        from gguf.quants import Q4_K

        size = 144 if qtype == "Q4_K" else 176
        b = raw.reshape(-1, size)  # one super-block (256 weights, 8 blocks) per row
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = Q4_K.get_scale_min(b[:, 4:16])  # 6-bit scales and mins, gguf's unpacking
        scales = (d[:, None] * sc.astype(np.float32)).reshape(n, -1)
        offset = -(dmin[:, None] * m.astype(np.float32)).reshape(n, -1)
        qs = b[:, -128:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        low = (qs & 0x0F).reshape(n, -1)  # 64-weight chunks: 32 low nibbles, 32 high ones
        if qtype == "Q4_K":
            return Decomposed(qtype, 32, [Term(low, scales, 0)], offset=offset)
        qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        high = (qh & 0x01).reshape(n, -1)  # block j's bit is bit j of byte l
        return Decomposed(qtype, 32, [Term(low, scales, 0), Term(high, 16 * scales, 0)],
                          offset=offset)
    if qtype == "Q6_K":
        b = raw.reshape(-1, 210)
        ql, qh = b[:, :128], b[:, 128:192]
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])
        scales = (d[:, None] * sc).reshape(n, -1)  # 16 blocks of 16 per super-block
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32)
                >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
        return Decomposed(qtype, 16, [Term(low.reshape(n, -1), scales, 0),
                                      Term(high.reshape(n, -1), 16 * scales, 2)])
    raise ValueError(f"GGUF tensor type {qtype} is not supported; epara reads F32, F16, "
                     "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K")


def pack_nibbles(codes: np.ndarray, block: int) -> np.ndarray:
    """[N, K] codes 0..15 -> MatMulNBits' [N, K/block, block/2] (element 2i low nibble)."""
    n = codes.shape[0]
    codes = codes.reshape(n, -1, block)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q4_K", "Q5_K", "Q6_K")
