#!/usr/bin/env bash
# Packaging checks, run by .ci/run after the main Python 3.11 suite (issue 14 item 4):
#   1. build: `python -m build` makes the wheel and the sdist;
#   2. wheel: a fresh Python 3.11 venv installs the wheel alone (the six core dependencies) and
#      smoke-tests it: no service packages, `rigl --help`, a one-epoch synthetic `rigl train`,
#      and `rigl serve` / digits answering with the extra to install (exit 2);
#   3. py312-install: a Python 3.12 venv with `pip install -e ".[test]"`;
#   4. py312-tests: that venv runs the fast tests (pyproject's default `-m`).
# Any failure fails CI. .ci/run starts the first three legs (disk- and network-bound) beside the fast 3.11
# tests, waits for them before the slow set, and runs the last one at the end; PACKAGING_WORK names the
# folder the two calls share (kept, not removed). Measured on the 2-core CI machine (bench/results/packaging.md): build 7-28 s; wheel
# leg ~1.5 min (60 s install, torch 2.14.1 from the local wheel files; 30 s smoke); py312 leg
# ~3 min install with a warm pip cache (6.6 min cold: torch cp312 is downloaded) + ~4 min of tests.
# PACKAGING_LEGS=build,wheel,py312-install,py312-tests picks legs (all by default).
set -euo pipefail
cd "$(dirname "$0")/.."

legs=",${PACKAGING_LEGS:-build,wheel,py312-install,py312-tests},"
py311=${PY311:-python3.11}
py312=${PY312:-}
if [[ -z $py312 && $legs == *,py312-* ]]; then  # pyenv's 3.12 (its python3.12 shim fails while 3.11 is global)
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
    if [[ -n $candidate ]] && "$candidate" --version >/dev/null 2>&1; then py312=$candidate; break; fi
  done
  [[ -n $py312 ]] || { echo "packaging: no working Python 3.12 (set PY312)" >&2; exit 1; }
fi
if [[ -n ${PACKAGING_WORK:-} ]]; then
  work=$PACKAGING_WORK; mkdir -p "$work"
else
  work=$(mktemp -d /tmp/rigl-packaging.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v "^WARNING: Location .* is ignored" || true; }  # this machine's pip index noise
step() { echo "== packaging: $* ($(date -u +%H:%M:%S))"; }
took() { echo "== packaging: $1 took $(( $(date +%s) - $2 )) s"; }
checkout=$PWD
# Builds and editable installs write into the source folder (build/, *.egg-info): they work on a copy of the
# tracked files, so that they may run while the checkout's own pip install and tests do.
src="$work/src"
if [[ $legs == *,build,* || $legs == *,wheel,* || $legs == *,py312-install,* ]]; then
  rm -rf "$src" && mkdir -p "$src"
  git ls-files -z | xargs -0 cp --parents -t "$src" 2>/dev/null || true  # files deleted in the tree are skipped
fi

if [[ $legs == *,build,* || $legs == *,wheel,* ]]; then
  step "build wheel and sdist"
  t0=$(date +%s)
  python3 -m build --outdir "$work/dist" "$src" 2>&1 | tail -n 3
  wheel=$(ls "$work"/dist/rigl_service-*.whl)
  sdist=$(ls "$work"/dist/rigl_service-*.tar.gz)
  # The wheel carries the packages, their data files and the `rigl` entry points; the sdist the sources.
  python3 - "$wheel" "$sdist" <<'EOF'
import sys, tarfile, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for want in ("rigl_core/optional.py", "rigl_core/schemas/architecture.schema.json", "api/static/index.html",
             "api/serve.py", "worker/cli.py", "store/jobs.py"):
    assert want in names, f"wheel lacks {want}"
meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
entry = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
assert "rigl = rigl_core.cli:main" in entry and "serve = api.serve:add_command" in entry, entry
sdist = tarfile.open(sys.argv[2]).getnames()
assert any(n.endswith("/pyproject.toml") for n in sdist) and any(n.endswith("/rigl_core/training/trainer.py") for n in sdist)
print(f"wheel: {len(names)} files; sdist: {len(sdist)} files")
EOF
  took build "$t0"
fi

if [[ $legs == *,wheel,* ]]; then
  step "install the wheel in a fresh Python 3.11 venv"
  t0=$(date +%s)
  "$py311" -m venv "$work/venv311"
  "$work/venv311/bin/pip" install -q --no-compile "$wheel" 2>&1 | quiet  # no .pyc for 5 GB of torch: faster
  took "wheel install" "$t0"
  t0=$(date +%s)
  cd "$work"  # away from the checkout: only the installed wheel is importable
  bin="$work/venv311/bin"
  installed=$("$bin/pip" list --format=freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
  for pkg in fastapi celery sqlalchemy uvicorn httpx pyyaml matplotlib scikit-learn mnist1d psycopg boto3 prometheus-client; do
    if grep -q "^$pkg==" <<<"$installed"; then echo "packaging: $pkg was installed with the library" >&2; exit 1; fi
  done
  echo "core install: $(grep -cv '^nvidia-\|^cuda-' <<<"$installed") packages besides the CUDA wheels; torch $(grep '^torch==' <<<"$installed")"
  "$bin/rigl" --help >/dev/null
  "$bin/python" -c "import rigl_core.training.trainer; from rigl_core import RigL"
  "$bin/rigl" train --model mlp --dataset synthetic --epochs 1 --set dataset.num_samples=512 --out "$work/run" 2>/dev/null
  test -s "$work/run/model.safetensors" && test -s "$work/run/report.json"
  expect_hint() {  # expect_hint EXTRA COMMAND...: exit 2 and one line naming the extra
    local extra=$1 out rc=0; shift
    out=$("$bin/rigl" "$@" 2>&1 >/dev/null) || rc=$?
    if [[ $rc != 2 || $out != *"pip install \"rigl-service[$extra]\""* ]]; then
      echo "packaging: 'rigl $*' gave rc=$rc: $out" >&2; exit 1
    fi
  }
  expect_hint service serve --help
  expect_hint service serve
  expect_hint service worker
  expect_hint datasets train --model mlp --dataset digits --epochs 1 --out "$work/digits"
  expect_hint client status job_0123
  cd - >/dev/null
  took "wheel smoke test" "$t0"
fi

if [[ $legs == *,py312-install,* ]]; then
  step "Python 3.12: pip install -e \".[test]\""
  t0=$(date +%s)
  "$py312" -m venv "$work/venv312"
  "$work/venv312/bin/pip" install -q -e "$src[test]" 2>&1 | quiet
  took "py312 install" "$t0"
fi

if [[ $legs == *,py312-tests,* ]]; then
  step "Python 3.12: the fast tests"
  t0=$(date +%s)
  "$work/venv312/bin/python" --version
  cd "$checkout"  # `python -m` puts the checkout first on sys.path: the tests run its code (the same files)
  "$work/venv312/bin/python" -m pytest -p no:cacheprovider -q  # pyproject's addopts: the fast tests only
  took "py312 tests" "$t0"
fi
