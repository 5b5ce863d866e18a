"""Launch scripts, Dockerfile and compose file: syntax, linters, help text."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = sorted(ROOT.glob("launch/*.sh")) + [ROOT / "launch/slurm.sbatch"]


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed (it comes with the project's dev extra)"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_shellcheck():
    r = subprocess.run([_tool("shellcheck"), "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/slurm.sbatch"])
def test_help_lists_variables_and_an_example(script):
    r = subprocess.run(["bash", script, "-h"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    assert "Variables" in r.stdout and "Example" in r.stdout


def test_hadolint_dockerfile():
    r = subprocess.run([_tool("hadolint"), "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_validates_against_schema():
    r = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker/compose.yaml"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_layout_check_rejects_sp_not_dividing_world(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel:\n  sp_size: 3\n")
    r = subprocess.run(["bash", "launch/torchrun.sh", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "NPROC": "2", "PYTHON": sys.executable})
    assert r.returncode != 0 and "sp_size=3 must divide the world size 2" in r.stderr
