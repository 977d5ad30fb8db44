"""``python -m riemann_zero.train --help`` lists every recipe key with its default and a meaning,
generated from the schema (so it cannot drift), and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from riemann_zero.train.help import MEANINGS, schema_keys

REPO = Path(__file__).resolve().parents[2]


def test_every_schema_key_has_a_meaning_and_no_meaning_is_stale():
    keys = {key for key, _, _ in schema_keys()}
    assert keys - set(MEANINGS) == set(), "recipe keys without a meaning in train/help.py"
    assert set(MEANINGS) - keys == set(), "meanings of keys the schema no longer has"
    assert all(MEANINGS[k].strip() for k in keys)


def test_help_lists_every_key_with_its_default_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "riemann_zero.train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for key, default, _ in schema_keys():
        line = next((ln for ln in lines if ln.split() and ln.split()[0] == key), None)
        assert line is not None, key
        assert f"[default: {default!r}]" in line and MEANINGS[key] in line
    assert "recipes/" in proc.stdout and "smoke=true" in proc.stdout


def test_no_arguments_is_a_usage_error_that_points_to_help():
    proc = subprocess.run([sys.executable, "-m", "riemann_zero.train"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--help" in proc.stderr
