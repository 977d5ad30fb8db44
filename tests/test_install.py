"""``pip install .`` into a fresh virtual environment that already sees an installed torch keeps
that torch: the requirement is a range, not an exact pin, so pip has nothing to replace.

The fresh venv (no packages of its own) gets the running interpreter's site-packages through a
``.pth`` file, so torch, transformers, … count as installed there, as on a cluster image with its
own CUDA torch. ``pip install --dry-run --report`` resolves offline (``--no-index``: everything
must already be satisfied) and lists what it would install: only riemann-zero itself.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_pip_install_keeps_installed_torch(tmp_path):
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    Path(purelib.stdout.strip(), "outer.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    report = tmp_path / "report.json"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "--no-index",
         "--no-build-isolation", "--quiet", "--report", str(report), str(REPO)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert names == ["riemann-zero"], names  # torch (and every other dependency) kept
    seen = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == torch.__version__


def test_torch_requirement_is_a_range():
    """Any torch from the oldest the code needs (2.9: torch.optim.Muon) to newer 2.x builds,
    CUDA local versions included, satisfies the requirement."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    for version in ("2.9.0", "2.10.1+cu128", "2.13.0+cpu", "2.15.0"):
        assert torch_req.specifier.contains(version, prereleases=False), version
    assert not torch_req.specifier.contains("2.8.0")
    assert hasattr(torch.optim, "Muon")  # the reason for the lower bound exists here
