"""The asset cache is filled once per cache (per node) when many ranks ask for it at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = """
import os, sys, time
from pathlib import Path
from riemann_zero import assets
def build(out):
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # the other processes arrive while this one builds
    (out / "weights").write_text("w")
ready = Path(sys.argv[1]).with_name("ready")
ready.mkdir(exist_ok=True)
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 3:  # all three ask at the same moment
    time.sleep(0.05)
out = assets._build_dir_once(assets.cache_dir() / "models" / "entry", build)
print((out / "weights").read_text())
"""


def test_concurrent_ranks_fill_a_cache_entry_once(tmp_path):
    """Regression: every local rank converted SmolLM2 itself (write_dir_atomically kept the first
    copy, but each rank paid the conversion's time and ~1.2 GB); now one process builds while the
    others wait on the cache's lock and then read its result."""
    log = tmp_path / "builds.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), RIEMANN_ZERO_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(log)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert all(o.strip() == "w" for o in outs)
    assert len(log.read_text().split()) == 1  # built by one process
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir()]
    assert leftovers == ["entry"]  # no temporary folders left behind
