"""An ONNX model that fits no single node is placed by the leader as a pipeline and runs
exactly as planned: each node builds its stage's cut from its own store at the plan's
range, every node's running configuration equals the published placement, a request
through the head (or any node) gets the unsplit model's answer through the same API, and
a dead stage gives that request a clear error within its deadline."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epara.models import imaging
from epara.models.backends import get_backend
from epara.models.manifest import load_manifest, save_manifest
from epara.models.split import onnx_stage_analysis
from epara.node.client import Client, EparaError
from epara.node.lab.loadgen import running_mismatches
from epara.node.leader.model import Placement
from epara.peer.security import create_cluster_credentials

from .helpers import start_node, stop_node, wait_for_cluster, wait_for_socket

MODEL = "text-det"
# text-det needs ~157 MB at its reference page size: it fits neither node whole, and
# each half of it fits one.
BUDGET_MB = "120"
TOLERANCE = 1e-4  # a cut can break an onnxruntime fusion (~1e-6, see FACTS.md)


@pytest.fixture(scope="module")
def det_store(tmp_path_factory: pytest.TempPathFactory,
              prepared: Callable[[str], Path]) -> Path:
    """A store holding only text-det, with its cut analysis recorded (what
    ``epara models split`` records) but no stages: the nodes cut their own."""
    store = tmp_path_factory.mktemp("det-store")
    subprocess.run(["cp", "-r", str(prepared(MODEL)), str(store / MODEL)], check=True)
    manifest = load_manifest(store / MODEL)
    analysis = onnx_stage_analysis(store / MODEL / manifest.model_file,
                                   manifest.extra.get("reference_shapes"))
    save_manifest(store / MODEL, replace(manifest, extra={**manifest.extra,
                                                          "stages": analysis.to_json()}))
    return store


@pytest.fixture
def cluster(tmp_path: Path, det_store: Path) -> Iterator[dict[str, Any]]:
    credentials = tmp_path / "cluster"
    create_cluster_credentials(credentials)
    nodes = {}
    for i in range(2):
        sock = tmp_path / f"n{i}" / "node.sock"
        # Each node has its own copy of the store, as separate devices do.
        store = tmp_path / f"store{i}"
        subprocess.run(["cp", "-r", str(det_store), str(store)], check=True)
        process = start_node(store, sock, "--cluster", str(credentials), "--node-id",
                             f"n{i}", "--interface", "127.0.0.1", "--port", "0",
                             "--threads", "1", "--memory-budget-mb", BUDGET_MB)
        nodes[f"n{i}"] = (process, sock, store)
    try:
        for process, sock, _ in nodes.values():
            wait_for_socket(sock, process)
        wait_for_cluster([sock for _, sock, _ in nodes.values()], set(nodes))
        yield nodes
    finally:
        for process, _, _ in nodes.values():
            stop_node(process)


def _page() -> np.ndarray:
    return np.random.default_rng(7).random((1, 3, 160, 256), dtype=np.float32)


def _document() -> np.ndarray:
    """A small page with two lines of text, RGB uint8."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (320, 160), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=28)
    draw.text((10, 20), "EPARA 2026", fill="black", font=font)
    draw.text((10, 90), "edge pipeline", fill="black", font=font)
    return np.asarray(page)


def _pipeline(sock: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    """The placement the node holds and text-det's units in it (device, first, end)."""
    with Client(sock) as client:
        placement = client.status()["plan"]["placement"]
    return placement, [unit["stages"] for service in placement["services"]
                       if service["service"] == MODEL for unit in service["units"]]


def test_a_planned_onnx_pipeline_runs_as_planned_and_answers_as_the_whole_model(
        cluster: dict[str, Any], det_store: Path) -> None:
    manifest = load_manifest(det_store / MODEL)
    whole = get_backend("onnx").load(det_store / MODEL, manifest, threads=1)
    page = _page()
    expected = whole.run({"x": page})["sigmoid_0.tmp_0"]
    # The first request is what makes the leader place the model (cold start waits for
    # the placement within its deadline).
    for name in ("n0", "n1"):  # through the head and through the stage's node
        with Client(cluster[name][1], timeout=60) as client:
            got = client.infer(MODEL, {"x": page}, deadline_ms=30000)["sigmoid_0.tmp_0"]
        assert got.shape == expected.shape
        assert float(np.abs(got - expected).max()) <= TOLERANCE, name

    # The segment op: the same image pre/post-processing around the pipeline as around a
    # replica, so the same mask as the whole model's.
    image = _document()
    with Client(cluster["n0"][1], timeout=60) as client:
        answer = client.segment(MODEL, image, deadline_ms=30000)
    rgb = imaging.decode_image(image)
    tensor = imaging.preprocess(rgb, manifest.extra, manifest.inputs[0].dtype)
    probabilities = imaging.probability_map(whole.run({"x": tensor})["sigmoid_0.tmp_0"],
                                            manifest.extra)
    expected_mask = imaging.mask_for_image(probabilities, rgb.shape[:2],
                                           float(manifest.extra.get("threshold", 0.5)))
    assert answer["mask"].shape == expected_mask.shape
    assert np.count_nonzero(expected_mask) > 0.01 * expected_mask.size  # text was found
    # A pixel may flip where the probability sits on the threshold (~1e-6 apart).
    assert np.mean(answer["mask"] == expected_mask) >= 0.999

    placement, units = _pipeline(cluster["n0"][1])
    assert len(units) == 1 and len(units[0]) == 2, units
    (head, _, _, _), (stage_node, first, end, _) = units[0]
    assert {head, stage_node} == {"n0", "n1"}
    # What runs on every node is exactly what the published placement asks of it.
    assert running_mismatches([sock for _, sock, _ in cluster.values()], placement) == []
    with Client(cluster[stage_node][1]) as client:
        status = client.status()
    assert status["plan"]["running"]["stages"] == [f"{MODEL}#{first}-{end}"]
    # The stage node cut its stage from its own store, at the plan's positions.
    cuts = Placement.from_dict(placement)
    assert cuts.version >= 1
    assert any(p.name.startswith(f"{MODEL}.part") for p in cluster[stage_node][2].iterdir())

    # A dead stage: the request fails with a clear error within its deadline, no hang.
    cluster[stage_node][0].send_signal(signal.SIGKILL)
    deadline_ms = 4000
    started = time.monotonic()
    with Client(cluster[head][1], timeout=30) as client, \
            pytest.raises(EparaError) as failed:
        client.infer(MODEL, {"x": page}, deadline_ms=deadline_ms)
    assert time.monotonic() - started < deadline_ms / 1000 + 2
    assert failed.value.code in ("stage_failed", "unavailable", "deadline_exceeded",
                                 "deadline_unmeetable"), failed.value
    assert failed.value.message
    with Client(cluster[head][1]) as client:
        client.ping()  # the head keeps running
