"""Splitting real models into pipeline stages: chaining the stages computes the model.

Measured here (onnxruntime 1.32, CPU): text-det cut at the balanced cuts gives output
bit-identical to the whole model with graph optimisations on or off. Cuts placed right
after Conv nodes break onnxruntime's Conv+activation fusions: with optimisations on the
chain then differs by up to ~2e-7 (checked against 1e-4), with ``ORT_DISABLE_ALL`` on both
sides it stays bit-identical. The MiniLM stage chain equals the whole TorchScript model
exactly (checked against 1e-5).
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from epara.models.backends import get_backend
from epara.models.manifest import Manifest, load_manifest
from epara.models.preparing import file_sha256, install_model
from epara.models.split import (
    MAX_CANDIDATES,
    STAGE_TASK,
    SplitError,
    SplitUnavailable,
    StageAnalysis,
    analyse_onnx,
    onnx_stage_analysis,
    split_model,
    split_onnx,
    split_tflite,
    split_torchscript,
    stage_name,
    stage_of,
)
from epara.models.store import ModelStore

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

_OPT_TOLERANCE = 1e-4  # text-det chain vs whole with onnxruntime optimisations on
_TORCH_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def text_det(prepared: Callable[[str], Path]) -> tuple[Path, Manifest]:
    directory = prepared("text-det")
    return directory, load_manifest(directory)


@pytest.fixture(scope="module")
def analysis(text_det: tuple[Path, Manifest]) -> StageAnalysis:
    directory, manifest = text_det
    return onnx_stage_analysis(directory / manifest.model_file)


def _page(height: int = 320, width: int = 640) -> np.ndarray:
    """A normalised NCHW input like rapidocr's preprocessing gives (mean 0, std ~1)."""
    return np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)


def _ort_session(path: Path, optimise: bool) -> object:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def _chain_onnx(stages: list[Path], inputs: Mapping[str, np.ndarray], optimise: bool,
                sent: list[dict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Run the stages in order, each fed by name from what the stages before produced;
    ``sent`` collects what each stage hands to the next."""
    values = dict(inputs)
    for directory in stages:
        manifest = load_manifest(directory)
        session = _ort_session(directory / manifest.model_file, optimise)
        feeds = {s.name: values[s.name] for s in manifest.inputs}
        names = [s.name for s in manifest.outputs]
        produced = dict(zip(names, session.run(names, feeds), strict=True))
        if sent is not None:
            sent.append(produced)
        values.update(produced)
    return values


def _whole(text_det: tuple[Path, Manifest], x: np.ndarray, optimise: bool) -> np.ndarray:
    directory, manifest = text_det
    return _ort_session(directory / manifest.model_file, optimise).run(None, {"x": x})[0]


# --- analysis ----------------------------------------------------------------------------

def test_analysis_finds_cheap_cuts_spread_over_the_model(analysis: StageAnalysis) -> None:
    assert analysis.reference == {"x": (1, 3, 736, 1280)}
    assert analysis.node_count == 330  # 672 nodes, 342 of them Constant weights
    assert 1 <= len(analysis.cuts) <= MAX_CANDIDATES
    positions = [c.position for c in analysis.cuts]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert analysis.input_bytes == 3 * 736 * 1280 * 4
    assert analysis.output_bytes == 736 * 1280 * 4
    for cut in analysis.cuts:
        assert cut.flops_before + cut.flops_after == analysis.total_flops
        assert 0 < cut.flops_before < analysis.total_flops
        assert cut.weight_bytes_before + cut.weight_bytes_after >= analysis.total_weight_bytes
        assert cut.crossing and cut.activation_bytes == sum(t.nbytes for t in cut.crossing)
    # PP-OCRv4 det is ~10.6 GFLOPs at 736x1280 and holds 4.7 MB of weights.
    assert 9e9 < analysis.total_flops < 12e9
    assert 4.5e6 < analysis.total_weight_bytes < 4.9e6
    # The end of the backbone, where the neck has reduced the four feature maps to
    # 12-96 channels, costs less to send than the input image itself.
    cheapest = min(analysis.cuts, key=lambda c: c.activation_bytes)
    assert cheapest.activation_bytes < analysis.input_bytes / 2
    assert len(cheapest.crossing) == 4  # the four FPN levels: a U-Net cut


def test_analysis_json_is_the_documented_structure(analysis: StageAnalysis,
                                                   text_det: tuple[Path, Manifest]) -> None:
    data = json.loads(json.dumps(analysis.to_json()))
    assert data["format"] == 1 and data["positions"] == "onnx-nodes"
    assert data["reference"] == {"x": [1, 3, 736, 1280]}
    assert {"node_count", "total_flops", "total_weight_bytes", "input_bytes",
            "output_bytes", "cuts"} <= set(data)
    cut = data["cuts"][0]
    assert set(cut) == {"position", "crossing", "activation_bytes", "flops_before",
                        "flops_after", "weight_bytes_before", "weight_bytes_after"}
    assert set(cut["crossing"][0]) == {"name", "dtype", "shape"}
    directory, manifest = text_det
    assert [c.to_json() for c in analyse_onnx(directory / manifest.model_file)] == \
        data["cuts"]


def test_activation_bytes_match_the_tensors_sent_at_run_time(
        text_det: tuple[Path, Manifest], analysis: StageAnalysis, tmp_path: Path) -> None:
    """Cut at every candidate at once and run at the reference size: what each stage
    hands on is exactly what the analysis says crosses there."""
    directory, manifest = text_det
    stages = split_onnx(directory, manifest, [c.position for c in analysis.cuts], tmp_path)
    sent: list[dict[str, np.ndarray]] = []
    _chain_onnx(stages, {"x": _page(736, 1280)}, optimise=True, sent=sent)
    for cut, produced in zip(analysis.cuts, sent[:-1], strict=True):
        assert {t.name: t.shape for t in cut.crossing} == \
            {k: v.shape for k, v in produced.items()}
        assert cut.activation_bytes == sum(v.nbytes for v in produced.values())


# --- ONNX stages -------------------------------------------------------------------------

@pytest.mark.parametrize("cuts", [1, 2])
def test_text_det_stages_chain_to_the_whole_model(zoo_store: ModelStore,
                                                  text_det: tuple[Path, Manifest],
                                                  cuts: int) -> None:
    stages = split_model(zoo_store, "text-det", cuts, stream=io.StringIO())
    count = cuts + 1
    assert [p.name for p in stages] == [stage_name("text-det", i, count) for i in range(count)]
    manifests = [load_manifest(p) for p in stages]
    for index, m in enumerate(manifests):
        assert m.task == STAGE_TASK and m.backend == "onnx"
        assert m.extra["stage"]["of"] == "text-det"
        assert (m.extra["stage"]["index"], m.extra["stage"]["count"]) == (index, count)
    assert manifests[0].inputs == text_det[1].inputs
    assert manifests[-1].outputs == text_det[1].outputs
    x = _page()
    for optimise in (True, False):
        chained = _chain_onnx(stages, {"x": x}, optimise)["sigmoid_0.tmp_0"]
        whole = _whole(text_det, x, optimise)
        assert float(np.abs(chained - whole).max()) <= _OPT_TOLERANCE
        if not optimise:
            assert np.array_equal(chained, whole)


def test_fusion_breaking_cuts_stay_within_tolerance(text_det: tuple[Path, Manifest],
                                                    tmp_path: Path) -> None:
    """Cuts right after Conv nodes split Conv+Add/activation fusions: a last-bit change
    with optimisations on, bit-identical with them off."""
    from epara.models.split import _load_graph

    directory, manifest = text_det
    g = _load_graph(directory / manifest.model_file)
    after_conv = [i + 1 for i, n in enumerate(g.nodes) if n.op_type == "Conv"][:-1:4]
    stages = split_onnx(directory, manifest, after_conv, tmp_path)
    x = _page()
    on = _chain_onnx(stages, {"x": x}, optimise=True)["sigmoid_0.tmp_0"]
    assert float(np.abs(on - _whole(text_det, x, True)).max()) <= _OPT_TOLERANCE
    off = _chain_onnx(stages, {"x": x}, optimise=False)["sigmoid_0.tmp_0"]
    assert np.array_equal(off, _whole(text_det, x, False))


def test_skip_connections_cross_every_cut_they_span(text_det: tuple[Path, Manifest],
                                                    tmp_path: Path) -> None:
    """Cuts inside the backbone: earlier feature maps (FPN skips) must reach the neck.
    Each stage's inputs are exactly the previous stage's outputs, and a map that jumps
    over a whole stage passes through it under its own name."""
    directory, manifest = text_det
    stages = [load_manifest(p) for p in
              split_onnx(directory, manifest, [72, 174, 247], tmp_path)]
    for before, after in itertools.pairwise(stages):
        assert [s.name for s in before.outputs] == [s.name for s in after.inputs]
    middle = stages[1]
    passed = {s.name for s in middle.inputs} & {s.name for s in middle.outputs}
    assert "p2o.Add.43" in passed  # the stride-4 backbone map, used again by the neck
    skips = {s.name for s in stages[2].outputs} - {s.name for s in stages[2].inputs}
    assert len(stages[2].outputs) == 4 and len(skips) == 4  # the neck's four levels
    x = _page()
    chained = _chain_onnx([tmp_path / m.name for m in stages], {"x": x}, optimise=True)
    assert np.array_equal(chained["sigmoid_0.tmp_0"], _whole(text_det, x, True))


def test_stage_files_hold_only_their_weights(text_det: tuple[Path, Manifest],
                                             analysis: StageAnalysis,
                                             tmp_path: Path) -> None:
    directory, manifest = text_det
    stages = split_onnx(directory, manifest, [analysis.cuts[len(analysis.cuts) // 2].position],
                        tmp_path)
    weights = [load_manifest(p).extra["stage"]["weight_bytes"] for p in stages]
    assert sum(weights) >= analysis.total_weight_bytes
    assert all(w < analysis.total_weight_bytes for w in weights)
    sizes = [(p / load_manifest(p).model_file).stat().st_size for p in stages]
    whole = (directory / manifest.model_file).stat().st_size
    assert all(size < whole for size in sizes)


def test_bad_cut_positions_are_refused(text_det: tuple[Path, Manifest],
                                       tmp_path: Path) -> None:
    directory, manifest = text_det
    for cuts in ([0], [330], []):
        with pytest.raises(SplitError, match="cut"):
            split_onnx(directory, manifest, cuts, tmp_path)


def test_split_model_is_idempotent_and_records_the_analysis(zoo_store: ModelStore) -> None:
    first = split_model(zoo_store, "text-det", [100, 247], stream=io.StringIO())
    stamps = [(p / "manifest.json").stat().st_mtime_ns for p in first]
    said = io.StringIO()
    again = split_model(zoo_store, "text-det", [100, 247], stream=said)
    assert again == first
    assert [(p / "manifest.json").stat().st_mtime_ns for p in again] == stamps
    assert said.getvalue().count("nothing to do") == 3
    parent = zoo_store.get("text-det").manifest
    assert parent.extra["stages"]["positions"] == "onnx-nodes"
    assert parent.extra["stages"]["cuts"]
    assert load_manifest(first[1]).extra["stage"]["positions"] == [100, 247]


def test_stage_of_cuts_a_planned_range_once_and_reuses_stages_already_made(
        zoo_store: ModelStore, text_det: tuple[Path, Manifest]) -> None:
    """What a node loads for a placed stage: the range's own cut, built once; or a stage
    already in the store for exactly that range (made by split_model)."""
    made = split_model(zoo_store, "text-det", [100, 247], stream=io.StringIO())
    assert stage_of(zoo_store, "text-det", 100, 247) == made[1]
    assert stage_of(zoo_store, "text-det", 0, 100) == made[0]
    built = stage_of(zoo_store, "text-det", 30, 200, stream=io.StringIO())
    assert built.name == "text-det.part30-200"
    stage = load_manifest(built)
    assert stage.task == STAGE_TASK and stage.extra["stage"]["positions"] == [30, 200]
    stamp = (built / "manifest.json").stat().st_mtime_ns
    assert stage_of(zoo_store, "text-det", 30, 200) == built
    assert (built / "manifest.json").stat().st_mtime_ns == stamp  # not built again
    for start, stop in ((0, 330), (200, 100), (0, 400)):
        with pytest.raises(SplitError, match="not a stage"):
            stage_of(zoo_store, "text-det", start, stop, stream=io.StringIO())


# --- TorchScript (MiniLM) ------------------------------------------------------------------

def test_minilm_stages_chain_to_the_whole_model(zoo_store: ModelStore,
                                                prepared: Callable[[str], Path]) -> None:
    pytest.importorskip("torch")
    from epara.models.wordpiece import WordPieceTokenizer

    directory = prepared("minilm")
    manifest = load_manifest(directory)
    stages = split_model(zoo_store, "minilm", 2, stream=io.StringIO())
    assert [load_manifest(p).extra["stage"]["positions"] for p in stages] == \
        [[0, 2], [2, 4], [4, 6]]
    analysis = zoo_store.get("minilm").manifest.extra["stages"]
    assert analysis["positions"] == "bert-layers" and analysis["node_count"] == 6
    tokenizer = WordPieceTokenizer.from_file(directory / "vocab.txt", max_length=256)
    # Different lengths, so padding (and the mask every stage needs) is exercised.
    batch = tokenizer.encode(["A man is eating food.",
                              "Someone is riding a white horse on an enclosed ground."])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    backend = get_backend("torch")
    whole = backend.load(directory, manifest, threads=2).run(inputs)["sentence_embedding"]
    values: dict[str, np.ndarray] = dict(inputs)
    for stage_dir in stages:
        stage = load_manifest(stage_dir)
        session = backend.load(stage_dir, stage, threads=2)
        values.update(session.run({s.name: values[s.name] for s in stage.inputs}))
    assert float(np.abs(values["sentence_embedding"] - whole).max()) <= _TORCH_TOLERANCE


def test_torchscript_other_than_bert_is_refused(tmp_path: Path,
                                                prepared: Callable[[str], Path]) -> None:
    torch = pytest.importorskip("torch")
    manifest = load_manifest(prepared("minilm"))
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2))).save(str(tmp_path / "m.ts"))
    with pytest.raises(SplitError, match=r"models/bert\.py"):
        split_torchscript(tmp_path, replace(manifest, files={"model": "m.ts"}), [1],
                          tmp_path / "out")


# --- TFLite --------------------------------------------------------------------------------

def test_tflite_split_says_what_to_install(zoo_store: ModelStore,
                                           prepared: Callable[[str], Path]) -> None:
    directory = prepared("selfie-seg")
    with pytest.raises(SplitUnavailable, match="pip install litert-torch"):
        split_model(zoo_store, "selfie-seg", 1, stream=io.StringIO())
    with pytest.raises(SplitUnavailable, match="TFLite converter"):
        split_tflite(directory, load_manifest(directory), [1], directory)
    assert not list(zoo_store.root.glob("selfie-seg.stage*"))


def test_a_tflite_stage_is_served_only_where_one_exists(zoo_store: ModelStore,
                                                        prepared: Callable[[str], Path]
                                                        ) -> None:
    """A TFLite model cannot be cut on a device: stage_of says so, unless a stage for the
    range was made elsewhere and installed in the store."""
    directory = prepared("selfie-seg")
    parent = load_manifest(directory)
    with pytest.raises(SplitUnavailable, match="TFLite converter"):
        stage_of(zoo_store, "selfie-seg", 0, 10, stream=io.StringIO())
    parent_sha = file_sha256(directory / parent.model_file)

    def build(staging: Path) -> Manifest:
        # The stage's file as a converter on a build machine would have made it (here:
        # the parent's bytes; what matters is how the store is searched).
        shutil.copy2(directory / parent.model_file, staging / parent.model_file)
        return replace(parent, task=STAGE_TASK, source={"parent_sha256": parent_sha},
                       extra={"stage": {"of": "selfie-seg", "index": 0, "count": 2,
                                        "positions": [0, 10]}})

    installed = install_model(zoo_store, "selfie-seg.converted0", {"kind": "import"},
                              build, stream=io.StringIO())
    try:
        assert stage_of(zoo_store, "selfie-seg", 0, 10) == installed
        with pytest.raises(SplitUnavailable):
            stage_of(zoo_store, "selfie-seg", 0, 11, stream=io.StringIO())
    finally:
        shutil.rmtree(installed)
