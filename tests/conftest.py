"""Shared fixtures for the peer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from epara.peer.capabilities import Capabilities
from epara.peer.security import create_cluster_credentials


@pytest.fixture
def fixed_caps() -> Capabilities:
    """A capability record without probing, so in-process members start instantly."""
    return Capabilities(hostname="test", machine="x86_64", cpu_model="test", cpu_cores=2,
                        mem_total_mb=4096, mem_free_mb=2048, accelerators=(), runtimes=(),
                        gflops=10.0, mem_bandwidth_gbs=5.0, device_class="server",
                        power_source="mains")


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Path:
    create_cluster_credentials(tmp_path / "cluster")
    return tmp_path / "cluster"


@pytest.fixture
def other_cluster_dir(tmp_path: Path) -> Path:
    create_cluster_credentials(tmp_path / "other")
    return tmp_path / "other"
