"""The wheel holds every subpackage under the epara namespace and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_the_three_folders_as_the_epara_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("epara-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"epara"}
    assert "epara/__init__.py" not in names  # a namespace, shared by the three folders
    for package in ROOT.glob("*/**/__init__.py"):
        relative = package.relative_to(ROOT)
        if relative.parts[0] in ("node", "peer", "models"):
            assert f"epara/{relative.as_posix()}" in names, f"{relative} is missing"
    # Import from the unpacked wheel with site processing off, so the editable install's
    # path hook cannot stand in for a file the wheel lacks.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (f"import sys; sys.path[:0] = [{str(target)!r}, "
            f"{sysconfig.get_paths()['purelib']!r}]; "
            "import epara.node.cli, epara.node.daemon, epara.models.backends.tflite_backend, "
            "epara.peer.wire; print(epara.node.cli.__file__)")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.stdout.strip().startswith(str(target)), result.stderr
