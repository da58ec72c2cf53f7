"""Shared machinery for putting a model into the store safely (used by zoo and importer).

The rules every preparation follows:
- Files are built in a hidden staging directory beside the target
  (``<store>/.partial-<name>.<random>``) and renamed into place only when complete, so an
  interrupted preparation never leaves a directory that looks like a prepared model.
  ``ModelStore.scan`` skips hidden directories.
- The manifest's ``source`` records how the model was made (``recipe``) and the sha256 of
  every file it names; a model counts as prepared only while its recipe matches and every
  file still hashes to its recorded value.
- One preparation per name at a time: an advisory ``flock`` on ``<store>/.lock-<name>``.
- Every failure a user can act on (pip failed, no network, disk full, a bad file) is
  raised as ``PrepareError`` with a message that says what to do.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from epara.models.manifest import Manifest, ManifestError, load_manifest, save_manifest
from epara.models.store import ModelStore

PARTIAL_PREFIX = ".partial-"


class PrepareError(RuntimeError):
    """A model could not be prepared or imported; the message says why and what to do."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def estimate_memory_mb(file_bytes: int, activation_bytes: int, factor: float = 1.2,
                       runtime_mb: float = 8.0) -> float:
    """Resident memory guess: weights (times ``factor`` for the runtime's copies and
    pre-packed layouts), plus activations, plus a fixed per-session runtime overhead."""
    return round(file_bytes * factor / 2**20 + activation_bytes / 2**20 + runtime_mb, 1)


def check_intact(model_dir: Path, want: Mapping[str, Any]) -> str | None:
    """None when ``model_dir`` holds a complete model made by the recipe ``want``
    (every key of ``want`` equals the manifest's ``source`` entry, every file hashes as
    recorded); otherwise the reason it does not."""
    try:
        manifest = load_manifest(model_dir)
    except ManifestError as exc:
        return str(exc)
    for key, value in want.items():
        if manifest.source.get(key) != value:
            return (f"it was made from {key}={manifest.source.get(key)!r}, "
                    f"this recipe wants {value!r}")
    hashes = manifest.source.get("sha256")
    if not isinstance(hashes, Mapping) or set(hashes) != set(manifest.files.values()):
        return "its manifest does not record a sha256 for every file"
    for rel, digest in hashes.items():
        if file_sha256(model_dir / rel) != digest:
            return f"file {rel} does not match its recorded sha256 (corrupted or edited)"
    return None


@contextmanager
def _name_lock(store: ModelStore, name: str) -> Iterator[None]:
    store.root.mkdir(parents=True, exist_ok=True)
    with open(store.root / f".lock-{name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a concurrent preparation of `name`
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _disk_full_message(exc: OSError, where: Path) -> str:
    free = shutil.disk_usage(where).free if where.exists() else 0
    return (f"disk full while writing under {where} ({free / 2**20:.0f} MiB free): "
            f"free some space or point the store elsewhere (EPARA_MODEL_STORE): {exc}")


def install_model(store: ModelStore, name: str, recipe: Mapping[str, Any],
                  build: Callable[[Path], Manifest], *, force: bool = False,
                  stream: TextIO | None = None) -> Path:
    """Make ``store.path_for(name)`` hold the model ``build`` writes, unless an intact
    copy made by the same ``recipe`` is already there (and ``force`` is False).

    ``build(staging_dir)`` writes the files and returns their manifest; this function
    adds ``recipe`` and the files' sha256 to ``source``, writes the manifest last and
    renames the staging directory into place.
    """
    out = stream if stream is not None else sys.stderr
    target = store.path_for(name)
    try:
        with _name_lock(store, name):
            if target.exists() and not force:
                problem = check_intact(target, recipe)
                if problem is None:
                    out.write(f"{name}: already prepared in {target}, nothing to do\n")
                    return target
                out.write(f"{name}: re-preparing, the copy in {target} is not usable: "
                          f"{problem}\n")
            # Partials of this name are leftovers of interrupted runs: we hold the lock.
            for pattern in (f"{PARTIAL_PREFIX}{name}.*", f"{PARTIAL_PREFIX}old-{name}.*"):
                for stale in store.root.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{name}.", dir=store.root))
            staging.chmod(0o755)  # mkdtemp makes it private; a model dir is readable
            try:
                manifest = build(staging)
                if manifest.name != name:
                    manifest = replace(manifest, name=name)
                hashes = {rel: file_sha256(staging / rel) for rel in manifest.files.values()}
                source = {**manifest.source, **recipe, "sha256": hashes}
                save_manifest(staging, replace(manifest, source=source))
                _swap_into_place(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PrepareError(_disk_full_message(exc, store.root)) from exc
        raise
    out.write(f"{name}: prepared in {target}\n")
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    # rename() cannot replace a non-empty directory: move the old one aside first.
    old = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}old-{target.name}.",
                                dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
