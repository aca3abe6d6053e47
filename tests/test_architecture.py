"""The package's shape: no import cycle, kernels/ imported only lazily, files a reader can hold.

Read from the source with `ast` (nothing is imported), so a failure names the modules and files at fault.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinygrad_llm"
KERNEL_FILE_LIMIT = 300
FILE_LIMIT = 700
EXEMPT_FROM_LIMIT = {"functional.py"}  # one screen per op, many ops: long by design


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test):
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree):
    """Import statements run when the module is imported: outside any function body (and outside
    `if TYPE_CHECKING:` blocks, which never run)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_stmt(stmt)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    def visit_stmt(stmt):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            found.append(stmt)
        visit(stmt)

    visit(tree)
    return found


def _resolve(module, is_package, node):
    """The package modules an import statement in `module` loads (explicitly named ones only)."""
    targets = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            targets.append(alias.name)
        return [t for t in targets if t in MODULES]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    for alias in node.names:
        submodule = f"{prefix}.{alias.name}"
        targets.append(submodule if submodule in MODULES else prefix)
    return [t for t in targets if t in MODULES]


def _all_imports(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph(module_level_only=True):
    """{module: the package modules it imports}: at module level only, or counting imports inside
    functions too (what a reader follows)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        nodes = _module_level_imports(tree) if module_level_only else _all_imports(tree)
        edges = set()
        for node in nodes:
            edges.update(t for t in _resolve(module, is_package, node) if t != module)
        graph[module] = edges
    return graph


# Convenience methods that hand the work to a module above their own, importing it when called:
# GPT.from_pretrained / save_pretrained (hub.py loads and saves models) and BPETokenizer.from_pretrained /
# save_pretrained (hf_tokenizer.py reads and writes tokenizer files). They are the only upward imports.
DELEGATIONS = {("tinygrad_llm.model", "tinygrad_llm.hub"), ("tinygrad_llm.tokenizer", "tinygrad_llm.hf_tokenizer")}


def find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack = []

    def visit(node):
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == WHITE:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_resolve_reads_relative_and_absolute_imports():
    tree = ast.parse("from .tensor import Tensor\nfrom . import functional as F\n"
                     "import tinygrad_llm.nn\nfrom tinygrad_llm.kernels.cpu import attention\n"
                     "def f():\n    from . import model\n")
    nodes = _module_level_imports(tree)
    resolved = [t for n in nodes for t in _resolve("tinygrad_llm.train", False, n)]
    assert resolved == ["tinygrad_llm.tensor", "tinygrad_llm.functional", "tinygrad_llm.nn",
                        "tinygrad_llm.kernels.cpu.attention"]


def test_the_package_has_no_module_level_import_cycle():
    graph = import_graph()
    assert "tinygrad_llm.tensor" in graph and graph["tinygrad_llm.nn"]  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_counting_imports_inside_functions():
    graph = import_graph(module_level_only=False)
    for low, high in DELEGATIONS:
        assert high in graph[low], f"{low} no longer imports {high}: drop it from DELEGATIONS"
        graph[low] = graph[low] - {high}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (imports inside functions included): " + " -> ".join(cycle)


def test_only_kernels_and_the_lazy_loader_reach_kernels():
    offenders = []
    for module, path in MODULES.items():
        if module == "tinygrad_llm.kernels" or module.startswith("tinygrad_llm.kernels."):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _module_level_imports(tree):
            for target in _resolve(module, path.name == "__init__.py", node):
                if target == "tinygrad_llm.kernels" or target.startswith("tinygrad_llm.kernels."):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not offenders, "\n".join(offenders)
    # backend.py reaches kernels/ only through importlib on first use, never by an import statement
    backend = (PACKAGE / "backend.py").read_text()
    assert "tinygrad_llm.kernels." in backend and "importlib.import_module" in backend


def test_file_sizes():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        in_kernels = "kernels" in path.relative_to(PACKAGE).parts
        limit = KERNEL_FILE_LIMIT if in_kernels else FILE_LIMIT
        if path.name in EXEMPT_FROM_LIMIT and path.parent == PACKAGE:
            continue
        if lines > limit:
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines > {limit}")
    assert not too_long, "\n".join(too_long)
