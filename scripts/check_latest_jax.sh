#!/usr/bin/env bash
# The package on the newest JAX: jax/jaxlib 0.12 need Python >= 3.12, while the pinned test stack
# stays on Python 3.11 / jax 0.10.2 because its PyTorch references (torch 2.13 CPU) are installed
# for 3.11. This builds a Python 3.12 venv with jax 0.12.0.1 + flax 0.12.12 (no torch) and runs
# the torch-free cycle: the demo model's edit of examples/, a tiny training run, its resume, export
# and an edit with the export; then it compares the demo edits with the pinned stack's.
#   PY312=/path/to/python3.12 scripts/check_latest_jax.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY312=${PY312:-python3.12}
VENV=${VENV:-.venv-jax-latest}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
grep -v -e '^jax' -e '^flax' requirements-test.txt > "$WORK/req.txt"
"$VENV/bin/pip" install -q -r "$WORK/req.txt" jax==0.12.0.1 jaxlib==0.12.0.1 flax==0.12.12
"$VENV/bin/pip" install -q --no-deps -e .
cp -r examples configs "$WORK/" && cd "$WORK"
NEW="$ROOT/$VENV/bin/ip2p"
"$NEW" -q edit --image examples/*.png --instruction "make the background blue" --seed 0 --out new
"$NEW" train --config configs/train.py:tiny --workdir run
"$NEW" train --config configs/train.py:tiny --workdir run --config.train.num_steps=30 2>&1 | tee resume.log
grep -q "resumed from" resume.log
"$NEW" export --workdir run --out model
"$NEW" -q edit --model model --image examples/shapes_0.png --instruction "make it red" --steps 2 --out tiny
"$ROOT/.venv/bin/ip2p" -q edit --image examples/*.png --instruction "make the background blue" --seed 0 --out pinned
"$ROOT/.venv/bin/python" - <<'PY'
import glob, numpy as np
from PIL import Image
for a in sorted(glob.glob("new/*.png")):
    x, y = (np.asarray(Image.open(p)).astype(int) for p in (a, a.replace("new/", "pinned/")))
    d = np.abs(x - y)
    print(f"{a}: max |jax 0.12 - pinned| {d.max()}/255, {100 * (d > 0).mean():.3f} % of values differ")
    assert d.max() <= 2, a
PY
echo "jax 0.12 check passed"
