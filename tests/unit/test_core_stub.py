"""src/fastgw/_core.pyi names only what the compiled core has, and every public
class and function of the core is in it."""

from __future__ import annotations

import ast
from pathlib import Path

import fastgw._core as core

STUB = Path(core.__file__).with_name("_core.pyi")


def stub_names() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets)
            out[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            out[node.name] = set()
        elif isinstance(node, ast.AnnAssign):       # a module-level constant
            out[node.target.id] = set()
    return out


def test_every_stub_name_exists_in_the_core():
    for name, members in stub_names().items():
        obj = getattr(core, name)
        for member in members - {"__init__"}:
            assert hasattr(obj, member), f"{name}.{member} is in _core.pyi, not in the core"


def test_every_public_core_name_is_in_the_stub():
    public = {n for n in dir(core) if not n.startswith("_")}
    assert public <= set(stub_names()), f"not in _core.pyi: {public - set(stub_names())}"
