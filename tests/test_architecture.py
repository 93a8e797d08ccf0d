"""The package's architecture, checked from its source (docs/design.md).

Layers, lowest first; a module imports only from its own layer and those listed for it:

    fold_math                 pure numpy, no TensorFlow
    errors, report            shared records, import nothing of tf_bnfuse
    graph/                    GraphDef plumbing                       <- fold_math
    passes/                   pass context, runner, grammar, passes   <- graph, fold_math
    savedmodel/               SavedModel I/O                          <- graph
    verify/                   test inputs, comparison, TFLite         <- savedmodel, graph
    api, cli, config, phases/ on top                                  <- everything
"""

import ast
import os

import pytest

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tf_bnfuse")
SHARED = {"errors", "report"}
ALLOWED = {  # layer -> the layers it may import (besides itself and SHARED)
    "fold_math": set(),
    "shared": set(),
    "graph": {"fold_math"},
    "passes": {"graph", "fold_math"},
    "savedmodel": {"graph"},
    "verify": {"savedmodel", "graph"},
    "top": {"fold_math", "graph", "passes", "savedmodel", "verify"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 8
MAX_RUN_PART_FIELDS = 12
TF_INTERNAL = "graph/tf_internal.py"


def _modules():
    """{path relative to the package: source} of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    found[os.path.relpath(path, PACKAGE)] = f.read()
    return found


MODULES = _modules()


def _layer(relative):
    """The layer of a module path ("graph/index.py") or dotted name below tf_bnfuse ("graph.index")."""
    first = relative.replace("\\", "/").replace(".", "/").split("/")[0]
    if first in ("graph", "passes", "savedmodel", "verify", "fold_math"):
        return first
    return "shared" if first in SHARED else "top"


def _imports(source):
    """(module names imported, with their dotted paths) of a source."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + ["%s.%s" % (node.module, alias.name) for alias in node.names]
    return names


def _package_imports(source):
    """The tf_bnfuse modules a source imports, as names below tf_bnfuse ("graph.index", "errors")."""
    found = set()
    for name in _imports(source):
        if name == "tf_bnfuse" or not name.startswith("tf_bnfuse."):
            continue
        parts = name.split(".")[1:]
        # "from tf_bnfuse.graph import names" names a module; "from tf_bnfuse.graph import GraphIndex" a name in one
        found.add(".".join(parts))
    return found


@pytest.mark.parametrize("relative", sorted(MODULES))
def test_each_module_imports_only_from_the_layers_below_it(relative):
    layer = _layer(relative)
    wrong = sorted(name for name in _package_imports(MODULES[relative])
                   if _layer(name) not in ALLOWED[layer] | {layer, "shared"})
    assert wrong == [], "%s (layer %s) imports %s" % (relative, layer, wrong)


def test_the_fold_math_imports_no_tensorflow():
    assert not [n for n in _imports(MODULES["fold_math.py"]) if n.split(".")[0] in ("tensorflow", "keras")]


# TensorFlow's namespaces of internals reached as attributes (tf.__internal__.tracking...)
TF_PRIVATE_NAMESPACES = {"__internal__", "__operators__"}
PYTHON_PRIVATE_USES = {"os._exit", "atexit._run_exitfuncs"}  # the CLI's exit without teardown: Python's, not TF's


def _private_attributes(source):
    """The private attributes a source reads off objects other than self and cls ("obj._name",
    and getattr(obj, "_name"))."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in TF_PRIVATE_NAMESPACES:
            found.append("%s.%s" % (ast.unparse(node.value), node.attr))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if ast.unparse(node.value) not in ("self", "cls"):
                found.append("%s.%s" % (ast.unparse(node.value), node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
            found.append("%s(..., %r)" % (node.func.id, node.args[1].value))
    return found


def test_tensorflow_internals_are_used_from_one_module():
    users = sorted(path for path, source in MODULES.items()
                   if any(n.startswith("tensorflow.python") for n in _imports(source)))
    assert users == [TF_INTERNAL]
    private = {path: uses for path, source in MODULES.items() if path != TF_INTERNAL
               for uses in [sorted(set(_private_attributes(source)) - PYTHON_PRIVATE_USES)] if uses}
    assert private == {}, "private attributes used outside %s" % TF_INTERNAL


def test_sizes():
    too_long = {path: source.count("\n") for path, source in MODULES.items()
                if source.count("\n") > MAX_MODULE_LINES}
    assert too_long == {}
    long_functions = []
    for path, source in MODULES.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append("%s:%s (%d lines)" % (path, node.name, length))
    assert long_functions == []
    assert len([p for p in MODULES if "/" not in p]) <= MAX_TOP_LEVEL_MODULES


@pytest.mark.parametrize("relative", sorted(p for p in MODULES if _layer(p) in ("graph", "passes")))
def test_graph_and_passes_keep_no_module_state(relative):
    """What a pass depends on comes in its PassContext: module-level names in these layers are
    constants (UPPER_CASE), aliases of a module's functions, or functions and classes."""
    tree = ast.parse(MODULES[relative])
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))]
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            name = target.id if isinstance(target, ast.Name) else None
            if name is None or name.lstrip("_").isupper() or name == "__all__":
                continue
            assert isinstance(node.value, (ast.Name, ast.Attribute)), (
                "%s: module-level %s = %s" % (relative, name, ast.unparse(node.value)))


def test_one_helper_per_graph_primitive():
    """Control inputs are told apart, and new GraphDefs made, in graph/names.py alone."""
    for path, source in MODULES.items():
        if path == "graph/names.py":
            continue
        assert 'startswith("^")' not in source, path
        assert "GraphDef()" not in source, path


@pytest.mark.parametrize("relative", sorted(p for p in MODULES if p == "api.py" or p.startswith("phases/")))
def test_a_run_keeps_its_state_in_named_parts(relative):
    """No bag of state that every phase reads and writes: each part of a run is a small record
    made by one phase (phases/parts.py), frozen: a later phase makes a new one, never changes it."""
    for node in ast.walk(ast.parse(MODULES[relative])):
        if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            fields = [s for s in node.body if isinstance(s, ast.AnnAssign)]
            assert len(fields) <= MAX_RUN_PART_FIELDS, "%s: %s has %d fields" % (relative, node.name, len(fields))
            if relative == "phases/parts.py":
                assert any("frozen=True" in ast.unparse(d) for d in node.decorator_list), node.name


def test_the_supported_tensorflow_range_is_the_one_the_tests_run_on():
    """pyproject.toml's TensorFlow range admits the TensorFlow under test, and constraints.txt pins it."""
    import tomllib
    import tensorflow as tf
    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dependencies = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    [tensorflow] = [d for d in dependencies if d.name == "tensorflow"]
    assert tensorflow.specifier.contains(tf.__version__), (str(tensorflow.specifier), tf.__version__)
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        assert "tensorflow==%s\n" % tf.__version__ in f.read()
