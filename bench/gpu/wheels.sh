#!/usr/bin/env bash
''':'
# Fill the ignored folder .whl/ with every wheel the GPU kit needs on the device that its image
# lacks (bench/gpu/wheelset.py decides which: the kit's imports, pinned to the versions installed
# in this environment), for CPython 3.12 on manylinux x86-64. DeepSpeed, published only as a source
# archive, is built here into a pure-Python wheel (DS_BUILD_OPS=0). Writes .whl/requirements.txt,
# checks that .whl/ plus the working tree stay under the 64 MiB that travel to the device, and
# prints the install line the device runs (bench/gpu/check.sh runs it itself).
#   bash bench/gpu/wheels.sh          (PYTHON=... picks the environment; default .venv/bin/python)
# Wheels already in .whl/ at the pinned version are kept; others are removed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LIMIT=$((64 * 1024 * 1024))
WHL=.whl
mkdir -p "$WHL"
PLAN="$("$PY" bench/gpu/wheelset.py)"
TARGET=(--python-version 3.12 --implementation cp)
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  TARGET+=(--platform "${tag}_x86_64")  # glibc 2.28 or newer on the device
done
touch "$WHL/MANIFEST"
NEW=""
COUNT=0
while read -r kind pin; do
  COUNT=$((COUNT + 1))
  file="$(awk -v p="$pin" '$1 == p {print $2}' "$WHL/MANIFEST")"
  if [ -n "$file" ] && [ -f "$WHL/$file" ]; then
    NEW+="$pin $file"$'\n'
    continue
  fi
  tmp="$(mktemp -d)"
  if [ "$kind" = build ]; then
    echo "[wheels] building $pin (pure Python; DS_BUILD_OPS=0)"
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation "$pin" -w "$tmp"
  else
    echo "[wheels] $pin"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" "$pin" -d "$tmp"
  fi
  file="$(cd "$tmp" && ls -- *.whl)"
  mv "$tmp/$file" "$WHL/"
  rmdir "$tmp"
  NEW+="$pin $file"$'\n'
done <<< "$PLAN"
printf '%s' "$NEW" > "$WHL/MANIFEST"
for f in "$WHL"/*.whl; do  # wheels of an older plan
  grep -qF " $(basename "$f")" "$WHL/MANIFEST" || { echo "[wheels] removing $(basename "$f")"; rm -f "$f"; }
done
awk '{print $1}' "$WHL/MANIFEST" > "$WHL/requirements.txt"

WHEELS=$(cat "$WHL"/*.whl "$WHL/requirements.txt" "$WHL/MANIFEST" | wc -c)
TREE=$("$PY" - <<'PYEOF'
import os, subprocess
out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                     capture_output=True, check=True).stdout
files = [f for f in out.decode().split(chr(0)) if os.path.isfile(f) and not os.path.islink(f)]
print(sum(os.path.getsize(f) for f in files))  # what travels: tracked and not-ignored files
PYEOF
)
TOTAL=$((WHEELS + TREE))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo
echo "[wheels] $COUNT wheels in $WHL: $(mib "$WHEELS"); working tree: $(mib "$TREE");"\
  "together $(mib "$TOTAL") of the $(mib "$LIMIT") that travel"
"$PY" - <<'PYEOF'
import sys
sys.path.insert(0, "bench/gpu")
import wheelset
print("[wheels] not carried, the device image has them:")
for name, why in wheelset.DEVICE_HAS.items():
    print(f"  {name}: {why}")
print("[wheels] not carried, the kit does not use them:")
for name, why in wheelset.LEFT_OUT.items():
    print(f"  {name}: {why}")
PYEOF
if [ "$TOTAL" -gt "$LIMIT" ]; then
  echo "[wheels] over the travel limit by $(mib $((TOTAL - LIMIT))): drop a root from" \
    "bench/gpu/wheelset.py or shrink the tree" >&2
  exit 1
fi
echo "[wheels] the GPU machine installs them with (bench/gpu/check.sh runs this first):"
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
  "--target /tmp/gpu-kit-site .whl/*.whl && export PYTHONPATH=/tmp/gpu-kit-site"
exit 0
'''
# Python reads everything above as one string: tests/test_architecture.py parses bench/*.sh
# as Python, so this file is valid bash and valid Python, like launch/run.sh.
# ' <- closes, for bash -n, the quote that the triple quote above opens in bash
