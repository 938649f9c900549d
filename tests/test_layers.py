"""The import graph between the top-level folders runs one way only (docs/layout.md):

    base (minicpmv_edge/errors.py, facts.py) <- bindings <- runtime <- export <- quantize <- workflows <- entry

A module may import from its own layer or any layer below it, never above; that rules out cycles between
folders. Function-local imports count too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("base", "bindings", "runtime", "export", "quantize", "workflows", "entry")
FOLDER_OF_PACKAGE = {"_native": "bindings", "runtime": "runtime", "export": "export", "quantize": "quantize",
                     "workflows": "workflows"}
ENTRY_MODULES = {"__init__", "__main__", "cli"}


def _layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "minicpmv_edge":
        return "entry" if path.stem in ENTRY_MODULES else "base"
    return "bindings" if rel.parts[0] == "bindings" else rel.parts[0]


def _layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "minicpmv_edge":
        return None
    if len(parts) == 1 or parts[1] == "__version__":     # the package itself: every import runs it anyway
        return "base"
    if parts[1] in FOLDER_OF_PACKAGE:
        return FOLDER_OF_PACKAGE[parts[1]]
    return "entry" if parts[1] in ENTRY_MODULES else "base"


def import_edges(root: Path = ROOT) -> set[tuple[str, str, str]]:
    """(from layer, to layer, file) for every import of a project module."""
    edges = set()
    for folder in ("minicpmv_edge", "bindings/_native", "runtime", "export", "quantize", "workflows"):
        for path in sorted((root / folder).rglob("*.py")):
            src = _layer_of_file(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level:       # relative: same folder
                    targets = [src]
                elif isinstance(node, ast.ImportFrom) and node.module == "minicpmv_edge":
                    targets = [_layer_of_module(f"minicpmv_edge.{a.name}") for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = [_layer_of_module(node.module or "")]
                elif isinstance(node, ast.Import):
                    targets = [_layer_of_module(a.name) for a in node.names]
                else:
                    continue
                edges |= {(src, t, str(path.relative_to(root))) for t in targets if t and t != src}
    return edges


def test_no_folder_imports_a_layer_above_it():
    edges = import_edges()
    upward = sorted(f"{f}: {a} imports {b}" for a, b, f in edges if LAYERS.index(b) > LAYERS.index(a))
    print("\n[import graph] " + ", ".join(sorted({f"{a}->{b}" for a, b, _ in edges})))
    assert not upward, "\n".join(upward)
    assert {("workflows", "export"), ("quantize", "export"), ("runtime", "bindings")} <= {(a, b) for a, b, _ in edges}
