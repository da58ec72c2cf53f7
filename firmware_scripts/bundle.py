"""Build an offline bundle (a .tar.gz) that installs an epara node on one kind of device.

The bundle holds wheels for epara (built from this source tree) and every dependency for
the target's platform and Python, the chosen models from the model store, optional
cluster credentials, the node's flags, systemd units and ``install.sh``. Nothing in it
needs a network on the device.
"""

from __future__ import annotations

import email.parser
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import epara.node
from epara.firmware import install
from epara.firmware.profiles import Profile, parse_wheel_name, wheel_fits
from epara.models.manifest import ManifestError
from epara.models.store import ModelStore, StoredModel
from epara.peer.security import (
    AUTHORITY_KEY_FILE,
    DEVICE_FILES,
    CredentialsError,
    certified_node_id,
)

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # not installed here: pip, which builds every bundle, carries a copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[assignment]

# Which extra a model's backend needs on the device.
BACKEND_EXTRA = {"onnx": "onnx", "tflite": "tflite", "torch": "torch"}
# What a node with its own certificate needs beyond the core (Ed25519 signatures).
IDENTITY_EXTRA = "identity"
# Reproducible wheels and tarballs: the same source and profile give the same bytes, so
# the same release id, and flashing a rebuilt bundle changes nothing.
FIXED_MTIME = 315532800  # 1980-01-01, the earliest time a zip entry can hold


class BundleError(RuntimeError):
    pass


@dataclass(frozen=True)
class BundleSummary:
    path: Path
    size: int
    wheels: list[str]
    models: list[str]
    release: str
    profile: str
    credentials: bool
    node_id: str | None = None  # the device its credentials certify (per-device identity)

    def describe(self) -> str:
        creds = (f"device {self.node_id}" if self.node_id else "shared cluster key") \
            if self.credentials else "none"
        return (f"{self.path}: {self.size / 1e6:.1f} MB, {len(self.wheels)} wheels, "
                f"models: {', '.join(self.models) or 'none'}, credentials: {creds}, "
                f"profile {self.profile}, release {self.release}")


def wheel_cache() -> Path:
    """``$EPARA_WHEEL_CACHE`` (shared with the model zoo's wheel fetches), else
    ``~/.cache/epara/wheels``: a second bundle for the same target downloads nothing."""
    env = os.environ.get("EPARA_WHEEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "epara" / "wheels"


def source_root() -> Path:
    root = Path(epara.node.__file__).resolve().parent.parent
    if not (root / "setup.cfg").exists():
        raise BundleError(f"epara is installed from a wheel ({root}); bundles are built "
                          "from a source checkout (pip install -e .)")
    return root


def build_bundle(profile: Profile, store: ModelStore, out: Path | None = None,
                 models: Sequence[str] | None = None, cluster: Path | None = None,
                 with_extras: Sequence[str] = (), extra_wheels: Sequence[Path] = (),
                 node_flags: Sequence[str] = (), allow_lead: bool = False,
                 cache: Path | None = None) -> BundleSummary:
    from epara.node.daemon import VERSION

    unknown = [e for e in with_extras if e not in profile.optional_extras]
    if unknown:
        raise BundleError(f"profile {profile.name} has no optional extra {unknown}; it offers "
                          f"{sorted(profile.optional_extras) or 'none'}")
    extras = [*profile.extras, *with_extras]
    node_id = _certified_node_id(cluster) if cluster is not None else None
    if node_id is not None and IDENTITY_EXTRA not in extras:
        extras.append(IDENTITY_EXTRA)  # the node verifies certificates: PyNaCl on the device
    flags = [f for f in profile.node_flags if not (allow_lead and f == "--never-lead")]
    if profile.threads:
        flags += ["--threads", str(profile.threads)]
    flags += list(node_flags)
    if any(not f or any(c.isspace() or c in "\"'$\\" for c in f) for f in flags):
        raise BundleError(f"node flags must be single words without quotes or $: {flags}")
    model_names = list(models if models is not None else profile.models)
    # Checked before any download: a wrong model name should fail in a second.
    chosen = [_model(store, name, extras) for name in model_names]
    with tempfile.TemporaryDirectory(prefix="epara-bundle-") as tmp:
        top = f"epara-{profile.name}-{VERSION}"
        root = Path(tmp) / top
        (root / "wheels").mkdir(parents=True)
        epara_wheel = _build_epara_wheel(Path(tmp) / "build")
        pins = [p for e in with_extras for p in profile.optional_extras[e]]
        requirements = [f"{epara_wheel}[{','.join(extras)}]", *pins, "pip"]
        # pip judges environment markers (`; python_version < "3.11"`) by the Python it
        # runs on, not by --python-version: add what the target needs until nothing is
        # missing.
        for _ in range(5):
            _download(profile, requirements, root / "wheels", cache or wheel_cache())
            missing = missing_requirements(root / "wheels", profile, extras)
            if not missing:
                break
            requirements += missing
        else:
            raise BundleError(f"requirements still missing for {profile.name}: {missing}")
        for wheel in extra_wheels:
            (root / "extra-wheels").mkdir(exist_ok=True)
            shutil.copy2(wheel, root / "extra-wheels" / wheel.name)
        wheels = sorted(p.name for p in (root / "wheels").glob("*.whl"))
        misfits = {w: why for w in wheels + [p.name for p in extra_wheels]
                   if (why := wheel_fits(w, profile))}
        if misfits:
            raise BundleError(f"wheels that would not install on {profile.name}: {misfits}")
        for model in chosen:
            shutil.copytree(model.directory, root / "models" / model.manifest.name)
        if cluster is not None:
            (root / "cluster").mkdir(mode=0o700)
            # The shared key, or a device's own key, certificate and trust files.
            for name, mode in DEVICE_FILES.items():
                if (cluster / name).is_file():
                    shutil.copyfile(cluster / name, root / "cluster" / name)
                    (root / "cluster" / name).chmod(mode)
        _write(root / "etc" / "node.env", f'EPARA_NODE_FLAGS="{" ".join(flags)}"\n')
        _write(root / "systemd" / install.UNIT, render_unit(profile))
        _write(root / "systemd" / install.FIRSTBOOT_UNIT, render_firstboot_unit(profile))
        _write(root / "systemd" / "sysusers.conf",
               f'u {install.USER} - "epara inference node" {install.STATE} /usr/sbin/nologin\n')
        _write(root / "systemd" / "tmpfiles.conf", render_tmpfiles())
        shutil.copyfile(install.__file__, root / "install.py")
        _write(root / "install.sh", render_install_sh(profile), 0o755)
        release = content_hash(root)
        manifest = {"format": 1, "version": VERSION, "release": release,
                    "profile": {**profile.to_json(), "node_flags": flags}, "extras": extras,
                    "models": model_names, "wheels": wheels,
                    "extra_wheels": [p.name for p in extra_wheels],
                    "credentials": cluster is not None, "node_id": node_id}
        _write(root / install.BUNDLE_JSON, json.dumps(manifest, indent=2) + "\n")
        out = out or Path.cwd() / f"{top}-{release}.tar.gz"
        _tar(root, top, out)
    return BundleSummary(out, out.stat().st_size, wheels, model_names, release, profile.name,
                         cluster is not None, node_id)


def _certified_node_id(cluster: Path) -> str | None:
    """Check a credentials directory before anything is downloaded: a device directory
    (``epara cluster admit``: its own key and certificate, which must load and verify) or
    a shared-key one, never the authority. The node id its certificate names, if any."""
    if not ((cluster / "cluster.key").is_file() or (cluster / "node.cert").is_file()):
        raise BundleError(f"no cluster credentials in {cluster} (epara cluster init, "
                          "or a device directory from epara cluster admit)")
    if (cluster / AUTHORITY_KEY_FILE).exists():
        raise BundleError(f"{cluster} is the cluster's authority, which never goes onto a "
                          "device: bundle a device directory made by `epara cluster admit ID "
                          "--authority DIR --out DEVICE_DIR`")
    try:
        return certified_node_id(cluster)
    except (CredentialsError, ValueError, OSError) as exc:
        raise BundleError(f"{cluster}: {exc}") from None


# Lab code no device needs (the emulated bed, the load generator, the demo): left out of
# the wheel a bundle installs.
LAB_PREFIX = "epara/node/lab/"


def _build_epara_wheel(dest: Path) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(FIXED_MTIME)}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dest), str(source_root())], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    (wheel,) = dest.glob("epara-*.whl")
    without_lab(wheel)
    return wheel


def without_lab(wheel: Path) -> None:
    """Rewrite ``wheel`` in place without the lab subpackage (its files and their RECORD
    lines), keeping every other entry's bytes, time stamp and order (reproducible)."""
    stripped = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stripped, "w") as out:
        for info in src.infolist():
            if info.filename.startswith(LAB_PREFIX):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.startswith(LAB_PREFIX.encode()))
            out.writestr(info, data)
    stripped.replace(wheel)


def _pip_download(profile: Profile, requirements: Sequence[str], dest: Path,
                  offline_from: Path | None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:",
           "--implementation", "cp", "--python-version", profile.python,
           "--abi", profile.python_tag, "--abi", "abi3", "--abi", "none",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest)]
    for tag in profile.platform_tags():
        cmd += ["--platform", tag]
    if offline_from is not None:
        cmd += ["--no-index", "--find-links", str(offline_from)]
    return subprocess.run([*cmd, *requirements], capture_output=True, text=True)


def _download(profile: Profile, requirements: Sequence[str], dest: Path, cache: Path) -> None:
    """Resolve from the cache alone when it can; otherwise fill the cache from the index
    (the user's own pip configuration) and resolve again from the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    if _pip_download(profile, requirements, dest, offline_from=cache).returncode == 0:
        return
    online = _pip_download(profile, requirements, cache, offline_from=None)
    for ours in cache.glob("epara-*.whl"):
        ours.unlink()  # built from source each time: a cached copy would go stale
    if online.returncode != 0:
        tail = "\n".join(online.stdout.splitlines()[-5:] + online.stderr.splitlines()[-10:])
        raise BundleError(f"pip could not download wheels for {profile.name} "
                          f"({profile.arch}, Python {profile.python}):\n{tail}")
    again = _pip_download(profile, requirements, dest, offline_from=cache)
    if again.returncode != 0:
        raise BundleError(f"resolving from the wheel cache failed:\n{again.stderr[-2000:]}")


def target_environment(profile: Profile) -> dict[str, str]:
    """PEP 508 marker variables as seen on the target device."""
    return {"python_version": profile.python, "python_full_version": f"{profile.python}.0",
            "implementation_name": "cpython", "implementation_version": f"{profile.python}.0",
            "platform_python_implementation": "CPython", "platform_machine": profile.arch,
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_release": "", "platform_version": ""}


def missing_requirements(wheel_dir: Path, profile: Profile,
                         epara_extras: Sequence[str]) -> list[str]:
    """Requirements of the wheels in ``wheel_dir`` that hold on the target (markers
    evaluated for it) but that no wheel there provides."""
    env = target_environment(profile)
    metadata = {}
    for wheel in wheel_dir.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            metadata[parse_wheel_name(wheel.name).distribution] = \
                email.parser.BytesParser().parsebytes(z.read(name))
    wanted: dict[str, set[str]] = {"epara": set(epara_extras)}
    missing: list[str] = []
    queue = ["epara"]
    while queue:
        dist = queue.pop()
        for line in metadata[dist].get_all("Requires-Dist") or []:
            req = Requirement(line)
            extras = wanted[dist] or {""}
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            name = canonicalize_name(req.name)
            if name not in metadata:
                missing.append(f"{req.name}{req.specifier}")
                continue
            if name not in wanted or not set(req.extras) <= wanted[name]:
                wanted[name] = wanted.get(name, set()) | set(req.extras)
                queue.append(name)
    return sorted(set(missing))


def _model(store: ModelStore, name: str, extras: Sequence[str]) -> StoredModel:
    try:
        model = store.get(name)
    except (ManifestError, OSError):
        raise BundleError(f"model {name!r} is not in the model store {store.root}: "
                          f"`epara models prepare {name}` or `epara models import`") from None
    need = BACKEND_EXTRA.get(model.manifest.backend)
    if need is not None and need not in extras:
        raise BundleError(f"model {name} needs the {need} runtime, which this profile does "
                          f"not install (extras: {', '.join(extras)})")
    return model


def content_hash(root: Path) -> str:
    """Hash of every file's path, mode and bytes: the release id."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _tar(root: Path, top: str, out: Path) -> None:
    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = FIXED_MTIME
        return info

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    # Level 1: the wheels inside are zip files already; harder compression buys ~1 %.
    # No file name or time in the gzip header either: the same content, the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                                               compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=top, recursive=False, filter=normalise)
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=f"{top}/{path.relative_to(root).as_posix()}",
                    recursive=False, filter=normalise)
    os.replace(tmp, out)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


# --- what goes onto the device ----------------------------------------------------------

def render_unit(profile: Profile) -> str:
    limits = "".join(f"{key}={value}\n" for key, value in sorted(profile.limits.items()))
    venv = f"{install.PREFIX}/current/venv"
    return f"""\
[Unit]
Description=epara edge AI inference node ({profile.name})
Wants=network-online.target
After=network-online.target {install.FIRSTBOOT_UNIT}
# Skipped, not failed, while a first-boot install has not built the venv yet.
ConditionPathExists={venv}/bin/epara

[Service]
Type=simple
User={install.USER}
Group={install.USER}
Environment=EPARA_CLUSTER_DIR={install.ETC}/cluster
Environment=HOME={install.STATE}
Environment=XDG_CACHE_HOME={install.STATE}/cache
# The flags live in the release, so rolling back an upgrade restores them with the code.
EnvironmentFile={install.PREFIX}/current/node.env
# EPARA_NODE_ID, pinned at first install and kept by upgrades (absent: the machine id).
EnvironmentFile=-{install.ETC}/identity.env
ExecStart={venv}/bin/epara node --store {install.STATE}/models --socket {install.SOCKET} \
--socket-group {install.USER} $EPARA_NODE_FLAGS
Restart=on-failure
RestartSec=5
RuntimeDirectory=epara
RuntimeDirectoryMode=0750
StateDirectory=epara
StateDirectoryMode=0750
{limits}NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def render_firstboot_unit(profile: Profile) -> str:
    staged = f"{install.PREFIX}/firstboot"
    return f"""\
[Unit]
Description=Install the staged epara node (first boot, offline)
ConditionPathExists={staged}/install.py
After=local-fs.target systemd-sysusers.service systemd-tmpfiles-setup.service
Before={install.UNIT}

[Service]
Type=oneshot
# The venv for this device is built here, by the device's own Python: the machine that
# wrote the SD card may have another architecture.
ExecStart={profile.python_bin} {staged}/install.py --bundle {staged} --root / --firstboot
# Installing numpy and friends from wheels on an SD card takes minutes.
TimeoutStartSec=30min

[Install]
WantedBy=multi-user.target
"""


def render_tmpfiles() -> str:
    # Files written onto a mounted root belong to root (the user does not exist there
    # yet); at boot, after systemd-sysusers made the user, these hand them over.
    return f"d {install.ETC}/cluster 0700 {install.USER} {install.USER} -\n" + "".join(
        f"z {install.ETC}/cluster/{name} {mode:04o} {install.USER} {install.USER} -\n"
        for name, mode in DEVICE_FILES.items())


def render_install_sh(profile: Profile) -> str:
    return f"""\
#!/bin/sh
# Install this epara bundle offline: only the device's own Python is needed.
#   sudo ./install.sh                 install (or re-install: nothing changes) and start
#   sudo ./install.sh --upgrade       switch to this bundle, roll back if unhealthy
#   sudo ./install.sh --uninstall     remove (keeps identity and credentials; --purge)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${{EPARA_PYTHON:-{profile.python_bin}}}
[ -x "$python" ] || python=python3
exec "$python" "$here/install.py" --bundle "$here" "$@"
"""
