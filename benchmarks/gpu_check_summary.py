"""The GPU check's summary (benchmarks/gpu_check.sh, last step): summary.json from what the steps wrote.

    python benchmarks/gpu_check_summary.py OUT WORK     # sizes from the environment: ATT_D, ATT_T_CUDNN, ...

Reads OUT/{tests_gpu.xml, attention.json, dsa.json, train.json} and WORK/{steps.tsv, env.json,
nvidia_smi.txt}; writes OUT/summary.json and prints it short. A target passes only if the kernels it
times passed their compiled tests in the same run (`target`): a fast number from a kernel that failed
its test, or whose test never ran, is reported as unverified, not as a pass. Exits 1 when a step did
not finish (a missed target is a result, not a failure).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}  # JUnit child tag -> outcome


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, box, rc, secs, status, cmd = line.split("\t", 5)
        steps.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(secs),
                      "time_box_s": int(box), "command": cmd})
    return steps


def read_tests(path: Path, step_status: str | None) -> dict:
    """{passed, failed, error, skipped: counts, cases: [{test, outcome, seconds, message?}]}, or {missing}."""
    try:
        cases = []
        for tc in ET.parse(path).iter("testcase"):
            child = next((c for c in tc if c.tag in OUTCOMES), None)
            msg = "" if child is None else child.get("message", "")
            cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}",
                          "outcome": "passed" if child is None else OUTCOMES[child.tag],
                          "seconds": float(tc.get("time") or 0), **({"message": msg[:300]} if msg else {})})
    except (OSError, ET.ParseError) as e:
        return {"missing": f"no JUnit XML ({type(e).__name__}); the tests step was {step_status}"}
    return {**{k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")},
            "cases": cases}


def case(file: str, prefix: str, ends: str | None = None, switches: set[str] | None = None):
    """A JUnit case matcher: the test file, the test name's start, and for parametrized ids their end, or the
    set of switches the id ends with ('...-approx+skip]'; the empty set: '...-]')."""
    def match(c):
        cls, _, name = c["test"].rpartition("::")
        if not cls.endswith(file) or not name.startswith(prefix):
            return False
        if switches is not None:
            return name.endswith("]") and set(filter(None, name[:-1].rsplit("-", 1)[-1].split("+"))) == switches
        return ends is None or name.endswith(ends)
    return match


def checked(tests: dict, needs) -> tuple[bool | None, list[str]]:
    """(True, []) when every compiled test in `needs` passed in this run; (False, why) when one failed or
    erred (or was skipped); (None, why) when the XML has no such test (the tests step ran out of time, say).

    `needs`: (label, matcher) pairs."""
    if "cases" not in tests:
        return None, [tests.get("missing", "no JUnit XML")]
    ok, why = True, []
    for label, match in needs:
        found = [c for c in tests["cases"] if match(c)]
        bad = [f"{c['test']}: {c['outcome']}" for c in found if c["outcome"] != "passed"]
        if not found:
            why.append(f"{label}: no such test in tests_gpu.xml")
            ok = None if ok else ok
        elif bad:
            why += bad
            ok = False
    return ok, why


def flash_needs(env: dict) -> list:
    """The compiled tests behind impl='pallas': the Mosaic GPU kernel on Hopper with jax >= 0.11
    (`mosaic_gpu.use_by_default`), else the Triton one."""
    cc, jax_v = str(env.get("compute_capability") or ""), (env.get("versions") or {}).get("jax") or "0"
    if cc.startswith("9.") and tuple(int(x) for x in jax_v.split(".")[:2]) >= (0, 11):
        return [("Mosaic GPU flash, default switches",
                 case("test_flash_mosaic_gpu", "test_compiled_on_gpu[", switches=set()))]
    return [("Triton flash", case("test_flash_gpu", "test_compiled_on_gpu"))]


SPARSE_NEEDS = {
    "pallas": [("sparse Triton, atomic backward", case("test_sparse_gpu", "test_compiled_on_gpu[atomic]"))],
    "pallas-key-major": [("sparse Triton, key-major backward",
                          case("test_sparse_gpu", "test_compiled_on_gpu[key_major]"))],
}
SELECT_NEEDS = {"threshold": [
    ("threshold selection = lax.top_k", case("test_dsa", "test_row_topk_by_threshold")),
    ("threshold selection = brute force", case("test_dsa", "test_topk_selection_equals_brute", ends="threshold]")),
]}


def dsa_needs(name: str, env: dict) -> list:
    """The compiled tests behind DSA variant 'dsa@SELECT[+SPARSE]': its selection, its sparse kernel and the
    flash kernel of the full-attention baseline."""
    select, _, sparse = name.removeprefix("dsa@").partition("+")
    return [*SELECT_NEEDS.get(select, []), *SPARSE_NEEDS.get(sparse, []), *flash_needs(env)]


def target(tests, what, value, goal, source, why_missing, needs=()) -> dict:
    """A target's value and verdict: it passes only if the kernels it times passed their compiled tests here."""
    t = {"what": what, "value": value, "target": f">= {goal}", "source": source,
         "needs": [label for label, _ in needs]}
    if value is None:
        return {**t, "pass": None, "missing": why_missing}
    ok, why = checked(tests, needs)
    if not ok:
        return {**t, "pass": None, "unverified": "; ".join(why)}
    return {**t, "pass": value >= goal}


def summarize(out: Path, work: Path, sizes: dict, smoke: bool = False) -> dict:
    """summary.json's content. `sizes`: ATT_D, ATT_T_CUDNN, ATT_T_FULL, ATT_W, DSA_T, DSA_K (ints or strings)."""
    steps = read_steps(work)
    status = {s["name"]: s["status"] for s in steps}
    tests = read_tests(out / "tests_gpu.xml", status.get("tests"))
    env = load(work / "env.json") or {}
    att, dsa, train = load(out / "attention.json"), load(out / "dsa.json"), load(out / "train.json")
    d, t_cudnn, t_full, w = (int(sizes[k]) for k in ("ATT_D", "ATT_T_CUDNN", "ATT_T_FULL", "ATT_W"))
    dsa_t, dsa_k = int(sizes["DSA_T"]), int(sizes["DSA_K"])
    pallas = flash_needs(env)

    def att_missing(T, *impls):
        if att is None:
            return f"no attention.json; the attention step was {status.get('attention')}"
        rows = [r for r in att["rows"] if r["impl"] in impls and r["T"] == T and r["D"] == d
                and r["mode"] == "fwd_bwd" and ("error" in r or "skipped" in r)]
        errs = [f"{r['impl']}{'' if r['window'] is None else ' W=' + str(r['window'])}: "
                f"{r.get('error') or r.get('skipped')}" for r in rows]
        return "; ".join(errs) or "no timing for these rows"

    def variant(impl, r):
        """A flash variant's ratios and errors, and whether the compiled test with its switches passed here."""
        switches = set(impl.split("@", 1)[1].split("+")[1:])
        label = "Mosaic GPU flash with " + ("+".join(sorted(switches)) or "default switches")
        ok, why = checked(tests, [(label, case("test_flash_mosaic_gpu", "test_compiled_on_gpu[", switches=switches))])
        key = f"D{d}_T{t_cudnn}_fwd_bwd"
        return {"vs_cudnn": r.get(key), "vs_default": r.get(f"vs_default_{key}"), "errors": r.get("errors", []),
                "tests_passed": ok, **({"unverified": "; ".join(why)} if not ok else {})}

    vs_cudnn = (att or {}).get("pallas_speed_vs_cudnn", {}).get(f"D{d}_T{t_cudnn}_fwd_bwd")
    variants = {impl: variant(impl, r) for impl, r in (att or {}).get("pallas_variants_speed_vs_cudnn", {}).items()}
    sliding = (att or {}).get("sliding_speedup_vs_full_causal", {}).get(f"D{d}_fwd_bwd")
    row = next((r for r in (dsa or {}).get("rows", []) if r["T"] == dsa_t), None)
    # The best DSA variant among those whose kernels passed their tests here (else the best, unverified).
    ratios = (row or {}).get("full_over_dsa", {})
    verified = {n: v for n, v in ratios.items() if checked(tests, dsa_needs(n, env))[0]}
    best = max(((v, n) for n, v in (verified or ratios).items()), default=None)
    dsa_missing = (f"no dsa.json; the dsa step was {status.get('dsa')}" if dsa is None else
                   json.dumps(row["errors"]) if row and row.get("errors") else "no timing at this length")
    targets = {
        "flash_vs_cudnn": target(tests, f"lc_jax impl=pallas speed / cuDNN speed (jax.nn.dot_product_attention), "
                                 f"causal fwd+bwd, T={t_cudnn}, bf16, head dim {d}", vs_cudnn, 0.8,
                                 f"attention.json pallas_speed_vs_cudnn D{d}_T{t_cudnn}_fwd_bwd",
                                 att_missing(t_cudnn, "lc_jax_pallas", "jax_cudnn"), pallas),
        "sliding_vs_full": target(tests, f"full causal time / sliding window W={w} time, lc_jax pallas fwd+bwd, "
                                  f"T={t_full}, head dim {d}", sliding, 4.0,
                                  f"attention.json sliding_speedup_vs_full_causal D{d}_fwd_bwd",
                                  att_missing(t_full, "lc_jax_pallas"), pallas),
        "dsa_vs_full": {**target(tests, f"full attention time / DSA time (k={dsa_k}, indexer and selection "
                                 f"included), one 2048-wide layer, fwd+bwd, T={dsa_t}", best[0] if best else None, 3.0,
                                 "dsa.json rows[].full_over_dsa (the best variant whose kernels passed here)",
                                 dsa_missing, dsa_needs(best[1], env) if best else ()),
                        "variant": best[1] if best else None},
    }
    train_rows = {r["attention_impl"]: ({"tokens_per_s": r["tokens_per_s"], "median_step_s": r["median_step_s"],
                                         "final_loss": r["final_loss"]} if "error" not in r else {"error": r["error"]})
                  for r in (train or {}).get("rows", [])}
    smi = (work / "nvidia_smi.txt").read_text().strip() if (work / "nvidia_smi.txt").exists() else None
    return {
        "check": "benchmarks/gpu_check.sh" + (" --smoke" if smoke else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {"nvidia_smi": smi, "jax_device_kind": env.get("device_kind"), "backend": env.get("backend"),
                   "device_count": env.get("device_count"), "compute_capability": env.get("compute_capability")},
        "versions": env.get("versions"),
        "steps": steps,
        "targets": targets,
        # Each --acc-pallas-blocks variant of the kernel (they inform the next default): its flash_vs_cudnn ratio,
        # its speed / the default's (timed side by side), and whether its compiled test passed here.
        "flash_variants_vs_cudnn": variants,
        # Each Pallas GPU kernel's source digest as run here, and whether lc_jax.ops lets impl='auto' take it now.
        # A kernel whose compiled tests all passed gets this digest in its lc_jax.ops.GPU_VERIFIED entry.
        "kernels": env.get("kernels"),
        "tests": tests,
        "train_tokens_per_s": train_rows or f"no train.json; the train step was {status.get('train')}",
    }


def report(summary: dict) -> None:
    env = summary["device"]
    print(f"\nGPU check summary ({env['jax_device_kind']}, jax {(summary['versions'] or {}).get('jax')})")
    for s in summary["steps"]:
        print(f"  step {s['name']:10s} {s['status']:8s} {s['seconds']:4d}s of {s['time_box_s']}s")
    tests = summary["tests"]
    if "cases" in tests:
        print(f"  tests: {tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
              f"{tests['skipped']} skipped")
        for c in tests["cases"]:
            if c["outcome"] in ("failed", "error"):
                print(f"    {c['outcome']}: {c['test']}: {c.get('message', '')[:200]}")
    for name, t in summary["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        value = f"{t['value']:.2f}" if t["value"] is not None else t["missing"]
        print(f"  {name:15s} {verdict:4s} {value} (target {t['target']})"
              + (f"; unverified: {t['unverified'][:200]}" if "unverified" in t else ""))

    def ratio(x):
        return "n/a" if x is None else f"{x:.2f}"

    for impl, v in summary["flash_variants_vs_cudnn"].items():
        print(f"  flash variant  {impl}: {ratio(v['vs_cudnn'])} of cuDNN's speed, {ratio(v['vs_default'])} of the "
              f"default's; compiled test {'passed' if v['tests_passed'] else 'not passed'}"
              + (f"; errors: {v['errors'][0][:150]}" if v["errors"] else ""))
    for impl, r in (summary["train_tokens_per_s"] if isinstance(summary["train_tokens_per_s"], dict) else {}).items():
        print(f"  train {impl:7s} " + (f"{r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r else r["error"]))


def main(argv: list[str]) -> int:
    out, work = Path(argv[1]), Path(argv[2])
    sizes = {k: os.environ[k] for k in ("ATT_D", "ATT_T_CUDNN", "ATT_T_FULL", "ATT_W", "DSA_T", "DSA_K")}
    summary = summarize(out, work, sizes, smoke=os.environ.get("SMOKE") == "1")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report(summary)
    print(f"wrote {out / 'summary.json'}")
    return 0 if all(s["status"] in ("ok", "unselected") for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
