"""Shared test helpers: small real ONNX models and node processes.

The ONNX models here are real graphs run by onnxruntime (not mocks); they are small so
protocol tests run fast. Tests of the shipped pretrained models live beside the zoo.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from epara.models.manifest import Hints, Manifest, TensorSpec, save_manifest


def make_add_model(store: Path, name: str = "add", batch: int | None = None,
                   matmul_size: int = 0, **hints: Any) -> Path:
    """y = x + 1 over float32[batch, 4]; with ``matmul_size`` N, also burns N^3 FLOPs x 8.

    The optional matrix work makes a model slow enough to observe queueing and deadlines.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", ["x", "one"], ["y"])]
    inits = [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])]
    if matmul_size:
        n = matmul_size
        rng = np.random.default_rng(0)
        weight = (rng.random((n, n), dtype=np.float32) / n).astype(np.float32)
        inits.append(helper.make_tensor("w", TensorProto.FLOAT, [n, n], weight.ravel()))
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [2], [n, n]))
        nodes.append(helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0))
        nodes.append(helper.make_node("Expand", ["s", "shape"], ["m0"]))
        for i in range(8):
            nodes.append(helper.make_node("MatMul", [f"m{i}", "w"], [f"m{i + 1}"]))
        nodes.append(helper.make_node("ReduceSum", ["m8"], ["burn"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("burn", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory = store / name
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    out_specs = [TensorSpec("y", "float32", (batch, 4))]
    if matmul_size:
        out_specs.append(TensorSpec("burn", "float32", ()))
    manifest = Manifest(
        name=name, task="generic", backend="onnx", files={"model": "model.onnx"},
        inputs=(TensorSpec("x", "float32", (batch, 4)),), outputs=tuple(out_specs),
        memory_mb=1.0, hints=Hints(**hints))
    save_manifest(directory, manifest)
    return directory


def wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    from epara.node.client import Client, NodeUnreachable

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}")
        if path.exists():
            with contextlib.suppress(NodeUnreachable), Client(path, timeout=5) as client:
                client.ping()
                return
        time.sleep(0.05)
    raise TimeoutError(f"node did not open {path} in {timeout} s")


def start_node(store: Path, socket_path: Path, *extra: str, prefix: Sequence[str] = (),
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``epara node`` as a real process (``prefix``: e.g. ``ip netns exec NS``).

    Without ``--cluster`` in ``extra`` the node runs alone: tests never multicast from
    the machine's own network namespace by accident."""
    if "--cluster" not in extra:
        extra = (*extra, "--standalone")
    command = [*prefix, sys.executable, "-m", "epara.node.cli", "--log-level", "info", "node",
               "--store", str(store), "--socket", str(socket_path), *extra]
    log_path = socket_path.parent.parent / f"{socket_path.parent.name}-node.log"
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


def stop_node(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_node(store: Path, socket_path: Path, *extra: str,
                 env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``epara node`` as a real process; stop it afterwards."""
    process = start_node(store, socket_path, *extra, env=env)
    try:
        wait_for_socket(socket_path, process)
        yield process
    finally:
        stop_node(process)
        if os.environ.get("EPARA_TEST_SHOW_LOGS"):
            log_path = socket_path.parent.parent / f"{socket_path.parent.name}-node.log"
            sys.stderr.write(log_path.read_text())


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_cluster(sockets: Sequence[Path], node_ids: set[str],
                     timeout: float = 30.0) -> None:
    """Every node at ``sockets`` has joined and sees all of ``node_ids``. A node's socket
    answers before it joins, and serves requests locally until then: a test that sends
    its first request right after ``wait_for_socket`` would race the join."""
    from epara.node.client import Client

    def joined(sock: Path) -> bool:
        with Client(sock, timeout=10) as client:
            status = client.status()
        cluster = status.get("cluster") or {}
        return status.get("plan") is not None and \
            node_ids <= {m["node_id"] for m in cluster.get("members", [])}

    for sock in sockets:
        wait_until(lambda sock=sock: joined(sock), timeout, f"{sock} to join the cluster")


def still_serving(sock: Path) -> None:
    """The node at ``sock`` still answers a plain request (the ``add`` model)."""
    from epara.node.client import Client

    with Client(sock, timeout=30) as client:
        out = client.infer("add", {"x": np.ones((1, 4), np.float32)})
    np.testing.assert_array_equal(out["y"], np.full((1, 4), 2, np.float32))


def raw_connect(sock: Path) -> socket.socket:
    """A bare Unix-socket connection, for speaking the wire format by hand."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(sock))
    return s
