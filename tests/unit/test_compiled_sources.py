"""What mypyc compiles differently from the interpreter, checked in the sources of the compiled
modules so that an edit cannot bring it back unseen."""

from __future__ import annotations

import ast
from pathlib import Path

from proxy import compiled
from proxy.core.client_side import Downstream
from proxy.core.links import ClientCodec
from proxy.http1.codec import ServerCodec
from proxy.http1.connection import Http1Connection
from proxy.http1.h11_codec import H11Client, H11Server
from proxy.http1.httptools_client import HttptoolsClient
from proxy.http1.httptools_server import HttptoolsServer
from proxy.http2.stream import H2Stream
from proxy.http2.upstream_stream import H2UpstreamStream

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


def _constants_not_final(tree: ast.Module) -> list[str]:
    """Module-level names bound once with `=` (not type aliases, not `__all__`): compiled, each
    read of one is a dict lookup in the module's globals unless it is `Final`."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                found += [
                    f"{n.id}:{node.lineno}"
                    for n in names
                    if isinstance(n, ast.Name) and n.id.lstrip("_").isupper()
                ]
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id.lstrip("_").isupper()
            and "Final" not in ast.unparse(node.annotation)
        ):
            found.append(f"{node.target.id}:{node.lineno}")
    return found


def test_the_compiled_modules_constants_are_final() -> None:
    """A constant read per request or per frame (a framing state, an event code, a regex) costs
    a globals lookup each time unless it is `Final` (then an int is a C constant, anything else
    a C static): some 30 lookups per HTTP/1.1 request before they were."""
    found = []
    for name in compiled.MODULES:
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        found += [f"{name} {where}" for where in _constants_not_final(tree)]
    assert found == []


def test_the_final_check_sees_a_plain_constant() -> None:
    tree = ast.parse("A = 1\nB: Final = 2\n_C, _D = range(2)\nlog = x\nE: int = 3\n")
    assert _constants_not_final(tree) == ["A:1", "_C:3", "_D:3", "E:5"]


def _undefined(base: type, subclasses: tuple[type, ...], count: int) -> dict[str, list[str]]:
    names = [n for n, v in vars(base).items() if callable(v) and not n.startswith("_")]
    assert len(names) == count, names
    missing = {
        c.__name__: [n for n in names if getattr(c, n) is getattr(base, n)] for c in subclasses
    }
    return {name: left for name, left in missing.items() if left}


def test_every_downstream_defines_every_method_of_downstream() -> None:
    """`Downstream` is a native base (its calls go through a vtable, not by name): a method an
    HTTP/1.1 connection or an HTTP/2 stream did not define would raise NotImplementedError."""
    assert _undefined(Downstream, (Http1Connection, H2Stream), 13) == {}


def test_every_codec_defines_every_method_of_its_base() -> None:
    """The HTTP/1.1 codecs' bases are native too: every server codec (httptools, h11) and every
    client codec (httptools, h11, the h2c stream) defines each method, or a request through it
    would raise NotImplementedError."""
    assert _undefined(ServerCodec, (HttptoolsServer, H11Server), 11) == {}
    assert _undefined(ClientCodec, (HttptoolsClient, H11Client, H2UpstreamStream), 7) == {}


def _class_node(cls: type) -> ast.ClassDef:
    """A class's definition, read from its module's source (a compiled class keeps neither
    its `__slots__` nor its annotations)."""
    tree = ast.parse((ROOT / (cls.__module__.replace(".", "/") + ".py")).read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)


def _slots(node: ast.ClassDef) -> set[str]:
    return {
        e.value
        for item in node.body
        if isinstance(item, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets)
        for e in ast.walk(item.value)
        if isinstance(e, ast.Constant) and isinstance(e.value, str)
    }


def test_no_interpreted_subclass_declares_a_native_bases_attribute_again() -> None:
    """An interpreted subclass that lists one of its native base's attributes in its own
    `__slots__` hides the native field: compiled code reads the base's, Python code the
    subclass's (h11's server codec kept `paused` in its slots when `ServerCodec` took it)."""
    for base, subclasses in (
        (ServerCodec, (H11Server,)),
        (ClientCodec, (H11Client, H2UpstreamStream)),
    ):
        node = _class_node(base)
        declared = _declared(node) | _slots(node)
        for cls in subclasses:
            assert _slots(_class_node(cls)) & declared == set(), (base, cls)


def test_slots_are_read_from_the_source() -> None:
    assert _slots(_class_node(ServerCodec)) == {"paused"} == _declared(_class_node(ServerCodec))
    assert "sink" in _slots(_class_node(H11Server))
