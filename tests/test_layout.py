"""The layout's rules, read from the code's imports (module level and inside functions alike): no import cycle,
the library imports no orchestration, evaluation never imports the trainer, the params schema is a leaf."""

import ast
from pathlib import Path

from conftest import ROOT

PARTS = ("diht_core", "tasks", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for part in PARTS:
        for path in (ROOT / part).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set) -> tuple[set, set]:
    """(our modules imported, top-level external packages imported) by one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if not node.__dict__.get("level") and t.split(".")[0] not in PARTS:
                external.add(t.split(".")[0])
                continue
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not (path.name == "__init__.py" and t.startswith(name + ".")):
                ours.add(t)
    return ours, external


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycles():
    _, g = _graph()
    edges = {m: ours for m, (ours, _) in g.items()}
    state: dict = {}

    def visit(m, trail):
        state[m] = "open"
        for d in edges.get(m, ()):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(trail + [m, d])
            if d not in state:
                visit(d, trail + [m])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [])


def test_the_parts_import_only_downward():
    _, g = _graph()
    for m, (ours, external) in g.items():
        if m.startswith("diht_core"):
            assert not external & {"prefect", "prefect_dask", "mlflow"}, m
            assert not any(d.startswith(("tasks", "flows")) for d in ours), m
        if m.startswith("diht_core.eval"):
            assert not any(d.startswith("diht_core.train") for d in ours), m
        if m.startswith("diht_core.data"):
            assert all(d.startswith(("diht_core.data", "diht_core.config")) for d in ours), m
        if m == "diht_core.config":  # a leaf: only plain data modules of ours, which import nothing of ours
            assert all(not g[d][0] for d in ours), (m, ours)


def test_atomic_writes_leave_nothing_behind(tmp_path):
    import pytest

    from diht_core.data.files import atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "done")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "done"
