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
    """The names in a class's `__slots__` (plain or annotated), read from its source."""
    values = [
        item.value
        for item in node.body
        if (
            isinstance(item, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets)
        )
        or (
            isinstance(item, ast.AnnAssign)
            and isinstance(item.target, ast.Name)
            and item.target.id == "__slots__"
        )
    ]
    return {
        e.value
        for value in values
        if value is not None
        for e in ast.walk(value)
        if isinstance(e, ast.Constant) and isinstance(e.value, str)
    }


def _interpreted_subclasses(base: type) -> dict[str, ast.ClassDef]:
    """Every class of an interpreted module of the package that derives from `base`, directly
    or through other classes of the package (by name, in the sources: nothing is imported)."""
    compiled_files = {ROOT / (name.replace(".", "/") + ".py") for name in compiled.MODULES}
    classes = [
        (path, node)
        for path in sorted((ROOT / "proxy").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    ]

    names = {base.__name__}  # the package's classes derive from its names, not `module.Name`
    derived: dict[str, tuple[Path, ast.ClassDef]] = {}
    while True:
        more = {
            f"{path.relative_to(ROOT)}:{node.name}": (path, node)
            for path, node in classes
            if any(isinstance(b, ast.Name) and b.id in names for b in node.bases)
        }
        if more.keys() <= derived.keys():
            break
        derived |= more
        names |= {node.name for _, node in more.values()}
    return {where: node for where, (path, node) in derived.items() if path not in compiled_files}


def test_no_interpreted_subclass_declares_a_native_bases_attribute_again() -> None:
    """An interpreted subclass that lists one of its native base's attributes in its own
    `__slots__` hides the native field: compiled code reads the base's, Python code the
    subclass's (h11's server codec kept `paused` in its slots when `ServerCodec` took it).
    The subclasses are found in the sources, so a new one is checked too."""
    found: set[str] = set()
    for base in (ServerCodec, ClientCodec, Downstream):
        node = _class_node(base)
        declared = _declared(node) | _slots(node)
        for where, sub in _interpreted_subclasses(base).items():
            found.add(sub.name)
            assert _slots(sub) & declared == set(), (base, where)
    # the search finds the ones there are today (it cannot pass by finding none)
    assert {"H11Server", "H11Client", "H2UpstreamStream"} <= found, found


def test_slots_are_read_from_the_source() -> None:
    assert _slots(_class_node(ServerCodec)) == {"paused"} == _declared(_class_node(ServerCodec))
    assert "sink" in _slots(_class_node(H11Server))
    annotated = ast.parse("class A:\n    __slots__: tuple[str, ...] = ('x', 'y')\n").body[0]
    assert isinstance(annotated, ast.ClassDef) and _slots(annotated) == {"x", "y"}
