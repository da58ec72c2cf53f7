"""A model too big for any one node is served by a pipeline across nodes that the leader's
partitioner chose, through the same local socket API as a local model; and a stage node
killed mid-stream costs a replay on a repaired route, never a wrong or repeated answer."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from epara.models.llm import GenerationParams, load_engine
from epara.node.client import Client, Done, EparaError
from epara.peer.security import create_cluster_credentials

from .helpers import start_node, stop_node, wait_for_cluster, wait_for_socket

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
BUDGET_MB = "300"  # the model needs ~540 MB: it fits on no single node


@pytest.fixture(scope="module")
def llm_store(tmp_path_factory: pytest.TempPathFactory,
              prepared: Callable[[str], Path]) -> Path:
    """A store holding only the LLM (shared by the node processes)."""
    source = prepared(MODEL)
    store = tmp_path_factory.mktemp("llm-store")
    subprocess.run(["cp", "-r", str(source), str(store / MODEL)], check=True)
    return store


@pytest.fixture(scope="module")
def reference(llm_store: Path) -> list[int]:
    engine = load_engine(llm_store / MODEL, threads=1)
    engine.add("ref", prompt=PROMPT, params=GenerationParams(max_tokens=16))
    tokens: list[int] = []
    while engine.active:
        tokens += [e.token_id for e in engine.step()]  # what the API streams, in order
    return tokens


@pytest.fixture
def cluster(tmp_path: Path, llm_store: Path) -> Iterator[dict[str, Any]]:
    credentials = tmp_path / "cluster"
    create_cluster_credentials(credentials)
    nodes = {}
    for i in range(3):
        sock = tmp_path / f"n{i}" / "node.sock"
        process = start_node(llm_store, sock, "--cluster", str(credentials), "--node-id",
                             f"n{i}", "--interface", "127.0.0.1", "--port", "0",
                             "--threads", "1", "--memory-budget-mb", BUDGET_MB)
        nodes[f"n{i}"] = (process, sock)
    try:
        for process, sock in nodes.values():
            wait_for_socket(sock, process)
        wait_for_cluster([sock for _, sock in nodes.values()], set(nodes))
        yield nodes
    finally:
        for process, _ in nodes.values():
            stop_node(process)


def generate(sock: Path, deadline_ms: float = 30000) -> tuple[list[int], str]:
    with Client(sock, timeout=60) as client:
        tokens = []
        for item in client.generate(MODEL, PROMPT, max_tokens=16, deadline_ms=deadline_ms):
            if isinstance(item, Done):
                return tokens, item.finish_reason
            tokens.append(item.token)
    raise AssertionError("no done event")


def pipeline_units(sock: Path) -> list[list[str]]:
    with Client(sock) as client:
        plan = client.status()["plan"]["placement"]
    return [[stage[0] for stage in unit["stages"]] for service in plan["services"]
            if service["service"] == MODEL for unit in service["units"]]


def test_a_model_that_fits_no_node_runs_as_a_pipeline_with_the_same_tokens(
        cluster: dict[str, Any], reference: list[int]) -> None:
    for name in ("n0", "n1", "n2"):  # from any node: the head, a stage, or neither
        tokens, reason = generate(cluster[name][1])
        assert tokens == reference, name
        assert reason == "length"
    units = pipeline_units(cluster["n0"][1])
    assert units and all(len(devices) >= 2 for devices in units)


def test_killing_a_stage_node_mid_stream_replays_without_wrong_or_repeated_tokens(
        cluster: dict[str, Any], reference: list[int]) -> None:
    generate(cluster["n0"][1])  # the pipeline is placed and warm
    (devices,) = pipeline_units(cluster["n0"][1])
    victim = devices[1]  # a stage that is not the head
    clients = [name for name in cluster if name != victim]
    outcomes: list[tuple[str, Any, float]] = []
    deadline_ms = 20000

    def stream(name: str) -> None:
        for _ in range(5):
            started = time.monotonic()
            try:
                tokens, _ = generate(cluster[name][1], deadline_ms)
                outcomes.append(("ok", tokens, time.monotonic() - started))
            except EparaError as exc:
                outcomes.append(("error", exc, time.monotonic() - started))

    threads = [threading.Thread(target=stream, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    cluster[victim][0].send_signal(signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == 10
    for kind, value, elapsed in outcomes:
        assert elapsed < deadline_ms / 1000 + 2  # nothing hangs past its deadline
        if kind == "ok":
            assert value == reference  # replayed, never wrong or repeated
        else:
            assert value.code and value.message  # a clear error
    assert sum(kind == "ok" for kind, _, _ in outcomes) >= 8, [
        (kind, getattr(value, "message", ""), round(elapsed, 1))
        for kind, value, elapsed in outcomes]
    repaired = pipeline_units(cluster[clients[0]][1])
    assert repaired and all(victim not in devices for devices in repaired)
