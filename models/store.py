"""The local model store: one directory per prepared model, each with its manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from epara.models.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest


def default_store() -> Path:
    """``$EPARA_MODEL_STORE``, else ``$XDG_CACHE_HOME/epara/models``, else ``~/.cache/...``."""
    if os.environ.get("EPARA_MODEL_STORE"):
        return Path(os.environ["EPARA_MODEL_STORE"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "epara" / "models"


@dataclass(frozen=True)
class StoredModel:
    directory: Path
    manifest: Manifest


@dataclass(frozen=True)
class BrokenModel:
    directory: Path
    reason: str


class ModelStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store()

    def path_for(self, name: str) -> Path:
        return self.root / name

    def scan(self) -> tuple[list[StoredModel], list[BrokenModel]]:
        """Every model directory in the store; broken ones are reported, not fatal."""
        good: list[StoredModel] = []
        broken: list[BrokenModel] = []
        if not self.root.is_dir():
            return good, broken
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if directory.name.startswith("."):
                continue  # staging dirs of preparations and caches (.wheels) are not models
            if not (directory / MANIFEST_NAME).exists():
                continue  # a preparation in progress, or not a model
            try:
                good.append(StoredModel(directory, load_manifest(directory)))
            except ManifestError as exc:
                broken.append(BrokenModel(directory, str(exc)))
        return good, broken

    def get(self, name: str) -> StoredModel:
        directory = self.path_for(name)
        return StoredModel(directory, load_manifest(directory))
