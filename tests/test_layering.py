"""Imports go one way: ``ops``, ``data`` <- ``parallel`` <- ``models`` <- ``train`` (and ``md``)
<- ``cli``, ``bench`` (the entry points, which may use each other). Every import in the package, at module level or inside a function, is
checked; an upward (or sideways) one fails with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import ds4sci

ROOT = Path(ds4sci.__file__).parent
LEVELS = {"ops": 0, "data": 0, "parallel": 1, "models": 2, "train": 3, "md": 3, "cli": 4, "bench": 4,
          "demo": 4, "__init__": 4, "__main__": 4}


def _layer(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def _imports(path: Path):
    """``(line, imported module as a tuple of names under ds4sci)`` of every ds4sci import."""
    here = path.relative_to(ROOT).with_suffix("").parts
    package = here[:-1] if path.name != "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ds4sci":
                    yield node.lineno, tuple(alias.name.split(".")[1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = (*base, *(node.module.split(".") if node.module else ()))
            elif node.module and node.module.split(".")[0] == "ds4sci":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if not target:  # "from ds4sci import x" / "from .. import x": the names are submodules
                for alias in node.names:
                    yield node.lineno, (alias.name,)
            else:
                yield node.lineno, target


def test_imports_go_one_way():
    bad = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        here = path.relative_to(ROOT).parts
        mine = _layer(here)
        assert mine in LEVELS, f"{path}: package {mine!r} has no place in the layering; add it to LEVELS"
        for line, target in _imports(path):
            if not target:
                continue
            theirs = _layer(target)
            if theirs == mine or theirs not in LEVELS:
                continue
            top = LEVELS[mine] == LEVELS[theirs] == max(LEVELS.values())  # entry points use each other
            if LEVELS[theirs] >= LEVELS[mine] and not top:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {mine} imports {'.'.join(target)}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    pkg = tmp_path / "ds4sci"
    (pkg / "parallel").mkdir(parents=True)
    (pkg / "parallel" / "x.py").write_text("def f():\n    from ..models.genslm import GenSLM\n")
    (pkg / "parallel" / "y.py").write_text("from ds4sci.train import trainer\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    found = [(p.name, t) for p in sorted((pkg / "parallel").glob("*.py")) for _, t in _imports(p)]
    assert ("x.py", ("models", "genslm")) in found and ("y.py", ("train",)) in found
