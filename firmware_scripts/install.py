"""Install, upgrade or remove an epara node from an unpacked bundle. Standard library only.

This file travels inside every bundle (``install.sh`` runs it with the device's own
``python3``), so it must not import epara or anything outside the standard library.

Layout on the target (``--root`` prefixes every path; ``/`` on the device itself)::

    /opt/epara/releases/<release>/venv   one venv per bundle content hash
    /opt/epara/current -> releases/<id>  what epara.service runs
    /opt/epara/previous -> releases/<id> what an upgrade rolls back to
    /opt/epara/firstboot/                a staged bundle, installed at first boot
    /opt/epara/releases/<id>/node.env    node flags from the bundle's profile
    /etc/epara/identity.env              EPARA_NODE_ID: written once, kept by upgrades
                                         (a device certificate's node id, when it has one)
    /etc/epara/cluster/cluster.key       credentials: written once, kept by upgrades
                      (or node.key, node.cert, (a device's own identity instead, when it has
                       authority.pub, ...)    one: DEVICE_FILES; never the authority's key)
    /var/lib/epara/models/<name>/        the bundled models (the node's store)
    /etc/systemd/system/epara.service    + multi-user.target.wants/ symlink

Modes: ``full`` builds the venv with this interpreter (it must be the target's
architecture and Python version); ``firstboot`` only stages the bundle and a oneshot unit
that runs ``full`` on the device at its first boot (a venv for another architecture
cannot be built by running the target's Python here). ``auto`` picks ``full`` when this
machine can build the target's venv.

Idempotent: files are written only when their bytes differ, a release's venv is built
once (its directory name is the bundle's content hash), so installing the same bundle
twice changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "/opt/epara"
# A device's credentials (epara.peer.security.DEVICE_FILES, repeated here: this file
# imports nothing of epara): the shared cluster key, or its own key and certificate.
# Which of the two a directory holds: a certificate means the per-device layout (which
# needs no cluster key).
CREDENTIAL_MARKERS = ("node.cert", "cluster.key")
DEVICE_FILES = {"cluster.key": 0o600, "node.key": 0o600, "node.cert": 0o644,
                "authority.pub": 0o644, "revocations.cbor": 0o644}
ETC = "/etc/epara"
STATE = "/var/lib/epara"
RUNTIME = "/run/epara"
SOCKET = f"{RUNTIME}/node.sock"
UNIT_DIR = "/etc/systemd/system"
UNIT = "epara.service"
FIRSTBOOT_UNIT = "epara-firstboot.service"
WANTS = f"{UNIT_DIR}/multi-user.target.wants"
USER = "epara"
BUNDLE_JSON = "bundle.json"


class InstallError(RuntimeError):
    pass


def _remove_path(path: Path) -> bool:
    """Remove a file, link or directory tree; False when there was nothing there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    return True


class Installer:
    """Applies one unpacked bundle to one root file system and reports what changed."""

    def __init__(self, bundle: Path, root: Path, log: bool = True) -> None:
        self.bundle = bundle
        self.root = root
        self.live = root.resolve() == Path("/")
        self.manifest = json.loads((bundle / BUNDLE_JSON).read_text())
        self.changed: list[str] = []
        self.log = log

    def at(self, path: str) -> Path:
        """``path`` (absolute on the target) inside this root."""
        return self.root / path.lstrip("/")

    def say(self, text: str) -> None:
        if self.log:
            print(f"epara-install: {text}", flush=True)

    # --- idempotent file operations ----------------------------------------------------

    def put_bytes(self, target: str, data: bytes, mode: int = 0o644) -> None:
        path = self.at(target)
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            if path.stat().st_mode & 0o7777 != mode:
                path.chmod(mode)
                self.changed.append(f"mode {target}")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside and rename: a power cut leaves the old file or the new, never half.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        self.changed.append(target)

    def put_file(self, source: Path, target: str, mode: int | None = None) -> None:
        self.put_bytes(target, source.read_bytes(),
                       mode if mode is not None else source.stat().st_mode & 0o777)

    def put_tree(self, source: Path, target: str, prune: bool = False) -> None:
        """Copy ``source`` over ``target``; with ``prune`` also delete files that
        ``source`` lacks (a staged bundle must not keep an older bundle's wheels, which
        pip could prefer)."""
        wanted = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
        for relative in sorted(wanted):
            self.put_file(source / relative, f"{target}/{relative}")
        if prune and self.at(target).is_dir():
            for path in sorted(self.at(target).rglob("*")):
                relative = path.relative_to(self.at(target)).as_posix()
                if (path.is_file() or path.is_symlink()) and relative not in wanted:
                    self.remove(f"{target}/{relative}")

    def put_link(self, target: str, points_to: str) -> None:
        path = self.at(target)
        if path.is_symlink() and os.readlink(path) == points_to:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.new")
        tmp.unlink(missing_ok=True)
        os.symlink(points_to, tmp)
        os.replace(tmp, path)  # atomic switch, also for `current` during an upgrade
        self.changed.append(f"{target} -> {points_to}")

    def remove(self, target: str) -> None:
        if _remove_path(self.at(target)):
            self.changed.append(f"removed {target}")

    # --- install -----------------------------------------------------------------------

    def can_build_venv(self) -> str | None:
        """None when this interpreter can build the target's venv, else why not."""
        want_arch, want_py = self.manifest["profile"]["arch"], self.manifest["profile"]["python"]
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if platform.machine() != want_arch:
            return f"the target is {want_arch}, this machine {platform.machine()}"
        if here != want_py:
            return f"the target runs Python {want_py}, this interpreter is {here}"
        return None

    def install(self, mode: str = "auto", node_id: str | None = None,
                activate: bool = True) -> None:
        why_not = self.can_build_venv()
        if mode == "auto":
            mode = "full" if why_not is None else "firstboot"
        if mode == "firstboot":
            if self.live:
                raise InstallError("firstboot staging is for a mounted root, not /")
            self.stage_firstboot()
            return
        if why_not is not None:
            raise InstallError(f"cannot build the venv here: {why_not}")
        certified = self.manifest.get("node_id")
        if node_id and certified and node_id != certified:
            raise InstallError(f"--node-id {node_id}: this bundle carries the certificate of "
                               f"node {certified}, and a device with its own certificate is "
                               "the node it names")
        release = self.manifest["release"]
        self.build_release(release)
        self.write_config(node_id)
        self.enable()
        if activate:
            self.activate(release)
            if self.live:
                self.live_setup()

    def build_release(self, release: str) -> None:
        venv = f"{PREFIX}/releases/{release}/venv"
        done = self.at(f"{PREFIX}/releases/{release}/.complete")
        if done.exists():
            return
        final = self.at(f"{PREFIX}/releases/{release}")
        staging = final.with_name(f".{release}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.say(f"building release {release} (offline, from {len(self.wheels())} wheels)")
        # No pip inside the venv: pip runs from its own bundled wheel, which saves ~15 MB
        # per release; an upgrade is a new bundle and a new venv anyway.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(staging / "venv")],
                       check=True)
        python = str(staging / "venv" / "bin" / "python")
        self.pip(python, "install", "--no-index", "--find-links", str(self.bundle / "wheels"),
                 self.requirement())
        extra = sorted((self.bundle / "extra-wheels").glob("*.whl"))
        if extra:
            replaced = [r for w in extra for r in self.manifest["profile"]["replaces"].get(
                _dist(w.name), [])]
            if replaced:
                self.pip(python, "uninstall", "-y", *replaced)
            self.pip(python, "install", "--no-index", "--no-deps", *map(str, extra))
        _retarget_venv(staging / "venv", str(staging / "venv"), venv,
                       None if self.live else self.manifest["profile"]["python_bin"])
        # The flags belong to the release, so a rollback restores them with the code.
        shutil.copyfile(self.bundle / "etc" / "node.env", staging / "node.env")
        (staging / ".complete").write_text(json.dumps(
            {"release": release, "version": self.manifest["version"],
             "profile": self.manifest["profile"]["name"]}) + "\n")
        os.replace(staging, final)
        self.changed.append(venv)

    def wheels(self) -> list[Path]:
        return sorted((self.bundle / "wheels").glob("*.whl"))

    def requirement(self) -> str:
        extras = self.manifest["extras"]
        return f"epara[{','.join(extras)}]=={self.manifest['version']}" if extras \
            else f"epara=={self.manifest['version']}"

    def pip(self, python: str, *args: str) -> None:
        (pip_wheel,) = [w for w in self.wheels() if w.name.startswith("pip-")]
        # Hermetic: the host's pip configuration (extra indexes, find-links, constraints)
        # must not leak into an offline install.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PIP_NO_CACHE_DIR="1")
        subprocess.run([python, f"{pip_wheel}/pip", *args, "--quiet"], check=True, env=env)

    def write_config(self, node_id: str | None) -> None:
        b = self.bundle
        self.put_file(b / "systemd" / UNIT, f"{UNIT_DIR}/{UNIT}", 0o644)
        self.put_file(b / "systemd" / "sysusers.conf", "/etc/sysusers.d/epara.conf", 0o644)
        self.put_file(b / "systemd" / "tmpfiles.conf", "/etc/tmpfiles.d/epara.conf", 0o644)
        if (b / "models").is_dir():
            self.put_tree(b / "models", f"{STATE}/models")
        marker = next((n for n in CREDENTIAL_MARKERS if (b / "cluster" / n).exists()), None)
        key = b / "cluster" / (marker or "cluster.key")
        installed = self.at(f"{ETC}/cluster/{marker or 'cluster.key'}")
        present = any(self.at(f"{ETC}/cluster/{n}").exists() for n in CREDENTIAL_MARKERS)
        if marker is not None:
            # Credentials are the cluster membership: an upgrade never swaps them.
            if not present:
                self.at(f"{ETC}/cluster").mkdir(parents=True, exist_ok=True, mode=0o700)
                for name, mode in DEVICE_FILES.items():  # a device's own identity too
                    if (b / "cluster" / name).exists():
                        self.put_file(b / "cluster" / name, f"{ETC}/cluster/{name}", mode)
            elif not installed.exists() or installed.read_bytes() != key.read_bytes():
                self.say("keeping the cluster credentials already installed (the bundle's "
                         "differ; `epara firmware uninstall --purge` first to replace them)")
        identity = self.at(f"{ETC}/identity.env")
        certified = self.certified_node_id()
        if certified:
            # The certificate is the identity: a pinned id that differs would stop the
            # node (its certificate names another), so the pin follows the certificate.
            pinned = f"EPARA_NODE_ID={certified}"
            if identity.exists() and identity.read_text().strip() != pinned:
                self.say(f"the node id is now {certified}, the one its certificate names "
                         f"(was {identity.read_text().strip().partition('=')[2]})")
            self.put_bytes(f"{ETC}/identity.env", f"{pinned}\n".encode())
        elif node_id and identity.exists() and \
                identity.read_text().strip() != f"EPARA_NODE_ID={node_id}":
            self.say(f"keeping the node id in {ETC}/identity.env; --node-id {node_id} is "
                     "ignored (a node's identity outlives reinstalls)")
        elif node_id and not identity.exists():
            self.put_bytes(f"{ETC}/identity.env", f"EPARA_NODE_ID={node_id}\n".encode())
        elif self.live and not identity.exists():
            # Pinned at first install so that renaming the host later keeps the node's
            # identity in the cluster. Not done for a mounted root: an image flashed to ten
            # cards would give ten devices one id; those derive it from their machine id.
            self.put_bytes(f"{ETC}/identity.env",
                           f"EPARA_NODE_ID={_default_node_id()}\n".encode())
        self.put_link("/usr/local/bin/epara", f"{PREFIX}/current/venv/bin/epara")

    def certified_node_id(self) -> str | None:
        """The node id this bundle's certificate names, when that certificate is the one
        installed (the device is then that node, whatever was pinned before)."""
        certified = self.manifest.get("node_id")
        bundled = self.bundle / "cluster" / "node.cert"
        installed = self.at(f"{ETC}/cluster/node.cert")
        if certified and bundled.is_file() and installed.is_file() and \
                installed.read_bytes() == bundled.read_bytes():
            return str(certified)
        return None

    def activate(self, release: str) -> None:
        current = self.at(f"{PREFIX}/current")
        if current.is_symlink():
            old = os.readlink(current)
            if old != f"releases/{release}":
                self.put_link(f"{PREFIX}/previous", old)
        self.put_link(f"{PREFIX}/current", f"releases/{release}")
        self.prune()

    def prune(self) -> None:
        """Keep only the current and previous releases (the SD card is small)."""
        keep = {os.readlink(self.at(f"{PREFIX}/{n}")).split("/")[-1]
                for n in ("current", "previous") if self.at(f"{PREFIX}/{n}").is_symlink()}
        releases = self.at(f"{PREFIX}/releases")
        for release in sorted(releases.iterdir()) if releases.is_dir() else []:
            if release.name not in keep:
                self.remove(f"{PREFIX}/releases/{release.name}")

    def enable(self) -> None:
        # What `systemctl enable` does, done by hand so it works on a mounted root too.
        self.put_link(f"{WANTS}/{UNIT}", f"{UNIT_DIR}/{UNIT}")

    def stage_firstboot(self) -> None:
        self.say(f"staging for first boot: {self.can_build_venv()}")
        self.put_tree(self.bundle, f"{PREFIX}/firstboot", prune=True)
        self.put_file(self.bundle / "systemd" / FIRSTBOOT_UNIT, f"{UNIT_DIR}/{FIRSTBOOT_UNIT}",
                      0o644)
        self.put_link(f"{WANTS}/{FIRSTBOOT_UNIT}", f"{UNIT_DIR}/{FIRSTBOOT_UNIT}")
        # epara.service is installed now too, so it starts in the same boot right after
        # the first-boot unit (it is ordered after it and waits for the venv).
        self.put_file(self.bundle / "systemd" / UNIT, f"{UNIT_DIR}/{UNIT}", 0o644)
        self.enable()

    def finish_firstboot(self) -> None:
        self.remove(f"{WANTS}/{FIRSTBOOT_UNIT}")
        self.remove(f"{UNIT_DIR}/{FIRSTBOOT_UNIT}")
        self.remove(f"{PREFIX}/firstboot")

    def live_setup(self) -> None:
        """On the running device: the user, ownership, and systemd itself."""
        if _run_ok(["systemd-sysusers", "/etc/sysusers.d/epara.conf"]) is None:
            try:
                subprocess.run(["id", USER], check=True, capture_output=True)
            except subprocess.CalledProcessError:
                subprocess.run(["useradd", "--system", "--home-dir", STATE, "--shell",
                                "/usr/sbin/nologin", "--user-group", USER], check=True)
        _run_ok(["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/epara.conf"])
        if systemd_running():
            subprocess.run(["systemctl", "daemon-reload"], check=True)
            # Nothing changed: `start` leaves a running node alone (idempotent flash).
            verb = "restart" if self.changed else "start"
            subprocess.run(["systemctl", "enable", UNIT], check=True, capture_output=True)
            subprocess.run(["systemctl", verb, UNIT], check=True)
        else:
            self.say("systemd is not running here: epara.service starts at next boot")


# --- upgrade with rollback --------------------------------------------------------------

def upgrade(installer: Installer, restart: list[str], timeout: float,
            socket: str | None) -> bool:
    """Install the bundle's release next to the running one, switch to it, restart, and
    roll back to the old release unless the new node answers ``status`` (and, with
    credentials, has joined its cluster under the same node id) within ``timeout``."""
    root = installer.root
    current = installer.at(f"{PREFIX}/current")
    if not current.is_symlink():
        raise InstallError("nothing installed to upgrade (run flash/install first)")
    old = os.readlink(current)
    before = node_status(root, socket, timeout=5)
    installer.install(mode="full", activate=False)
    release = f"releases/{installer.manifest['release']}"
    if release == old:
        installer.say("this release is already running")
        return True
    installer.activate(installer.manifest["release"])
    installer.say(f"switched to {release}; restarting")
    subprocess.run(restart, check=True)
    # Credentials are never swapped, but a shared-key device may have gained its own
    # certificate: then it rejoins as the node that certificate names.
    expected_id = installer.certified_node_id() or (before["node_id"] if before else None)
    if wait_healthy(root, socket, timeout, expected_id):
        installer.say(f"upgrade healthy: {release}")
        return True
    installer.say(f"new node not healthy within {timeout:.0f} s: rolling back to {old}")
    installer.put_link(f"{PREFIX}/current", old)
    installer.remove(f"{PREFIX}/previous")
    subprocess.run(restart, check=True)
    wait_healthy(root, socket, timeout, expected_id)
    return False


def node_status(root: Path, socket: str | None, timeout: float) -> dict | None:
    """``epara status --json`` from the installed release, or None if it does not answer."""
    python = root / PREFIX.lstrip("/") / "current" / "venv" / "bin" / "python"
    sock = socket or str(root / SOCKET.lstrip("/"))
    try:
        out = subprocess.run([str(python), "-m", "epara.node.cli", "status", "--json",
                              "--socket", sock], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None


def wait_healthy(root: Path, socket: str | None, timeout: float,
                 node_id: str | None) -> bool:
    clustered = any((root / ETC.lstrip("/") / "cluster" / n).exists()
                    for n in CREDENTIAL_MARKERS)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = node_status(root, socket, timeout=max(1.0, end - time.monotonic()))
        if status is not None and (node_id is None or status["node_id"] == node_id) and \
                (not clustered or status.get("cluster")):
            return True
        time.sleep(0.5)
    return False


# --- uninstall ----------------------------------------------------------------------------

def uninstall(root: Path, purge: bool) -> list[str]:
    """Remove the node; keep identity, credentials and models unless ``purge``."""
    live = root.resolve() == Path("/")
    if live and systemd_running():
        _run_ok(["systemctl", "disable", "--now", UNIT])
        _run_ok(["systemctl", "disable", FIRSTBOOT_UNIT])
    removed = []
    paths = [f"{WANTS}/{UNIT}", f"{WANTS}/{FIRSTBOOT_UNIT}", f"{UNIT_DIR}/{UNIT}",
             f"{UNIT_DIR}/{FIRSTBOOT_UNIT}", "/usr/local/bin/epara", PREFIX,
             "/etc/tmpfiles.d/epara.conf"]
    if purge:
        paths += [ETC, STATE, "/etc/sysusers.d/epara.conf"]
    for target in paths:
        if _remove_path(root / target.lstrip("/")):
            removed.append(target)
    if live and systemd_running():
        _run_ok(["systemctl", "daemon-reload"])
    return removed


# --- helpers ------------------------------------------------------------------------------

def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _run_ok(cmd: list[str]) -> str | None:
    """Run a best-effort system tool; None when it is missing or fails."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _dist(wheel_name: str) -> str:
    return wheel_name.split("-")[0].replace("_", "-").lower()


def _default_node_id() -> str:
    """The id the daemon would derive itself: host name and machine id."""
    host = platform.node() or "epara"
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return f"{host}-{text[:8]}"
    return f"{host}-{os.urandom(4).hex()}"


def _text_files(directory: Path) -> Iterator[Path]:
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if b"\0" not in f.read(4096):
                    yield path


def _retarget_venv(venv: Path, built_at: str, runs_at: str, python_bin: str | None) -> None:
    """Make a venv built at ``built_at`` work at ``runs_at`` (venvs hold absolute paths in
    pyvenv.cfg, script shebangs and activate scripts; site-packages holds none)."""
    for path in [venv / "pyvenv.cfg", *_text_files(venv / "bin")]:
        text = path.read_text()
        if built_at in text:
            path.write_text(text.replace(built_at, runs_at))
    if python_bin is not None:
        # Built on a matching host for a mounted root: point at the target's interpreter.
        cfg = venv / "pyvenv.cfg"
        lines = [f"home = {Path(python_bin).parent}" if line.startswith("home =")
                 else f"executable = {python_bin}" if line.startswith("executable =")
                 else line for line in cfg.read_text().splitlines()]
        cfg.write_text("\n".join(lines) + "\n")
        for name in ("python", "python3", f"python{Path(python_bin).name[6:]}"):
            link = venv / "bin" / name
            if link.is_symlink():
                link.unlink()
                link.symlink_to(python_bin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--mode", choices=["auto", "full", "firstboot"], default="auto")
    parser.add_argument("--node-id", help="pin this node id (kept by later upgrades)")
    parser.add_argument("--firstboot", action="store_true",
                        help="run by epara-firstboot.service: install, then unstage")
    parser.add_argument("--upgrade", action="store_true")
    parser.add_argument("--restart-command", help="default: systemctl restart epara.service")
    parser.add_argument("--socket", help=f"node socket for the health check (default "
                        f"ROOT{SOCKET})")
    parser.add_argument("--health-timeout", type=float, default=60.0)
    parser.add_argument("--uninstall", action="store_true")
    parser.add_argument("--purge", action="store_true",
                        help="with --uninstall: also identity, credentials and models")
    parser.add_argument("--json", action="store_true", help="print what changed as JSON")
    args = parser.parse_args(argv)
    try:
        if args.uninstall:
            result: dict = {"removed": uninstall(args.root, args.purge)}
        else:
            installer = Installer(args.bundle, args.root, log=not args.json)
            if args.upgrade:
                restart = shlex.split(args.restart_command) if args.restart_command \
                    else ["systemctl", "restart", UNIT]
                ok = upgrade(installer, restart, args.health_timeout, args.socket)
                result = {"changed": installer.changed, "upgraded": ok}
            else:
                installer.install(args.mode, node_id=args.node_id)
                if args.firstboot:
                    installer.finish_firstboot()
                result = {"changed": installer.changed}
    except (InstallError, subprocess.CalledProcessError, OSError) as exc:
        print(f"epara-install: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        changes = result.get("changed", result.get("removed", []))
        print(f"epara-install: {len(changes)} change(s)" + "".join(f"\n  {c}" for c in changes))
    return 0 if result.get("upgraded", True) else 3


if __name__ == "__main__":
    sys.exit(main())
