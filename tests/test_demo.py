"""`epara demo` end to end, for real: a cluster forms, the leader places the LLM and the
segmentation model, the same workload runs under epara's placement and a baseline's, the
table, ratio and plot come out, and nothing is left behind — after a normal run and after
Ctrl-C, on loopback and (as root) on namespace hosts with emulated device classes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from epara.models.store import ModelStore
from epara.node.testbed import have_bed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(zoo_store: ModelStore, prepared: Callable[[str], Path]) -> Path:
    for name in ("smollm2-135m", "selfie-seg"):
        prepared(name)
    return zoo_store.root


def demo_command(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "epara.node.cli", "demo", "--nodes", "3", "--seconds", "6",
            "--store", str(store), "--out", str(out), *extra]


def leftovers(store: Path) -> str:
    """Node processes serving this store (the demo's nodes get ``--store``)."""
    return subprocess.run(["pgrep", "-af", f"epara.node.cli.* node --store {store}"],
                          capture_output=True, text=True).stdout.strip()


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def cgroups() -> set[str]:
    root = Path("/sys/fs/cgroup/cpu")
    return {p.name for p in root.glob("epara-*")} if root.is_dir() else set()


def check_report(stdout: str, out: Path) -> None:
    assert "cluster formed: 3 nodes, leader epara-n" in stdout
    assert re.search(r"smollm2-135m +\S+ +\S+ +\d+ unit", stdout), stdout
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^ +(epara|replicate-all) +([\d.]+) +([\d.]+)%  selfie-seg \d+/\d+ .*"
        r"smollm2-135m \d+/\d+", stdout, re.M)}
    assert set(rows) == {"epara", "replicate-all"}, stdout
    assert all(goodput > 0 and 0 < slo <= 100 for goodput, slo in rows.values()), rows
    assert re.search(r"epara / replicate-all goodput: [\d.]+x", stdout), stdout
    for name in ("goodput.png", "mask.png", "overlay.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert (out / "goodput.png").stat().st_size > 10_000
    assert "nothing left running" in stdout


def test_demo_on_loopback_compares_epara_with_a_baseline_and_cleans_up(
        tmp_path: Path, store: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(demo_command(store, out, "--loopback"), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as loopback processes (--loopback)" in result.stdout
    check_report(result.stdout, out)
    assert leftovers(store) == ""


@pytest.mark.root
@pytest.mark.skipif(have_bed() is not None, reason=f"{have_bed()}")
def test_demo_as_root_runs_on_emulated_namespace_hosts_and_removes_them(
        tmp_path: Path, store: Path) -> None:
    before = (namespaces(), cgroups())
    out = tmp_path / "out"
    result = subprocess.run(demo_command(store, out), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "namespace hosts with emulated device classes (root)" in result.stdout
    assert "EMULATED host 2 10.77.0.3: pi" in result.stdout
    check_report(result.stdout, out)
    assert leftovers(store) == ""
    assert (namespaces(), cgroups()) == before


def test_ctrl_c_mid_workload_stops_every_node_and_leaves_nothing(
        tmp_path: Path, store: Path) -> None:
    # On namespace hosts where this can run (the harder clean-up), else on loopback.
    before = (namespaces(), cgroups())
    command = demo_command(store, tmp_path / "out", *(() if have_bed() is None
                                                      else ("--loopback",)))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert process.stdout is not None
    seen = []
    end = time.monotonic() + 180
    for line in process.stdout:
        seen.append(line)
        if "[epara]" in line:  # the live progress line: the workload is running
            break
        assert time.monotonic() < end, "".join(seen)
    else:
        raise AssertionError("the demo ended before its workload:\n" + "".join(seen))
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert "interrupted: every node stopped" in output
    assert leftovers(store) == ""
    assert (namespaces(), cgroups()) == before
