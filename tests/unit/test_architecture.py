"""The architecture holds: one-way layers (import-linter, the contracts in pyproject.toml),
no import cycle between modules, and no module so big that nobody can read it whole.

docs/architecture.md draws the layers these tests enforce.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the tree at ``root`` (its src/ and pyproject.toml), whatever is installed."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: pip install -e '.[test]' installs import-linter")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
                          cwd=root, env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold() -> None:
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(("module", "line", "contract", "message"), [
    # an upward import: the model (the on-disk format) reaching for the command line
    ("model/types.py", "import deltavault.cli.main", "One-way layers",
     "deltavault.model is not allowed to import deltavault.cli"),
    # an engine importing another engine
    ("restore/files.py", "import deltavault.backup.files.archiver", "One-way layers",
     "deltavault.restore is not allowed to import deltavault.backup.files"),
    # a file-level cycle inside one package
    ("maintenance/findings.py", "import deltavault.maintenance.check", "No import cycle",
     "No cycles are allowed in deltavault.maintenance"),
    # the sending side of sync reaching into the receiving side
    ("sync/sender/walk.py", "import deltavault.sync.receiver.core", "sync: local, push and pull",
     "deltavault.sync.sender is not allowed to import deltavault.sync.receiver"),
    # the protocol reaching up into the sync it carries
    ("sync/wire.py", "import deltavault.sync.push", "sync: local, push and pull",
     "deltavault.sync.wire is not allowed to import deltavault.sync.push"),
    # a file-level cycle inside sync
    ("sync/receiver/temps.py", "import deltavault.sync.receiver.core", "No import cycle",
     "No cycles are allowed in deltavault.sync.receiver"),
])
def test_a_wrong_import_breaks_the_contract(tmp_path: Path, module: str, line: str, contract: str,
                                            message: str) -> None:
    shutil.copytree(SRC, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "deltavault" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa: E402, F401\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    broken = r.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and message in broken, r.stdout


# Prints {module: [modules it imports]} of the package found on PYTHONPATH.
_GRAPH = """
import json, grimp
g = grimp.build_graph("deltavault")
print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))
"""


def import_graph(src: Path) -> dict[str, list[str]]:
    """The module-level import graph of the package under ``src`` (grimp, as import-linter
    builds it: function-level imports count)."""
    r = subprocess.run([sys.executable, "-c", _GRAPH], env={"PYTHONPATH": str(src)},
                       capture_output=True, text=True, timeout=300, check=True)
    graph: dict[str, list[str]] = json.loads(r.stdout)
    return graph


def _cycles(graph: dict[str, list[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_no_import_cycle_between_modules() -> None:
    """File level, across packages too: a cycle through function-level imports counts."""
    cycles = _cycles(import_graph(SRC))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def _has_size_reason(text: str) -> bool:
    """A line starting with 'Size:' in the module docstring, or a '# Size:' comment above
    the first statement after it."""
    tree = ast.parse(text)
    doc = ast.get_docstring(tree) or ""
    if any(line.strip().startswith("Size:") for line in doc.splitlines()):
        return True
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    first = body[0].lineno if body else len(text.splitlines())
    return any(line.strip().startswith("# Size:") for line in text.splitlines()[:first])


def test_no_module_over_400_lines_without_a_reason() -> None:
    big = []
    for path in sorted((SRC / "deltavault").rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_LINES and not _has_size_reason(text):
            big.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not big, ("split these where a seam exists, or say at the top why not "
                     "(a 'Size:' line in the docstring): " + ", ".join(big))


def test_the_size_rule_reads_reasons() -> None:
    assert _has_size_reason('"""Doc.\n\nSize: one state machine; see below."""\nimport os\n')
    assert _has_size_reason('"""Doc."""\n# Size: one state machine\nimport os\n')
    assert not _has_size_reason('"""Doc."""\nimport os\n# Size: too late\n')


def test_the_diagram_shows_every_layer_of_the_contract() -> None:
    """docs/architecture.dot (the picture in docs/architecture.md) names every package the
    layer contract names, so the two cannot drift apart unnoticed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    dot = (ROOT / "docs" / "architecture.dot").read_text()
    svg = (ROOT / "docs" / "architecture.svg").read_text()
    for layer in layers:
        for module in layer.replace(":", "|").split("|"):
            name = module.strip().removeprefix("deltavault.")
            name = "tracking.volume" if name == "tracking" else name
            assert name in dot and name in svg, f"{name} is missing from docs/architecture.dot or .svg"
