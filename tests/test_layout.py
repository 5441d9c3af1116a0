"""The package's layout (docs/design.md): the public paths users have, and imports that follow
the flow of a run one way."""

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "resnet_jax"
NETWORKS = ("models", "layers", "vgg", "initializers", "flops", "convert", "linen", "cpu")
COMMANDS = ("main", "evaluate", "report")
# Each part of the package and the parts it may import (besides itself).
MAY_IMPORT = {
    "networks": set(),
    "run": set(),
    "data": {"run"},
    "distributed": {"run"},
    "training": {"networks", "run", "data", "distributed"},
    "cli": {"run"},
    "analysis": {"networks", "run", "data", "distributed", "training", "cli"},
    "commands": {"networks", "run", "data", "distributed", "training", "cli", "analysis"},
}


def _part(module: str) -> str:
    """The part of the package that `resnet_jax.X[.Y]` belongs to."""
    name = module.split(".")[1]
    if name in NETWORKS:
        return "networks"
    if name in COMMANDS:
        return "commands"
    assert name in MAY_IMPORT, f"{module}: a module of no known part (docs/design.md's tree)"
    return name


def _imports(path: pathlib.Path) -> set[str]:
    """The resnet_jax modules that `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnet_jax"):
            if node.module == "resnet_jax":
                found.update(f"resnet_jax.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("resnet_jax."))
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] != "__init__":
            yield ".".join(parts), path


def test_every_part_of_the_package_is_a_package_with_its_docstring():
    for part in MAY_IMPORT:
        if part in ("networks", "commands"):
            continue
        init = PACKAGE / part / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} says nothing of its package"


def test_imports_follow_the_flow_of_a_run_one_way():
    wrong = []
    for module, path in _modules():
        mine = _part(module)
        for target in _imports(path):
            theirs = _part(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_import_against_the_flow(tmp_path):
    bad = tmp_path / "module.py"
    bad.write_text("def f():\n    from resnet_jax.training import loop\n")
    (found,) = _imports(bad)
    assert _part(found) == "training" and "training" not in MAY_IMPORT["data"]


@pytest.mark.parametrize("name", ["models", "flops", "convert", "linen", "layers", "vgg"])
def test_the_public_paths_stay(name):
    module = importlib.import_module(f"resnet_jax.{name}")
    assert module.__file__ == str(PACKAGE / f"{name}.py")


def test_the_commands_are_where_users_run_them():
    for name in COMMANDS:
        assert (PACKAGE / f"{name}.py").is_file()
        source = (PACKAGE / f"{name}.py").read_text()
        assert 'if __name__ == "__main__":' in source, f"python -m resnet_jax.{name} would do nothing"
