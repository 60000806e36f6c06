#!/usr/bin/env bash
# The GPU check (benchmarks/GPU_CHECK.md): ONE command that turns a briefly lent NVIDIA GPU machine into verified
# numbers. Run from the repo root there. It installs the wheels carried in .whl/ (benchmarks/gpu_wheels.txt) into
# /tmp/site, prints the device and versions, then runs each step in its own time box, so that a failing or slow
# step does not stop the others and the whole stays within the budget (420 s, about 7 minutes):
#   tests      the compiled-on-GPU tests of the Triton, Mosaic GPU, sparse Triton and cuDNN paths, and DSA's
#              threshold selection against lax.top_k on the GPU (JUnit XML)
#   attention  flash fwd+bwd, bf16, head dim 128: lc_jax pallas vs cuDNN at 8K, sliding W=1024 vs full at 32K
#   train      50 training steps of the quickstart model in bf16 per attention impl (xla, pallas, cudnn)
#   dsa        one 2048-wide DSA layer at 64K, k=2048, indexer included, fwd+bwd vs full attention
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
  # Tests spread over 4 xdist workers (the Mosaic file holds 7 of the 11); no preallocation: they share the GPU.
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

STEP_NAMES=() STEP_BOXES=() STEP_CMDS=()
add_step() { STEP_NAMES+=("$1"); STEP_BOXES+=("$2"); STEP_CMDS+=("$3"); }
add_step tests 130 "$TESTS_ENV$PY -m pytest -q -p no:cacheprovider -rA $TESTS_FLAGS--junitxml=$OUT/tests_gpu.xml \
-k 'compiled_on_gpu or cudnn_on_gpu or row_topk_by_threshold' tests/test_flash_gpu.py tests/test_flash_mosaic_gpu.py \
tests/test_sparse_gpu.py tests/test_cudnn_impl.py tests/test_dsa.py"
add_step attention 100 "$PY benchmarks/attention.py --accelerator --acc-lengths $ATT_T_CUDNN $ATT_T_FULL \
--acc-head-dims $ATT_D --acc-window $ATT_W --acc-impls lc_jax_pallas jax_cudnn tokamax $ATT_FLAGS \
--acc-pallas-blocks $ATT_BLOCKS \
--out $OUT/attention.json"
add_step train 80 "$PY benchmarks/train_step.py --config configs/quickstart.py --set model.dtype=bfloat16 \
$TRAIN_FLAGS --out $OUT/train.json"
# Last: the longest and least known step takes what is left of the budget.
add_step dsa 240 "$PY benchmarks/dsa.py --layer wide --lengths $DSA_T --topk $DSA_K --dtype bfloat16 \
$DSA_FLAGS --out $OUT/dsa.json"

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
print(json.dumps(env, indent=1))
json.dump(env, open(sys.argv[1], "w"))
if len(sys.argv) > 2 and env["backend"] != sys.argv[2]:
    sys.exit(f"jax runs on {env['backend']!r}, not {sys.argv[2]!r}: the steps would measure the wrong device")
EOF

read -r -d '' SUMMARY_PY <<'EOF'
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, work = Path(sys.argv[1]), Path(sys.argv[2])
E = os.environ


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, box, rc, secs, status, cmd = line.split("\t", 5)
    steps.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(secs),
                  "time_box_s": int(box), "command": cmd})
status = {s["name"]: s["status"] for s in steps}

OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}  # JUnit child tag -> outcome
try:
    cases = []
    for tc in ET.parse(out / "tests_gpu.xml").iter("testcase"):
        child = next((c for c in tc if c.tag in OUTCOMES), None)
        msg = "" if child is None else child.get("message", "")
        cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}",
                      "outcome": "passed" if child is None else OUTCOMES[child.tag],
                      "seconds": float(tc.get("time") or 0), **({"message": msg[:300]} if msg else {})})
    tests = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    tests["cases"] = cases
except (OSError, ET.ParseError) as e:
    tests = {"missing": f"no JUnit XML ({type(e).__name__}); the tests step was {status.get('tests')}"}


def target(what, value, goal, source, why_missing):
    t = {"what": what, "value": value, "target": f">= {goal}", "source": source}
    if value is None:
        return {**t, "pass": None, "missing": why_missing}
    return {**t, "pass": value >= goal}


att, dsa, train = load(out / "attention.json"), load(out / "dsa.json"), load(out / "train.json")
d, t_cudnn, t_full, w = E["ATT_D"], E["ATT_T_CUDNN"], E["ATT_T_FULL"], E["ATT_W"]


def att_missing(T, *impls):
    if att is None:
        return f"no attention.json; the attention step was {status.get('attention')}"
    rows = [r for r in att["rows"] if r["impl"] in impls and r["T"] == int(T) and r["D"] == int(d)
            and r["mode"] == "fwd_bwd" and ("error" in r or "skipped" in r)]
    errs = [f"{r['impl']}{'' if r['window'] is None else ' W=' + str(r['window'])}: "
            f"{r.get('error') or r.get('skipped')}" for r in rows]
    return "; ".join(errs) or "no timing for these rows"


vs_cudnn = (att or {}).get("pallas_speed_vs_cudnn", {}).get(f"D{d}_T{t_cudnn}_fwd_bwd")
variants = {impl: r.get(f"D{d}_T{t_cudnn}_fwd_bwd")
            for impl, r in (att or {}).get("pallas_variants_speed_vs_cudnn", {}).items()}
sliding = (att or {}).get("sliding_speedup_vs_full_causal", {}).get(f"D{d}_fwd_bwd")
row = next((r for r in (dsa or {}).get("rows", []) if r["T"] == int(E["DSA_T"])), None)
best = max(((v, n) for n, v in (row or {}).get("full_over_dsa", {}).items()), default=None)
dsa_missing = (f"no dsa.json; the dsa step was {status.get('dsa')}" if dsa is None else
               json.dumps(row["errors"]) if row and row.get("errors") else "no timing at this length")
targets = {
    "flash_vs_cudnn": target(f"lc_jax impl=pallas speed / cuDNN speed (jax.nn.dot_product_attention), causal "
                             f"fwd+bwd, T={t_cudnn}, bf16, head dim {d}", vs_cudnn, 0.8,
                             f"attention.json pallas_speed_vs_cudnn D{d}_T{t_cudnn}_fwd_bwd",
                             att_missing(t_cudnn, "lc_jax_pallas", "jax_cudnn")),
    "sliding_vs_full": target(f"full causal time / sliding window W={w} time, lc_jax pallas fwd+bwd, "
                              f"T={t_full}, head dim {d}", sliding, 4.0,
                              f"attention.json sliding_speedup_vs_full_causal D{d}_fwd_bwd",
                              att_missing(t_full, "lc_jax_pallas")),
    "dsa_vs_full": {**target(f"full attention time / DSA time (k={E['DSA_K']}, indexer and selection "
                             f"included), one 2048-wide layer, fwd+bwd, T={E['DSA_T']}",
                             best[0] if best else None, 3.0, "dsa.json rows[].full_over_dsa (best variant)",
                             dsa_missing), "variant": best[1] if best else None},
}
train_rows = {r["attention_impl"]: ({"tokens_per_s": r["tokens_per_s"], "median_step_s": r["median_step_s"],
                                     "final_loss": r["final_loss"]} if "error" not in r else {"error": r["error"]})
              for r in (train or {}).get("rows", [])}
env = load(work / "env.json") or {}
smi = (work / "nvidia_smi.txt").read_text().strip() if (work / "nvidia_smi.txt").exists() else None
summary = {
    "check": "benchmarks/gpu_check.sh" + (" --smoke" if E.get("SMOKE") == "1" else ""),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": {"nvidia_smi": smi, "jax_device_kind": env.get("device_kind"), "backend": env.get("backend"),
               "device_count": env.get("device_count"), "compute_capability": env.get("compute_capability")},
    "versions": env.get("versions"),
    "steps": steps,
    "targets": targets,
    # flash_vs_cudnn's ratio for each --acc-pallas-blocks variant of the kernel (not the default one: they inform
    # the next default)
    "flash_variants_vs_cudnn": variants,
    "tests": tests,
    "train_tokens_per_s": train_rows or f"no train.json; the train step was {status.get('train')}",
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"\nGPU check summary ({summary['device']['jax_device_kind']}, jax {(env.get('versions') or {}).get('jax')})")
for s in steps:
    print(f"  step {s['name']:10s} {s['status']:8s} {s['seconds']:4d}s of {s['time_box_s']}s")
if "cases" in tests:
    print(f"  tests: {tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
          f"{tests['skipped']} skipped")
    for c in tests["cases"]:
        if c["outcome"] in ("failed", "error"):
            print(f"    {c['outcome']}: {c['test']}: {c.get('message', '')[:200]}")
for name, t in targets.items():
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
    value = f"{t['value']:.2f}" if t["value"] is not None else t["missing"]
    print(f"  {name:15s} {verdict:4s} {value} (target {t['target']})")
for impl, v in variants.items():
    print(f"  flash variant  {impl}: {'n/a' if v is None else f'{v:.2f}'} (cuDNN time / its time)")
for impl, r in train_rows.items():
    print(f"  train {impl:7s} " + (f"{r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r else r["error"]))
print(f"wrote {out / 'summary.json'}")
sys.exit(0 if all(s["status"] in ("ok", "unselected") for s in steps) else 1)  # a missed target is a result, not a failure
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
    timeout -k 5 $SUMMARY_S $PY -c "$SUMMARY_PY" "$OUT" "$WORK"
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
