"""Run the node installed in a root directory as its systemd unit would, without booting.

For tests and benchmarks on a build machine: reads ``epara.service`` from the root,
expands its environment files the way systemd does, and maps the unit's absolute paths
(``/opt/epara``, ``/etc/epara``, ``/var/lib/epara``, ``/run/epara``) into the root. The
differences from a real boot: no ``User=`` switch, no resource limits, and no
``--socket-group`` when that group does not exist on this machine.
"""

from __future__ import annotations

import grp
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from epara.firmware import install

MAPPED = (install.PREFIX, install.ETC, install.STATE, install.RUNTIME)


@dataclass(frozen=True)
class NodeCommand:
    argv: list[str]
    env: dict[str, str]
    socket: Path


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with every value it was given (units repeat
    keys such as Environment=); backslash-continued lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().replace("\\\n", "").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")) and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return env


def map_path(root: Path, value: str) -> str:
    for prefix in MAPPED:
        if value == prefix or value.startswith(prefix + "/"):
            return str(root / value.lstrip("/"))
    return value


def installed_node_command(root: Path) -> NodeCommand:
    service = read_unit(root / install.UNIT_DIR.lstrip("/") / install.UNIT)["Service"]
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = map_path(root, value)
    for line in service.get("EnvironmentFile", []):
        optional = line.startswith("-")
        path = root / line.lstrip("-").lstrip("/")
        if optional and not path.exists():
            continue
        env.update(_env_file(path))
    (exec_start,) = service["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(exec_start):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:  # systemd: a bare $VAR word splits into several arguments
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    argv = [map_path(root, a) for a in argv]
    if "--socket-group" in argv:
        i = argv.index("--socket-group")
        try:
            grp.getgrnam(argv[i + 1])
        except KeyError:
            del argv[i:i + 2]
    # The script's shebang names the path on the device; run it with the venv's python.
    python = Path(argv[0]).parent / "python"
    socket = Path(argv[argv.index("--socket") + 1])
    (root / install.RUNTIME.lstrip("/")).mkdir(parents=True, exist_ok=True, mode=0o750)
    # systemd starts services with a near-empty environment: so must this, or a
    # PYTHONPATH from the build machine could hide what the install lacks.
    clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return NodeCommand([str(python), *argv], {**clean, **env}, socket)
