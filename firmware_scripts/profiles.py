"""Device profiles: what a bundle for one kind of device holds and how its node runs.

A profile is a TOML file in ``profiles/`` (or any path given to ``--profile``). It names
the target's CPU architecture, Python and glibc, which ``epara`` extras to install, the
systemd resource limits and the default node flags. Everything here is pure: reading a
profile and judging a wheel's tags does no I/O beyond reading the file.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 runs Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
OLDEST_MANYLINUX_GLIBC = 17  # manylinux2014 = manylinux_2_17


class ProfileError(ValueError):
    """A profile that does not exist or does not make sense."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str  # `uname -m` of the target: x86_64, aarch64
    python: str  # "3.11"
    python_bin: str  # the target's interpreter, for the venv built on a matching host
    glibc: str  # "2.36": the newest manylinux tag the target accepts
    extras: tuple[str, ...]
    optional_extras: dict[str, tuple[str, ...]] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    node_flags: tuple[str, ...] = ()
    threads: int | None = None
    limits: dict[str, str] = field(default_factory=dict)
    replaces: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    def platform_tags(self) -> list[str]:
        """Every manylinux tag the target accepts, newest first (pip needs them listed:
        ``--platform manylinux_2_36_aarch64`` alone would refuse a manylinux_2_28 wheel)."""
        major, minor = (int(p) for p in self.glibc.split("."))
        if major != 2 or minor < OLDEST_MANYLINUX_GLIBC:
            raise ProfileError(f"{self.name}: glibc {self.glibc} is older than manylinux2014")
        tags = [f"manylinux_2_{m}_{self.arch}" for m in range(minor, OLDEST_MANYLINUX_GLIBC - 1,
                                                              -1)]
        tags.append(f"manylinux2014_{self.arch}")
        return tags

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "arch": self.arch,
                "python": self.python, "python_bin": self.python_bin, "glibc": self.glibc,
                "extras": list(self.extras), "models": list(self.models),
                "node_flags": list(self.node_flags), "threads": self.threads,
                "limits": dict(self.limits),
                "replaces": {k: list(v) for k, v in self.replaces.items()}}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (``rpi``), or a TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile {name_or_path!r}; shipped profiles: "
                           f"{', '.join(available_profiles())}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    return profile_from_dict(path.stem, data)


def profile_from_dict(name: str, data: dict[str, Any]) -> Profile:
    try:
        python = str(data["python"])
        profile = Profile(
            name=name, description=str(data.get("description", "")), arch=str(data["arch"]),
            python=python, python_bin=str(data.get("python_bin", f"/usr/bin/python{python}")),
            glibc=str(data["glibc"]), extras=tuple(data.get("extras", ())),
            optional_extras={k: tuple(v) for k, v in data.get("optional_extras", {}).items()},
            models=tuple(data.get("models", ())), node_flags=tuple(data.get("node_flags", ())),
            threads=data.get("threads"),
            limits={k: str(v) for k, v in data.get("limits", {}).items() if str(v)},
            replaces={k: tuple(v) for k, v in data.get("replaces", {}).items()})
    except KeyError as exc:
        raise ProfileError(f"profile {name}: missing key {exc}") from None
    if not re.fullmatch(r"3\.\d+", profile.python):
        raise ProfileError(f"profile {name}: python must look like 3.11, not {python!r}")
    profile.platform_tags()  # validates glibc
    return profile


# --- wheel tags ----------------------------------------------------------------------

@dataclass(frozen=True)
class WheelName:
    distribution: str  # normalised: lower case, "-" for runs of -_.
    version: str
    python_tags: frozenset[str]
    abi_tags: frozenset[str]
    platform_tags: frozenset[str]


def parse_wheel_name(filename: str) -> WheelName:
    """The parts of a wheel file name (PEP 427; compressed tag sets split on ".")."""
    if not filename.endswith(".whl"):
        raise ValueError(f"not a wheel: {filename}")
    parts = filename[:-4].split("-")
    if len(parts) == 6:
        del parts[2]  # the optional build tag
    if len(parts) != 5:
        raise ValueError(f"not a wheel name: {filename}")
    dist, version, py, abi, plat = parts
    return WheelName(re.sub(r"[-_.]+", "-", dist).lower(), version,
                     frozenset(py.split(".")), frozenset(abi.split(".")),
                     frozenset(plat.split(".")))


def wheel_fits(filename: str, profile: Profile) -> str | None:
    """None when the wheel installs on the profile's target, else why not.

    Checked independently of pip's choice, so a bundle can be audited after the fact.
    """
    wheel = parse_wheel_name(filename)
    plats = set(profile.platform_tags()) | {"any"}
    if not wheel.platform_tags & plats:
        return f"platform {'.'.join(sorted(wheel.platform_tags))} is not {profile.arch} " \
               f"manylinux <= glibc {profile.glibc}"
    minor = int(profile.python.split(".")[1])
    pure = {"py3", f"py3{minor}"}
    if wheel.abi_tags == {"none"} and wheel.python_tags & (pure | {profile.python_tag}):
        return None
    if profile.python_tag in wheel.python_tags and wheel.abi_tags & {profile.python_tag,
                                                                      "abi3", "none"}:
        return None
    # A stable-ABI wheel built for an older CPython (cp310-abi3) runs on newer ones.
    for tag in wheel.python_tags:
        if "abi3" in wheel.abi_tags and tag.startswith("cp3") and int(tag[3:]) <= minor:
            return None
    return f"python {'.'.join(sorted(wheel.python_tags))}-{'.'.join(sorted(wheel.abi_tags))} " \
           f"does not run on CPython {profile.python}"
