"""A model served on this node: one worker thread, a bounded queue, dynamic batching.

Requests arrive from the event loop as ``Job``s carrying a ``concurrent.futures.Future``.
The worker thread owns the backend session (runtimes are not thread-safe per session),
stacks compatible jobs of a batching service along its batch axis, and refuses early a
job that cannot meet its deadline instead of serving it late.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from epara.models.backends import Session
from epara.models.manifest import Manifest, check_inputs

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request this service will not or cannot serve. ``code`` is the protocol code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class InferResult:
    outputs: dict[str, np.ndarray]
    queue_ms: float
    compute_ms: float
    batch: int


@dataclass
class Job:
    inputs: dict[str, np.ndarray]
    rows: int  # size along the batch axis (1 when the service does not batch)
    deadline: float | None  # time.monotonic() by which the answer is useless
    work: int = 0  # input elements: what the run time scales with
    future: Future[InferResult] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = True  # still counted in the service's queue depth

    def shape_key(self) -> tuple[Any, ...]:
        """Jobs can share a batch when every non-batch dimension and dtype agree."""
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.inputs.items()))


class LatencyTracker:
    """Exponentially weighted batch time plus a window of recent request latencies."""

    def __init__(self, window: int = 256, skip_first: bool = True) -> None:
        self.batch_seconds: float | None = None
        # One request's run time: from batches of one row, else a batch's time per row
        # (a lower bound on accelerators, about right on CPUs). The leader
        # plans from it, so it must not grow with the batches that load brings.
        self.single_seconds: float | None = None
        self.recent_ms: deque[float] = deque(maxlen=window)
        # the first run after loading (caches, JIT) says little, where there is a JIT
        self._cold = skip_first
        self._lock = threading.Lock()

    @staticmethod
    def _ewma(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def record_batch(self, seconds: float, rows: int = 1) -> None:
        with self._lock:
            if self._cold:
                self._cold = False
                return
            self.batch_seconds = self._ewma(self.batch_seconds, seconds)
            if rows <= 1:
                self.single_seconds = self._ewma(self.single_seconds, seconds)
            elif self.single_seconds is None:
                self.single_seconds = seconds / rows

    def record_request(self, ms: float) -> None:
        with self._lock:
            self.recent_ms.append(ms)

    def percentile(self, q: float) -> float | None:
        with self._lock:
            values = sorted(self.recent_ms)
        if not values:
            return None
        return values[min(len(values) - 1, int(q / 100 * len(values)))]


class NodeWork:
    """A request's work on the node around its model run (decoding and resizing an image
    before, making its mask after), in CPU seconds, exponentially averaged.

    It runs on this device's cores beside the model, never batches, and on a small device
    can take longer than the model itself (a 512x600 JPEG: ~13 ms around a ~7 ms
    selfie-seg run on one core), so the leader's capacity estimates must count it."""

    def __init__(self) -> None:
        self.before_s: float | None = None
        self.after_s: float | None = None
        self._lock = threading.Lock()

    def record(self, before_s: float, after_s: float) -> None:
        with self._lock:
            self.before_s = LatencyTracker._ewma(self.before_s, before_s)
            self.after_s = LatencyTracker._ewma(self.after_s, after_s)

    def total_ms(self) -> float | None:
        with self._lock:
            if self.before_s is None or self.after_s is None:
                return None
            return (self.before_s + self.after_s) * 1000


class RunCost:
    """How long a model run takes as a function of its input size, learned from runs.

    Admission must not promise what a run cannot keep: a 640x640 image takes several
    times a 160x160 one. A run's *work* is the number of input elements it was fed; the
    model is ``seconds = fixed + per_element * work``, fitted by least squares over the
    last ``window`` runs (a single size seen so far: proportional upwards, never less for
    smaller inputs). Predictions are multiplied by the worst ratio of actual to fitted
    time among runs of the last ``margin_s`` seconds, so one run slower than promised
    raises the next estimates at once; the margin forgets it after ``margin_s``, so a
    passing slowdown cannot keep a service refusing for good. Pure: the caller passes
    the clock.
    """

    def __init__(self, window: int = 32, margin_s: float = 30.0) -> None:
        self.margin_s = margin_s
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        # Fitted once per new run, not per request: (line, [(when, actual / fitted)])
        self._model: tuple[tuple[float, float, float], list[tuple[float, float]]] | None = None

    def record(self, work: float, seconds: float, now: float) -> None:
        with self._lock:
            self._samples.append((float(work), seconds, now))
            fit = _fit([(w, t) for w, t, _ in self._samples])
            assert fit is not None
            fixed, per_element, floor = fit
            self._model = (fit, [(at, t / max(fixed + per_element * w, floor, 1e-9))
                                 for w, t, at in self._samples])

    def fixed_seconds(self) -> float | None:
        """The fitted cost of a run whatever its size (what batching shares); None until
        runs of different sizes have been seen."""
        with self._lock:
            samples = [(w, t) for w, t, _ in self._samples]
        works = [w for w, _ in samples]
        if not works or max(works) < 1.2 * min(works):
            return None
        fit = _fit(samples)
        return None if fit is None else fit[0]

    def predict(self, runs: int, work: float, now: float) -> float | None:
        """Seconds for ``runs`` runs fed ``work`` elements in all; None when unknown."""
        model = self._model
        if model is None:
            return None
        (fixed, per_element, floor), ratios = model
        margin = max([1.0, *(r for at, r in ratios if now - at <= self.margin_s)])
        return margin * max(runs * fixed + per_element * work, runs * floor)


def companion_wait(max_wait: float, arrival_gap: float | None,
                   fixed_run_s: float | None) -> float:
    """How long a batch stays open for requests not yet here.

    Waiting pays only while requests arrive faster than ``max_wait`` *and* the run cost a
    companion would share (the fitted fixed seconds per run, what stacking saves) is more
    than the wait for it costs the idle worker. Measured on CPUs (bench/local_api.py,
    ``batch_curve``), the time per frame hardly falls with the batch size, so there a
    batch forms only from requests already queued and nobody pays ``max_wait``; an
    accelerator with a large per-run cost keeps waiting. Unknown (one batch size seen so
    far): wait, so batches of several sizes are seen and the fit can tell."""
    if arrival_gap is None or arrival_gap >= max_wait:
        return 0.0
    if fixed_run_s is not None and fixed_run_s <= arrival_gap:
        return 0.0
    return max_wait


def _fit(samples: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """(fixed seconds, seconds per element, floor seconds per run) for ``t = max(a + b w,
    floor)``: least squares with a, b >= 0 when the runs had different sizes; with one
    size seen so far, proportional above it and never less than its time below it (the
    only safe guesses: a run never takes less for more input, nor more for less)."""
    if not samples:
        return None
    works = [w for w, _ in samples]
    times = [t for _, t in samples]
    lo, hi = min(works), max(works)
    if hi < 1.2 * lo or hi <= 0:
        mean_t = sum(times) / len(times)
        mean_w = sum(works) / len(works)
        return (0.0, mean_t / mean_w, mean_t) if mean_w > 0 else (mean_t, 0.0, mean_t)
    n = len(samples)
    mean_w = sum(works) / n
    mean_t = sum(times) / n
    var = sum((w - mean_w) ** 2 for w in works)
    slope = max(0.0, sum((w - mean_w) * (t - mean_t) for w, t in samples) / var)
    fixed = mean_t - slope * mean_w
    if fixed < 0:  # through the origin instead
        slope = sum(w * t for w, t in samples) / max(sum(w * w for w in works), 1e-12)
        fixed = 0.0
    return (fixed, slope, 0.0)


def input_work(inputs: Mapping[str, np.ndarray]) -> int:
    """A run's input size: its number of input elements."""
    return sum(int(a.size) for a in inputs.values())


class ModelService:
    """Serves one loaded model. ``submit`` is thread-safe and never blocks."""

    def __init__(self, manifest: Manifest, session: Session) -> None:
        self.manifest = manifest
        self.session = session
        # The pipeline this service heads (node/reconcile.py's head_key); None: a replica
        self.head_key: str | None = None
        hints = manifest.hints
        # The declared axis bounds every request's rows, even when max_batch is 1 (the
        # model was exported or measured for that many); stacking needs max_batch > 1.
        self.declared_axis = hints.batch_axis
        self.batch_axis = hints.batch_axis if hints.max_batch > 1 else None
        self.max_batch = hints.max_batch if self.declared_axis is not None else 1
        self.max_wait = hints.max_wait_ms / 1000
        self.max_queue = hints.max_queue
        self.latency = LatencyTracker()
        self.cost = RunCost()  # admission: run time by input size
        self.node_work = NodeWork()  # per request, around the run (ops that decode)
        self._cold = True  # the first run after loading (caches, JIT) says little
        self._busy_until = 0.0  # when the batch running now should end (monotonic)
        self._waiting_work = 0  # input elements of the jobs waiting
        self.counts = {"served": 0, "failed": 0, "refused": 0, "expired": 0, "cancelled": 0,
                       "batches": 0}
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting = 0  # jobs submitted and not yet taken into a batch
        self._lock = threading.Lock()
        self._last_arrival: float | None = None
        self._arrival_gap: float | None = None  # seconds, exponentially averaged
        self._held: list[Job] = []  # taken from the queue but not batchable with the last run
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"svc-{manifest.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def set_max_batch(self, batch: int) -> None:
        """Run batches of at most ``batch`` rows (the placement's choice for this unit),
        within what the model allows (its manifest's max batch; 1 when it has no batch
        axis). The worker reads it for its next batch."""
        if self.batch_axis is not None:
            self.max_batch = max(1, min(int(batch), self.manifest.hints.max_batch))

    def submit(self, inputs: Mapping[str, Any], deadline: float | None) -> Future[InferResult]:
        """Validate and enqueue; raise ServiceError for what must be refused now."""
        if self._stopping:
            raise ServiceError("unavailable", f"model {self.manifest.name} is shutting down")
        try:
            checked = check_inputs(self.manifest.inputs, inputs)
        except ValueError as exc:
            raise ServiceError("bad_input", f"model {self.manifest.name}: {exc}") from None
        rows = 1
        if self.declared_axis is not None and checked:
            rows = next(iter(checked.values())).shape[self.declared_axis]
            # The model's limit, not the placement's batch: a larger request runs alone.
            if rows > self.manifest.hints.max_batch:
                raise ServiceError("bad_input", f"batch of {rows} exceeds this service's "
                                   f"max batch {self.manifest.hints.max_batch}")
        work = input_work(checked)
        now = time.monotonic()
        if deadline is not None:
            expected = self.expected_completion(now, work)
            if expected > deadline:
                self.counts["refused"] += 1
                raise ServiceError(
                    "deadline_unmeetable",
                    f"model {self.manifest.name}: {self._waiting} requests queued, expected "
                    f"completion in {(expected - now) * 1000:.1f} ms, beyond the deadline in "
                    f"{(deadline - now) * 1000:.1f} ms")
        with self._lock:
            if self._waiting >= self.max_queue:
                self.counts["refused"] += 1
                raise ServiceError("overloaded", f"model {self.manifest.name}: queue is full "
                                   f"({self.max_queue} requests)")
            self._waiting += 1
            self._waiting_work += work
        job = Job(checked, rows, deadline, work)
        self._note_arrival(job.enqueued)
        # A request cancelled while queued (its client left) frees its slot at once. The
        # callback holds the job weakly: a job <-> future cycle would keep the inputs (maybe
        # views of a client's shared memory, mapped while referenced) until a GC pass.
        # A job already gone was taken from the queue, and taking it released it.
        job_ref = weakref.ref(job)
        job.future.add_done_callback(
            lambda f: f.cancelled() and (held := job_ref()) is not None
            and self._release([held]))
        self._queue.put(job)
        return job.future

    def _note_arrival(self, now: float) -> None:
        """Keep an average of the gap between arrivals, for the batching wait."""
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._arrival_gap = gap if self._arrival_gap is None \
                else 0.7 * self._arrival_gap + 0.3 * gap
        self._last_arrival = now

    def _release(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                if job.queued:
                    job.queued = False
                    self._waiting -= 1
                    self._waiting_work -= job.work

    def expected_completion(self, now: float, work: int = 0) -> float:
        """When a request of ``work`` input elements submitted now would finish: the rest
        of the batch running now, the queued work, then its own run, each from the run
        cost learned by input size (``RunCost``). Before any measured run: now."""
        with self._lock:
            waiting, waiting_work = self._waiting, self._waiting_work
        runs = (waiting // self.max_batch if self.batch_axis is not None else waiting) + 1
        ahead = self.cost.predict(runs, waiting_work + work, now)
        if ahead is None:
            return now
        return max(now, self._busy_until) + ahead

    def stats(self) -> dict[str, Any]:
        p50 = self.latency.percentile(50)
        p99 = self.latency.percentile(99)
        return {
            "model": self.manifest.name,
            "category": self.manifest.hints.category,
            "target": self.session.target,
            "queue_depth": self._waiting,
            "max_batch": self.max_batch,
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "batch_ms_ewma": None if self.latency.batch_seconds is None
            else self.latency.batch_seconds * 1000,
            # what the leader plans one device's run of the model by: none for a
            # pipeline head, whose runs include its peers' stages and the network
            "run_ms_ewma": None if self.latency.single_seconds is None
            or self.head_key is not None else self.latency.single_seconds * 1000,
            "node_work_ms_ewma": self.node_work.total_ms(),
            **self.counts,
        }

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued (up to ``timeout``), then release the session."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
        self.session.close()

    # --- worker thread -------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        first = self._held.pop(0) if self._held else self._queue.get()
        if first is None:
            return None
        batch = [first]
        if self.batch_axis is None:
            return batch
        rows = first.rows
        key = first.shape_key()
        # A lone request (or a slow stream) runs at once; a batch waits for companions
        # only when what they would share is worth the wait (companion_wait).
        wait = companion_wait(self.max_wait, self._arrival_gap, self.cost.fixed_seconds())
        until = time.monotonic() + wait
        # Held jobs first (they were waiting longest), then whatever arrives in time.
        for job in list(self._held):
            if job.shape_key() == key and rows + job.rows <= self.max_batch:
                self._held.remove(job)
                batch.append(job)
                rows += job.rows
        while rows < self.max_batch:
            remaining = until - time.monotonic()
            try:
                job = self._queue.get(timeout=max(0.0, remaining)) if remaining > 0 \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # keep the stop marker for the loop
                break
            if job.shape_key() == key and rows + job.rows <= self.max_batch:
                batch.append(job)
                rows += job.rows
            else:
                self._held.append(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._release(batch)
            live = self._drop_dead(batch)
            if live:
                self._execute(live)
            # Let go of the inputs before waiting for the next batch: they may be views of
            # a client's shared memory, which stays mapped while anything refers to it.
            del batch, live

    def _drop_dead(self, batch: list[Job]) -> list[Job]:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                self.counts["cancelled"] += 1
            elif job.deadline is not None and now > job.deadline:
                self.counts["expired"] += 1
                job.future.set_exception(ServiceError(
                    "deadline_exceeded", f"model {self.manifest.name}: deadline passed after "
                    f"{(now - job.enqueued) * 1000:.1f} ms in the queue"))
            else:
                live.append(job)
        return live

    def _execute(self, jobs: list[Job]) -> None:
        start = time.monotonic()
        work = sum(job.work for job in jobs)
        expected = self.cost.predict(len(jobs) if self.batch_axis is None else 1, work, start)
        self._busy_until = start + (expected or 0.0)
        # A batch serves all its requests, so it may wait until the latest deadline.
        deadline = None if any(j.deadline is None for j in jobs) \
            else max(j.deadline for j in jobs if j.deadline is not None)
        try:
            if len(jobs) == 1:
                outputs = [self.session.run_by(jobs[0].inputs, deadline)]
            else:
                stacked = {name: np.concatenate([j.inputs[name] for j in jobs],
                                                axis=self.batch_axis)
                           for name in jobs[0].inputs}
                merged = self.session.run_by(stacked, deadline)
                bounds = np.cumsum([j.rows for j in jobs])[:-1]
                split = {name: np.split(value, bounds, axis=self.batch_axis)
                         for name, value in merged.items()}
                outputs = [{name: parts[i] for name, parts in split.items()}
                           for i in range(len(jobs))]
        except ServiceError as exc:  # the session's own verdict (a pipeline's route broke)
            self._busy_until = 0.0
            log.warning("model %s failed on a batch of %d: %s", self.manifest.name,
                        len(jobs), exc)
            self.counts["failed"] += len(jobs)
            for job in jobs:
                job.future.set_exception(ServiceError(exc.code, str(exc)))
            return
        except Exception as exc:  # a runtime failure must not kill the worker
            self._busy_until = 0.0
            if len(jobs) > 1:
                # One request's input may have made the shared run fail: run each alone,
                # so only the request that caused it fails and the others are served.
                log.warning("model %s failed on a batch of %d (%s); running each alone",
                            self.manifest.name, len(jobs), exc)
                for job in jobs:
                    self._execute([job])
                return
            log.warning("model %s failed on a request: %s", self.manifest.name, exc)
            self.counts["failed"] += 1
            jobs[0].future.set_exception(ServiceError(
                "inference_failed", f"model {self.manifest.name}: {exc}"))
            return
        end = time.monotonic()
        self._busy_until = 0.0
        self.latency.record_batch(end - start, sum(job.rows for job in jobs))
        if self._cold:
            self._cold = False
        else:
            self.cost.record(work, end - start, end)
        self.counts["batches"] += 1
        self.counts["served"] += len(jobs)
        for job, out in zip(jobs, outputs, strict=True):
            self.latency.record_request((end - job.enqueued) * 1000)
            job.future.set_result(InferResult(out, (start - job.enqueued) * 1000,
                                              (end - start) * 1000, len(jobs)))
