#!/usr/bin/env bash
# The GPU check (benchmarks/GPU_CHECK.md): ONE command that turns a briefly lent NVIDIA GPU machine into verified
# numbers. Run from the repo root there. It installs the wheels carried in .whl/ (benchmarks/gpu_wheels.txt) into
# /tmp/site, prints the device and versions, then runs each step in its own time box, so that a failing or slow
# step does not stop the others and the whole stays within the budget (420 s, about 7 minutes):
#   tests      the compiled-on-GPU tests of the Triton, Mosaic GPU, sparse Triton and cuDNN paths, and DSA's
#              threshold selection against lax.top_k on the GPU (JUnit XML)
#   attention  flash fwd+bwd, bf16, head dim 128: lc_jax pallas vs cuDNN at 8K, sliding W=1024 vs full at 32K
#   dsa        one 2048-wide DSA layer at 64K, k=2048, indexer included, fwd+bwd vs full attention
#   train      50 training steps of the quickstart model in bf16 per attention impl (xla, pallas, cudnn)
# A target passes only if the kernels it times passed their compiled tests in the same run.
# Results go to $OUT (default runs/gpu_check): gpu_check.log, tests_gpu.xml, attention.json, train.json,
# dsa.json and summary.json (device, versions, every step's status, the three target ratios with pass/fail).
#
#   bash benchmarks/gpu_check.sh                             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                   # here: every step, its command and time box; checks .whl/
#   bash benchmarks/gpu_check.sh --dry-run --no-wheel-check  # the same without downloaded wheels (tests, CI)
#   bash benchmarks/gpu_check.sh --smoke                     # every step at toy sizes on this machine's CPU
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 WHEEL_CHECK=1 SMOKE=0 ONLY=
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --no-wheel-check) WHEEL_CHECK=0 ;;
    --smoke) SMOKE=1 ;;
    --only=*) ONLY=${arg#--only=} ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (allowed: --dry-run, --no-wheel-check, --smoke," \
      "--only=STEP[,STEP...], --help)" >&2; exit 2 ;;
  esac
done

WHEEL_LIST=benchmarks/gpu_wheels.txt
WHEEL_DIR=.whl
SITE=/tmp/site
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}  # every step's box is cut to what is left of this
SUMMARY_S=15                          # kept back for the summary
if ((SMOKE)); then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  OUT=${OUT:-runs/gpu_check_smoke}
  export JAX_PLATFORMS=cpu
else
  PY=${PYTHON:-python3}
  OUT=${OUT:-runs/gpu_check}
  export JAX_PLATFORMS=cuda,cpu  # else tests/conftest.py pins the CPU; the env step stops the run without a GPU
fi
# The repo is not pip-installed there; the carried wheels go first (a smoke run uses this machine's packages).
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
((SMOKE)) || PYTHONPATH=$SITE:$PYTHONPATH
export PYTHONPATH PYTHONUNBUFFERED=1

# Sizes: the issue's targets on the GPU; toy sizes with --smoke (the plumbing only: every step, the summary).
if ((SMOKE)); then
  ATT_D=64 ATT_T_CUDNN=256 ATT_T_FULL=512 ATT_W=128 DSA_T=256 DSA_K=64 ATT_BLOCKS=128x128+approx+skip
  TESTS_ENV= TESTS_FLAGS=
  ATT_FLAGS="--acc-heads 2 --reps 1 --iters 1"
  TRAIN_FLAGS="--steps 2 --set data.seq_len=128 --impls xla,cudnn"
  DSA_FLAGS="--select xla --sparse xla --full-impl xla --index-block-q 64 --index-block-k 128 --sparse-block-q 32 \
--repeats 1"
else
  ATT_D=128 ATT_T_CUDNN=8192 ATT_T_FULL=32768 ATT_W=1024 DSA_T=65536 DSA_K=2048
  # Other blocks than the kernel's default 64 x 64, e.g. "128x64 64x128": on the H200 (2026-11-30) each was slower.
  # The A/B of the Mosaic GPU kernel's switches (approx_math, skip_full_masks, warpgroups; new after run 5, off
  # by default until they pass here): approx math alone, both, and with two compute warpgroups and a producer
  # (128-row q blocks, 64 in the dk/dv kernel), side by side with the default in one run.
  ATT_BLOCKS="64x64+approx 64x64+approx+skip 128x64+approx+skip+wg2"
  # Tests spread over 4 xdist workers (the Mosaic file holds 8 of the 17); no preallocation: they share the GPU.
  TESTS_ENV="env XLA_PYTHON_CLIENT_PREALLOCATE=false " TESTS_FLAGS="-n 4 --dist load --timeout=110 "
  ATT_FLAGS="--acc-heads 16 --reps 3 --iters 5"
  # The quickstart's 256-wide blocks are tuned for the CPU; 128 suits both the XLA path and the kernels here.
  TRAIN_FLAGS="--steps 50 --set model.attention.block_q=128 --set model.attention.block_k=128 --impls xla,pallas,cudnn"
  # Query blocks for a GPU: the defaults are sized for a CPU cache (1 query per block at k = 2048). Two DSA
  # variants, paired by --zip: the threshold selection with the sparse kernel's key-major backward (both new
  # after run 5, not yet run on a GPU; all its parts are timed), and run 5's streaming top_k with the atomic
  # backward (1.475 s then: selection 0.365 s, sparse attention 0.855 s), whose selection and attention are
  # timed again beside them. The gather path (0.10x full attention in runs 2-3) is not timed.
  DSA_FLAGS="--select threshold,xla --sparse pallas-key-major,pallas --zip --full-impl pallas --index-block-q 512 \
--sparse-block-q 256 --repeats 3"
fi

# The compiled kernels, and DSA's threshold selection against lax.top_k and brute force (what the DSA step times).
TESTS_K="compiled_on_gpu or cudnn_on_gpu or row_topk_by_threshold or (topk_selection_equals_brute and threshold)"
STEP_NAMES=() STEP_BOXES=() STEP_CMDS=()
add_step() { STEP_NAMES+=("$1"); STEP_BOXES+=("$2"); STEP_CMDS+=("$3"); }
add_step tests 130 "$TESTS_ENV$PY -m pytest -q -p no:cacheprovider -rA $TESTS_FLAGS--junitxml=$OUT/tests_gpu.xml \
-k '$TESTS_K' tests/test_flash_gpu.py tests/test_flash_mosaic_gpu.py \
tests/test_sparse_gpu.py tests/test_cudnn_impl.py tests/test_dsa.py"
add_step attention 100 "$PY benchmarks/attention.py --accelerator --acc-lengths $ATT_T_CUDNN $ATT_T_FULL \
--acc-head-dims $ATT_D --acc-window $ATT_W --acc-impls lc_jax_pallas jax_cudnn tokamax $ATT_FLAGS \
--acc-pallas-blocks $ATT_BLOCKS --acc-variant-lengths $ATT_T_CUDNN \
--out $OUT/attention.json"
# Before train: the DSA step has run out of its box in every full run so far (runs 1-3), and train's rates have
# been measured twice (runs 1 and 3: 816K and 790K tokens/s with the Mosaic GPU kernel).
add_step dsa 240 "$PY benchmarks/dsa.py --layer wide --lengths $DSA_T --topk $DSA_K --dtype bfloat16 \
$DSA_FLAGS --out $OUT/dsa.json"
# Last: takes what is left of the budget.
add_step train 80 "$PY benchmarks/train_step.py --config configs/quickstart.py --set model.dtype=bfloat16 \
$TRAIN_FLAGS --out $OUT/train.json"

# --only=tests,dsa: a rerun of some steps (the others are recorded as skipped; install and env always run).
if [[ -n $ONLY ]]; then
  for name in ${ONLY//,/ }; do
    if [[ " ${STEP_NAMES[*]} " != *" $name "* ]]; then
      echo "gpu_check.sh: --only step '$name' is not a step (allowed: ${STEP_NAMES[*]})" >&2; exit 2
    fi
  done
fi
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

norm() { tr 'A-Z.-' 'a-z__' <<<"$1"; }
wheel_specs() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$WHEEL_LIST" | grep -v '^$'; }

# The .whl/ files of the listed NAME==VERSIONs into WHEEL_FILES, the specs that have none into MISSING.
find_wheels() {
  local spec name ver f base hit
  WHEEL_FILES=() MISSING=()
  for spec in $(wheel_specs); do
    name=${spec%%==*} ver=${spec#*==} hit=
    for f in "$WHEEL_DIR"/*.whl; do  # NAME-VERSION-TAGS.whl, NAME with _ for - and .
      base=$(basename "$f")
      [[ -e $f && $(norm "${base%%-*}") == "$(norm "$name")" && $(cut -d- -f2 <<<"$base") == "$ver" ]] && hit=$f
    done
    if [[ -n $hit ]]; then WHEEL_FILES+=("$hit"); else MISSING+=("$spec"); fi
  done
}

pip_download_cmd() {
  echo "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp" \
    "--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64" \
    "--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $WHEEL_DIR $*"
}

dry_run() {
  local i f total=$(( SMOKE ? 60 : 120 )) rc=0
  echo "GPU check, dry run: nothing is run. Mode: $( ((SMOKE)) && echo 'smoke (toy sizes, CPU)' || echo 'GPU')."
  echo "python: $PY   OUT: $OUT   budget: ${BUDGET_S}s (${SUMMARY_S}s kept for the summary)"
  echo "env: JAX_PLATFORMS=$JAX_PLATFORMS PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1"
  if ((!SMOKE)); then
    echo "step install (time box 60s): $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir" \
      "--upgrade --target $SITE <the .whl/ file of each line of $WHEEL_LIST>"
  fi
  echo "step env (time box 60s): nvidia-smi; python, jax and package versions, jax.devices() (into summary.json)"
  for i in "${!STEP_NAMES[@]}"; do
    echo "step ${STEP_NAMES[$i]} (time box ${STEP_BOXES[$i]}s): ${STEP_CMDS[$i]}"
    total=$((total + STEP_BOXES[i]))
  done
  echo "step summary: writes $OUT/summary.json (targets: lc_jax pallas >= 0.8x cuDNN fwd+bwd at T=$ATT_T_CUDNN" \
    "D=$ATT_D; sliding W=$ATT_W >= 4x faster than full at T=$ATT_T_FULL; DSA k=$DSA_K >= 3x cheaper than full" \
    "at T=$DSA_T)"
  echo "time boxes: ${total}s in all, each cut to what is left of the ${BUDGET_S}s budget"
  if ((SMOKE || !WHEEL_CHECK)); then
    echo "wheels: not checked"
  else
    find_wheels
    if ((${#MISSING[@]})); then
      echo "wheels: MISSING from $WHEEL_DIR/: ${MISSING[*]}"
      echo "  fetch them with: make gpu-wheels   (or: $(pip_download_cmd "${MISSING[@]}"))"
      rc=1
    else
      echo "wheels: all ${#WHEEL_FILES[@]} of $WHEEL_LIST in $WHEEL_DIR/," \
        "$(du -ch "${WHEEL_FILES[@]}" | tail -1 | cut -f1) (the device run must carry .whl)"
    fi
    for f in "$WHEEL_DIR"/*.whl; do
      [[ -e $f && " ${WHEEL_FILES[*]} " != *" $f "* ]] && echo "  note: $f is not in $WHEEL_LIST, not installed"
    done
  fi
  ((rc == 0)) && echo "ready" || echo "NOT ready"
  return $rc
}

DEADLINE=$((SECONDS + BUDGET_S))

# record NAME BOX RC SECONDS STATUS CMD: one line of $WORK/steps.tsv, which the summary reads.
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"; }

# run_step NAME BOX CMD: CMD under `timeout` (SIGINT first, so that pytest still writes its XML; KILL 5 s later),
# its box cut to what is left of the budget.
run_step() {
  local name=$1 box=$2 cmd=$3 left rc t0 status
  left=$((DEADLINE - SECONDS - SUMMARY_S))
  ((box > left)) && box=$left
  if ((box < 10)); then
    echo; echo "== $name: skipped, the budget is spent"
    record "$name" 0 "" 0 skipped "$cmd"
    return
  fi
  echo; echo "== $name (time box ${box}s): $cmd"
  t0=$SECONDS
  timeout -k 5 -s INT "$box" bash -c "$cmd"
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  echo "== $name: $status (rc $rc, $((SECONDS - t0))s)"
  record "$name" "$box" "$rc" "$((SECONDS - t0))" "$status" "$cmd"
  return "$rc"
}

read -r -d '' ENV_PY <<'EOF'
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import jax

versions = {"python": platform.python_version()}
for pkg in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "numpy", "grain",
            "ml-collections", "tensorboardX", "tokamax"):
    try:
        versions[pkg] = version(pkg)
    except PackageNotFoundError:
        versions[pkg] = None
dev = jax.devices()[0]
env = {"versions": versions, "backend": jax.default_backend(), "device_kind": dev.device_kind,
       "device_count": jax.device_count(), "compute_capability": getattr(dev, "compute_capability", None)}
try:  # what a passing run records in lc_jax.ops.GPU_VERIFIED; a failure here must not stop the check
    from lc_jax import ops

    env["kernels"] = {key: {"digest": ops.kernel_digest(key), "auto_takes_it": ops.gpu_verified(key) is None,
                            "why_not": ops.gpu_verified(key)} for key in ops.GPU_KERNELS}
except Exception as e:  # noqa: BLE001
    env["kernels"] = {"error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(env, indent=1))
json.dump(env, open(sys.argv[1], "w"))
if len(sys.argv) > 2 and env["backend"] != sys.argv[2]:
    sys.exit(f"jax runs on {env['backend']!r}, not {sys.argv[2]!r}: the steps would measure the wrong device")
EOF



main() {
  local i no_gpu=0
  echo "GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
    "budget ${BUDGET_S}s, OUT=$OUT"
  if ((!SMOKE)); then
    find_wheels
    ((${#MISSING[@]})) && echo "WARNING: wheels missing from $WHEEL_DIR/ (was .whl carried?): ${MISSING[*]}"
    run_step install 60 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
--target $SITE ${WHEEL_FILES[*]}"
  fi
  echo; echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$WORK/nvidia_smi.txt"
  else
    echo "nvidia-smi: not found"
  fi
  # Without a GPU jax falls back to the CPU: then the steps would only burn the lease.
  run_step env 60 "$PY -c \"\$ENV_PY\" $WORK/env.json $( ((SMOKE)) || echo gpu)" || no_gpu=1
  for i in "${!STEP_NAMES[@]}"; do
    if ((no_gpu)); then
      echo "== ${STEP_NAMES[$i]}: skipped, jax has no GPU (see env)"
      record "${STEP_NAMES[$i]}" 0 "" 0 skipped "${STEP_CMDS[$i]}"
    elif ! selected "${STEP_NAMES[$i]}"; then
      echo "== ${STEP_NAMES[$i]}: not selected (--only=$ONLY)"
      record "${STEP_NAMES[$i]}" 0 "" 0 unselected "${STEP_CMDS[$i]}"
    else
      run_step "${STEP_NAMES[$i]}" "${STEP_BOXES[$i]}" "${STEP_CMDS[$i]}"
    fi
  done
  echo; echo "== summary"
  ATT_D=$ATT_D ATT_T_CUDNN=$ATT_T_CUDNN ATT_T_FULL=$ATT_T_FULL ATT_W=$ATT_W DSA_T=$DSA_T DSA_K=$DSA_K SMOKE=$SMOKE \
    timeout -k 5 $SUMMARY_S $PY benchmarks/gpu_check_summary.py "$OUT" "$WORK"
}

if ((DRY)); then
  dry_run
  exit
fi
mkdir -p "$OUT"
rm -f "$OUT"/{gpu_check.log,tests_gpu.xml,attention.json,train.json,dsa.json,summary.json}  # no stale results
WORK=$(mktemp -d)
export ENV_PY
main 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
