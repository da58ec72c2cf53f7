"""Text generation on ONNX Runtime: pipeline stages with their own KV caches, and an
engine that batches sequences continuously over them.

No network code here: the node calls ``LlmEngine.step`` from one worker thread and
forwards the events. A stage (``LlmStage``) owns its layers' KV pool (a preallocated
slab per sequence slot, written in place by attention), keyed by sequence id, so a
stage can move to another device and keep its caches there; the engine only passes
activations from one stage to the next.

Serving needs ``onnxruntime``, ``numpy``, ``tokenizers`` and ``jinja2`` (the ``llm``
extra); graphs and weights come from ``llm_prepare``.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from epara.models.llm_graph import load_config, stage_range
from epara.models.manifest import Manifest

log = logging.getLogger(__name__)

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
    token_id: int  # -1 on a cancel or error event; a stop token's id ends with text ""
    text: str  # this event's piece (an error's message); pieces concatenate to the text
    # None while generating; "stop" | "length" | "cancelled" | "error" (this sequence
    # failed alone; the others go on)
    finish_reason: str | None


class StageLike(Protocol):
    """What the engine drives: an ``LlmStage`` here, or a chain of stages on other nodes
    (the node's pipeline client) that keeps its caches there."""

    layers: range

    def forward(self, seq_ids: Sequence[str], inputs: np.ndarray,
                positions: np.ndarray) -> np.ndarray: ...

    def drop(self, seq_id: str) -> None: ...


class KvPoolFull(RuntimeError):
    """No room for another sequence now (KV memory or slots); it fits once others end."""


PAGE = mmap.PAGESIZE


class KvPool:
    """Preallocated keys and values of one stage's layers: one slab per sequence slot.

    Per layer and kind (key, value) the pool is [slots, KVH, capacity, HD] float32, all in
    one anonymous private mapping. Attention writes each new token's keys and values
    into its sequence's slab in place (``LlmStage`` binds the slabs as both past and
    present of GroupQueryAttention), so no step copies a cache. The mapping is reserved,
    not committed: a page becomes memory when a position in it is first written, so a
    sequence costs what its context holds (rounded to pages), and ``release`` gives a
    finished sequence's pages back to the system at once (``madvise(MADV_DONTNEED)``).

    A batched forward needs its rows' slabs to be adjacent (a view of consecutive slots,
    which ONNX Runtime takes without copying); ``arrange`` keeps them so, moving a
    sequence only when the set of sequences batched together changes.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int,
                 capacity: int) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV pool needs slots and capacity, got {slots}, {capacity}")
        self.slots, self.capacity = slots, capacity
        self.slab_bytes = kv_heads * capacity * head_dim * 4
        self.token_bytes = layers * 2 * kv_heads * head_dim * 4  # all layers, K and V
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0) \
            | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, layers * 2 * slots * self.slab_bytes, flags=flags)
        self.array = np.frombuffer(self._map, np.float32).reshape(
            layers, 2, slots, kv_heads, capacity, head_dim)
        self.owner: list[str | None] = [None] * slots
        self.slot: dict[str, int] = {}
        self.length: dict[str, int] = {}

    @property
    def sequences(self) -> int:
        return len(self.slot)

    def in_use_bytes(self) -> int:
        """KV bytes that the pool's sequences hold (their positions, all layers)."""
        return sum(self.length.values()) * self.token_bytes

    def release(self, seq_id: str) -> None:
        slot = self.slot.pop(seq_id, None)
        self.length.pop(seq_id, None)
        if slot is not None:
            self.owner[slot] = None
            self._discard(slot)

    def arrange(self, seq_ids: Sequence[str]) -> int:
        """Give every sequence of ``seq_ids`` a slot (new ones get free slots) so that
        together they fill the consecutive slots ``start .. start+len-1``; returns
        ``start``. Sequences already inside the chosen range stay; others move in."""
        n = len(seq_ids)
        new = [s for s in seq_ids if s not in self.slot]
        if n > self.slots or len(new) > self.owner.count(None):
            raise KvPoolFull(f"the KV pool has {self.slots} slots, "
                             f"{self.owner.count(None)} free; {len(new)} new sequences")
        members = set(seq_ids)
        # The range holding most of them, then the most free slots (a new sequence goes
        # to a free slot, not over another batch's), then the lowest.
        start = max(range(self.slots - n + 1), key=lambda a: (
            sum(1 for s in seq_ids if s in self.slot and a <= self.slot[s] < a + n),
            self.owner[a:a + n].count(None), -a))
        span = range(start, start + n)
        outside = [s for s in seq_ids if s in self.slot and self.slot[s] not in span]
        free_in = [p for p in span if self.owner[p] is None]
        taken_in = [p for p in span if self.owner[p] is not None
                    and self.owner[p] not in members]
        targets = free_in + taken_in
        for seq_id in new:  # free slots in the range first, then evict a stranger
            target = targets.pop(0)
            if self.owner[target] is not None:
                spare = next(p for p in range(self.slots)
                             if self.owner[p] is None and p not in span)
                self._swap(target, spare)
            self.owner[target], self.slot[seq_id], self.length[seq_id] = seq_id, target, 0
        for seq_id in outside:
            self._swap(self.slot[seq_id], targets.pop(0))
        return start

    def _swap(self, a: int, b: int) -> None:
        """Exchange two slots' contents (either may be empty), copying only used positions."""
        used = max((self.length[o] for o in (self.owner[a], self.owner[b]) if o), default=0)
        if used:
            kv = self.array[:, :, :, :, :used]
            kept = kv[:, :, a].copy()
            kv[:, :, a] = kv[:, :, b]
            kv[:, :, b] = kept
        self.owner[a], self.owner[b] = self.owner[b], self.owner[a]
        for slot in (a, b):
            owner = self.owner[slot]
            if owner is None:
                self._discard(slot)
            else:
                self.slot[owner] = slot

    def _discard(self, slot: int) -> None:
        """Return a slot's pages to the system; they read as zeros if touched again."""
        layers = self.array.shape[0]
        for block in range(layers * 2):
            begin = (block * self.slots + slot) * self.slab_bytes
            lo, hi = -(-begin // PAGE) * PAGE, (begin + self.slab_bytes) // PAGE * PAGE
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class LlmStage:
    """One stage (a consecutive layer range): its ONNX session and the KV pool of its
    sequences.

    ``forward(seq_ids, inputs, positions)`` runs ``S`` new tokens for each of ``B``
    sequences (the same ``S`` for all): ``inputs`` are token ids [B,S] for the first
    stage and hidden states [B,S,D] after it; ``positions`` [B,S] are the tokens'
    absolute positions, consecutive from where each sequence's cache ends (or earlier: the
    cache is cut back to that point, which a replay after a failed step needs). It
    returns hidden states [B,S,D], or the last position's logits [B,V] on the last stage,
    and its attention writes the new keys and values into the pool in place. Sequences
    with different cache lengths batch together without padding.

    ``slots``: sequences the pool holds at once; ``capacity``: positions per sequence
    (default the model's context). ``expire`` frees sequences idle for a while (their
    head died, say). ``providers``: ONNX Runtime execution providers, by default the
    device's (``device_providers``).
    """

    def __init__(self, path: Path, threads: int | None = None, slots: int = 16,
                 capacity: int | None = None, providers: Sequence[str] | None = None,
                 ) -> None:
        import onnxruntime as ort

        config = load_config(Path(path).parent)
        self.layers = range(*stage_range(path))
        self.first = self.layers.start == 0
        self.last = self.layers.stop == config.layers
        capacity = min(capacity or config.context, config.context)
        self.pool = KvPool(len(self.layers), config.kv_heads, config.head_dim, slots,
                           capacity)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.providers = list(providers or device_providers())
        self._session = ort.InferenceSession(
            str(path), sess_options=options,
            providers=[_provider_options(p, Path(path).parent) for p in self.providers])
        self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        self._input_name = "input_ids" if self.first else "hidden_in"
        self._output = "logits" if self.last else "hidden_out"
        self._last_used: dict[str, float] = {}

    def length(self, seq_id: str) -> int:
        return self.pool.length.get(seq_id, 0)

    def drop(self, seq_id: str) -> None:
        self.pool.release(seq_id)
        self._last_used.pop(seq_id, None)

    def expire(self, idle_seconds: float) -> list[str]:
        """Free the caches of sequences not run for ``idle_seconds``; their ids."""
        cutoff = time.monotonic() - idle_seconds
        stale = [s for s, t in self._last_used.items() if t < cutoff]
        for seq_id in stale:
            self.drop(seq_id)
        return stale

    @property
    def sequences(self) -> int:
        return self.pool.sequences

    def forward(self, seq_ids: Sequence[str], inputs: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
        batch, new = positions.shape
        if len(set(seq_ids)) != len(seq_ids) or len(seq_ids) != batch \
                or inputs.shape[:2] != (batch, new) or new < 1:
            raise ValueError(f"{len(seq_ids)} sequences, inputs {inputs.shape}, "
                             f"positions {positions.shape}: they must agree, one row per "
                             "distinct sequence")
        pool = self.pool
        starts = [int(p) for p in positions[:, 0]]
        for seq_id, begin in zip(seq_ids, starts, strict=True):
            have = pool.length.get(seq_id, 0)
            if not 0 <= begin <= have:
                raise ValueError(f"sequence {seq_id}: its tokens start at position {begin} "
                                 f"but this stage holds {have} (an expired or lost cache)")
            if begin + new > pool.capacity:
                raise ValueError(f"sequence {seq_id}: {begin + new} positions exceed the "
                                 f"KV capacity {pool.capacity}")
        ends = {seq_id: begin + new for seq_id, begin in zip(seq_ids, starts, strict=True)}
        fresh = [s for s in seq_ids if s not in pool.slot]
        first = pool.arrange(seq_ids)
        # Rows in slot order, so the slabs they read are one consecutive view.
        order = np.argsort([pool.slot[s] for s in seq_ids], kind="stable")
        ordered = not np.any(order != np.arange(batch))
        if not ordered:
            inputs, positions = inputs[order], positions[order]
            starts = [starts[i] for i in order]
        io = self._session.io_binding()
        io.bind_cpu_input(self._input_name, np.ascontiguousarray(inputs))
        io.bind_cpu_input("positions", np.ascontiguousarray(positions, dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.array([b + new - 1 for b in starts], np.int32))
        io.bind_cpu_input("total_length", np.array(max(starts) + new, np.int32))
        io.bind_output(self._output)
        for i, layer in enumerate(self.layers):
            for j, kind in enumerate("kv"):
                slabs = self._ortvalue(pool.array[i, j, first:first + batch])
                io.bind_ortvalue_input(f"past_{kind}.{layer}", slabs)
                io.bind_ortvalue_output(f"present_{kind}.{layer}", slabs)
        try:
            self._session.run_with_iobinding(io)
        except Exception:
            for seq_id in fresh:  # a failed first step leaves nothing behind
                self.drop(seq_id)
            raise
        result = io.get_outputs()[0].numpy()
        now = time.monotonic()
        for seq_id, end in ends.items():
            pool.length[seq_id] = end
            self._last_used[seq_id] = now
        return result if ordered else result[np.argsort(order)]


ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(available: Sequence[str], accelerators: Sequence[str]) -> list[str]:
    """Execution providers for an LLM stage, best first, CPU always last.

    ``available``: what the installed onnxruntime offers (``onnxruntime-gpu``, or the
    Jetson wheel, offers CUDA and TensorRT); ``accelerators``: the kinds of accelerator
    the capability probe found (``cuda``, ``jetson``). A GPU provider is used only where
    both agree: an onnxruntime-gpu wheel on a machine without a GPU runs on the CPU.
    Operators a GPU provider lacks (the float32 GroupQueryAttention over the KV pool)
    run on the CPU provider, which ONNX Runtime assigns node by node.
    """
    chosen = []
    if {"cuda", "jetson"} & set(accelerators):
        chosen = [p for p in ACCELERATED_PROVIDERS if p in available]
    return [*chosen, "CPUExecutionProvider"]


def device_providers() -> list[str]:
    """``choose_providers`` for this device: onnxruntime's providers and the probe's
    accelerator figures (``epara.peer.capabilities``; only its cheap hardware part)."""
    import onnxruntime as ort

    from epara.peer import capabilities

    kinds = [a.kind for a in capabilities.cuda_devices()]
    if capabilities.jetson(capabilities.board_model()) is not None:
        kinds.append("jetson")
    return choose_providers(ort.get_available_providers(), kinds)


def _provider_options(provider: str, model_dir: Path) -> str | tuple[str, dict[str, Any]]:
    if provider == "TensorrtExecutionProvider":
        # Building a TensorRT engine takes minutes on a Jetson: keep it across restarts,
        # in the user's cache (the model store's directories are hashed, read-only).
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path":
                          str(cache / "epara" / "tensorrt" / Path(model_dir).name)}
    return provider


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
    reserved: int  # KV positions held for it (prompt + max_tokens, at most the context)
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of prompt + resumed tokens already in the caches
    prefilled: bool = False
    text: str = ""  # decoded so far (possibly beyond what was emitted)
    emitted: int = 0  # characters of text already sent


class LlmEngine:
    """Continuous batching over a chain of stages (in-process here; one per device later).

    Each ``step()`` decodes one token for every running sequence (one batched forward
    per stage), then prefills newly added sequences in chunks: while sequences are
    decoding, only as many prompt tokens as take about ``interleave_steps`` decode steps
    (measured, adapted chunk by chunk), so a long prompt stretches the running streams'
    token gaps to about 1 + ``interleave_steps`` steps instead of stalling them for a
    whole prefill; with nothing decoding, ``prefill_chunk`` tokens at a time.

    Sequences are admitted by KV memory: each holds ``prompt + max_tokens`` positions
    (at most ``context``) of ``kv_budget_tokens`` (default: the manifest's
    ``kv_budget_tokens``, the KV memory its ``memory_mb`` counts), and at most
    ``slots`` (default the manifest's ``max_batch``) run at once. ``add`` raises
    ``KvPoolFull`` when the sequence fits later but not now.

    A failure that belongs to one sequence (a non-finite logit, a sampling error, a
    forward that fails for it alone) ends that sequence with an ``"error"`` event; the
    others go on. A failed batched forward is retried one sequence at a time, so only
    the sequences that fail alone are failed. A broken remote route (``StageFailed``)
    is raised: every sequence must be replayed elsewhere.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int | None = None,
                 stages: Sequence[Path | StageLike] | None = None,
                 prefill_chunk: int = 256, slots: int | None = None,
                 kv_budget_tokens: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self.manifest = manifest
        self.config = load_config(model_dir)
        self.prefill_chunk = prefill_chunk
        self.slots = slots or max(1, manifest.hints.max_batch)
        budget = kv_budget_tokens or int(manifest.extra.get("kv_budget_tokens", 0)) \
            or self.slots * self.config.context
        self.kv_budget_tokens = budget
        self.context = min(self.config.context, budget)  # positions one sequence may use
        # Decode micro-batches when the chain's tail is remote (pipeline parallelism).
        self.micro_batches = 2
        if stages is None:
            stages = [model_dir / manifest.model_file]
        self.stages: list[StageLike] = [
            LlmStage(Path(s), threads, slots=self.slots, capacity=self.context,
                     providers=providers) if isinstance(s, (str, Path)) else s
            for s in stages]
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
        self._reserved = 0
        # Prefill chunks beside decoding are sized to take about this many decode steps
        # (measured), so a running stream's token gap stays near 1 + this.
        self.interleave_steps = 1.5
        self._decode_seconds: float | None = None
        # From one token up: a first chunk guessed too big would be the longest stall.
        self._interleave_tokens = 1

    @property
    def active(self) -> int:
        return len(self._sequences)

    def warm_up(self, prompt: str = "Hello! What can you do?", tokens: int = 2) -> None:
        """Run one short generation and forget it, before serving: a runtime's first
        passes (allocations, kernel selection) take several times a warm one's, which
        the first user would wait for and the planner would take for the model's speed.
        Only for an engine whose stages are all local (a pipeline's would cross the
        network before its peers are ready)."""
        seq_id = "_warm_up"
        self.add(seq_id, prompt=prompt, params=GenerationParams(max_tokens=tokens, seed=0))
        for _ in range(tokens + len(self.encode(prompt)) + 2):  # bounded, whatever happens
            if any(event.seq_id == seq_id and event.finish_reason is not None
                   for event in self.step()):
                return
        self.cancel(seq_id)
        self.step()

    @property
    def kv_reserved_tokens(self) -> int:
        return self._reserved

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
        already delivered) before a failure elsewhere; generation continues after them.
        ValueError: it can never run; ``KvPoolFull``: not now (retry once others end)."""
        if seq_id in self._sequences or seq_id in self._cancelled:
            raise ValueError(f"sequence {seq_id!r} is already running")
        check_params(params)
        ids = self.encode(prompt, messages)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine's context is "
                             f"{self.context}")
        if len(resume) >= params.max_tokens or len(ids) + len(resume) >= self.context:
            raise ValueError(f"{len(resume)} resumed tokens leave no room to generate")
        if any(not 0 <= t < self.config.vocab for t in resume):
            raise ValueError("resume tokens must be ids of this model's vocabulary")
        reserved = min(len(ids) + params.max_tokens, self.context)
        if len(self._sequences) >= self.slots or \
                self._reserved + reserved > self.kv_budget_tokens:
            raise KvPoolFull(f"{len(self._sequences)} sequences hold {self._reserved} of "
                             f"{self.kv_budget_tokens} KV positions; this one needs "
                             f"{reserved}")
        rng = np.random.default_rng(params.seed)
        seq = _Sequence(seq_id, params, ids, rng, Detokenizer(self.tokenizer), reserved)
        for token in resume:
            seq.generated.append(int(token))
            seq.text += seq.decoder.push(int(token))
        # What the client was already sent: everything but a held-back stop-string prefix.
        seq.emitted = len(seq.text) - _partial_stop(seq.text, params.stop)
        self._sequences[seq_id] = seq
        self._reserved += reserved

    def cancel(self, seq_id: str) -> None:
        """Stop a sequence; its last event (``"cancelled"``) comes with the next step."""
        seq = self._sequences.get(seq_id)
        if seq is not None:
            self._end(seq)
            self._cancelled.append(seq_id)

    def step(self) -> list[TokenEvent]:
        events = [TokenEvent(s, -1, "", "cancelled") for s in self._cancelled]
        self._cancelled.clear()
        running = [s for s in self._sequences.values() if s.prefilled]
        if running:
            started = time.perf_counter()
            events.extend(self._decode(running))
            self._decode_seconds = _ewma(self._decode_seconds, time.perf_counter() - started)
        budget = self._prefill_budget() if running else self.prefill_chunk
        for seq in [s for s in self._sequences.values() if not s.prefilled]:
            if budget <= 0:
                break
            # A resumed sequence (a replay after a failed route) rebuilds its cache from
            # the prompt and the tokens it already produced, then goes on after them.
            tokens = seq.prompt + seq.generated
            count = min(budget, len(tokens) - seq.fed)
            ids = np.array([tokens[seq.fed:seq.fed + count]], np.int64)
            positions = np.arange(seq.fed, seq.fed + count)[None]
            started = time.perf_counter()
            try:
                logits = self._forward([seq.seq_id], ids, positions)
            except Exception as exc:
                if _is_route_failure(exc):
                    raise
                events.append(self._fail(seq, exc))
                continue
            if running:
                self._adapt_budget(time.perf_counter() - started)
            seq.fed += count
            budget -= count
            if seq.fed == len(tokens):
                seq.prefilled = True
                events.append(self._accept(seq, logits[0]))
        return events

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill beside a decode step (see ``_adapt_budget``)."""
        return min(self._interleave_tokens, self.prefill_chunk)

    def _adapt_budget(self, chunk_seconds: float) -> None:
        """Steer the interleaved chunk's time towards ``interleave_steps`` decode steps.

        A chunk's cost is far from proportional to its tokens (a matmul over several
        rows re-expands the 4-bit weights once per call, whatever the rows), so the
        budget follows the measured time of the last chunk instead of a per-token rate:
        shrink when it ran long, grow when it ran short."""
        if self._decode_seconds is None:
            return
        target = self.interleave_steps * self._decode_seconds
        tokens = self._interleave_tokens
        if chunk_seconds > target:
            tokens = int(tokens * max(0.5, target / chunk_seconds))
        elif chunk_seconds < 0.7 * target:
            tokens = int(tokens * 1.25) + 1
        self._interleave_tokens = max(1, min(self.prefill_chunk, tokens))

    def _decode(self, running: list[_Sequence]) -> list[TokenEvent]:
        last = np.array([[s.generated[-1]] for s in running], np.int64)
        positions = np.array([[len(s.prompt) + len(s.generated) - 1] for s in running])
        try:
            logits = self._forward([s.seq_id for s in running], last, positions)
        except Exception as exc:
            if _is_route_failure(exc):
                raise
            if len(running) == 1:
                return [self._fail(running[0], exc)]
            # Find the culprit: each sequence alone (a stage cuts its cache back to the
            # position asked for, so a half-done batched step is simply redone).
            log.warning("a batched decode step failed (%s); retrying its %d sequences one "
                        "by one", exc, len(running))
            return [event for seq in running for event in self._decode([seq])]
        return [self._accept(s, row) for s, row in zip(running, logits, strict=True)]

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

    def _end(self, seq: _Sequence) -> None:
        """Forget a sequence: its caches in every stage and its KV reservation."""
        del self._sequences[seq.seq_id]
        self._reserved -= seq.reserved
        for stage in self.stages:
            stage.drop(seq.seq_id)

    def _fail(self, seq: _Sequence, exc: BaseException) -> TokenEvent:
        log.warning("sequence %s failed: %s", seq.seq_id, exc)
        self._end(seq)
        return TokenEvent(seq.seq_id, -1, f"{type(exc).__name__}: {exc}", "error")

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> TokenEvent:
        """Sample the next token of ``seq`` and turn it into an event; a failure here is
        this sequence's alone."""
        try:
            if not np.isfinite(logits).all():
                raise FloatingPointError("the model produced non-finite logits")
            token = sample(logits, seq.params, seq.rng)
        except Exception as exc:
            return self._fail(seq, exc)
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
        if len(seq.generated) >= params.max_tokens or total >= self.context:
            return self._finish(seq, token, seq.text[seq.emitted:], "length")
        hold = _partial_stop(seq.text, params.stop)
        piece = seq.text[seq.emitted:len(seq.text) - hold]
        seq.emitted += len(piece)
        return TokenEvent(seq.seq_id, token, piece, None)

    def _finish(self, seq: _Sequence, token: int, piece: str, reason: str) -> TokenEvent:
        self._end(seq)
        return TokenEvent(seq.seq_id, token, piece, reason)


def check_params(params: GenerationParams) -> None:
    """ValueError unless every generation parameter is finite and in range."""
    numbers = (params.temperature, params.top_p)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) \
            or not isinstance(params.max_tokens, int) or params.max_tokens < 1 \
            or params.temperature < 0 or not 0 < params.top_p <= 1 \
            or not isinstance(params.top_k, int) or params.top_k < 0:
        raise ValueError(f"bad generation parameters {params}")


def _is_route_failure(exc: BaseException) -> bool:
    """A remote stage died or stalled (the node's ``StageFailed``): every sequence on the
    route must be replayed elsewhere, so it is no single sequence's fault."""
    return type(exc).__name__ == "StageFailed"


def _ewma(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


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

