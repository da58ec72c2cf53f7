"""Importing a user's own model files: real ONNX, TFLite and torch files, run afterwards."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from epara.models.backends import get_backend
from epara.models.importer import import_model, parse_tensor_spec
from epara.models.manifest import TensorSpec, load_manifest
from epara.models.preparing import PrepareError
from epara.models.store import ModelStore


def _run(model_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    manifest = load_manifest(model_dir)
    return get_backend(manifest.backend).load(model_dir, manifest, threads=1).run(inputs)


def _onnx_affine(path: Path, batch: str | int) -> tuple[np.ndarray, np.ndarray]:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w, b


def test_onnx_with_dynamic_batch(tmp_path: Path) -> None:
    w, b = _onnx_affine(tmp_path / "Affine Model.onnx", "N")
    store = ModelStore(tmp_path / "store")
    target = import_model(tmp_path / "Affine Model.onnx", store, stream=io.StringIO())
    assert target == store.path_for("affine-model")  # name from the file, made safe
    manifest = load_manifest(target)
    assert manifest.backend == "onnx"
    assert manifest.inputs == (TensorSpec("x", "float32", (None, 4)),)
    assert manifest.outputs == (TensorSpec("y", "float32", (None, 3)),)
    assert manifest.hints.batch_axis == 0 and manifest.hints.max_batch > 1
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    np.testing.assert_allclose(_run(target, {"x": x})["y"], x @ w + b, rtol=1e-5)


def test_onnx_with_fixed_batch_does_not_batch(tmp_path: Path) -> None:
    _onnx_affine(tmp_path / "fixed.onnx", 1)
    target = import_model(tmp_path / "fixed.onnx", ModelStore(tmp_path / "s"),
                          stream=io.StringIO())
    manifest = load_manifest(target)
    assert manifest.inputs[0].shape == (1, 4)
    assert manifest.hints.batch_axis is None and manifest.hints.max_batch == 1


def test_second_import_is_a_no_op(tmp_path: Path) -> None:
    _onnx_affine(tmp_path / "m.onnx", "N")
    store = ModelStore(tmp_path / "s")
    target = import_model(tmp_path / "m.onnx", store, "mine", stream=io.StringIO())
    mtime = (target / "m.onnx").stat().st_mtime_ns
    log = io.StringIO()
    import_model(tmp_path / "m.onnx", store, "mine", stream=log)
    assert "already prepared" in log.getvalue()
    assert (target / "m.onnx").stat().st_mtime_ns == mtime


def test_tflite_import(tmp_path: Path, prepared: Callable[[str], Path]) -> None:
    source = tmp_path / "selfie.tflite"
    shutil.copy(prepared("selfie-seg") / "selfie_segmentation.tflite", source)
    target = import_model(source, ModelStore(tmp_path / "s"), task="segmentation",
                          stream=io.StringIO())
    manifest = load_manifest(target)
    assert manifest.backend == "tflite" and manifest.task == "segmentation"
    # The file itself declares batch 1: import reports what the file says.
    assert manifest.inputs == (TensorSpec("input_1", "float32", (1, 256, 256, 3)),)
    assert manifest.outputs == (TensorSpec("activation_10", "float32", (1, 256, 256, 1)),)
    assert manifest.hints.batch_axis is None
    out = _run(target, {"input_1": np.full((1, 256, 256, 3), 0.5, np.float32)})
    mask = out["activation_10"]
    assert mask.shape == (1, 256, 256, 1) and mask.min() >= 0 and mask.max() <= 1


def _scripted(path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Mix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 5)

        def forward(self, features: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.proj(features * gate))

    torch.manual_seed(0)
    torch.jit.script(Mix().eval()).save(str(path))


def test_torchscript_needs_input_specs(tmp_path: Path) -> None:
    _scripted(tmp_path / "mix.pt")
    with pytest.raises(PrepareError, match=r"forward\(features, gate\).*name:dtype:shape"):
        import_model(tmp_path / "mix.pt", ModelStore(tmp_path / "s"), stream=io.StringIO())
    with pytest.raises(PrepareError, match="give one spec per argument"):
        import_model(tmp_path / "mix.pt", ModelStore(tmp_path / "s"),
                     inputs=["gate:float32:?x8", "features:float32:?x8"],
                     stream=io.StringIO())


def test_torchscript_import_with_specs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    _scripted(tmp_path / "mix.ts")
    store = ModelStore(tmp_path / "s")
    target = import_model(tmp_path / "mix.ts", store,
                          inputs=["features:float32:batch,8", "gate:float32:?x8"],
                          stream=io.StringIO())
    manifest = load_manifest(target)
    assert manifest.backend == "torch"
    assert manifest.inputs == (TensorSpec("features", "float32", (None, 8)),
                               TensorSpec("gate", "float32", (None, 8)))
    assert manifest.outputs == (TensorSpec("output", "float32", (None, 5)),)
    assert manifest.hints.batch_axis == 0
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    g = np.ones((3, 8), np.float32)
    got = _run(target, {"features": x, "gate": g})["output"]
    want = torch.jit.load(str(tmp_path / "mix.ts"))(torch.from_numpy(x), torch.from_numpy(g))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6)


def test_exported_program_import(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Scale(), (torch.zeros(2, 6),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "scale.pt2"))
    target = import_model(tmp_path / "scale.pt2", ModelStore(tmp_path / "s"),
                          stream=io.StringIO())
    manifest = load_manifest(target)
    assert manifest.inputs == (TensorSpec("x", "float32", (None, 6)),)
    assert manifest.outputs == (TensorSpec("output", "float32", (None, 6)),)
    assert manifest.hints.batch_axis == 0
    x = np.arange(18, dtype=np.float32).reshape(3, 6)
    np.testing.assert_allclose(_run(target, {"x": x})["output"], x * 2 + 1)


# --- bad input -----------------------------------------------------------------------------

def test_not_a_model_gives_a_clear_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "s")
    for name, pattern in [("junk.onnx", "not an ONNX model"),
                          ("junk.tflite", "not a TFLite model"),
                          ("junk.pt2", "not an exported program")]:
        (tmp_path / name).write_bytes(b"this is not a model\n" * 10)
        with pytest.raises(PrepareError, match=pattern):
            import_model(tmp_path / name, store, stream=io.StringIO())
    assert store.scan() == ([], [])
    assert not list(store.root.glob(".partial-*"))


def test_torch_save_pickle_is_refused_with_advice(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"weight": torch.zeros(2)}, str(tmp_path / "state.pt"))
    with pytest.raises(PrepareError, match=r"torch.jit.script"):
        import_model(tmp_path / "state.pt", ModelStore(tmp_path / "s"),
                     inputs=["x:float32:?"], stream=io.StringIO())


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(PrepareError, match=r"unknown extension '.h5'.*\.onnx"):
        import_model(tmp_path / "model.h5", ModelStore(tmp_path / "s"))
    (tmp_path / "weights.pth").write_bytes(b"x")
    with pytest.raises(PrepareError, match="state dict"):
        import_model(tmp_path / "weights.pth", ModelStore(tmp_path / "s"))
    with pytest.raises(PrepareError, match="does not exist"):
        import_model(tmp_path / "absent.onnx", ModelStore(tmp_path / "s"))


def test_input_specs_only_for_torchscript(tmp_path: Path) -> None:
    _onnx_affine(tmp_path / "m.onnx", "N")
    with pytest.raises(PrepareError, match="only for TorchScript"):
        import_model(tmp_path / "m.onnx", ModelStore(tmp_path / "s"), inputs=["x:float32:?x4"])


@pytest.mark.parametrize(("text", "want"), [
    ("image:float32:?x3x224x224", TensorSpec("image", "float32", (None, 3, 224, 224))),
    ("input_ids:int64:batch,seq", TensorSpec("input_ids", "int64", (None, None))),
    ("m:uint8:-1x4", TensorSpec("m", "uint8", (None, 4))),
    ("scale:float32:", TensorSpec("scale", "float32", ())),
    ("ns:x:float16:2", TensorSpec("ns:x", "float16", (2,))),
])
def test_parse_tensor_spec(text: str, want: TensorSpec) -> None:
    assert parse_tensor_spec(text) == want


@pytest.mark.parametrize("text", ["image", "image:float32", ":float32:1", "a:notatype:1",
                                  "a:float32:3x-2"])
def test_parse_tensor_spec_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad input spec"):
        parse_tensor_spec(text)
