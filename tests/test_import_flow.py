"""Imports follow the data flow: a module imports only from its own package or an earlier one.

The order (design.md): leaves (errors, log, config, plotting, files) → data → quant → models → methods
→ train → adapters → eval → report → serve → ui → demo → cli. Also: no import cycles between modules
(imports inside functions and under TYPE_CHECKING count), and an import inside a function says why it
is not at the top (an optional dependency, or start-up time).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LEAVES = ("errors", "log", "config", "plotting", "files")
ORDER = ("data", "quant", "models", "methods", "train", "adapters", "eval", "report", "serve", "ui", "demo", "cli")
RANK = {**dict.fromkeys(LEAVES, 0), **{name: i + 1 for i, name in enumerate(ORDER)}}
REASON = re.compile(r"#.*(optional dependency|start-up time)", re.IGNORECASE)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. tuneforge.eval.run
    target: str  # imported tuneforge module (or a third-party name when not ours)
    file: str  # relative to the source root, e.g. tuneforge/eval/run.py
    line: int
    in_function: bool
    why: bool  # a reason comment on the line or the line before

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def known_modules(root: Path) -> set[str]:
    return {module_name(p, root) for p in (root / "tuneforge").rglob("*.py")}


def targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: set[str]) -> list[str]:
    """Modules an import statement loads: ``from a.b import c`` is ``a.b.c`` when c is a module, else ``a.b``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parent = source.split(".") if is_package else source.split(".")[:-1]
        parent = parent[:len(parent) - (node.level - 1)]
        base = ".".join(parent + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return subs or [base]


def imports_of(path: Path, root: Path, modules: set[str]) -> list[Import]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    source = module_name(path, root)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                n = child.lineno
                why = bool(REASON.search(lines[n - 1]) or (n > 1 and REASON.search(lines[n - 2])))
                for t in targets(child, source, path.name == "__init__.py", modules):
                    found.append(Import(source, t, str(path.relative_to(root)), n, in_function, why))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(text, filename=str(path)), False)
    return found


def rank(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1]] if len(parts) > 1 and parts[1] in RANK else 0


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def backward(imports: list[Import]) -> list[str]:
    return [f"{i.where}: {i.source} imports {i.target} ({package(i.target)} comes after {package(i.source)})"
            for i in imports if i.target.startswith("tuneforge.") and package(i.source) != package(i.target)
            and rank(i.target) > rank(i.source)]


def unexplained(imports: list[Import]) -> list[str]:
    return [f"{i.where}: {i.target} imported inside a function: move it to the top, or say why with "
            "'# optional dependency' / '# start-up time' on its line or the line before"
            for i in imports if i.in_function and not i.why]


def cycles(imports: list[Import]) -> list[str]:
    """Each import cycle between tuneforge modules once, as ``a -> b -> a`` with the line of each edge."""
    graph: dict[str, dict[str, Import]] = {}
    for i in imports:
        if i.target.startswith("tuneforge") and i.target != i.source:
            graph.setdefault(i.source, {}).setdefault(i.target, i)
    found, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, {})):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        edges = [graph[a][b].where for a, b in zip(path, path[1:] + [start], strict=True)]
                        found.append(" -> ".join(path + [start]) + f"  ({', '.join(edges)})")
                elif nxt not in path and nxt > start:  # each cycle is found from its smallest module
                    stack.append((nxt, path + [nxt]))
    return found


def all_imports(root: Path) -> list[Import]:
    modules = known_modules(root)
    return [i for p in sorted((root / "tuneforge").rglob("*.py")) for i in imports_of(p, root, modules)]


def report(imports: list[Import]) -> str:
    sections = [("imports against the data flow", backward(imports)), ("import cycles", cycles(imports)),
                ("imports inside functions without a reason", unexplained(imports))]
    return "\n".join(f"\n{title} ({len(items)}):\n  " + "\n  ".join(items) for title, items in sections if items)


def test_imports_follow_the_data_flow():
    problems = report(all_imports(SRC))
    assert not problems, problems


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "tuneforge" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_flags_a_backward_import_a_cycle_and_an_unexplained_local_import(tmp_path):
    root = write(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/a.py": "from tuneforge.eval.b import x\n",  # data → eval: backward
        "eval/__init__.py": "",
        "eval/b.py": "def f():\n    from tuneforge.eval import c\n",  # no reason given
        "eval/c.py": "from . import b\n",  # eval.c → eval.b → eval.c: a cycle
    })
    imports = all_imports(root)
    assert backward(imports) == ["tuneforge/data/a.py:1: tuneforge.data.a imports tuneforge.eval.b "
                                 "(eval comes after data)"]
    assert [c.split("  ")[0] for c in cycles(imports)] == ["tuneforge.eval.b -> tuneforge.eval.c -> tuneforge.eval.b"]
    assert len(unexplained(imports)) == 1 and unexplained(imports)[0].startswith("tuneforge/eval/b.py:2:")


def test_the_checker_accepts_forward_imports_and_explained_local_ones(tmp_path):
    root = write(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "data/__init__.py": "",
        "data/a.py": "from tuneforge.errors import E\n",
        "eval/__init__.py": "",
        "eval/b.py": "from tuneforge.data.a import x\n\ndef f():\n"
                     "    import matplotlib  # start-up time: only drawing needs it\n",
    })
    assert report(all_imports(root)) == ""
