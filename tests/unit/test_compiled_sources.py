"""What mypyc compiles differently from the interpreter, checked in the sources of the compiled
modules so that an edit cannot bring it back unseen."""

from __future__ import annotations

import ast
from pathlib import Path

from proxy import compiled

ROOT = Path(compiled.__file__).resolve().parent.parent


def _rebound_except_names(tree: ast.AST) -> list[str]:
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        caught: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                caught.setdefault(node.name, set()).add(ast.unparse(node.type))
        found += [
            f"{function.name}:{function.lineno} `{name}` for {sorted(types)}"
            for name, types in caught.items()
            if len(types) > 1
        ]
    return found


def test_no_compiled_function_reuses_an_except_name_for_another_type() -> None:
    """Compiled, `except A as e` gives `e` the type A for the whole function: a later
    `except B as e` then raises TypeError where it should handle B (an HTTP/2 client that spent
    its rapid-reset budget got a torn connection instead of GOAWAY ENHANCE_YOUR_CALM)."""
    found = []
    for name in compiled.MODULES:
        path = ROOT / (name.replace(".", "/") + ".py")
        found += [f"{name} {where}" for where in _rebound_except_names(ast.parse(path.read_text()))]
    assert found == []


def test_the_check_sees_a_rebound_name() -> None:
    tree = ast.parse(
        "def f():\n try: pass\n except KeyError as e: pass\n except ValueError as e: pass\n"
    )
    assert _rebound_except_names(tree) == ["f:1 `e` for ['KeyError', 'ValueError']"]


def _declared(cls: ast.ClassDef) -> set[str]:
    """The attributes a class declares: annotated at class level or on `self` in its methods."""
    names = {
        node.target.id
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    for node in ast.walk(cls):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
        ):
            names.add(target.attr)
    return names


def test_no_compiled_class_declares_again_what_its_base_declares() -> None:
    """Compiled, an attribute a subclass declares again is visited twice by the garbage
    collector's traversal, which then never frees a reference cycle through it: every HTTP/2
    stream and its exchange stayed in memory (1.2 KB per stream, caught by the 100k-stream
    memory test)."""
    classes: dict[str, tuple[ast.ClassDef, list[str]]] = {}
    for name in compiled.MODULES:
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = (node, bases)

    def inherited(name: str) -> set[str]:
        bases = classes[name][1]
        found = set()
        for base in bases:
            if base in classes:
                found |= _declared(classes[base][0]) | inherited(base)
        return found

    again = {
        name: sorted(_declared(node) & inherited(name))
        for name, (node, _) in classes.items()
        if _declared(node) & inherited(name)
    }
    assert again == {}
