"""Shared fixtures: one wheel cache and one prepared model store per test session; peer
capabilities and cluster credentials."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from epara.models.store import ModelStore
from epara.peer.capabilities import Capabilities
from epara.peer.security import create_cluster_credentials


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$EPARA_WHEEL_CACHE`` when set (reused across runs), else a session temp dir:
    either way each wheel is downloaded at most once per session."""
    env = os.environ.get("EPARA_WHEEL_CACHE")
    cache = Path(env) if env else tmp_path_factory.mktemp("wheels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPARA_WHEEL_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def zoo_store(tmp_path_factory: pytest.TempPathFactory, wheel_cache: Path) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def prepared(zoo_store: ModelStore) -> Callable[[str], Path]:
    """``prepared(name)``: the model directory, prepared once per session."""
    from epara.models.zoo import prepare

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = prepare(name, zoo_store)
        return done[name]

    return get


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
