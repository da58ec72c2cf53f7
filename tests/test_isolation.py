"""One request cannot hurt another: every number at the boundary is finite and in range,
a failure inside a shared batch fails only the request that caused it, declared limits
hold, and admission scales its estimate with the input's size."""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epara.models.manifest import Hints, Manifest, TensorSpec, load_manifest, save_manifest
from epara.node.api import Request, _generation_params
from epara.node.daemon import load_service
from epara.node.service import InferResult, ModelService, RunCost, ServiceError

# --- bad numbers are refused at the boundary -------------------------------------------


@pytest.mark.parametrize("params", [
    {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": -1},
    {"top_p": math.nan}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"max_tokens": 0},
    {"max_tokens": 2**70}, {"seed": -1}, {"seed": 2**70}, {"temperature": True},
    {"stop": [""]}, {"stop": ["x"] * 100}, {"stop": "x"}, {"nonsense": 1},
])
def test_bad_generation_params_are_refused(params: dict[str, Any]) -> None:
    pytest.importorskip("epara.models.llm")
    with pytest.raises(ServiceError) as info:
        _generation_params(Request({"op": "generate", "params": params}))
    assert info.value.code == "bad_request"


def test_good_generation_params_pass() -> None:
    pytest.importorskip("epara.models.llm")
    params = _generation_params(Request({"params": {
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_tokens": 16, "seed": 3,
        "stop": ["\n"]}}))
    assert params.temperature == 0.7 and params.stop == ("\n",)


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf, -1, 0, 2**70, True, "5"])
def test_bad_deadlines_are_refused(budget: Any) -> None:
    with pytest.raises(ServiceError) as info:
        Request({"op": "infer", "deadline_ms": budget}).deadline()
    assert info.value.code == "bad_request"


# --- a poisoned request in a shared batch ----------------------------------------------


def _lookup_model(store: Path) -> Path:
    """y = table[idx]: a real ONNX Gather whose out-of-range index makes onnxruntime
    raise, for the whole batch it runs in."""
    import onnx
    from onnx import TensorProto, helper

    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 4])],
        initializer=[helper.make_tensor("table", TensorProto.FLOAT, [10, 4], table.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory = store / "lookup"
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    save_manifest(directory, Manifest(
        name="lookup", task="generic", backend="onnx", files={"model": "model.onnx"},
        inputs=(TensorSpec("idx", "int64", (None, 1)),),
        outputs=(TensorSpec("y", "float32", (None, 1, 4)),), memory_mb=1.0,
        hints=Hints(category="frequency", batch_axis=0, max_batch=8, max_wait_ms=20)))
    return directory


def test_a_poisoned_request_fails_alone_and_its_batch_mates_are_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = _lookup_model(tmp_path)
    service = load_service(directory, load_manifest(directory), 1)
    assert isinstance(service, ModelService)
    caplog.set_level(logging.WARNING, "epara.node.service")
    try:
        for _ in range(20):  # until the poisoned one has shared a run with others
            futures: list[tuple[int, Future[InferResult]]] = []
            for i in (1, 2, 3, 99, 4, 5, 6):  # 99: out of the table's range
                futures.append((i, service.submit({"idx": np.array([[i]], np.int64)}, None)))
            for i, future in futures:
                if i == 99:
                    with pytest.raises(ServiceError) as info:
                        future.result(30)
                    assert info.value.code == "inference_failed"
                else:
                    np.testing.assert_array_equal(future.result(30).outputs["y"][0, 0],
                                                  np.arange(4 * i, 4 * i + 4))
            if "running each alone" in caplog.text:
                break
        assert "running each alone" in caplog.text, "the poisoned request never shared a run"
    finally:
        service.stop()


# --- declared limits -------------------------------------------------------------------


def test_a_declared_max_batch_of_one_refuses_more_rows(tmp_path: Path) -> None:
    from .helpers import make_add_model

    directory = make_add_model(tmp_path, "one", batch=None, batch_axis=0, max_batch=1)
    service = load_service(directory, load_manifest(directory), 1)
    assert isinstance(service, ModelService)
    try:
        assert service.submit({"x": np.ones((1, 4), np.float32)}, None).result(30)
        with pytest.raises(ServiceError) as info:
            service.submit({"x": np.ones((3, 4), np.float32)}, None)
        assert info.value.code == "bad_input" and "max batch 1" in str(info.value)
    finally:
        service.stop()


# --- admission by input size -----------------------------------------------------------


def test_run_cost_scales_with_input_size() -> None:
    cost = RunCost()
    assert cost.predict(1, 100, 0.0) is None  # nothing measured: no opinion
    for _ in range(5):
        cost.record(1000, 0.010, 0.0)
    # One size seen: proportional above it, never less below it.
    assert cost.predict(1, 4000, 0.0) == pytest.approx(0.040)
    assert cost.predict(1, 10, 0.0) == pytest.approx(0.010)
    # Two sizes: the fitted line (1 ms fixed + 9 us per element).
    cost = RunCost()
    for work in (1000, 2000, 4000):
        cost.record(work, 0.001 + 9e-6 * work, 0.0)
    assert cost.predict(1, 8000, 0.0) == pytest.approx(0.001 + 9e-6 * 8000)
    assert cost.predict(3, 3000, 0.0) == pytest.approx(0.003 + 9e-6 * 3000)


def test_a_run_slower_than_promised_raises_the_estimate_at_once_then_is_forgotten() -> None:
    cost = RunCost(margin_s=30.0)
    for _ in range(8):
        cost.record(1000, 0.010, 0.0)
    before = cost.predict(1, 1000, 1.0)
    assert before is not None
    cost.record(1000, 0.030, 1.0)  # contention: three times the fit
    after = cost.predict(1, 1000, 1.0)
    assert after is not None and after >= 2 * before
    forgotten = cost.predict(1, 1000, 40.0)
    assert forgotten is not None and forgotten < after / 2


def test_a_large_input_is_refused_where_a_small_one_is_accepted(tmp_path: Path) -> None:
    """Admission learns from small runs; a request 64x as large with the same deadline
    is refused at once instead of being accepted and served late."""
    import onnx
    from onnx import TensorProto, helper

    weight = np.eye(256, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"])
             for i in range(16)]
    nodes.append(helper.make_node("Identity", ["h16"], ["y"]))
    graph = helper.make_graph(
        nodes, "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 256])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [256, 256], weight.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory = tmp_path / "scale"
    directory.mkdir()
    onnx.save(model, str(directory / "model.onnx"))
    save_manifest(directory, Manifest(
        name="scale", task="generic", backend="onnx", files={"model": "model.onnx"},
        inputs=(TensorSpec("x", "float32", (None, 256)),),
        outputs=(TensorSpec("y", "float32", (None, 256)),), memory_mb=1.0))
    service = load_service(directory, load_manifest(directory), 1)
    assert isinstance(service, ModelService)
    try:
        small = np.ones((64, 256), np.float32)
        for _ in range(6):
            service.submit({"x": small}, None).result(30)
        import time

        one_run = service.expected_completion(time.monotonic(), small.size) - time.monotonic()
        assert one_run > 0
        # A deadline of 8 small runs: a small request fits, one 64x larger cannot.
        budget = 8 * one_run
        service.submit({"x": small}, time.monotonic() + budget).result(30)
        with pytest.raises(ServiceError) as info:
            service.submit({"x": np.ones((64 * 64, 256), np.float32)},
                           time.monotonic() + budget)
        assert info.value.code == "deadline_unmeetable"
    finally:
        service.stop()


# --- segment: thresholds and empty images ----------------------------------------------


def test_segment_refuses_bad_thresholds_and_empty_images(
        prepared: Any) -> None:
    import asyncio

    from epara.node.api import LocalApi

    directory = prepared("selfie-seg")
    service = load_service(directory, load_manifest(directory), 1)
    api = LocalApi({"selfie-seg": service}, lambda: [], lambda: {})
    image = np.zeros((32, 48, 3), np.uint8)

    async def call(**fields: Any) -> dict[str, Any]:
        replies: list[dict[str, Any]] = []

        async def reply(answer: dict[str, Any]) -> None:
            replies.append(answer)

        await api._handle(Request({"id": 1, "op": "segment", "model": "selfie-seg",
                                   **fields}), reply, {})
        return replies[-1]

    try:
        for threshold in (-1, 2, math.nan, math.inf):
            answer = asyncio.run(call(image=image, threshold=threshold))
            assert answer["error"]["code"] == "bad_request", answer
        for empty in (b"", np.zeros((0, 0, 3), np.uint8), np.zeros((4, 0, 3), np.uint8)):
            answer = asyncio.run(call(image=empty))
            assert answer["error"]["code"] == "bad_input", answer
        assert service.stats()["node_work_ms_ewma"] is None  # refusals are not work
        answer = asyncio.run(call(image=image, threshold=0.5))
        assert answer["ok"] and answer["mask"].shape == (32, 48)
        # The node timed its decoding and masking, which the leader plans with.
        assert service.stats()["node_work_ms_ewma"] > 0
        assert service.node_work.after_s is not None and service.node_work.after_s > 0
    finally:
        service.stop()


# --- generate: a NaN beside healthy streams, and the end-of-sequence token ----------------


def test_a_nan_temperature_is_refused_and_healthy_streams_finish_without_eos_events(
        prepared: Any) -> None:
    """The real SmolLM2 in a real GenerationService behind the API handler: a request with
    temperature NaN is refused at the boundary while two healthy greedy streams run
    beside it; they end with `done` and never stream the end-of-sequence token."""
    import asyncio

    pytest.importorskip("epara.models.llm")
    from epara.node.api import LocalApi

    directory = prepared("smollm2-135m")
    manifest = load_manifest(directory)
    stop_ids = {int(t) for t in manifest.extra.get("stop_token_ids", ())}
    service = load_service(directory, manifest, 1)
    api = LocalApi({"llm": service}, lambda: [], lambda: {})
    question = [{"role": "user", "content": "What is the capital of France?"}]

    async def call(request_id: int, params: dict[str, Any]) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []

        async def reply(answer: dict[str, Any]) -> None:
            replies.append(answer)

        await api._handle(Request({"id": request_id, "op": "generate", "model": "llm",
                                   "messages": question, "params": params}), reply, {})
        return replies

    async def run() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(
            call(1, {"temperature": 0, "max_tokens": 32}),
            call(2, {"temperature": math.nan, "max_tokens": 32}),
            call(3, {"temperature": 0, "max_tokens": 32}))

    try:
        healthy_a, poisoned, healthy_b = asyncio.run(run())
    finally:
        service.stop()
    assert poisoned == [{"id": 2, "ok": False, "error": {
        "code": "bad_request", "message": poisoned[0]["error"]["message"]}}]
    for stream in (healthy_a, healthy_b):
        assert stream[-1]["event"] == "done", stream[-1]
        tokens = [r for r in stream if r.get("event") == "token"]
        assert "Paris" in "".join(r["text"] for r in tokens)
        assert not stop_ids & {r["token"] for r in tokens}
        assert stream[-1]["usage"]["completion_tokens"] == len(tokens)
    assert [r.get("token") for r in healthy_a] == [r.get("token") for r in healthy_b]
