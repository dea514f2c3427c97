"""The import graph is the map: which part of ip2p_jax may import which, checked on the source.

- importing ip2p_jax.models loads no other part of the package (errors aside), and importing
  ip2p_jax.diffusion loads no model (both in fresh interpreters);
- the package graph (every import of every module, top-level and inside functions; a package or
  top-level module is one node) has no cycle and follows LAYERS;
- imports inside functions are only of the optional heavy dependencies (HEAVY), or listed in
  FUNCTION_LEVEL_EXCEPTIONS with the reason.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ip2p_jax")

BOTTOM = {"errors", "dtypes", "progress", "jsonl", "files"}       # anything may import these
# node -> the nodes it may import (besides BOTTOM). A node is a sub-package of ip2p_jax or a
# top-level module; "ip2p_jax" is the package's own __init__.
LAYERS = {
    "ip2p_jax": set(),
    "errors": set(),
    "progress": set(),
    "jsonl": {"errors"},
    "files": {"errors"},
    "dtypes": {"errors"},
    "images": set(),
    "masks": {"images"},
    "turns": set(),
    "tokenizer": set(),
    "models": set(),
    "diffusion": set(),
    "sharding": set(),
    "adapters": set(),
    "weights": {"models", "tokenizer", "adapters"},
    "data": {"tokenizer"},
    "placement": {"models", "sharding", "tokenizer"},
    "metrics": {"models", "weights", "tokenizer", "sharding", "placement"},
    "edit_request": set(),
    "pipeline": {"models", "weights", "diffusion", "sharding", "images", "tokenizer", "placement", "masks", "turns",
                 "adapters", "edit_request"},
    "datagen.layout": set(),
    "datagen.shapes": {"datagen.layout"},
    "train": {"models", "weights", "diffusion", "data", "tokenizer", "sharding", "placement", "pipeline",
              "datagen.shapes", "adapters"},
    "datagen": {"models", "weights", "diffusion", "data", "tokenizer", "sharding", "placement", "images",
                "pipeline", "metrics", "train", "datagen.shapes", "datagen.layout"},
    "cpu_devices": set(),
    "demo": {"datagen", "datagen.shapes", "pipeline", "images", "cpu_devices"},
    "edit_job": {"pipeline", "images", "data", "edit_request"},
    "commands": {"demo", "pipeline", "weights", "diffusion", "images", "sharding", "data", "train", "edit_job",
                 "masks", "turns", "edit_request"},
    "cli": {"commands", "commands.app", "sharding", "cpu_devices"},
    "app": {"commands", "pipeline", "diffusion", "images", "masks", "edit_request"},
    "commands.app": {"app", "commands", "pipeline", "images", "edit_request"},
}
# Imported inside functions on purpose: optional extras, or slow imports only some paths need.
HEAVY = {"torch", "diffusers", "transformers", "gradio", "tensorflow_datasets", "grain", "apache_beam",
         "tensorboardX", "array_record"}
FUNCTION_LEVEL_EXCEPTIONS = {   # (module, imported module): why it is not at the top
    ("ip2p_jax.data.pipeline", "jax"): "grain's worker processes import this module; they need no jax "
                                       "(a ~3 s import each)",
    ("ip2p_jax.commands.train", "ip2p_jax.train.loop"): "the training loop loads orbax, which installs a root "
                                                        "logging handler on import; only `ip2p train` needs it",
    ("ip2p_jax.commands.export", "ip2p_jax.train.export"): "as above, for `ip2p export`",
    ("ip2p_jax.train.data", "ip2p_jax.data.builder"): "loads TFDS, needed only for data.source='tfds'",
    ("ip2p_jax.train.data", "ip2p_jax.data.pipeline"): "loads TFDS, needed only for data.source='tfds'",
    ("ip2p_jax.datagen.demo_model", "ip2p_jax.data.builder"): "loads TFDS, needed only by the encode stage",
    ("ip2p_jax.edit_job", "ip2p_jax.data.builder"): "loads TFDS, needed only by --tfds dataset edits",
}
# Files other branches of issue 17 are rewriting (their function-level imports move there);
# the lead empties this set after merging them.
PENDING_OTHER_BRANCHES: set = set()


def _modules() -> dict[str, str]:
    """module name -> file, for every module of the package."""
    out = {}
    for dirpath, dirnames, files in os.walk(PACKAGE):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _targets(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """The modules an import statement loads (a `from X import name` of a submodule: X.name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")[:None if is_package else -1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str, path: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of `path`."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((t, child.lineno, in_function)
                           for t in _targets(module, path.endswith("__init__.py"), child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


# The shapes world is a synthetic data source below training (the demo autoencoder trains on its
# renders), so it and the layout helpers it writes with are nodes of their own inside datagen.
# `ip2p app` (commands.app) serves the web UI, which itself uses `ip2p edit`'s model choice and
# writers: a node of its own above both.
SUB_NODES = ("datagen.shapes", "datagen.layout", "commands.app")


def _node(module: str) -> str:
    parts = module.split(".")
    for sub in SUB_NODES:
        if ".".join(parts[1:3]) == sub:
            return sub
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph() -> dict[tuple[str, str], list[str]]:
    """(importing node, imported node) -> ['module:line', ...] where it happens."""
    edges = defaultdict(list)
    for module, path in sorted(MODULES.items()):
        for target, line, _ in _imports(module, path):
            if target.split(".")[0] == "ip2p_jax" and _node(module) != _node(target):
                edges[(_node(module), _node(target))].append(f"{module}:{line}")
    return dict(edges)


def _cycle(graph: dict[str, set]) -> list[str] | None:
    state, stack = {}, []

    def dfs(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := dfs(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n)):
            return found
    return None


def allowed(node: str) -> set[str]:
    return LAYERS[node] if node in BOTTOM else LAYERS[node] | BOTTOM - {node}


def _fresh_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('ip2p_jax')))"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_models_import_nothing_else_of_the_package():
    models = sorted(m for m in MODULES if m.startswith("ip2p_jax.models"))
    loaded = _fresh_import(", ".join(models))
    others = sorted(m for m in loaded if _node(m) not in {"models", "errors", "ip2p_jax"})
    assert not others, f"importing {', '.join(models)} loads {others}"
    for forbidden in ("weights", "data", "train", "pipeline", "diffusion"):
        assert f"ip2p_jax.{forbidden}" not in loaded


def test_diffusion_imports_no_model():
    loaded = _fresh_import("ip2p_jax.diffusion")
    assert not [m for m in loaded if _node(m) not in {"diffusion", "errors", "ip2p_jax"}], sorted(loaded)


def test_layering_table_is_acyclic():
    assert set(LAYERS) >= BOTTOM
    graph = {n: allowed(n) for n in LAYERS}
    assert _cycle(graph) is None, _cycle(graph)


def test_package_graph_follows_the_layers():
    edges = package_graph()
    unknown = sorted({n for edge in edges for n in edge if n not in LAYERS})
    assert not unknown, f"parts of ip2p_jax with no row in LAYERS: {unknown} (add them to the table)"
    bad = [f"{a} -> {b} ({', '.join(where[:3])})" for (a, b), where in sorted(edges.items())
           if b not in allowed(a)]
    assert not bad, "imports against the layering:\n  " + "\n  ".join(bad)
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    cycle = _cycle(graph)
    assert cycle is None, ("import cycle between parts of ip2p_jax: " + " -> ".join(cycle) + "\n  "
                           + "\n  ".join(f"{a} -> {b}: {', '.join(edges[(a, b)][:3])}"
                                         for a, b in zip(cycle, cycle[1:])))


def _function_level_violations() -> dict[str, list[str]]:
    out = defaultdict(list)
    for module, path in sorted(MODULES.items()):
        for target, line, in_function in sorted(set(_imports(module, path)), key=lambda x: x[1]):
            if in_function and target.split(".")[0] not in HEAVY \
                    and (module, target) not in FUNCTION_LEVEL_EXCEPTIONS:
                out[os.path.relpath(path, ROOT)].append(f"line {line}: {target}")
    return dict(out)


def test_function_level_imports_are_heavy_optional_ones():
    violations = {f: v for f, v in _function_level_violations().items() if f not in PENDING_OTHER_BRANCHES}
    assert not violations, "imports inside functions that belong at the top of the module:\n" + "\n".join(
        f"  {f}: {'; '.join(v)}" for f, v in sorted(violations.items()))


def test_pending_files_exist():
    """PENDING_OTHER_BRANCHES names real files (so a rename does not silently exempt one)."""
    missing = sorted(f for f in PENDING_OTHER_BRANCHES if not os.path.isfile(os.path.join(ROOT, f)))
    assert not missing, missing


@pytest.mark.parametrize("path", sorted(FUNCTION_LEVEL_EXCEPTIONS))
def test_exceptions_are_still_needed(path):
    module, target = path
    assert any(t == target and fn for t, _, fn in _imports(module, MODULES[module])), \
        f"{module} no longer imports {target} inside a function: drop it from FUNCTION_LEVEL_EXCEPTIONS"
