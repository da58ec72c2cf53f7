"""The LLM runtime on the real SmolLM2-135M weights: the KV pool, admission by KV memory,
chunked prefill beside running streams, isolation of one sequence's failure inside a
shared batch, stage caches freed after a killed head, and the execution providers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epara.models.llm import (
    GenerationParams,
    KvPool,
    KvPoolFull,
    LlmEngine,
    LlmStage,
    choose_providers,
    device_providers,
)
from epara.models.llm_graph import build_stages, load_config
from epara.models.manifest import load_manifest
from epara.node.dataplane import DataPlane
from epara.node.generation import GenerationService
from epara.node.pipeline import LlmStageAdapter, StageHost
from epara.node.service import ServiceError

# Greedy tokens from transformers (see tests/test_llm.py's REFERENCE).
PROMPTS = {
    "The capital of France is": [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33],
    "Once upon a time, there was a little robot who":
        [761, 253, 1767, 2470, 288, 919, 701, 5587, 30, 909, 436, 1217],
    "def fibonacci(n):\n    ": [753, 3987, 46477, 24, 94, 727, 466, 585, 304, 1758, 216, 32],
}


@pytest.fixture(scope="module")
def model_dir(prepared: Callable[[str], Path]) -> Path:
    pytest.importorskip("gguf")
    return prepared("smollm2-135m")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LlmEngine:
    return LlmEngine(model_dir, load_manifest(model_dir), threads=2)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- the KV pool ---------------------------------------------------------------------------

def test_kv_pool_memory_grows_with_context_and_is_returned_at_the_end() -> None:
    # SmolLM2's shape: 30 layers, 3 KV heads of 64; 8 slots of 8192 positions reserve
    # 2.9 GB of address space, but only written positions become memory.
    pool = KvPool(30, 3, 64, slots=8, capacity=8192)
    before = _rss_bytes()
    assert pool.arrange(["a"]) == 0
    slot = pool.slot["a"]
    pool.array[:, :, slot, :, :1024] = 1.0  # what attention writes for 1024 positions
    pool.length["a"] = 1024
    grown = _rss_bytes() - before
    assert pool.in_use_bytes() == 1024 * pool.token_bytes == 47_185_920
    # Pages: 16 positions of 64 floats each; allow the interpreter a little noise.
    assert 0.95 * pool.in_use_bytes() < grown < pool.in_use_bytes() + 8 * 2**20
    pool.release("a")
    assert _rss_bytes() - before < 8 * 2**20
    assert pool.sequences == 0 and pool.owner == [None] * 8


def test_kv_pool_keeps_a_batch_in_adjacent_slots_and_moves_only_on_change() -> None:
    pool = KvPool(2, 1, 4, slots=4, capacity=16)
    start = pool.arrange(["a", "b", "c"])
    assert sorted(pool.slot[s] for s in "abc") == [start, start + 1, start + 2]
    for s in "abc":  # mark each sequence's slab with its own value
        pool.array[:, :, pool.slot[s], :, :3] = ord(s)
        pool.length[s] = 3
    before = dict(pool.slot)
    assert pool.arrange(["c", "a", "b"]) == start and pool.slot == before  # no move
    pool.arrange(["n"])  # a new sequence (a prompt's chunk) takes a free slot
    assert pool.slot == {**before, "n": pool.slot["n"]}
    pool.release("n")
    pool.release("b")  # a hole in the middle: the next batch [a, c] must be adjacent
    start = pool.arrange(["a", "c"])
    assert {pool.slot["a"], pool.slot["c"]} == {start, start + 1}
    for s in "ac":
        assert (pool.array[:, :, pool.slot[s], :, :3] == ord(s)).all()  # moved whole
    pool.arrange(["d"])
    pool.arrange(["e"])
    with pytest.raises(KvPoolFull):
        pool.arrange(["f"])


def test_stage_updates_its_pool_in_place_and_rewinds_on_replay(model_dir: Path) -> None:
    stage = LlmStage(build_stages(model_dir, [2])[0], threads=2, slots=2, capacity=64)
    buffer = stage.pool.array.ctypes.data
    ids = np.array([[504, 3575, 282, 4649, 314]], np.int64)
    first = stage.forward(["s"], ids, np.arange(5)[None])
    slab = stage.pool.array[0, 0, stage.pool.slot["s"], :, :5].copy()
    assert np.abs(slab).sum() > 0 and stage.length("s") == 5
    again = stage.forward(["s"], ids[:, 3:], np.arange(3, 5)[None])  # replay from 3
    np.testing.assert_allclose(again, first[:, 3:], rtol=1e-5, atol=1e-5)
    assert stage.length("s") == 5 and stage.pool.array.ctypes.data == buffer
    with pytest.raises(ValueError, match="expired or lost"):
        stage.forward(["t"], ids[:, :1], np.array([[4]]))  # unknown cache, position 4
    with pytest.raises(ValueError, match="capacity"):
        stage.forward(["s"], np.zeros((1, 60), np.int64), np.arange(5, 65)[None])
    assert stage.sequences == 1


# --- admission, chunked prefill --------------------------------------------------------------

def test_sequences_are_admitted_by_kv_memory(model_dir: Path, engine: LlmEngine) -> None:
    manifest = engine.manifest
    cfg = load_config(model_dir)
    # The planner's memory figure holds the weights and the KV budget the engine uses.
    budget = manifest.extra["kv_budget_tokens"]
    kv_mb = budget * cfg.layers * manifest.extra["stages"]["kv_bytes_per_token_per_layer"] / 2**20
    weights_mb = (model_dir / "weights.bin").stat().st_size / 2**20
    assert manifest.memory_mb >= weights_mb + kv_mb
    assert engine.kv_budget_tokens == budget

    small = LlmEngine(model_dir, manifest, stages=engine.stages, slots=4, kv_budget_tokens=64)
    small.add("a", prompt="The capital of France is", params=GenerationParams(max_tokens=40))
    assert small.kv_reserved_tokens == 45
    with pytest.raises(KvPoolFull):  # fits alone, not beside "a"
        small.add("b", prompt="The capital of France is",
                  params=GenerationParams(max_tokens=30))
    with pytest.raises(ValueError):  # a prompt longer than the whole budget: never
        small.add("c", prompt="word " * 80, params=GenerationParams(max_tokens=1))
    small.add("d", prompt="The capital of France is", params=GenerationParams(max_tokens=5))
    while small.active:
        small.step()
    assert small.kv_reserved_tokens == 0 and small.stages[0].sequences == 0
    small.add("b", prompt="The capital of France is", params=GenerationParams(max_tokens=30))
    small.cancel("b")
    assert small.kv_reserved_tokens == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine: LlmEngine) -> None:
    prompt, want = next(iter(PROMPTS.items()))
    engine.add("running", prompt=prompt, params=GenerationParams(max_tokens=40))
    engine.step()
    engine.step()
    long_prompt = "The history of the printing press begins " * 28  # ~197 tokens
    assert len(engine.encode(long_prompt)) > 3 * 48
    engine.add("long", prompt=long_prompt, params=GenerationParams(max_tokens=4))
    running, long_tokens, steps_without, steps_to_first = [], [], 0, 0
    chunk, engine.prefill_chunk = engine.prefill_chunk, 48  # at most 48 tokens a step
    try:
        while engine.active:
            events = engine.step()
            got = [e for e in events if e.seq_id == "running"]
            steps_without += not got and "running" in [e.seq_id for e in events] + list(
                engine._sequences)
            running += [e.token_id for e in got]
            long_tokens += [e.token_id for e in events if e.seq_id == "long"]
            steps_to_first += not long_tokens
    finally:
        engine.prefill_chunk = chunk
    # The long prompt took several steps (chunks), the running stream got a token on
    # every one of them, and both give their solo greedy tokens.
    assert steps_without == 0 and steps_to_first >= 3
    assert running[:10] == want[2:12]
    engine.add("alone", prompt=long_prompt, params=GenerationParams(max_tokens=4))
    alone = []
    while engine.active:
        alone += [e.token_id for e in engine.step()]
    assert long_tokens == alone


# --- one sequence's failure stays its own ---------------------------------------------------

class NanForOneSequence:
    """A real stage whose output row turns non-finite for one chosen sequence: what a
    numeric fault (overflowing activations) looks like to the engine."""

    def __init__(self, stage: LlmStage, victim: str) -> None:
        self.stage, self.victim, self.layers = stage, victim, stage.layers

    def forward(self, seq_ids: Sequence[str], inputs: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
        out = self.stage.forward(seq_ids, inputs, positions)
        if self.victim in seq_ids:
            out[list(seq_ids).index(self.victim)] = np.nan
        return out

    def drop(self, seq_id: str) -> None:
        self.stage.drop(seq_id)


def _collect(service: GenerationService, prompt: str, **params: Any,
             ) -> tuple[threading.Event, list[Any]]:
    done, items = threading.Event(), []

    def sink(item: Any) -> None:
        items.append(item)
        if item is None or isinstance(item, ServiceError):
            done.set()

    service.submit(prompt, None, GenerationParams(**params), None, sink)
    return done, items


def test_a_poisoned_sequence_fails_alone_beside_healthy_streams(model_dir: Path) -> None:
    manifest = load_manifest(model_dir)
    first, last = build_stages(model_dir, [15])
    poisoned = "Water boils at 100 degrees and freezes at 0 degrees because"
    head, tail = LlmStage(first, threads=2, slots=8), LlmStage(last, threads=2, slots=8)
    engine = LlmEngine(model_dir, manifest, threads=2,
                       stages=[head, NanForOneSequence(tail, "s1")])
    service = GenerationService(manifest, engine)
    try:
        healthy = [_collect(service, p, max_tokens=12) for p in list(PROMPTS)[:1]]
        bad = _collect(service, poisoned, max_tokens=12)  # s1: its logits turn NaN
        healthy += [_collect(service, p, max_tokens=12) for p in list(PROMPTS)[1:]]
        nan_temperature = _collect(service, "Hello", max_tokens=12,
                                   temperature=float("nan"))
        for done, _ in [*healthy, bad, nan_temperature]:
            assert done.wait(60)
    finally:
        service.stop()
    for (_, items), want in zip(healthy, PROMPTS.values(), strict=True):
        assert items[-1] is None  # finished normally
        assert [e.token_id for e in items[:-1]] == want
    assert isinstance(bad[1][-1], ServiceError) and bad[1][-1].code == "inference_failed"
    assert "non-finite" in str(bad[1][-1])
    assert nan_temperature[1] == [nan_temperature[1][-1]]
    assert nan_temperature[1][-1].code == "bad_input"
    assert engine.active == 0 and engine.kv_reserved_tokens == 0
    assert head.sequences == 0 and tail.sequences == 0


# --- stage caches of a killed head ------------------------------------------------------------

HEAD = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    from pathlib import Path
    from epara.node.dataplane import DataPlane
    from epara.node.pipeline import PipelineClient, StageRef

    async def main():
        plane = DataPlane(Path(sys.argv[1]), "127.0.0.1")
        await plane.start()
        client = PipelineClient(plane, "head")
        route = [StageRef("stage", ("127.0.0.1", int(sys.argv[2])), "tail")]
        for seq in ("ends", "orphan"):
            x = np.random.default_rng(0).standard_normal((1, 6, 576)).astype(np.float32)
            out = await client.run(route, {"x": x, "positions": np.arange(6)[None]}, 30.0,
                                   seq_ids=[seq])
            assert out["x"].shape == (1, 49152)
        client.drop(route, "ends")  # this sequence ended; "orphan" is still running
        await asyncio.sleep(0.5)
        print("ready", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


def test_a_killed_heads_sequences_are_freed_on_the_stage(model_dir: Path,
                                                          cluster_dir: Path) -> None:
    tail = LlmStage(build_stages(model_dir, [29])[1], threads=1, slots=4)

    async def run() -> list[int]:
        plane = DataPlane(cluster_dir, "127.0.0.1")
        await plane.start()
        host = StageHost(plane, "stage")
        host.add("tail", LlmStageAdapter(tail, idle_seconds=1.0))
        head = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HEAD, str(cluster_dir), str(plane.endpoint[1]),
            stdout=subprocess.PIPE)
        try:
            assert head.stdout is not None
            line = await asyncio.wait_for(head.stdout.readline(), 60)
            assert line.strip() == b"ready"
            held = [tail.sequences]  # "ends" dropped, "orphan" still held
            head.send_signal(signal.SIGKILL)
            await head.wait()
            deadline = time.monotonic() + 10
            while tail.sequences and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return [*held, tail.sequences]
        finally:
            if head.returncode is None:
                head.kill()
                await head.wait()
            host.close()
            await plane.stop()

    assert asyncio.run(run()) == [1, 0]
    assert tail.pool.in_use_bytes() == 0


# --- execution providers ---------------------------------------------------------------------

def test_providers_follow_the_probed_accelerators() -> None:
    gpu_wheel = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(gpu_wheel, ["cuda"]) == gpu_wheel
    assert choose_providers(gpu_wheel, ["jetson"]) == gpu_wheel
    assert choose_providers(gpu_wheel[1:], ["cuda"]) == gpu_wheel[1:]
    assert choose_providers(gpu_wheel, []) == ["CPUExecutionProvider"]  # no GPU found
    assert choose_providers(["CPUExecutionProvider"], ["cuda"]) == ["CPUExecutionProvider"]
    assert choose_providers(gpu_wheel, ["npu"]) == ["CPUExecutionProvider"]


def test_greedy_tokens_on_the_devices_accelerator(model_dir: Path) -> None:
    providers = device_providers()
    if providers == ["CPUExecutionProvider"]:
        pytest.skip("no GPU execution provider here (needs a CUDA GPU or a Jetson and "
                    "onnxruntime-gpu); the CPU path is what the other tests check")
    engine = LlmEngine(model_dir, load_manifest(model_dir), providers=providers)
    assert engine.stages[0].providers == providers
    for prompt, want in PROMPTS.items():
        engine.add(prompt, prompt=prompt, params=GenerationParams(max_tokens=len(want)))
    tokens: dict[str, list[int]] = {p: [] for p in PROMPTS}
    while engine.active:
        for event in engine.step():
            tokens[event.seq_id].append(event.token_id)
    assert tokens == PROMPTS


def test_a_short_prompts_prefill_is_scaled_by_its_per_token_part_only() -> None:
    from epara.node.generation import typical_prefill_s

    # 5 tokens in 300 ms with 100 ms decode steps: 100 ms fixed + 50 ms a token.
    assert typical_prefill_s(0.300, 5, 0.100, 64) == pytest.approx(0.100 + 0.050 * 63)
    # Not 300 ms x 64 / 5 = 3.84 s, as a proportional scale would say.
    assert typical_prefill_s(0.300, 5, 0.100, 64) < 0.300 * 64 / 5 / 1.1
    # A long prompt scales down; a decode step longer than the prefill is all fixed.
    assert typical_prefill_s(1.28, 128, 0.010, 64) < 1.28
    assert typical_prefill_s(0.050, 4, 0.200, 64) == pytest.approx(0.050)
    for bad in (float("nan"), float("inf"), -1.0):
        assert typical_prefill_s(bad, 5, 0.1, 64) is None
        assert typical_prefill_s(0.3, 5, bad, 64) is None
    assert typical_prefill_s(0.3, 0, 0.1, 64) is None
