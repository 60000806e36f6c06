"""The modules depend on each other in one direction, with no cycle and no function-local import hiding one.

    kernels <- fields, sharding, data, plots <- ops <- positions, attention <- model <- config <- state <- steps
            <- train, evaluate, generate, aot, memory <- experiments, configs

A module may import its own layer or a lower one. `config` sits above the model because validation
gathers the checks of the schemes and variants it names. The graph is read from the source (ast), so the
test is fast and sees imports inside functions too, which a fresh interpreter would only meet when called.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "lc_jax", "experiments", "configs")
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pallas_kernels",),
    ("lc_jax.errors", "lc_jax.fields", "lc_jax.sharding", "lc_jax.data", "lc_jax.plots"),
    ("lc_jax.ops",),
    ("lc_jax.positions", "lc_jax.attention"),
    ("lc_jax.layers", "lc_jax.model"),
    ("lc_jax.config",),
    ("lc_jax.state", "lc_jax.cli"),
    ("lc_jax.steps",),
    ("lc_jax.train", "lc_jax.evaluate", "lc_jax.generate", "lc_jax.aot", "lc_jax.memory", "lc_jax.inspect_attention"),
    ("experiments", "configs"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module == "lc_jax":  # the empty package itself
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _resolve(name: str) -> str | None:
    """The project module an import names (a module, or the package a name comes from), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                names = [f"{base}.{a.name}" for a in child.names]
            for name in names:
                target = _resolve(name)
                if target is not None and target != module:
                    out.append((target, child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("package", ["pallas_kernels", "lc_jax", "experiments", "configs"])
def test_no_function_local_import_of_a_project_module(package):
    found = [f"{m}:{line} imports {t} inside a function" for m, edges in GRAPH.items() if m.split(".")[0] == package
             for t, line, local in edges if local]
    assert not found, "\n".join(found)


def test_no_upward_import():
    found = [f"{m}:{line} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, edges in GRAPH.items()
             for t, line, _ in edges if _layer(t) > _layer(m)]
    assert not found, "\n".join(found)


def test_no_import_cycle():
    """Tarjan's strongly connected components over module-level imports; a package and its own modules are
    not a cycle (`pkg/__init__` re-exporting `pkg.x` while `pkg.x` imports a sibling through `pkg`)."""
    edges = {m: {t for t, _, local in GRAPH[m] if not local and not m.startswith(t + ".")} for m in MODULES}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_what_it_forbids(tmp_path, monkeypatch):
    """A late import, an upward import and a cycle in a scratch package are all reported."""
    pkg = tmp_path / "lc_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops.py").write_text("from lc_jax import model\n")  # upward, and a cycle with model
    (pkg / "model.py").write_text("from lc_jax import ops\n\n\ndef f():\n    from lc_jax import state\n")
    (pkg / "state.py").write_text("")
    modules = {"lc_jax": pkg / "__init__.py", "lc_jax.ops": pkg / "ops.py", "lc_jax.model": pkg / "model.py",
               "lc_jax.state": pkg / "state.py"}
    monkeypatch.setitem(globals(), "MODULES", modules)
    graph = {m: _imports(m) for m in modules}
    assert ("lc_jax.model", 1, False) in graph["lc_jax.ops"]
    assert ("lc_jax.state", 5, True) in graph["lc_jax.model"]
    assert _layer("lc_jax.model") > _layer("lc_jax.ops")
    monkeypatch.setitem(globals(), "GRAPH", graph)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="inside a function"):
        test_no_function_local_import_of_a_project_module("lc_jax")
    with pytest.raises(AssertionError, match=r"lc_jax.ops:1 \(layer 2\) imports lc_jax.model"):
        test_no_upward_import()
