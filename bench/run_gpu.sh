#!/usr/bin/env bash
# bench/gpu.py on a lent GPU machine (no network there): its Python 3.12 has torch and
# torchvision but not pydantic, pydantic-settings or SQLAlchemy, and nothing can be downloaded there.
#
#   1. here, before each device run (network; records the commit):
#          bash bench/run_gpu.sh prepare          (PYVER=3.13 bash ... if the device's Python is 3.13)
#      -> .device-wheels/ (git-ignored): cp312 wheels of what rigl_core, store and worker.runner import
#         beyond torch, at the versions installed here, and commit.json (the device gets no .git)
#   2. the device tool:        run(command="bash bench/run_gpu.sh", carry=[".device-wheels"], timeout_s=420)
#      -> unpacks the wheels into /tmp (nothing installed over the machine's torch), runs
#         bench/gpu.py (budget 300 s, ~3-5 min on an H100), writes $OUT/gpu.md + gpu.json; copy them
#         into bench/results/ here. A timeout still leaves the parts finished so far in $OUT.
#
# Extra arguments go to bench/gpu.py (e.g. --budget-s 200, --only resnet50).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.device-wheels}"

if [ "${1:-}" = "prepare" ]; then
    PYVER="${PYVER:-3.12}"
    ABI="cp${PYVER/./}"
    mkdir -p "$WHEELS"
    pins=$(python - <<'EOF'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
         "pydantic-settings", "python-dotenv", "sqlalchemy", "greenlet"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
    # shellcheck disable=SC2086
    pip download --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any --no-deps -d "$WHEELS" $pins
    python - <<'EOF' > "$WHEELS/commit.json"
import json, subprocess
run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
dirty = bool(run("status", "--porcelain", "--", "rigl_core", "worker", "store", "bench"))
print(json.dumps({"commit": run("rev-parse", "--short", "HEAD"), "dirty": dirty}))
EOF
    ls -la "$WHEELS"
    exit 0
fi

ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no $WHEELS/*.whl: run 'bash bench/run_gpu.sh prepare' here first and carry $WHEELS" >&2; exit 2; }
want=$(ls "$WHEELS"/pydantic_core-*.whl | sed -E 's/.*-(cp[0-9]+)-.*/\1/' | head -1)
have=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
[ "$want" = "$have" ] || { echo "the wheels are for $want but python3 here is $have: PYVER=${have:2:1}.${have:3} bash bench/run_gpu.sh prepare" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
SITE=/tmp/rigl-device-site
rm -rf "$SITE" && mkdir -p "$SITE"
for wheel in "$WHEELS"/*.whl; do python3 -m zipfile -e "$wheel" "$SITE"; done
OUT_DIR="${OUT:-bench/out}"
mkdir -p "$OUT_DIR"
PYTHONPATH="$PWD:$SITE" python3 -c "import torch, torchvision, pydantic, sqlalchemy, pydantic_settings; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, \
'pydantic', pydantic.__version__, 'sqlalchemy', sqlalchemy.__version__)"
PYTHONPATH="$PWD:$SITE" python3 bench/gpu.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_log.txt"
