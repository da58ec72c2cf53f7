"""Put a bundle onto a device: into a mounted root file system, or over SSH.

Both run the bundle's own ``install.py`` (the same code a device runs at first boot), so
there is one installer to trust. Over SSH the bundle is streamed through ``ssh`` itself
(no scp/sftp needed) and skipped when the device already holds the same bytes.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from epara.firmware import install

STAGING = "/var/tmp/epara-flash"  # on the device, under the target root


class FlashError(RuntimeError):
    pass


@dataclass(frozen=True)
class SshTarget:
    destination: str  # user@host
    port: int = 22
    identity: Path | None = None
    options: tuple[str, ...] = field(default_factory=tuple)  # ssh -o values

    @property
    def sudo(self) -> str:
        """Installing needs root on the device: a non-root login goes through sudo (-n:
        fail at once rather than wait for a password nobody can type)."""
        user = self.destination.split("@")[0] if "@" in self.destination else ""
        return "" if user == "root" else "sudo -n "

    def command(self, remote: str) -> list[str]:
        cmd = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes"]
        if self.identity is not None:
            cmd += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        for option in self.options:
            cmd += ["-o", option]
        return [*cmd, self.destination, remote]

    def run(self, remote: str, stdin: bytes | None = None, check: bool = True,
            stream: bool = False) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(self.command(remote), input=stdin,
                                capture_output=not stream, timeout=1800)
        if check and result.returncode != 0:
            err = (result.stderr or b"").decode(errors="replace").strip()
            raise FlashError(f"ssh {self.destination}: `{remote}` failed "
                             f"({result.returncode}): {err[-1500:]}")
        return result


def _top_dir(bundle: Path) -> str:
    with tarfile.open(bundle) as tar:
        first = tar.next()
        if first is None or not first.isdir():
            raise FlashError(f"{bundle} is not an epara bundle")
        return first.name


def _unpacked(bundle: Path, into: Path) -> Path:
    top = _top_dir(bundle)
    with tarfile.open(bundle) as tar:
        if hasattr(tarfile, "tar_filter"):  # 3.10.12+: refuse links and paths out of `into`
            tar.extractall(into, filter="tar")
        else:
            tar.extractall(into)  # older Pythons: our own bundle, from our own builder
    if not (into / top / install.BUNDLE_JSON).exists():
        raise FlashError(f"{bundle} has no {install.BUNDLE_JSON}: not an epara bundle")
    return into / top


def run_local(bundle: Path | None, args: Sequence[str]) -> int:
    """Run the bundle's install.py (or this package's, without a bundle) on this machine."""
    with tempfile.TemporaryDirectory(prefix="epara-flash-") as tmp:
        if bundle is None:
            script, extra = Path(install.__file__), []
        else:
            unpacked = _unpacked(bundle, Path(tmp))
            script, extra = unpacked / "install.py", ["--bundle", str(unpacked)]
        return subprocess.run([sys.executable, str(script), *extra, *args]).returncode


def run_ssh(target: SshTarget, bundle: Path | None, args: Sequence[str],
            target_root: str = "/") -> int:
    words = " ".join(map(shlex.quote, ["--root", target_root, *args]))
    if bundle is None:
        # Uninstall needs no bundle: the installer itself travels on stdin.
        remote = f"{target.sudo}python3 - {words}"
        return target.run(remote, stdin=Path(install.__file__).read_bytes(), check=False,
                          stream=True).returncode
    staging = shlex.quote(f"{target_root.rstrip('/')}{STAGING}")
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    name = shlex.quote(bundle.name)
    there = target.run(f"mkdir -p {staging} && cd {staging} && "
                       f"(sha256sum {name} 2>/dev/null || true)").stdout.decode()
    if not there.startswith(digest):
        # Streamed through ssh: works where sftp/scp is disabled, writes atomically.
        target.run(f"cat > {staging}/.{name}.partial && "
                   f"mv {staging}/.{name}.partial {staging}/{name}",
                   stdin=bundle.read_bytes())
    top = shlex.quote(_top_dir(bundle).rstrip("/"))
    remote = (f"cd {staging} && rm -rf {top} && tar -xzf {name} && "
              f"{target.sudo}sh {top}/install.sh {words}")
    return target.run(remote, check=False, stream=True).returncode
