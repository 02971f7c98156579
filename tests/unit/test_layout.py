"""The package's shape: no module-level import cycle between tflow's and the generators' modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_imports() -> dict[str, set[str]]:
    """{module: the tflow/generators modules it imports at module level} (TYPE_CHECKING blocks left out)."""
    files = {}
    for path in [*ROOT.glob("tflow/**/*.py"), *ROOT.glob("generators/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module])
                submodules = {f"{base}.{a.name}" for a in node.names} & set(files)
                # `from pkg import submodule` needs the submodule, not the package's own names
                found |= submodules if len(submodules) == len(node.names) else {base} | submodules
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_level_import_cycle():
    graph = module_imports()
    assert len(graph) > 50 and "tflow.channels.registry" in graph["tflow.channels.dispatch"]
    assert cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
