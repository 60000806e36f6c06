"""benchmarks/gpu_check.sh and its wheel list: ready to run on a lent GPU machine, checked here without one.

The machine has no network, so every third-party package the project imports
must be in its image (benchmarks/gpu_image_packages.txt) or carried as a wheel
(benchmarks/gpu_wheels.txt); a new import that is in neither fails here, not
minutes into a rare GPU lease. The dry run must list every step and exit 0.
"""

from __future__ import annotations

import ast
import email
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
WHEELS = ROOT / "benchmarks" / "gpu_wheels.txt"
IMAGE = ROOT / "benchmarks" / "gpu_image_packages.txt"
SOURCES = ("lc_jax", "pallas_kernels", "configs", "experiments", "benchmarks")
# Import names whose distribution is named otherwise (packages_distributions() covers what is installed here).
DISTRIBUTIONS = {"absl": "absl-py", "ml_collections": "ml-collections", "orbax": "orbax-checkpoint",
                 "tensorboardX": "tensorboardx", "yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}
# Never carried: the image's own builds (the CUDA plugin must match its jaxlib).
NOT_CARRIED = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"}
# What pip evaluates the wheels' markers against on the GPU machine.
GPU_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str | None]:
    """{normalised name: version or None} of a NAME[==VERSION] per line list (comments and blanks skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            out[norm(name)] = version or None
    return out


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source`, less the stdlib, first-party packages and imports
    guarded by `try: ... except ImportError` (optional, e.g. libtpu for deviceless TPU compiles)."""
    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in SOURCES and n != "__future__"}


def distribution(import_name: str) -> str:
    if import_name in DISTRIBUTIONS:
        return DISTRIBUTIONS[import_name]
    installed = packages_distributions().get(import_name)
    return norm(installed[0]) if installed else norm(import_name)


def uncovered(imports: dict[str, set[str]], available: set[str]) -> dict[str, str]:
    """{import name: 'distribution (first file)'} for the imports whose distribution is not available."""
    return {name: f"{distribution(name)} ({sorted(files)[0]})" for name, files in sorted(imports.items())
            if norm(distribution(name)) not in available}


def project_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in third_party_imports(path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_wheels_and_image_cover_every_third_party_import():
    found = project_imports()
    assert {"jax", "grain", "ml_collections", "tokamax"} <= set(found)  # the scan sees the package
    missing = uncovered(found, set(pins(WHEELS)) | set(pins(IMAGE)))
    assert not missing, (f"imported, but neither on the GPU image ({IMAGE.name}) nor carried ({WHEELS.name}): "
                         f"{missing}; add NAME==VERSION (for Python 3.12, x86-64) to {WHEELS.name}")


def test_an_import_in_neither_list_is_reported():
    src = "import jax\nimport yaml\nfrom absl import app\nimport surely_not_a_package.sub\ntry:\n    import libtpu\n" \
          "except ImportError:\n    pass\nimport os\nfrom lc_jax import ops\n"
    imports = {name: {"x.py"} for name in third_party_imports(src)}
    assert set(imports) == {"jax", "yaml", "absl", "surely_not_a_package"}
    assert uncovered(imports, {"jax", "pyyaml", "absl-py"}) == {"surely_not_a_package": "surely-not-a-package (x.py)"}


def test_wheel_list_is_pinned_and_carries_nothing_the_image_has():
    lines = [line.split("#", 1)[0].strip() for line in WHEELS.read_text().splitlines()]
    specs = [s for s in lines if s]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", s) for s in specs), specs
    names = [norm(s.split("==")[0]) for s in specs]
    assert len(names) == len(set(names)), "one version of each: two stop the whole install"
    assert not set(names) & NOT_CARRIED
    assert not set(names) & set(pins(IMAGE)), "carried, though the image has it"


def _dry_run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(cwd / "benchmarks" / "gpu_check.sh"), "--dry-run", *args],
                          capture_output=True, text=True, timeout=60)


def test_dry_run_lists_every_step_and_exits_0():
    proc = _dry_run("--no-wheel-check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    boxes = {m[0]: int(m[1]) for m in re.findall(r"^step (\w+) \(time box (\d+)s\)", out, re.M)}
    assert set(boxes) == {"install", "env", "tests", "attention", "train", "dsa"}, out
    budget = int(re.search(r"budget: (\d+)s", out)[1])
    assert budget <= 450  # with the last kill grace and the summary: under 8 minutes on the GPU
    for name in ("test_flash_gpu.py", "test_flash_mosaic_gpu.py", "test_sparse_gpu.py", "test_cudnn_impl.py",
                 "test_dsa.py"):
        assert f"tests/{name}" in out
    for fragment in ("--junitxml=", "--acc-lengths 8192 32768", "--acc-head-dims 128", "--acc-window 1024",
                     "jax_cudnn", "--lengths 65536 --topk 2048", "--steps 50", "--impls xla,pallas,cudnn",
                     "model.dtype=bfloat16", "summary.json"):
        assert fragment in out, fragment
    assert out.rstrip().endswith("ready")


def test_dry_run_names_missing_wheels_and_how_to_fetch_them(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    for f in (SCRIPT, WHEELS):
        shutil.copy(f, tmp_path / "benchmarks" / f.name)
    proc = _dry_run(cwd=tmp_path)  # no .whl/ there
    assert proc.returncode == 1
    assert "MISSING" in proc.stdout and "grain==0.2.18" in proc.stdout and "make gpu-wheels" in proc.stdout
    assert proc.stdout.rstrip().endswith("NOT ready")


def _listed_wheel_files() -> list[Path]:
    files = []
    for name, version in pins(WHEELS).items():
        hits = [f for f in (ROOT / ".whl").glob("*.whl")
                if norm(f.name.split("-")[0]) == name and f.name.split("-")[1] == version]
        if not hits:
            pytest.skip(f".whl/ lacks {name}=={version}: run `make gpu-wheels` to check the wheels' needs")
        files += hits
    return files


def test_downloaded_wheels_needs_are_on_the_image_or_carried():
    """Each wheel's Requires-Dist (markers as on the GPU machine) is met by the image or another wheel."""
    known = {**pins(IMAGE), **pins(WHEELS)}
    problems = []
    for path in _listed_wheel_files():
        with zipfile.ZipFile(path) as z:
            meta = email.message_from_bytes(z.read(next(n for n in z.namelist()
                                                        if n.endswith(".dist-info/METADATA"))))
        if (rp := meta.get("Requires-Python")) and not Requirement(f"python{rp}").specifier.contains("3.12.3"):
            problems.append(f"{path.name}: Requires-Python {rp}")
        for req in map(Requirement, meta.get_all("Requires-Dist") or []):
            if req.marker is not None and not req.marker.evaluate(GPU_ENV):
                continue
            name = norm(req.name)
            if name not in known:
                problems.append(f"{path.name} needs {req}, in neither list")
            elif known[name] and not req.specifier.contains(Version(known[name]), prereleases=True):
                problems.append(f"{path.name} needs {req}, the GPU machine has {known[name]}")
    assert not problems, problems


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "benchmarks" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _junit(cases: dict[str, str]) -> str:
    """A JUnit XML of {'file.py::name': 'passed' | 'failure' | 'skipped'}."""
    body = "".join(f'<testcase classname="tests.{t.split("::")[0].removesuffix(".py")}" name="{t.split("::")[1]}" '
                   f'time="1">' + ("" if o == "passed" else f'<{o} message="{o}"/>') + "</testcase>"
                   for t, o in cases.items())
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'


def test_a_target_counts_only_where_its_kernels_passed_their_tests(tmp_path):
    """The summary's verdicts: a fast number from a kernel whose compiled test failed (or never ran) is unverified,
    and DSA's target takes the best variant whose kernels passed."""
    summary = _summary_module()
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    (work / "steps.tsv").write_text("".join(f"{n}\t100\t0\t50\tok\tcmd\n" for n in ("tests", "attention", "dsa")))
    (work / "env.json").write_text(json.dumps({"compute_capability": "9.0", "versions": {"jax": "0.11.2"},
                                               "device_kind": "NVIDIA H200", "kernels": {}}))
    mosaic = "test_flash_mosaic_gpu.py::test_compiled_on_gpu"
    cases = {f"{mosaic}[128-bfloat16-64-None-]": "passed", f"{mosaic}[64-float32-64-None-]": "passed",
             f"{mosaic}[128-bfloat16-64-None-approx]": "failure",
             f"{mosaic}[128-bfloat16-64-None-approx+skip]": "passed",
             "test_sparse_gpu.py::test_compiled_on_gpu[atomic]": "passed",
             "test_sparse_gpu.py::test_compiled_on_gpu[key_major]": "failure",
             "test_dsa.py::test_row_topk_by_threshold_equals_top_k[sampled]": "passed",
             "test_dsa.py::test_topk_selection_equals_brute_force[5-threshold]": "passed"}
    (out / "tests_gpu.xml").write_text(_junit(cases))
    (out / "attention.json").write_text(json.dumps({
        "rows": [], "pallas_speed_vs_cudnn": {"D128_T8192_fwd_bwd": 0.9},
        "sliding_speedup_vs_full_causal": {"D128_fwd_bwd": 12.0},
        "pallas_variants_speed_vs_cudnn": {"lc_jax_pallas@64x64+approx": {"D128_T8192_fwd_bwd": 1.2},
                                           "lc_jax_pallas@64x64+approx+skip": {"D128_T8192_fwd_bwd": 1.1}}}))
    (out / "dsa.json").write_text(json.dumps({"rows": [{"T": 65536, "full_over_dsa": {
        "dsa@threshold+pallas-key-major": 5.0, "dsa@xla+pallas": 0.2}}]}))
    sizes = dict(ATT_D=128, ATT_T_CUDNN=8192, ATT_T_FULL=32768, ATT_W=1024, DSA_T=65536, DSA_K=2048)

    s = summary.summarize(out, work, sizes)
    t = s["targets"]
    assert t["flash_vs_cudnn"]["pass"] is True and t["sliding_vs_full"]["pass"] is True
    # The faster DSA variant's key-major backward failed its test: the verdict is the verified variant's.
    assert t["dsa_vs_full"]["variant"] == "dsa@xla+pallas" and t["dsa_vs_full"]["pass"] is False
    v = s["flash_variants_vs_cudnn"]
    assert v["lc_jax_pallas@64x64+approx"]["tests_passed"] is False and "approx]: failed" in \
        v["lc_jax_pallas@64x64+approx"]["unverified"]
    assert v["lc_jax_pallas@64x64+approx+skip"]["tests_passed"] is True

    # The default kernel's test failed: its timings are reported, but no target passes on them.
    (out / "tests_gpu.xml").write_text(_junit({**cases, f"{mosaic}[64-float32-64-None-]": "failure"}))
    t = summary.summarize(out, work, sizes)["targets"]
    assert t["flash_vs_cudnn"]["pass"] is None and t["flash_vs_cudnn"]["value"] == 0.9
    assert "64-float32-64-None-]: failed" in t["flash_vs_cudnn"]["unverified"]
    assert t["dsa_vs_full"]["pass"] is None
    # No JUnit XML at all (the tests step ran out of time): nothing is verified.
    (out / "tests_gpu.xml").unlink()
    t = summary.summarize(out, work, sizes)["targets"]
    assert all(x["pass"] is None and "no JUnit XML" in x["unverified"] for x in t.values())
