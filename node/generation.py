"""A text-generation model served on this node, with continuous batching.

One worker thread owns the engine. Between engine steps it admits new sequences (as
many as the engine's KV memory takes: ``KvPoolFull`` means "not now", and admission
waits until a sequence ends) and cancellations, so concurrent chats decode together
and a sequence joins or leaves without waiting for the others. A failure that belongs
to one sequence (the engine's ``"error"`` event) fails that request alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from epara.node.service import LatencyTracker, ServiceError

# A pass down a remote pipeline waits at most until its sequences' latest deadline, and
# never longer than HOP_LIMIT_S (a sequence without a deadline); MIN_HOP_S lets a pass
# whose deadline has just passed fail by timeout rather than not start.
HOP_LIMIT_S = 30.0
MIN_HOP_S = 0.05


def pass_timeout(deadlines: Sequence[float | None], now: float,
                 limit_s: float = HOP_LIMIT_S) -> float:
    """A batched pass serves all its sequences, so it may wait until the latest of their
    deadlines (monotonic seconds), never past ``limit_s``; a sequence without a deadline
    gets the whole limit."""
    if not deadlines or any(d is None for d in deadlines):
        return limit_s
    latest = max(d for d in deadlines if d is not None)
    return min(limit_s, max(MIN_HOP_S, latest - now))

log = logging.getLogger(__name__)


class TokenEventLike(Protocol):
    seq_id: str
    token_id: int
    text: str
    finish_reason: str | None


class Engine(Protocol):
    """What ``epara.models.llm.LlmEngine`` offers (kept structural to avoid a hard import)."""

    def add(self, seq_id: str, prompt: str | None = ..., messages: list[dict] | None = ...,
            params: Any = ...) -> None: ...

    def cancel(self, seq_id: str) -> None: ...

    def step(self) -> list[Any]: ...

    @property
    def active(self) -> int: ...


# A sink receives each TokenEvent of its sequence, then None at the end, or a ServiceError.
Sink = Callable[[Any], None]


@dataclass
class _Sequence:
    seq_id: str
    prompt: str | None
    messages: list[dict] | None
    params: Any
    deadline: float | None
    sink: Sink
    submitted: float
    first_token: float | None = None
    tokens: int = 0
    resume: list[int] = field(default_factory=list)
    prefill_began: float | None = None  # its first engine step
    prefill_alone: bool = True  # no other sequence ran in its prefill's steps
    prefill_s: float | None = None  # its prefill's time, when it ran alone


def typical_prefill_s(seconds: float, tokens: int, step_s: float,
                      typical_tokens: int) -> float | None:
    """How long a lone prefill of ``typical_tokens`` takes, from one of ``tokens`` that
    took ``seconds`` and the same sequence's decode steps (``step_s`` each).

    A prefill costs about one pass's fixed part, which a decode step shows, plus a part
    per prompt token: scaling a short prompt's time in proportion would count the fixed
    part many times over (a 5-token prompt's 300 ms became a 64-token prefill of 3.8 s,
    and the router refused every chat turn on that)."""
    if tokens < 1 or not all(math.isfinite(x) and x >= 0 for x in (seconds, step_s)):
        return None
    fixed = min(step_s, seconds)
    per_token = (seconds - fixed) / max(1, tokens - 1)
    return fixed + per_token * (typical_tokens - 1)


class GenerationService:
    def __init__(self, manifest: Any, engine: Engine, target: str = "cpu") -> None:
        self.manifest = manifest
        self.engine = engine
        self.target = target
        # The pipeline this service heads (node/reconcile.py's head_key); None: a replica
        self.head_key: str | None = None
        self.max_active = max(1, manifest.hints.max_batch)
        self.max_queue = manifest.hints.max_queue
        self.ttft = LatencyTracker()
        # A lone prefill's time, scaled to the planner's typical prompt: the "first pass"
        # the leader's estimates start from (run_ms; none for a pipeline head, whose
        # steps include its peers' stages and the network)
        # (its first one too: an LLM's requests are few, and the roofline it would
        # otherwise be planned by is ten times off on a CPU)
        self.prefill = LatencyTracker(skip_first=False)
        self.counts = {"served": 0, "failed": 0, "refused": 0, "expired": 0, "cancelled": 0,
                       "tokens": 0}
        self._ids = itertools.count()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pending: list[_Sequence] = []  # admitted by submit, not yet in the engine
        self._running: dict[str, _Sequence] = {}
        self._waiting = 0
        self._kv_full = False  # the engine refused a sequence for memory: wait for an end
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"gen-{manifest.name}",
                                        daemon=True)
        self._thread.start()

    def hop_timeout(self, seq_ids: Sequence[str]) -> float:
        """How long a pass of these sequences down a remote stage chain may wait (see
        ``pass_timeout``). Called from the engine's worker thread, which owns
        ``_running``; a sequence not running (yet) counts as one without a deadline."""
        seqs = [self._running.get(seq_id) for seq_id in seq_ids]
        return pass_timeout([None if s is None else s.deadline for s in seqs],
                            time.monotonic())

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def set_max_batch(self, batch: int) -> None:
        """Decode at most ``batch`` sequences together (the placement's choice for this
        unit), within the manifest's max batch."""
        self.max_active = max(1, min(int(batch), self.manifest.hints.max_batch))

    def submit(self, prompt: str | None, messages: list[dict] | None, params: Any,
               deadline: float | None, sink: Sink, resume: list[int] | None = None) -> str:
        """Queue a sequence. ``resume``: tokens it already produced elsewhere (a replay
        after a failed route): the engine rebuilds its cache from prompt + these and
        continues after them."""
        if self._stopping:
            raise ServiceError("unavailable", f"model {self.manifest.name} is shutting down")
        if (prompt is None) == (messages is None):
            raise ServiceError("bad_request", "generate needs exactly one of prompt or messages")
        with self._lock:
            if self._waiting >= self.max_queue:
                self.counts["refused"] += 1
                raise ServiceError("overloaded", f"model {self.manifest.name}: queue is full "
                                   f"({self.max_queue} sequences)")
            self._waiting += 1
        seq_id = f"s{next(self._ids)}"
        self._commands.put(("add", _Sequence(seq_id, prompt, messages, params, deadline, sink,
                                             time.monotonic(), resume=list(resume or ()))))
        return seq_id

    def cancel(self, seq_id: str) -> None:
        self._commands.put(("cancel", seq_id))

    def prompt_tokens(self, prompt: str | None, messages: list[dict] | None) -> int | None:
        """How many tokens the prompt (or the chat rendered by the model's template) is,
        or None when the engine cannot say. Safe from any thread (the tokenizer is)."""
        encode = getattr(self.engine, "encode", None)
        if encode is None:
            return None
        try:
            return len(encode(prompt=prompt, messages=messages))
        except (ValueError, KeyError, TypeError, RuntimeError):
            return None

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.manifest.name,
            "category": self.manifest.hints.category,
            "target": self.target,
            "queue_depth": self._waiting,
            "active_sequences": len(self._running),
            "max_batch": self.max_active,
            "ttft_ms_p50": self.ttft.percentile(50),
            "run_ms_ewma": None if self.prefill.single_seconds is None
            else self.prefill.single_seconds * 1000,
            "ttft_ms_p99": self.ttft.percentile(99),
            **self.counts,
        }

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # --- worker thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self._running and not self._pending
            if not self._drain_commands(block=idle):
                break
            self._admit()
            if self._running:
                self._step()
        for seq in [*self._pending, *self._running.values()]:
            self._finish(seq, ServiceError("unavailable", "the node is shutting down"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, arg = command
            if kind == "stop":
                return False
            if kind == "add":
                self._pending.append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, seq_id: str) -> None:
        for seq in self._pending:
            if seq.seq_id == seq_id:
                self._pending.remove(seq)
                self.counts["cancelled"] += 1
                self._finish(seq, None)
                return
        if seq_id in self._running:
            self.engine.cancel(seq_id)
            self.counts["cancelled"] += 1
            self._kv_full = False
            self._finish(self._running.pop(seq_id), None)

    def _admit(self) -> None:
        now = time.monotonic()
        if not self._running:
            self._kv_full = False  # an empty engine takes any sequence it accepts at all
        for seq in [s for s in self._pending if s.deadline is not None and now > s.deadline]:
            self._pending.remove(seq)
            self.counts["expired"] += 1
            self._finish(seq, ServiceError("deadline_exceeded", "deadline passed before "
                                           "the sequence could start"))
        # In arrival order: one that waits for KV memory holds back the ones after it,
        # so a long prompt is not starved by a stream of short ones.
        while self._pending and not self._kv_full and len(self._running) < self.max_active:
            seq = self._pending[0]
            try:
                self.engine.add(seq.seq_id, prompt=seq.prompt, messages=seq.messages,
                                params=seq.params, resume=seq.resume)
            except (ValueError, KeyError, TypeError) as exc:
                self._pending.pop(0)
                self.counts["failed"] += 1
                self._finish(seq, ServiceError("bad_input", str(exc)))
                continue
            except Exception as exc:
                if type(exc).__name__ != "KvPoolFull":
                    raise
                self._kv_full = True  # retried when a running sequence ends
                return
            self._pending.pop(0)
            self._running[seq.seq_id] = seq

    def _step(self) -> None:
        started = time.monotonic()
        for seq in self._running.values():
            if seq.first_token is None:
                if seq.prefill_began is None:
                    seq.prefill_began = started
                seq.prefill_alone &= len(self._running) == 1
        try:
            events = self.engine.step()
        except Exception as exc:  # an engine fault fails its sequences, not the node
            # A broken route (a stage's node died or stalled) is worth a replay elsewhere;
            # anything else is this model failing on this input.
            code = "stage_failed" if type(exc).__name__ == "StageFailed" \
                else "inference_failed"
            log.warning("generation step failed for %s: %s", self.manifest.name, exc)
            for seq_id in list(self._running):
                self.engine.cancel(seq_id)
                self.counts["failed"] += 1
                self._finish(self._running.pop(seq_id), ServiceError(code, str(exc)))
            self._kv_full = False
            with contextlib.suppress(Exception):
                self.engine.step()  # flush the cancellation events of the failed sequences
            return
        now = time.monotonic()
        for event in events:
            seq = self._running.get(event.seq_id)
            if seq is None:
                continue
            if event.finish_reason == "error":  # this sequence alone failed
                del self._running[seq.seq_id]
                self._kv_full = False
                self.counts["failed"] += 1
                self._finish(seq, ServiceError("inference_failed", event.text))
                continue
            if seq.first_token is None:
                seq.first_token = now
                # A prefill (in one step or several chunks) that ran alone, from the
                # start (a replay's resume rebuilds more than the prompt)
                if seq.prefill_alone and seq.prefill_began is not None and \
                        not seq.resume and not self.target.startswith("pipeline"):
                    seq.prefill_s = now - seq.prefill_began
                self.ttft.record_request((now - seq.submitted) * 1000)
            seq.tokens += 1
            self.counts["tokens"] += 1
            seq.sink(event)
            if event.finish_reason is not None:
                del self._running[seq.seq_id]
                self._kv_full = False
                self.counts["served"] += 1
                if seq.prefill_s is not None and seq.tokens >= 2 and seq.first_token:
                    self._note_prefill(seq, seq.prefill_s,
                                       (now - seq.first_token) / (seq.tokens - 1))
                self._finish(seq, None)
        for seq_id, seq in list(self._running.items()):
            if seq.deadline is not None and now > seq.deadline:
                self.engine.cancel(seq_id)
                self._kv_full = False
                del self._running[seq_id]
                self.counts["expired"] += 1
                self._finish(seq, ServiceError(
                    "deadline_exceeded", f"deadline passed after {seq.tokens} tokens"))

    def _note_prefill(self, seq: _Sequence, seconds: float, step_s: float) -> None:
        """Record a lone prefill as the planner's typical prompt would take it."""
        from epara.node.planning import TYPICAL_PROMPT_TOKENS

        tokens = self.prompt_tokens(seq.prompt, seq.messages)
        if tokens:
            typical = typical_prefill_s(seconds, tokens, step_s, TYPICAL_PROMPT_TOKENS)
            if typical is not None:
                self.prefill.record_batch(typical)

    def _finish(self, seq: _Sequence, outcome: ServiceError | None) -> None:
        with self._lock:
            self._waiting -= 1
        try:
            seq.sink(outcome)
        except Exception:  # a sink belongs to a connection that may be gone
            log.debug("sink of %s failed", seq.seq_id, exc_info=True)
