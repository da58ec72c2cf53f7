"""What a node counts about the requests it answers, and its Prometheus exposition.

``RequestLog`` is always on: ``status`` and the dashboard read it, and the node publishes
its goodput to its peers. ``PrometheusExporter`` needs the optional ``prometheus-client``
package (the ``metrics`` extra); without it the node runs the same and ``/metrics``
answers that the extra is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from epara.node.api import Finished

if TYPE_CHECKING:
    from epara.node.daemon import Node

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "(unknown)"
# Error codes by outcome; any other code is a failure of the node or the model.
_REFUSED = ("overloaded", "deadline_unmeetable")
_INVALID = ("bad_request", "bad_input", "unknown_model", "unsupported")
# Seconds. Wide on purpose: a 1 ms segmentation frame and a 30 s generation share them.
# Per model, the latest outcomes kept for the attainment window (a bound: a model
# answering faster than this many per window is measured over its latest ones).
ATTAINMENT_KEEP = 4096
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


def outcome_of(error: str | None) -> str:
    if error is None:
        return "ok"
    if error in _REFUSED:
        return "refused"
    if error == "deadline_exceeded":
        return "expired"
    if error == "cancelled":
        return "cancelled"
    if error in _INVALID:
        return "invalid"
    return "failed"


class RequestLog:
    """Counters of the model requests this node's API answered, by model, source and
    outcome, and its goodput: the requests that succeeded within their deadline."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.goodput: dict[tuple[str, str], int] = {}
        self.exporter: PrometheusExporter | None = None
        # model -> (monotonic end time, met its deadline) of requests that entered the
        # cluster here: the SLO attainment the leader compares with its estimate
        self.recent: dict[str, deque[tuple[float, bool]]] = {}
        # Observed on the event loop, read by the exporter in the HTTP handler and by
        # the membership thread that builds the state record: copy under a lock.
        self._lock = threading.Lock()

    def record(self, finished: Finished) -> None:
        outcome = outcome_of(finished.error)
        if finished.error == "unknown_model":
            # Any client can name any model: one series per made-up name would let it
            # grow the metrics without bound.
            finished = replace(finished, model=UNKNOWN_MODEL)
        with self._lock:
            key = (finished.model, finished.source, outcome)
            self.counts[key] = self.counts.get(key, 0) + 1
            met = outcome == "ok" and finished.deadline_met
            if met:
                good = (finished.model, finished.source)
                self.goodput[good] = self.goodput.get(good, 0) + 1
            # Served, refused or expired: whether the cluster was quick enough. Invalid
            # or cancelled requests and failures (a node died) say nothing of its speed.
            if finished.source != "peer" and outcome in ("ok", "refused", "expired"):
                self.recent.setdefault(finished.model, deque(maxlen=ATTAINMENT_KEEP)) \
                    .append((time.monotonic(), met))
        if self.exporter is not None:
            self.exporter.observe(finished, outcome)

    def snapshot(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int]]:
        with self._lock:
            return dict(self.counts), dict(self.goodput)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per model: the count of each outcome and ``goodput``, over every source."""
        counts, goodput = self.snapshot()
        out: dict[str, dict[str, int]] = {}
        for (model, _, outcome), n in counts.items():
            entry = out.setdefault(model, {"goodput": 0})
            entry[outcome] = entry.get(outcome, 0) + n
        for (model, _), n in goodput.items():
            out.setdefault(model, {"goodput": 0})["goodput"] += n
        return out

    def attainment(self, window_s: float) -> dict[str, tuple[int, int]]:
        """Per model, over the last ``window_s`` seconds: (requests that met their
        deadline, requests that ended) among those that entered the cluster here."""
        since = time.monotonic() - window_s
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for model, ended in self.recent.items():
                while ended and ended[0][0] <= since:
                    ended.popleft()
                if ended:
                    out[model] = (sum(met for _, met in ended), len(ended))
        return out

    def origin_goodput(self) -> dict[str, int]:
        """Goodput of the requests that entered the cluster here (not those a peer
        forwarded to this node), so that summing it over the members counts each once."""
        _, goodput = self.snapshot()
        out: dict[str, int] = {}
        for (model, source), n in goodput.items():
            if source != "peer":
                out[model] = out.get(model, 0) + n
        return out


class PrometheusExporter:
    """The node's metrics in a registry of its own (not the process-global one), so that
    the exposition holds exactly this node's series."""

    def __init__(self, node: Node, requests: RequestLog) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "epara_request_latency_seconds", "Time from receiving a model request to its "
            "last reply, for requests that succeeded", ["model"], registry=self.registry,
            buckets=LATENCY_BUCKETS)
        self.ttft = Histogram(
            "epara_time_to_first_token_seconds", "Time from receiving a generate request to "
            "its first token", ["model"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.stage = Histogram(
            "epara_stage_latency_seconds", "Time one pass spends in a pipeline stage "
            "hosted here (its queue and compute)", ["stage"], registry=self.registry,
            buckets=LATENCY_BUCKETS)
        self.registry.register(_NodeCollector(node, requests))

    def observe(self, finished: Finished, outcome: str) -> None:
        if outcome == "ok":
            self.latency.labels(finished.model).observe(finished.elapsed_s)
        if finished.first_token_s is not None:
            self.ttft.labels(finished.model).observe(finished.first_token_s)

    def observe_stage(self, key: str, seconds: float) -> None:
        self.stage.labels(key).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def make_exporter(node: Node, requests: RequestLog) -> PrometheusExporter | None:
    """The exporter, or None when prometheus-client is not installed."""
    try:
        exporter = PrometheusExporter(node, requests)
    except ImportError:
        log.info("prometheus-client is not installed: /metrics is off (extra `metrics`)")
        return None
    requests.exporter = exporter
    return exporter


class _NodeCollector:
    """Reads counters and gauges at scrape time from what the node already keeps, so
    nothing is counted twice and nothing has to be kept in step."""

    def __init__(self, node: Node, requests: RequestLog) -> None:
        self.node = node
        self.requests = requests

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts, goodput = self.requests.snapshot()
        requests = CounterMetricFamily(
            "epara_requests", "Model requests this node's API answered, by outcome",
            labels=["model", "source", "outcome"])
        for (model, source, outcome), n in sorted(counts.items()):
            requests.add_metric([model, source, outcome], n)
        yield requests
        good = CounterMetricFamily(
            "epara_goodput_requests", "Model requests that succeeded within their deadline",
            labels=["model", "source"])
        for (model, source), n in sorted(goodput.items()):
            good.add_metric([model, source], n)
        yield good

        queue = GaugeMetricFamily("epara_queue_depth", "Requests waiting or running in a "
                                  "model service on this node", labels=["model"])
        executed = CounterMetricFamily(
            "epara_service_requests", "Requests a model service on this node ran to an end "
            "(including those forwarded by peers), by outcome", labels=["model", "outcome"])
        for name, service in sorted(self.node.services.items()):
            stats = service.stats()
            queue.add_metric([name], stats["queue_depth"])
            for outcome in ("served", "failed", "refused", "expired", "cancelled"):
                executed.add_metric([name, outcome], stats[outcome])
        yield queue
        yield executed

        info = GaugeMetricFamily("epara_node_info", "This node", labels=["node_id", "version"])
        from epara.node.daemon import VERSION

        info.add_metric([self.node.node_id, VERSION], 1)
        yield info
        member = self.node.member
        if member is None:
            return
        view = member.view()
        alive = GaugeMetricFamily("epara_cluster_members", "Members in this node's view",
                                  labels=["status"])
        statuses: dict[str, int] = {}
        for m in view.members:
            statuses[m.status] = statuses.get(m.status, 0) + 1
        for status, n in sorted(statuses.items()):
            alive.add_metric([status], n)
        yield alive
        yield GaugeMetricFamily("epara_is_leader", "1 when this node leads the cluster",
                                value=int(view.is_leader))
        yield GaugeMetricFamily("epara_term", "The election term this node follows",
                                value=view.term)
        runtime = self.node.runtime
        if runtime is not None:
            yield GaugeMetricFamily("epara_placement_version", "Version of the placement "
                                    "this node applies", value=runtime.placement.version)
