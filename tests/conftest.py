"""Shared fixtures: one wheel cache and one prepared model store per test session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from epara.models.store import ModelStore


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
