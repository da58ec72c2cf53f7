"""The node daemon: loads the models in a store and serves them on the local socket API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from epara.models.backends import BackendUnavailable, all_backend_info, get_backend
from epara.models.manifest import Manifest
from epara.models.store import ModelStore
from epara.node.api import LocalApi, default_socket_path
from epara.node.generation import GenerationService
from epara.node.httpapi import HttpLimits, HttpServer, load_or_create_token
from epara.node.localsock import SocketLimits
from epara.node.metrics import RequestLog, make_exporter
from epara.node.runtime import ClusterRuntime
from epara.node.service import ModelService
from epara.peer.member import ClusterMember, MemberConfig
from epara.peer.security import certified_node_id

log = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass
class NodeConfig:
    store: Path | None = None  # None: the default model store
    socket_path: Path = field(default_factory=default_socket_path)
    socket_group: int | None = None
    models: tuple[str, ...] = ()  # empty: every model in the store
    threads: int | None = None  # per model; None lets each runtime decide
    socket_limits: SocketLimits = field(default_factory=SocketLimits)  # the local socket's
    node_id: str | None = None
    # Cluster membership: None runs the node alone (no mDNS, no network ports).
    cluster_dir: Path | None = None
    member: MemberConfig | None = None
    memory_budget_mb: float | None = None  # what models may use here (default: free memory)
    placement_policy: str = "epara"  # what the leader places by (baselines: for benchmarks)
    # The HTTP endpoint (OpenAI-compatible API, /metrics, dashboard): off unless a port is
    # given (0: any free port). Loopback by default; any other address needs a bearer
    # token, read from (or created in) http_token_file (docs/http.md).
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    http_token_file: Path | None = None
    http_limits: HttpLimits = field(default_factory=HttpLimits)


def default_cluster_dir() -> Path:
    """``$EPARA_CLUSTER_DIR``, else ``$XDG_CONFIG_HOME/epara/cluster`` (``~/.config/...``)."""
    if os.environ.get("EPARA_CLUSTER_DIR"):
        return Path(os.environ["EPARA_CLUSTER_DIR"])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "epara" / "cluster"


def load_service(directory: Path, manifest: Manifest,
                 threads: int | None) -> ModelService | GenerationService:
    """Load one model with its backend; raise on any failure (the caller reports it)."""
    if manifest.task == "text-generation":
        from epara.models.llm import LlmEngine  # the LLM extra may be absent

        engine = LlmEngine(directory, manifest, threads=threads)
        engine.warm_up()
        return GenerationService(manifest, engine)
    session = get_backend(manifest.backend).load(directory, manifest, threads=threads)
    return ModelService(manifest, session)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = ModelStore(config.store)
        # A device with its own certificate is the node its certificate names.
        self.node_id = config.node_id or certified_node_id(config.cluster_dir) or \
            _stable_node_id()
        self.services: dict[str, ModelService | GenerationService] = {}
        self.unavailable: dict[str, str] = {}  # model name or directory -> why not served
        self.started = time.time()
        self.backends: list[dict[str, Any]] = []
        self.api = LocalApi(self.services, self.describe_models, self.status,
                            config.socket_limits)
        self.requests = RequestLog()
        self.api.observer = self.requests.record
        self.exporter = make_exporter(self, self.requests)
        self.http: HttpServer | None = None
        self.member: ClusterMember | None = None
        self.runtime: ClusterRuntime | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        in_cluster = self.config.cluster_dir is not None
        # Alone, a node serves its whole store; in a cluster, the leader's placement
        # decides what each node loads.
        await asyncio.to_thread(self._load_models, not in_cluster)
        await self.api.start(self.config.socket_path, self.config.socket_group)
        log.info("node %s serving %d models on %s", self.node_id, len(self.services),
                 self.config.socket_path)
        # With the socket, before joining: whoever sees the socket up sees HTTP up too, and
        # requests meanwhile are served as the socket's are (locally until the router is set).
        if self.config.http_port is not None:
            token = (load_or_create_token(self.config.http_token_file)
                     if self.config.http_token_file is not None else None)
            self.http = HttpServer(self, self.config.http_host, self.config.http_port,
                                   self.exporter, token=token,
                                   limits=self.config.http_limits)
            await self.http.start()
            log.info("node %s serving HTTP on %s", self.node_id, self.http.url)
        if self.config.cluster_dir is not None:
            member_config = replace(self.config.member or MemberConfig(), node_id=self.node_id)
            self.member = ClusterMember(member_config, self.config.cluster_dir,
                                        self.cluster_state)
            await self.member.start()
            self.runtime = ClusterRuntime(self, self.member, self.config.cluster_dir,
                                          self.config.memory_budget_mb,
                                          policy=self.config.placement_policy)
            await self.runtime.start()
            if self.exporter is not None:
                self.runtime.stages.on_run = self.exporter.observe_stage
            self.api.router = self.runtime
            log.info("node %s joined cluster as %s:%d (data port %d)", self.node_id,
                     self.member.host, self.member.port, self.runtime.dataplane.port)

    def cluster_state(self) -> dict[str, Any]:
        """The small record this node publishes to its peers a few times a second."""
        services = {}
        for name, service in self.services.items():
            stats = service.stats()
            services[name] = {
                "queue": stats["queue_depth"],
                "p50_ms": stats.get("latency_ms_p50") or stats.get("ttft_ms_p50"),
                "served": stats["served"],
                # One request's run time as measured here (under whatever else this
                # device is doing; not the batches load brings): the leader's
                # capacity estimates start from it.
                "run_ms": stats.get("run_ms_ewma"),
                # and its work around the run (decoding, masks), which does not batch
                "work_ms": stats.get("node_work_ms_ewma"),
            }
        load1, _, _ = os.getloadavg()
        record = {"services": services, "mem_free_mb": _mem_available_mb(),
                  "load": round(load1 / (os.cpu_count() or 1), 3),
                  "goodput": self.requests.origin_goodput()}
        if self.runtime is not None:
            record.update(self.runtime.state())
        return record

    def _load_models(self, load: bool = True) -> None:
        # Probed once: importing a runtime can take seconds (torch), too slow per request.
        self.backends = [{"name": b.name, "available": b.available, "runtime": b.runtime,
                          "targets": list(b.targets)} for b in all_backend_info()]
        stored, broken = self.store.scan()
        for bad in broken:
            self.unavailable[bad.directory.name] = bad.reason
            log.warning("skipping %s: %s", bad.directory, bad.reason)
        wanted = set(self.config.models)
        found = {m.manifest.name for m in stored}
        for name in sorted(wanted - found):
            self.unavailable[name] = f"not in the model store {self.store.root}"
            log.warning("model %s is not in the store %s", name, self.store.root)
        for model in stored:
            if wanted and model.manifest.name not in wanted:
                continue
            if model.manifest.task == "stage" or not load:
                continue  # stages (and, in a cluster, every model) load on placement
            try:
                self.services[model.manifest.name] = load_service(
                    model.directory, model.manifest, self.config.threads)
            except (BackendUnavailable, ImportError, OSError, ValueError, RuntimeError) as exc:
                self.unavailable[model.manifest.name] = str(exc)
                log.warning("cannot serve %s: %s", model.manifest.name, exc)

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.runtime is not None:
            await self.runtime.stop()
        if self.member is not None:
            await self.member.stop()
        await self.api.stop()
        for service in self.services.values():
            await asyncio.to_thread(service.stop)

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()

    def describe_models(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "task": service.manifest.task,
                "backend": service.manifest.backend,
                "target": service.target if isinstance(service, GenerationService)
                else service.session.target,
                "inputs": [s.to_json() for s in service.manifest.inputs],
                "outputs": [s.to_json() for s in service.manifest.outputs],
                "memory_mb": service.manifest.memory_mb,
                "hints": service.manifest.hints.to_json(),
            }
            for name, service in sorted(self.services.items())
        ]

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "version": VERSION,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "socket": str(self.config.socket_path),
            "model_store": str(self.store.root),
            "connections": self.api.connections,
            "buffered_bytes": self.api.buffered_bytes,
            "http": self.http.url if self.http is not None else None,
            # The endpoint's bounds and what it holds now (null when HTTP is off).
            "http_limits": ({**self.http.limits.to_json(),
                             "open_connections": self.http.open_connections}
                            if self.http is not None else None),
            "backends": self.backends,
            "services": [s.stats() for _, s in sorted(self.services.items())],
            "unavailable": dict(self.unavailable),
            "requests": self.requests.summary(),
            "cluster": self.member.view().to_dict() if self.member is not None else None,
            "plan": self.runtime.status() if self.runtime is not None else None,
        }


def _mem_available_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return round(int(line.split()[1]) / 1024, 1)
    return None


def _stable_node_id() -> str:
    """A node id that survives restarts: derived from the machine id where there is one."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if text:
                return f"{socket.gethostname()}-{text[:8]}"
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def run_node(config: NodeConfig) -> None:
    asyncio.run(Node(config).run_until_stopped())
