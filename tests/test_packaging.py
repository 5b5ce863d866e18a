"""Packaging: a wheel of lasp installs one top-level module, ``lasp`` (the Triton kernels under
``kernels/`` install as ``lasp.kernels``; the top-level name ``kernels`` belongs to another
PyPI package), and the editable install resolves ``lasp.kernels`` from any directory."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_wheel_installs_only_lasp(tmp_path):
    src = tmp_path / "src"  # build from a copy: no build/ or egg-info left in the checkout
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lasp", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=110,
    )
    (wheel,) = out.glob("lasp-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = set(z.read(top_level).decode().split())
    assert declared == {"lasp"}
    modules = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert modules == {"lasp"}, modules
    for mod in ("lasp/kernels/__init__.py", "lasp/kernels/segment.py", "lasp/kernels/simple_gla/fwd.py"):
        assert mod in names


@pytest.mark.parametrize("cwd", ["repo_root", "elsewhere"])
def test_lasp_kernels_importable(cwd, tmp_path):
    where = ROOT if cwd == "repo_root" else tmp_path
    code = "import lasp.kernels.segment as s, lasp.kernels.simple_gla; print(s.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("segment.py")


def test_lasp_kernels_from_a_plain_checkout(tmp_path):
    """A checkout on PYTHONPATH, nothing installed (the editable install's finder removed): ``lasp``
    maps ``lasp.kernels`` to the checkout's ``kernels/`` (lasp/_checkout.py), so scripts run from a
    bare clone (the GPU check) import it."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
        f"sys.path.insert(0, {str(ROOT)!r}); import lasp.kernels.segment as s, lasp.kernels.simple_gla, lasp; "
        "print(s.__file__); print(lasp.__file__)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seg, pkg = r.stdout.split()
    assert Path(seg) == ROOT / "kernels" / "segment.py" and Path(pkg) == ROOT / "lasp" / "__init__.py"
