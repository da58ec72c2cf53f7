"""Bundles for devices, installed into root directories, over SSH, upgraded and removed.

Real wheels, real venvs, real node processes: an x86_64 bundle is installed into a fresh
root directory and the node it installed is started from there (as its systemd unit
would start it) on a namespace host, where it joins a cluster and serves a model. The
aarch64 bundles cannot run here; their wheels are audited tag by tag instead.

Wheels are cached in ``$EPARA_WHEEL_CACHE`` (default ``~/.cache/epara/wheels``), so only
the first run downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from epara.firmware import install
from epara.firmware.bundle import BundleError, BundleSummary, build_bundle, missing_requirements
from epara.firmware.installed import installed_node_command
from epara.firmware.profiles import load_profile, parse_wheel_name, wheel_fits
from epara.models.store import ModelStore
from epara.node.client import Client, NodeUnreachable
from epara.peer.security import (
    AUTHORITY_KEY_FILE,
    DEVICE_FILES,
    admit_device,
    create_authority,
    create_cluster_credentials,
)
from epara.peer.testing import NamespaceLab, have_netns

from .helpers import make_add_model, start_node, stop_node, wait_for_socket, wait_until

NETNS = have_netns()
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
CLI = [sys.executable, "-m", "epara.node.cli"]


# --- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("firmware")


@pytest.fixture(scope="module")
def authority(work: Path) -> Path:
    """The cluster's signing authority: it stays here, never in a bundle."""
    pytest.importorskip("nacl")  # per-device identity's extra (CI installs it: .[all])
    create_authority(work / "authority")
    return work / "authority"


@pytest.fixture(scope="module")
def credentials(work: Path, authority: Path) -> Path:
    """The device directory of the node the server bundle installs (per-device identity:
    its own key and certificate, made by `epara cluster admit installed`)."""
    admit_device(authority, "installed", work / "device-installed")
    return work / "device-installed"


@pytest.fixture(scope="module")
def store(work: Path) -> ModelStore:
    make_add_model(work / "store", "add", batch=None)
    return ModelStore(work / "store")


@pytest.fixture(scope="module")
def server_bundle(work: Path, store: ModelStore, credentials: Path) -> BundleSummary:
    return build_bundle(load_profile("x86_64-server"), store, out=work / "server.tar.gz",
                        models=["add"], cluster=credentials)


def tree_state(root: Path) -> dict[str, tuple[str, int, float]]:
    """Every path under ``root``: its kind/target/hash, mode and mtime."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        state[str(path.relative_to(root))] = (what, st.st_mode, st.st_mtime)
    return state


def flash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "firmware", "flash", *args], capture_output=True, text=True,
                          timeout=600)


def status(sock: Path) -> dict | None:
    try:
        with Client(sock, timeout=5) as client:
            return client.status()
    except (NodeUnreachable, OSError):
        return None



# --- profiles and wheel tags (pure) ------------------------------------------------------

def test_profiles_say_what_each_device_gets() -> None:
    rpi, jetson, server = (load_profile(n) for n in ("rpi", "jetson", "x86_64-server"))
    assert rpi.arch == jetson.arch == "aarch64" and server.arch == "x86_64"
    assert (rpi.python, jetson.python) == ("3.11", "3.10")
    assert set(rpi.extras) == {"tflite", "image"}
    assert "--never-lead" in rpi.node_flags and rpi.limits["MemoryMax"]
    assert "onnx" in jetson.extras and "torch" not in jetson.extras + tuple(
        jetson.optional_extras)
    assert server.optional_extras["torch"] == ("torch==2.13.0",)
    assert rpi.platform_tags()[0] == "manylinux_2_36_aarch64"
    assert "manylinux2014_aarch64" in rpi.platform_tags()


def test_wheel_tags_are_judged_for_the_target() -> None:
    rpi = load_profile("rpi")
    assert wheel_fits("numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64"
                      ".whl", rpi) is None
    assert wheel_fits("protobuf-7.36.2-cp310-abi3-manylinux2014_aarch64.whl", rpi) is None
    assert wheel_fits("tqdm-4.70.1-py3-none-any.whl", rpi) is None
    assert "platform" in str(wheel_fits("numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",
                                         rpi))
    assert "CPython 3.11" in str(wheel_fits("numpy-2.2.6-cp310-cp310-manylinux2014_aarch64"
                                            ".whl", rpi))
    assert "platform" in str(wheel_fits("x-1-cp311-cp311-manylinux_2_39_aarch64.whl", rpi))
    assert parse_wheel_name("a_b-1.0-1-py3-none-any.whl").distribution == "a-b"


# --- aarch64 bundles ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def device_bundle(work: Path) -> Callable[[str], BundleSummary]:
    """``device_bundle(profile)``: a bundle without models or credentials, built once."""
    built: dict[str, BundleSummary] = {}

    def get(name: str) -> BundleSummary:
        if name not in built:
            built[name] = build_bundle(load_profile(name), ModelStore(work / "empty-store"),
                                       out=work / f"{name}.tar.gz")
        return built[name]

    return get


@pytest.mark.parametrize("profile_name", ["rpi", "jetson"])
def test_aarch64_bundle_holds_only_wheels_for_the_device(
        work: Path, device_bundle: Callable[[str], BundleSummary], profile_name: str) -> None:
    profile = load_profile(profile_name)
    summary = device_bundle(profile_name)
    unpacked = work / f"{profile_name}-unpacked"
    with tarfile.open(summary.path) as tar:
        tar.extractall(unpacked, filter="tar")
    (top,) = unpacked.iterdir()
    wheels = sorted(p.name for p in (top / "wheels").glob("*.whl"))
    assert wheels == summary.wheels and len(wheels) > 5
    assert {w: wheel_fits(w, profile) for w in wheels} == dict.fromkeys(wheels)
    dists = {parse_wheel_name(w).distribution for w in wheels}
    assert {"epara", "numpy", "pyzmq", "zeroconf", "ai-edge-litert", "pip"} <= dists
    assert "torch" not in dists
    # Every requirement whose marker holds on the device (Python 3.10 needs tomli) is in.
    assert missing_requirements(top / "wheels", profile, profile.extras) == []
    if profile_name == "rpi":
        assert not {"onnxruntime", "onnxruntime-gpu"} & dists
        assert "--never-lead" in (top / "etc" / "node.env").read_text()
        assert "CPUQuota=300%" in (top / "systemd" / "epara.service").read_text()
    else:
        assert "onnxruntime" in dists and "tomli" in dists
    manifest = json.loads((top / "bundle.json").read_text())
    assert manifest["profile"]["arch"] == "aarch64" and manifest["release"] == summary.release
    assert os.access(top / "install.sh", os.X_OK)
    # The installer and the profiles travel inside the epara wheel too (package data).
    (epara_wheel,) = (top / "wheels").glob("epara-*.whl")
    names = set(zipfile.ZipFile(epara_wheel).namelist())
    assert {"epara/firmware/install.py", "epara/firmware/profiles/rpi.toml"} <= names
    # Lab code no device needs stays out, files and RECORD lines alike.
    assert not [n for n in names if n.startswith("epara/node/lab/")]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    assert b"epara/node/lab/" not in zipfile.ZipFile(epara_wheel).read(record)
    assert "epara/node/runtime.py" in names


def test_a_bundle_refuses_a_model_its_device_cannot_run(work: Path, store: ModelStore) -> None:
    with pytest.raises(BundleError, match="needs the onnx runtime"):
        build_bundle(load_profile("rpi"), store, out=work / "no.tar.gz", models=["add"])
    with pytest.raises(BundleError, match="epara models prepare nope"):
        build_bundle(load_profile("rpi"), store, out=work / "no.tar.gz", models=["nope"])


def test_foreign_root_is_staged_and_installed_at_first_boot(
        work: Path, server_bundle: BundleSummary,
        device_bundle: Callable[[str], BundleSummary]) -> None:
    """An aarch64 root gets the staged bundle and a first-boot unit, no venv. The first
    boot itself is run here with the x86_64 bundle staged the same way (--mode firstboot)
    and its installer invoked as the first-boot unit would invoke it."""
    pi_root = work / "pi-root"
    result = flash(str(device_bundle("rpi").path), "--root", str(pi_root))
    assert result.returncode == 0, result.stderr
    assert "the target is aarch64" in result.stdout
    assert (pi_root / "opt/epara/firstboot/install.py").exists()
    assert not (pi_root / "opt/epara/current").exists()
    wants = pi_root / "etc/systemd/system/multi-user.target.wants"
    assert {p.name for p in wants.iterdir()} == {install.UNIT, install.FIRSTBOOT_UNIT}
    # Staging again changes nothing, except that it drops files the bundle lacks (an
    # older bundle's wheel there could win pip's resolution at first boot).
    stale = pi_root / "opt/epara/firstboot/wheels/numpy-9.9-cp311-cp311-manylinux_2_17_aarch64.whl"
    stale.write_bytes(b"")
    def files() -> dict[str, tuple[str, int, float]]:
        # Directories left out: removing the stale file rightly touches its directory.
        return {k: v for k, v in tree_state(pi_root).items() if v[0] != "dir"}

    before = {k: v for k, v in files().items() if "numpy-9.9" not in k}
    again = flash(str(device_bundle("rpi").path), "--root", str(pi_root))
    assert "1 change(s)" in again.stdout and "removed" in again.stdout, again.stdout
    assert files() == before

    root = work / "firstboot-root"
    assert flash(str(server_bundle.path), "--root", str(root), "--mode",
                 "firstboot").returncode == 0
    unit = (root / "etc/systemd/system" / install.FIRSTBOOT_UNIT).read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    python, script, *args = exec_start.removeprefix("ExecStart=").split()
    assert python == load_profile("x86_64-server").python_bin  # the device's own Python
    args[args.index("--root") + 1] = str(root)
    args[args.index("--bundle") + 1] = str(root / "opt/epara/firstboot")
    subprocess.run([sys.executable, str(root / script.lstrip("/")), *args], check=True,
                   capture_output=True)
    assert (root / "opt/epara/current/venv/bin/epara").exists()
    assert not (root / "opt/epara/firstboot").exists()
    assert {p.name for p in (root / "etc/systemd/system/multi-user.target.wants").iterdir()} \
        == {install.UNIT}


# --- per-device credentials in a bundle ----------------------------------------------------

def test_a_device_bundle_carries_exactly_its_device_files_and_never_the_authority_key(
        work: Path, server_bundle: BundleSummary, credentials: Path, authority: Path,
        store: ModelStore) -> None:
    assert install.DEVICE_FILES == DEVICE_FILES  # install.py's copy (it imports no epara)
    assert server_bundle.node_id == "installed" and "device installed" in \
        server_bundle.describe()
    authority_key = (authority / AUTHORITY_KEY_FILE).read_bytes().strip()
    with tarfile.open(server_bundle.path) as tar:
        top = tar.getnames()[0]
        members = {m.name.removeprefix(f"{top}/"): m for m in tar.getmembers()}
        carried = {name.removeprefix("cluster/"): (m.mode, tar.extractfile(m).read())
                   for name, m in members.items() if name.startswith("cluster/") and m.isfile()}
        assert carried == {name: (mode, (credentials / name).read_bytes())
                           for name, mode in DEVICE_FILES.items()
                           if (credentials / name).exists()}
        assert {"node.key", "node.cert", "authority.pub"} <= set(carried)
        assert members["cluster"].mode == 0o700
        assert not any(n.endswith(AUTHORITY_KEY_FILE) for n in members)
        for member in tar.getmembers():  # nor its bytes under any other name
            if member.isfile() and member.size < 1 << 20:
                assert authority_key not in tar.extractfile(member).read(), member.name
        manifest = json.loads(tar.extractfile(f"{top}/bundle.json").read())
    assert manifest["node_id"] == "installed" and manifest["credentials"] is True
    # The device verifies certificates: its venv gets PyNaCl (the identity extra).
    assert "identity" in manifest["extras"]
    assert any(parse_wheel_name(w).distribution == "pynacl" for w in manifest["wheels"])
    # The authority itself, and a directory whose certificate does not verify, are
    # refused before anything is downloaded.
    with pytest.raises(BundleError, match="authority, which never goes onto a device"):
        build_bundle(load_profile("x86_64-server"), store, out=work / "no.tar.gz",
                     cluster=authority)
    forged = work / "device-forged"
    shutil.copytree(credentials, forged)
    create_authority(work / "other-authority")
    admit_device(work / "other-authority", "installed", work / "device-other")
    shutil.copyfile(work / "device-other" / "node.cert", forged / "node.cert")
    with pytest.raises(BundleError, match="not a certificate for this node's key"):
        build_bundle(load_profile("x86_64-server"), store, out=work / "no.tar.gz",
                     cluster=forged)


def _unpacked(bundle: Path, into: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(into, filter="tar")
        return into / tar.getnames()[0]


def test_installing_a_device_bundle_pins_the_certified_node_id(
        work: Path, server_bundle: BundleSummary, credentials: Path) -> None:
    """The identity the installer pins is the certificate's: another --node-id is refused
    (the node would not start), a stale pin is replaced, and a device that already has
    credentials keeps them and its id."""
    bundle = _unpacked(server_bundle.path, work / "unpacked-device")
    refused = flash(str(server_bundle.path), "--root", str(work / "refused-root"),
                    "--node-id", "someone-else")
    assert refused.returncode == 1 and "carries the certificate of node installed" in \
        refused.stderr, refused.stderr
    assert not (work / "refused-root/etc").exists()  # refused before any change

    fresh = work / "fresh-root"  # once installed under another id (a stale pin)
    (fresh / "etc/epara").mkdir(parents=True)
    (fresh / "etc/epara/identity.env").write_text("EPARA_NODE_ID=old-name\n")
    install.Installer(bundle, fresh, log=False).write_config(None)
    assert (fresh / "etc/epara/identity.env").read_text() == "EPARA_NODE_ID=installed\n"
    assert (fresh / "etc/epara/cluster").stat().st_mode & 0o777 == 0o700
    for name, mode in DEVICE_FILES.items():
        if (credentials / name).exists():
            assert (fresh / "etc/epara/cluster" / name).stat().st_mode & 0o777 == mode
        else:
            assert not (fresh / "etc/epara/cluster" / name).exists()

    # A device of another cluster keeps its own credentials and id.
    other = work / "other-cluster-root"
    create_cluster_credentials(other / "etc/epara/cluster")
    (other / "etc/epara/identity.env").write_text("EPARA_NODE_ID=theirs\n")
    install.Installer(bundle, other, log=False).write_config(None)
    assert not (other / "etc/epara/cluster/node.cert").exists()
    assert (other / "etc/epara/identity.env").read_text() == "EPARA_NODE_ID=theirs\n"


# --- x86_64: install into a root, run what was installed --------------------------------

@pytest.mark.root
@pytest.mark.skipif(NETNS is not None, reason=str(NETNS))
def test_installed_node_joins_a_cluster_and_serves_a_model(
        work: Path, server_bundle: BundleSummary, credentials: Path, authority: Path,
        store: ModelStore) -> None:
    """The bundle carries its device's own credentials; the installed node is the node
    its certificate names, and a peer (another device of the authority) accepts it."""
    root = work / "root"
    first = flash(str(server_bundle.path), "--root", str(root), "--node-id", "installed")
    assert first.returncode == 0, first.stderr
    before = tree_state(root)
    again = flash(str(server_bundle.path), "--root", str(root), "--node-id", "installed")
    assert again.returncode == 0 and "0 change(s)" in again.stdout, again.stdout
    assert tree_state(root) == before  # idempotent: not one byte, mode or mtime changed
    assert (root / "etc/systemd/system/multi-user.target.wants/epara.service").is_symlink()
    installed_creds = root / "etc/epara/cluster"
    assert {p.name: (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in installed_creds.iterdir()} == \
        {name: ((credentials / name).read_bytes(), mode) for name, mode in DEVICE_FILES.items()
         if (credentials / name).exists()}
    assert (root / "etc/epara/identity.env").read_text() == "EPARA_NODE_ID=installed\n"

    lab = NamespaceLab(2).create()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # An ordinary node from the source tree: another device of the same authority.
        admit_device(authority, "peer", work / "device-peer")
        peer_sock = work / "peer" / "node.sock"
        processes.append(start_node(Path(store.root), peer_sock, "--cluster",
                                    str(work / "device-peer"), prefix=lab.prefix(0)))
        node = installed_node_command(root)
        with open(work / "installed-node.log", "wb") as log:
            processes.append(subprocess.Popen([*lab.prefix(1), *node.argv], env=node.env,
                                              cwd="/", stdout=log, stderr=subprocess.STDOUT))
        wait_for_socket(peer_sock, processes[0])
        wait_for_socket(node.socket, processes[1])

        def joined() -> bool:
            views = [status(s) for s in (peer_sock, node.socket)]
            return all(v and v["cluster"] and {m["node_id"] for m in v["cluster"]["members"]}
                       == {"peer", "installed"} for v in views)

        wait_until(joined, 40, "the installed node and its peer in one cluster")
        with Client(node.socket) as client:
            out = client.infer("add", {"x": np.ones((2, 4), np.float32)})
        np.testing.assert_array_equal(out["y"], np.full((2, 4), 2, np.float32))
        info = status(node.socket)
        assert info is not None and info["model_store"] == str(root / "var/lib/epara/models")
        assert info["node_id"] == "installed"  # the certified one
        # The node runs from the installed venv, not from this source tree.
        cmdline = Path(f"/proc/{processes[1].pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(root))
    finally:
        for process in processes:
            stop_node(process)
        lab.close()


@pytest.mark.root
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed "
                    "(apt install systemd)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare is not installed")
def test_installed_units_pass_systemd_analyze_verify(
        work: Path, server_bundle: BundleSummary,
        device_bundle: Callable[[str], BundleSummary]) -> None:
    root = work / "verify-root"
    # This device already belongs to a cluster: installing must not swap its credentials.
    create_cluster_credentials(root / "etc/epara/cluster")
    theirs = (root / "etc/epara/cluster/cluster.key").read_bytes()
    result = flash(str(server_bundle.path), "--root", str(root), "--mode", "full")
    assert result.returncode == 0, result.stderr
    assert "keeping the cluster credentials" in result.stdout
    assert (root / "etc/epara/cluster/cluster.key").read_bytes() == theirs
    (root / "etc/systemd/system" / install.FIRSTBOOT_UNIT).write_text(
        _bundle_file(server_bundle.path, f"systemd/{install.FIRSTBOOT_UNIT}"))
    # The Pi's unit (CPUQuota, never-lead flags) runs the same ExecStart path.
    (root / "etc/systemd/system/epara-rpi.service").write_text(
        _bundle_file(device_bundle("rpi").path, f"systemd/{install.UNIT}"))
    # verify also checks that ExecStart exists: show it the installed /opt in a private
    # mount namespace (the machine's own /opt is untouched).
    for unit in (install.UNIT, install.FIRSTBOOT_UNIT, "epara-rpi.service"):
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$1/opt" /opt && exec systemd-analyze verify --man=no "$2"',
             "sh", str(root), str(root / "etc/systemd/system" / unit)],
            capture_output=True, text=True, timeout=60)
        # Any warning ("Unknown key", "Invalid memory limit, ignoring") fails the test too.
        assert result.returncode == 0 and not result.stderr.strip() \
            and not result.stdout.strip(), (unit, result.stdout, result.stderr)


def _bundle_file(bundle: Path, name: str) -> str:
    with tarfile.open(bundle) as tar:
        top = tar.getnames()[0]
        member = tar.extractfile(f"{top}/{name}")
        assert member is not None
        return member.read().decode()


def test_rebuilt_bundle_is_byte_identical(work: Path, server_bundle: BundleSummary,
                                          store: ModelStore, credentials: Path) -> None:
    again = build_bundle(load_profile("x86_64-server"), store, out=work / "server2.tar.gz",
                         models=["add"], cluster=credentials)
    assert again.release == server_bundle.release
    assert again.path.read_bytes() == server_bundle.path.read_bytes()


# --- upgrade with rollback, uninstall -------------------------------------------------------

class Supervisor:
    """Restarts the installed node whenever it exits, as Restart= would; re-reads the
    unit's command each time, so a switched ``current`` release takes effect."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.pid_file = root / "node.pid"
        self.stopping = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            node = installed_node_command(self.root)
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(node.argv, env=node.env, cwd="/", stdout=log,
                                                stderr=subprocess.STDOUT)
            self.pid_file.write_text(str(self.process.pid))
            self.process.wait()
            time.sleep(0.2)

    def __enter__(self) -> Supervisor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self.process is not None:
            stop_node(self.process)
        self.thread.join(10)


@pytest.fixture(scope="module")
def standalone_bundles(work: Path, device_bundle: Callable[[str], BundleSummary]
                       ) -> dict[str, BundleSummary]:
    """Bundles without credentials (the node runs alone: no network is touched here)."""
    profile = load_profile("x86_64-server")
    empty = ModelStore(work / "empty-store")
    return {
        "v1": device_bundle("x86_64-server"),
        "broken": build_bundle(profile, empty, out=work / "broken.tar.gz",
                               node_flags=["--no-such-flag"]),
        "v2": build_bundle(profile, empty, out=work / "v2.tar.gz",
                           node_flags=["--max-frame-mb=32"]),
    }


def test_upgrade_rolls_back_an_unhealthy_node_and_keeps_its_identity(
        work: Path, standalone_bundles: dict[str, BundleSummary]) -> None:
    root = work / "upgrade-root"
    assert flash(str(standalone_bundles["v1"].path), "--root", str(root), "--node-id",
                 "keeper").returncode == 0
    sock = root / "run/epara/node.sock"
    restart = f"sh -c 'kill $(cat {root}/node.pid) || true'"

    def upgrade(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "firmware", "upgrade", str(standalone_bundles[name].path), "--root",
             str(root), "--restart-command", restart, "--health-timeout", "8"],
            capture_output=True, text=True, timeout=300)

    def release() -> str:
        return os.readlink(root / "opt/epara/current")

    with Supervisor(root, work / "upgrade-node.log"):
        wait_until(lambda: status(sock) is not None, 30, "the v1 node")
        v1 = release()
        broken = upgrade("broken")
        assert broken.returncode == 3, broken.stdout + broken.stderr
        assert "rolling back" in broken.stdout
        assert release() == v1
        wait_until(lambda: status(sock) is not None, 30, "the v1 node after rollback")

        good = upgrade("v2")
        assert good.returncode == 0, good.stdout + good.stderr
        assert release() == f"releases/{standalone_bundles['v2'].release}"
        assert os.readlink(root / "opt/epara/previous") == v1
        info = status(sock)
        assert info is not None and info["node_id"] == "keeper"
        assert "--max-frame-mb=32" in (root / "opt/epara/current/node.env").read_text()

    removed = subprocess.run([*CLI, "firmware", "uninstall", "--root", str(root)],
                             capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt/epara").exists()
    assert not (root / "etc/systemd/system/epara.service").exists()
    assert (root / "etc/epara/identity.env").read_text() == "EPARA_NODE_ID=keeper\n"


# --- over SSH -------------------------------------------------------------------------------

@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[NamespaceLab, Path]]:
    """sshd on namespace host 1 (10.77.0.2:2222), key login only; yields the lab and the
    client's private key."""
    assert SSHD is not None
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "client_key")], check=True)
    shutil.copy(tmp_path / "client_key.pub", tmp_path / "authorized_keys")
    config = tmp_path / "sshd_config"
    config.write_text(f"""\
ListenAddress 10.77.0.2:2222
HostKey {tmp_path}/host_key
AuthorizedKeysFile {tmp_path}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    lab = NamespaceLab(2).create()
    log = open(tmp_path / "sshd.log", "wb")  # noqa: SIM115 (closed in teardown)
    process = subprocess.Popen([*lab.prefix(1), SSHD, "-D", "-e", "-f", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "sshd.log").read_text()
        yield lab, tmp_path / "client_key"
    finally:
        process.terminate()
        process.wait(10)
        log.close()
        lab.close()


@pytest.mark.root
@pytest.mark.skipif(NETNS is not None, reason=str(NETNS))
@pytest.mark.skipif(SSHD is None, reason="sshd is not installed (apt install openssh-server)")
def test_flash_over_ssh_installs_once_and_uninstalls(
        tmp_path: Path, sshd: tuple[NamespaceLab, Path],
        standalone_bundles: dict[str, BundleSummary]) -> None:
    lab, key = sshd
    # The device's root is a directory here: sshd runs on this machine's file system.
    device_root = tmp_path / "device"
    ssh_args = ["--ssh", "root@10.77.0.2", "--ssh-port", "2222", "--ssh-identity", str(key),
                "--ssh-option", "StrictHostKeyChecking=no", "--ssh-option",
                "UserKnownHostsFile=/dev/null", "--ssh-option", "LogLevel=ERROR",
                "--target-root", str(device_root)]

    def from_host0(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*lab.prefix(0), *CLI, "firmware", *args, *ssh_args],
                              capture_output=True, text=True, timeout=600)

    bundle = str(standalone_bundles["v1"].path)
    first = from_host0("flash", bundle, "--node-id", "over-ssh")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (device_root / "opt/epara/current/venv/bin/epara").exists()
    assert (device_root / "etc/epara/identity.env").read_text() == "EPARA_NODE_ID=over-ssh\n"

    def installed() -> dict[str, tuple[str, int, float]]:
        # The staging directory under var/tmp is unpacked afresh each time, by design.
        return {k: v for k, v in tree_state(device_root).items()
                if not k.startswith("var/tmp")}

    before = installed()
    second = from_host0("flash", bundle, "--node-id", "over-ssh")
    assert second.returncode == 0 and "0 change(s)" in second.stdout, second.stdout
    assert installed() == before

    removed = from_host0("uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not (device_root / "opt/epara").exists()
    assert (device_root / "etc/epara/identity.env").exists()  # kept without --purge


def test_a_device_identity_without_cluster_key_installs_once(tmp_path: Path) -> None:
    """A per-device directory (no cluster.key since per-device server keys) is installed
    as the device's credentials, and an upgrade bundle never swaps it."""
    pytest.importorskip("nacl")
    from epara.peer.security import admit_device, create_authority

    create_authority(tmp_path / "auth")

    def bundle(node_id: str) -> Path:
        b = tmp_path / f"bundle-{node_id}"
        (b / "systemd").mkdir(parents=True)
        for name in (install.UNIT, "sysusers.conf", "tmpfiles.conf"):
            (b / "systemd" / name).write_text("")
        (b / install.BUNDLE_JSON).write_text("{}")
        admit_device(tmp_path / "auth", node_id, b / "cluster")
        return b

    root = tmp_path / "root"
    install.Installer(bundle("pi-1"), root, log=False).write_config(None)
    etc = root / "etc/epara/cluster"
    assert sorted(p.name for p in etc.iterdir()) == [
        "authority.pub", "node.cert", "node.key", "revocations.cbor"]
    assert (etc / "node.key").stat().st_mode & 0o777 == 0o600
    first = (etc / "node.cert").read_bytes()
    install.Installer(bundle("pi-2"), root, log=False).write_config(None)
    assert (etc / "node.cert").read_bytes() == first
