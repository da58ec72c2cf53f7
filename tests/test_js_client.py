"""A client written in JavaScript from docs/local-api.md alone talks to a real node."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import make_add_model, running_node

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_javascript_client_passes_its_checks(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_add_model(store, "add", batch=None)
    make_add_model(store, "stream", batch=None, category="frequency", batch_axis=0,
                   max_batch=8, max_wait_ms=20)
    sock = tmp_path / "run" / "node.sock"
    with running_node(store, sock):
        result = subprocess.run(["node", str(ROOT / "clients/js/check.mjs"), str(sock)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not ok" not in result.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_javascript_client_runs_the_real_shipped_models(tmp_path: Path,
                                                        prepared: Callable[[str], Path]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for name in ("selfie-seg", "text-det", "minilm", "smollm2-135m"):
        (store / name).symlink_to(prepared(name))
    sock = tmp_path / "run" / "node.sock"
    with running_node(store, sock):
        result = subprocess.run(["node", str(ROOT / "clients/js/real-models.mjs"), str(sock)],
                                capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok - ") == 4 and "not ok" not in result.stdout
