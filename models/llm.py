"""Text generation on ONNX Runtime: pipeline stages with their own KV caches, and an
engine that batches sequences continuously over them.

No network code here: the node calls ``LlmEngine.step`` from one worker thread and
forwards the events. A stage (``LlmStage``) owns its layers' KV cache keyed by sequence
id, so a stage can later move to another device and keep its cache there; the engine
only passes activations from one stage to the next.

Serving needs ``onnxruntime``, ``numpy``, ``tokenizers`` and ``jinja2`` (the ``llm``
extra); graphs and weights come from ``llm_prepare``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from epara.models.llm_graph import NEG, load_config, stage_range
from epara.models.manifest import Manifest


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: fresh entropy per sequence
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one


@dataclass(frozen=True)
class TokenEvent:
    seq_id: str
    token_id: int  # -1 on a cancel event; a stop token's id ends with text ""
    text: str  # this event's piece; the pieces of a sequence concatenate to its text
    finish_reason: str | None  # None while generating; "stop" | "length" | "cancelled"


class StageLike(Protocol):
    """What the engine drives: an ``LlmStage`` here, or a chain of stages on other nodes
    (the node's pipeline client) that keeps its caches there."""

    layers: range

    def forward(self, seq_ids: Sequence[str], inputs: np.ndarray,
                positions: np.ndarray) -> np.ndarray: ...

    def drop(self, seq_id: str) -> None: ...


class LlmStage:
    """One stage (a consecutive layer range): its ONNX session and every sequence's cache.

    ``forward(seq_ids, inputs, positions)`` runs ``S`` new tokens for each of ``B``
    sequences (the same ``S`` for all): ``inputs`` are token ids [B,S] for the first
    stage and hidden states [B,S,D] after it; ``positions`` [B,S] are the tokens'
    absolute positions. It returns hidden states [B,S,D], or the last position's logits
    [B,V] on the last stage, and appends the new keys and values to each sequence's cache.
    Sequences with different cache lengths batch together: shorter caches are padded and
    the padding is masked out.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        config = load_config(Path(path).parent)
        self.layers = range(*stage_range(path))
        self.first = self.layers.start == 0
        self.last = self.layers.stop == config.layers
        self.kv_heads, self.head_dim = config.kv_heads, config.head_dim
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._input_name = "input_ids" if self.first else "hidden_in"
        self._outputs = ["logits" if self.last else "hidden_out"]
        self._outputs += [f"new_{kind}.{layer}" for layer in self.layers for kind in "kv"]
        self._cache: dict[str, _KvCache] = {}

    def length(self, seq_id: str) -> int:
        cache = self._cache.get(seq_id)
        return 0 if cache is None else cache.length

    def drop(self, seq_id: str) -> None:
        self._cache.pop(seq_id, None)

    @property
    def sequences(self) -> int:
        return len(self._cache)

    def forward(self, seq_ids: Sequence[str], inputs: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
        batch, new = positions.shape
        if len(set(seq_ids)) != len(seq_ids) or len(seq_ids) != batch \
                or inputs.shape[:2] != (batch, new):
            raise ValueError(f"{len(seq_ids)} sequences, inputs {inputs.shape}, "
                             f"positions {positions.shape}: they must agree, one row per "
                             "distinct sequence")
        caches = [self._cache.get(s) or _KvCache(len(self.layers), self.kv_heads,
                                                  self.head_dim) for s in seq_ids]
        lengths = [c.length for c in caches]
        # One sequence: its cache buffers go in as they are (no copy), unused capacity
        # masked. Several: their caches are stacked, padded to the longest.
        past = caches[0].capacity if batch == 1 else max(max(lengths), 1)
        bias = np.zeros((batch, new, past + new), np.float32)
        for row, length in enumerate(lengths):
            bias[row, :, length:past] = NEG
        bias[:, :, past:] = np.triu(np.full((new, new), NEG, np.float32), 1)
        feeds: dict[str, np.ndarray] = {
            self._input_name: inputs,
            "positions": np.ascontiguousarray(positions, dtype=np.int64),
            "attn_bias": bias,
        }
        for i, layer in enumerate(self.layers):
            feeds[f"past_k.{layer}"] = _stack([c.k[i] for c in caches], lengths, past)
            feeds[f"past_v.{layer}"] = _stack([c.v[i] for c in caches], lengths, past)
        results = self._session.run(self._outputs, feeds)
        for row, (seq_id, cache) in enumerate(zip(seq_ids, caches, strict=True)):
            cache.append([r[row] for r in results[1::2]], [r[row] for r in results[2::2]])
            self._cache[seq_id] = cache
        return results[0]


class _KvCache:
    """Keys and values of one sequence for one stage's layers: [layers, KVH, capacity, HD],
    grown in steps of ``GROW`` positions (a bounded number of unused, masked slots)."""

    GROW = 64

    def __init__(self, layers: int, kv_heads: int, head_dim: int) -> None:
        self.k = np.zeros((layers, kv_heads, self.GROW, head_dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        end = self.length + keys[0].shape[1]
        if end > self.capacity:
            grow = -(-end // self.GROW) * self.GROW
            for name in ("k", "v"):
                old = getattr(self, name)
                bigger = np.zeros((*old.shape[:2], grow, old.shape[3]), np.float32)
                bigger[:, :, :self.length] = old[:, :, :self.length]
                setattr(self, name, bigger)
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            self.k[i, :, self.length:end] = key
            self.v[i, :, self.length:end] = value
        self.length = end


def _stack(rows: list[np.ndarray], lengths: list[int], past: int) -> np.ndarray:
    """[B, KVH, past, HD] from each row's [KVH, capacity, HD] cache; one row: no copy."""
    if len(rows) == 1:
        return rows[0][None]
    out = np.zeros((len(rows), rows[0].shape[0], past, rows[0].shape[2]), np.float32)
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        out[i, :, :length] = row[:, :length]
    return out


class Detokenizer:
    """Incremental decoding: ``push(token)`` returns the text the token adds.

    Byte-level BPE splits multi-byte characters over several tokens, so decoding tokens
    one at a time would emit broken characters. Decode a short window instead (ids from
    ``prefix`` on, whose text up to ``read`` is already known) and hold text back while
    it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        decode = self._tokenizer.decode
        known = decode(self._ids[self._prefix:self._read])
        fresh = decode(self._ids[self._prefix:])
        if len(fresh) > len(known) and not fresh.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return fresh[len(known):]
        return ""


@dataclass
class _Sequence:
    seq_id: str
    params: GenerationParams
    prompt: list[int]
    rng: np.random.Generator
    decoder: Detokenizer
    generated: list[int] = field(default_factory=list)
    prefilled: bool = False
    text: str = ""  # decoded so far (possibly beyond what was emitted)
    emitted: int = 0  # characters of text already sent


class LlmEngine:
    """Continuous batching over a chain of stages (in-process here; one per device later).

    ``step()`` prefills the sequences added since the last step (each on its own, so a
    long prompt does not pad others) and decodes one token for every sequence that was
    already running, all of them in one batched forward per stage.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int | None = None,
                 stages: Sequence[Path | StageLike] | None = None,
                 prefill_chunk: int = 256) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self.manifest = manifest
        self.config = load_config(model_dir)
        self.prefill_chunk = prefill_chunk
        # Decode micro-batches when the chain's tail is remote (pipeline parallelism).
        self.micro_batches = 2
        if stages is None:
            stages = [model_dir / manifest.model_file]
        self.stages: list[StageLike] = [
            LlmStage(Path(s), threads) if isinstance(s, (str, Path)) else s for s in stages]
        covered = [layer for s in self.stages for layer in s.layers]
        if covered != list(range(self.config.layers)):
            raise ValueError(f"stages cover layers {covered}, need 0..{self.config.layers - 1}"
                             " in order")
        self.tokenizer = Tokenizer.from_file(str(model_dir / manifest.files["tokenizer"]))
        template = manifest.files.get("chat_template")
        self._template = None if template is None else (model_dir / template).read_text()
        self.stop_ids = frozenset(int(t) for t in manifest.extra.get("stop_token_ids", ()))
        # Raw prompts of Llama- and Gemma-family models start with BOS (chat templates
        # write it themselves, from bos_token).
        bos = manifest.extra.get("bos_token_id")
        self._bos = [int(bos)] if bos is not None and manifest.extra.get("add_bos_token") \
            else []
        self._sequences: dict[str, _Sequence] = {}
        self._cancelled: list[str] = []

    @property
    def active(self) -> int:
        return len(self._sequences)

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if messages is not None:
            return self.tokenizer.encode(self.render_chat(messages),
                                         add_special_tokens=False).ids
        return self._bos + self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def render_chat(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._template is None:
            raise ValueError(f"{self.manifest.name} has no chat template: send a prompt")

        def raise_exception(message: str) -> None:
            raise ValueError(f"the chat template refuses the messages: {message}")

        # Sandboxed, with the settings and names transformers gives chat templates.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        extra = self.manifest.extra
        try:
            return env.from_string(self._template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=extra.get("bos_token") or "", eos_token=extra.get("eos_token") or "")
        except TemplateError as exc:  # a user's GGUF may carry any template
            raise ValueError(f"the chat template failed: {exc}") from exc

    def add(self, seq_id: str, prompt: str | None = None, messages: list[dict] | None = None,
            params: GenerationParams = GenerationParams(),
            resume: Sequence[int] = ()) -> None:
        """Start a sequence. ``resume``: tokens it already produced (and whose text was
        already delivered) before a failure elsewhere; generation continues after them."""
        if seq_id in self._sequences or seq_id in self._cancelled:
            raise ValueError(f"sequence {seq_id!r} is already running")
        if params.max_tokens < 1 or params.temperature < 0 or not 0 < params.top_p <= 1 \
                or params.top_k < 0:
            raise ValueError(f"bad generation parameters {params}")
        ids = self.encode(prompt, messages)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.config.context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is "
                             f"{self.config.context}")
        if len(resume) >= params.max_tokens or len(ids) + len(resume) >= self.config.context:
            raise ValueError(f"{len(resume)} resumed tokens leave no room to generate")
        if any(not 0 <= t < self.config.vocab for t in resume):
            raise ValueError("resume tokens must be ids of this model's vocabulary")
        rng = np.random.default_rng(params.seed)
        seq = _Sequence(seq_id, params, ids, rng, Detokenizer(self.tokenizer))
        for token in resume:
            seq.generated.append(int(token))
            seq.text += seq.decoder.push(int(token))
        # What the client was already sent: everything but a held-back stop-string prefix.
        seq.emitted = len(seq.text) - _partial_stop(seq.text, params.stop)
        self._sequences[seq_id] = seq

    def cancel(self, seq_id: str) -> None:
        """Stop a sequence; its last event (``"cancelled"``) comes with the next step."""
        if self._sequences.pop(seq_id, None) is not None:
            self._drop(seq_id)
            self._cancelled.append(seq_id)

    def step(self) -> list[TokenEvent]:
        events = [TokenEvent(s, -1, "", "cancelled") for s in self._cancelled]
        self._cancelled.clear()
        running = [s for s in self._sequences.values() if s.prefilled]
        for seq in [s for s in self._sequences.values() if not s.prefilled]:
            # In chunks: attention scores grow with chunk x context, so one pass over a
            # long prompt would need gigabytes; chunks give the same cache and logits.
            # A resumed sequence (a replay after a failed route) rebuilds its cache from
            # the prompt and the tokens it already produced, then goes on after them.
            tokens = seq.prompt + seq.generated
            for start in range(0, len(tokens), self.prefill_chunk):
                ids = np.array([tokens[start:start + self.prefill_chunk]], np.int64)
                positions = np.arange(start, start + ids.shape[1])[None]
                logits = self._forward([seq.seq_id], ids, positions)
            seq.prefilled = True
            events.append(self._accept(seq, logits[0]))
        if running:
            last = np.array([[s.generated[-1]] for s in running], np.int64)
            positions = np.array([[len(s.prompt) + len(s.generated) - 1] for s in running])
            logits = self._forward([s.seq_id for s in running], last, positions)
            events.extend(self._accept(s, row) for s, row in zip(running, logits, strict=True))
        return events

    def _forward(self, seq_ids: list[str], ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        last = self.stages[-1]
        if len(seq_ids) > 1 and self.micro_batches > 1 and hasattr(last, "submit"):
            return self._forward_pipelined(seq_ids, ids, positions)
        values = ids
        for stage in self.stages:
            values = stage.forward(seq_ids, values, positions)
        return values

    def _forward_pipelined(self, seq_ids: list[str], ids: np.ndarray,
                           positions: np.ndarray) -> np.ndarray:
        """Micro-batches through a chain whose tail runs elsewhere (``submit`` returns a
        future): while the remote stages work on one micro-batch, the local stages run
        the next, so every stage stays busy. Rows come back in their original order."""
        groups = np.array_split(np.arange(len(seq_ids)), min(self.micro_batches,
                                                             len(seq_ids)))
        futures = []
        for rows in groups:
            group_ids = [seq_ids[i] for i in rows]
            values = ids[rows]
            for stage in self.stages[:-1]:
                values = stage.forward(group_ids, values, positions[rows])
            futures.append(self.stages[-1].submit(group_ids, values, positions[rows]))
        return np.concatenate([future.result() for future in futures])

    def _drop(self, seq_id: str) -> None:
        for stage in self.stages:
            stage.drop(seq_id)

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> TokenEvent:
        """Sample the next token of ``seq`` and turn it into an event."""
        token = sample(logits, seq.params, seq.rng)
        if token in self.stop_ids:
            return self._finish(seq, token, seq.text[seq.emitted:], "stop")
        seq.generated.append(token)
        seq.text += seq.decoder.push(token)
        params = seq.params
        # A stop string ends the text just before it; hold back any tail that could
        # still grow into one, so emitted pieces never need taking back.
        hits = [i for i in (seq.text.find(s, seq.emitted) for s in params.stop) if i >= 0]
        if hits:
            return self._finish(seq, token, seq.text[seq.emitted:min(hits)], "stop")
        total = len(seq.prompt) + len(seq.generated)
        if len(seq.generated) >= params.max_tokens or total >= self.config.context:
            return self._finish(seq, token, seq.text[seq.emitted:], "length")
        hold = _partial_stop(seq.text, params.stop)
        piece = seq.text[seq.emitted:len(seq.text) - hold]
        seq.emitted += len(piece)
        return TokenEvent(seq.seq_id, token, piece, None)

    def _finish(self, seq: _Sequence, token: int, piece: str, reason: str) -> TokenEvent:
        del self._sequences[seq.seq_id]
        self._drop(seq.seq_id)
        return TokenEvent(seq.seq_id, token, piece, reason)


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def sample(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else softmax sampling after top-k and top-p cuts."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    # Sorting 49k logits costs milliseconds per token: partition out the top k first, and
    # sort only when top-p needs the order.
    if params.top_k and params.top_k < scaled.size:
        candidates = np.argpartition(-scaled, params.top_k - 1)[:params.top_k]
    else:
        candidates = np.arange(scaled.size)
    if params.top_p < 1.0:
        candidates = candidates[np.argsort(-scaled[candidates], kind="stable")]
    probs = np.exp(scaled[candidates] - scaled[candidates].max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Smallest prefix whose mass reaches top_p (always at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    return int(candidates[rng.choice(candidates.size, p=probs)])


def load_engine(model_dir: Path, threads: int | None = None) -> LlmEngine:
    """An engine for a prepared model directory, whole model in one stage."""
    from epara.models.manifest import load_manifest

    return LlmEngine(Path(model_dir), load_manifest(Path(model_dir)), threads=threads)

