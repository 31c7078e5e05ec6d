"""Imports point down only: every import goes to a module of the same layer or a lower one, and
no import circle joins the modules of pipelines/ and flows/.

Imports are read with ast, at module level and inside functions alike: a deferred import that
closes a loop is the same dependency, only hidden."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "flows")
# DESIGN.md "Layers", top to bottom. A module may import its own layer and those below it.
LAYERS = (
    ("cli", ("pipelines.cli",)),
    ("flows", ("flows",)),
    ("commands", ("pipelines.commands",)),
    ("stages and serving", ("pipelines.stages", "pipelines.serving")),
    ("adapters", ("pipelines.adapters",)),
    ("core", ("pipelines.core",)),
)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name and target not in PACKAGES:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    """The layer's height: 0 for core, counting up; a module of no layer is an error."""
    for height, (_, prefixes) in enumerate(reversed(LAYERS)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return height
    raise AssertionError(f"{module} belongs to no layer of {[name for name, _ in LAYERS]}")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    names = [name for name, _ in reversed(LAYERS)]
    found = []
    for module in sorted(graph):
        if module in PACKAGES:
            continue
        for target in sorted(graph[module]):
            if target not in PACKAGES and layer_of(target) > layer_of(module):
                found.append(
                    f"{module} ({names[layer_of(module)]}) imports {target} ({names[layer_of(target)]})"
                )
    return found


def test_the_detector_finds_an_upward_import(tmp_path):
    for folder in ("pipelines", "pipelines/core", "pipelines/stages", "flows"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "core" / "a.py").write_text("def f():\n    from pipelines.stages.b import x\n")
    (tmp_path / "pipelines" / "stages" / "b.py").write_text("from pipelines.core.a import f\n")
    (tmp_path / "flows" / "c.py").write_text("import pipelines.stages.b\n")
    assert upward_imports(import_graph(tmp_path)) == [
        "pipelines.core.a (core) imports pipelines.stages.b (stages and serving)"
    ]


def test_imports_point_down_only():
    assert upward_imports(import_graph()) == []


def test_the_served_model_imports_only_the_model_of_the_project():
    """What travels inside a logged model (pipelines/serving/served_code.py) is all it imports."""
    from pipelines.serving.served_code import INFERENCE_MODULES

    imported = import_graph()["pipelines.serving.completion"]
    carried = {path.removesuffix(".py").replace("/", ".") for path in INFERENCE_MODULES}
    assert imported - set(PACKAGES) - {"pipelines.core"} == carried


def test_the_detector_finds_a_circle(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "a.py").write_text("from pipelines.b import x\n")
    (tmp_path / "pipelines" / "b.py").write_text("def f():\n    import flows.c\n")
    (tmp_path / "flows" / "c.py").write_text("import pipelines.a\n")
    assert circles(import_graph(tmp_path)) == [["flows.c", "pipelines.a", "pipelines.b"]]


def test_no_import_circle_in_pipelines_or_flows():
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert circles(graph) == []


def test_no_module_of_flows_hides_a_package_when_prefect_loads_the_flow_file():
    """A worker loads `flows/training.py` by path, and Prefect puts flows/ first on sys.path
    (prefect.utilities.importtools.load_script_as_module): a flows/dvc.py then answered every
    `import dvc` in the flow run, and each scheduled run failed with "'dvc' is not a package"."""
    import importlib.util
    import sys

    hidden = []
    for path in (ROOT / "flows").glob("*.py"):
        name = path.stem
        if name in sys.stdlib_module_names or (name != "__init__" and importlib.util.find_spec(name)):
            hidden.append(name)
    assert not hidden, f"flows/ modules named like importable packages: {hidden}"
