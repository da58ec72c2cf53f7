"""Stage pipelines over the data plane, with real split models (in one process here;
the multi-process and failure tests live in test_pipeline_cluster.py)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from epara.models.backends import get_backend
from epara.models.manifest import Manifest, load_manifest
from epara.models.split import split_model, stage_of
from epara.models.store import ModelStore
from epara.node.dataplane import DataPlane
from epara.node.pipeline import (
    PipelineClient,
    PipelineSession,
    SessionStage,
    StageFailed,
    StageHost,
    StageRef,
)
from epara.node.service import ModelService, ServiceError


def _session_stage(directory: Path) -> SessionStage:
    manifest = load_manifest(directory)
    session = get_backend(manifest.backend).load(directory, manifest, threads=1)
    return SessionStage(session, [s.name for s in manifest.inputs])


@pytest.fixture(scope="module")
def text_det_stages(zoo_store: ModelStore, prepared: Callable[[str], Path]) -> list[Path]:
    prepared("text-det")
    return split_model(zoo_store, "text-det", 1)  # one cut: two stages


def _page(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, 160, 256), dtype=np.float32)


def test_split_text_detection_over_two_stage_hosts_equals_the_whole_model(
        cluster_dir: Path, prepared: Callable[[str], Path],
        text_det_stages: list[Path]) -> None:
    whole_dir = prepared("text-det")
    whole_manifest = load_manifest(whole_dir)
    whole = get_backend("onnx").load(whole_dir, whole_manifest, threads=1)
    page = _page()
    expected = whole.run({"x": page})

    async def run() -> dict[str, np.ndarray]:
        planes = [DataPlane(cluster_dir, "127.0.0.1") for _ in range(3)]
        for plane in planes:
            await plane.start()
        hosts = [StageHost(planes[i], f"n{i}") for i in range(2)]
        for i, (host, directory) in enumerate(zip(hosts, text_det_stages, strict=True)):
            host.add(f"text-det#{i}", _session_stage(directory))
        client = PipelineClient(planes[2], "origin")
        route = [StageRef(f"n{i}", planes[i].endpoint, f"text-det#{i}") for i in range(2)]
        try:
            return await client.run(route, {"x": page}, timeout=30)
        finally:
            for host in hosts:
                host.close()
            for plane in planes:
                await plane.stop()

    result = asyncio.run(run())
    name = whole_manifest.outputs[0].name
    np.testing.assert_allclose(result[name], expected[name], atol=1e-4)


def test_a_missing_stage_is_reported_to_the_origin(cluster_dir: Path) -> None:
    async def run() -> None:
        planes = [DataPlane(cluster_dir, "127.0.0.1") for _ in range(2)]
        for plane in planes:
            await plane.start()
        StageHost(planes[0], "n0")
        client = PipelineClient(planes[1], "origin")
        try:
            with pytest.raises(StageFailed, match="not loaded"):
                await client.run([StageRef("n0", planes[0].endpoint, "nothing#0")],
                                 {"x": np.ones(3, np.float32)}, timeout=5)
        finally:
            for plane in planes:
                await plane.stop()

    asyncio.run(run())


def test_a_dead_stage_fails_the_request_within_its_timeout(cluster_dir: Path) -> None:
    async def run() -> float:
        planes = [DataPlane(cluster_dir, "127.0.0.1") for _ in range(2)]
        for plane in planes:
            await plane.start()
        client = PipelineClient(planes[1], "origin")
        dead = planes[0].endpoint
        await planes[0].stop()  # the stage's node is gone
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(StageFailed):
                await client.run([StageRef("n0", dead, "text-det#0")],
                                 {"x": np.ones(3, np.float32)}, timeout=1.0)
        finally:
            await planes[1].stop()
        return loop.time() - started

    assert asyncio.run(run()) < 3.0


def test_a_lost_node_fails_its_pending_requests_at_once(cluster_dir: Path) -> None:
    async def run() -> None:
        planes = [DataPlane(cluster_dir, "127.0.0.1") for _ in range(2)]
        for plane in planes:
            await plane.start()
        host = StageHost(planes[0], "n0")

        class Stall:
            def run(self, header: dict, tensors: dict) -> dict:
                import time

                time.sleep(2)  # a stage that stalls
                return dict(tensors)

            def drop(self, seq_id: str) -> None:
                pass

        host.add("stall#0", Stall())
        client = PipelineClient(planes[1], "origin")
        task = asyncio.create_task(client.run([StageRef("n0", planes[0].endpoint, "stall#0")],
                                              {"x": np.ones(3, np.float32)}, timeout=30))
        await asyncio.sleep(0.3)
        client.nodes_lost({"n0"})
        try:
            with pytest.raises(StageFailed, match="left the cluster"):
                await asyncio.wait_for(task, 1)
        finally:
            host.close()
            for plane in planes:
                await plane.stop()

    asyncio.run(run())


def _head_service(client: PipelineClient, first: Path, parent: Manifest,
                  route: Callable[[], list[StageRef]]) -> ModelService:
    """A pipeline head as the runtime makes one: the parent model's service whose session
    runs stage ``first`` here and the route's stages remotely."""
    manifest = load_manifest(first)
    session = PipelineSession(_session_stage(first), client, route,
                              [s.name for s in parent.outputs], asyncio.get_running_loop(),
                              "pipeline:test")
    service = ModelService(parent, session)
    service.head_key = "text-det@origin+n0#0-1,1-2"
    assert manifest.extra["stage"]["of"] == parent.name
    return service


def test_a_pipeline_head_serves_the_whole_models_answer_through_a_model_service(
        cluster_dir: Path, zoo_store: ModelStore, prepared: Callable[[str], Path]) -> None:
    whole_dir = prepared("text-det")
    parent = load_manifest(whole_dir)
    expected = get_backend("onnx").load(whole_dir, parent, threads=1).run({"x": _page(3)})
    # The stages the runtime builds for a planned range: each cut at its own positions.
    head_dir = stage_of(zoo_store, "text-det", 0, 120, stream=io.StringIO())
    tail_dir = stage_of(zoo_store, "text-det", 120, 330, stream=io.StringIO())

    async def run() -> dict[str, np.ndarray]:
        planes = [DataPlane(cluster_dir, "127.0.0.1") for _ in range(2)]
        for plane in planes:
            await plane.start()
        host = StageHost(planes[0], "n0")
        host.add("text-det#1-2", _session_stage(tail_dir))
        route = [StageRef("n0", planes[0].endpoint, "text-det#1-2")]
        service = _head_service(PipelineClient(planes[1], "origin"), head_dir, parent,
                                lambda: route)
        try:
            result = await asyncio.wrap_future(
                service.submit({"x": _page(3)}, time.monotonic() + 30))
            assert service.stats()["run_ms_ewma"] is None  # not one device's run time
            return result.outputs
        finally:
            await asyncio.to_thread(service.stop)
            host.close()
            for plane in planes:
                await plane.stop()

    outputs = asyncio.run(run())
    assert set(outputs) == {s.name for s in parent.outputs}
    name = parent.outputs[0].name
    np.testing.assert_allclose(outputs[name], expected[name], atol=1e-4)


def test_a_stalled_stage_fails_the_heads_request_by_its_deadline(
        cluster_dir: Path, zoo_store: ModelStore, prepared: Callable[[str], Path]) -> None:
    parent = load_manifest(prepared("text-det"))
    head_dir = stage_of(zoo_store, "text-det", 0, 120, stream=io.StringIO())

    class Stall:
        def run(self, header: dict, tensors: dict) -> dict:
            time.sleep(2)  # a stage that stalls
            return dict(tensors)

        def drop(self, seq_id: str) -> None:
            pass

    async def run() -> tuple[ServiceError, float]:
        planes = [DataPlane(cluster_dir, "127.0.0.1") for _ in range(2)]
        for plane in planes:
            await plane.start()
        host = StageHost(planes[0], "n0")
        host.add("text-det#1-2", Stall())
        route = [StageRef("n0", planes[0].endpoint, "text-det#1-2")]
        service = _head_service(PipelineClient(planes[1], "origin"), head_dir, parent,
                                lambda: route)
        started = time.monotonic()
        try:
            with pytest.raises(ServiceError) as failed:
                await asyncio.wrap_future(service.submit({"x": _page(3)}, started + 0.8))
            return failed.value, time.monotonic() - started
        finally:
            await asyncio.to_thread(service.stop)
            host.close()
            for plane in planes:
                await plane.stop()

    error, elapsed = asyncio.run(run())
    assert error.code == "stage_failed" and "no result within" in str(error)
    assert elapsed < 1.8  # the deadline ended the wait, not the stalled stage


def test_a_head_whose_stage_node_left_the_view_fails_with_stage_failed(
        cluster_dir: Path, zoo_store: ModelStore, prepared: Callable[[str], Path]) -> None:
    parent = load_manifest(prepared("text-det"))
    head_dir = stage_of(zoo_store, "text-det", 0, 120, stream=io.StringIO())

    def gone() -> list[StageRef]:
        raise StageFailed("node n0 is not in the cluster view", "n0")

    async def run() -> ServiceError:
        plane = DataPlane(cluster_dir, "127.0.0.1")
        await plane.start()
        service = _head_service(PipelineClient(plane, "origin"), head_dir, parent, gone)
        try:
            with pytest.raises(ServiceError) as failed:
                await asyncio.wrap_future(service.submit({"x": _page(3)}, None))
            return failed.value
        finally:
            await asyncio.to_thread(service.stop)
            await plane.stop()

    error = asyncio.run(run())
    assert error.code == "stage_failed" and "not in the cluster view" in str(error)
