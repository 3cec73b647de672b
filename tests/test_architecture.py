"""The package's contracts: the library takes plain values, and doc/ARCHITECTURE.md maps every module."""
import ast

from conftest import REPO

PACKAGE = REPO / "image_similarity"
MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py")


def _imported_names(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_no_module_imports_parameters_or_helpers():
    """helpers.py is the only bridge between PARAMETERS.py and the library."""
    offenders = {}
    for path in [PACKAGE / "__init__.py", *MODULES]:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names = {name.split(".")[0] for name in _imported_names(tree)} & {"PARAMETERS", "helpers"}
        # A function taking the PARAMETERS module (by the scripts' name for it, P) is the same dependency.
        takes_p = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and "P" in [arg.arg for arg in node.args.args + node.args.kwonlyargs]]
        if names or takes_p:
            offenders[path.name] = sorted(names) + takes_p
    assert not offenders, f"library modules that know PARAMETERS: {offenders}"


def test_architecture_names_every_module():
    text = (REPO / "doc" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [path.name for path in MODULES if f"`{path.name}`" not in text]
    assert MODULES and not missing, f"doc/ARCHITECTURE.md does not name {missing}"
