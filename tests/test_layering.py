"""The house's layering, held by an AST scan of every module (no imports executed).

(a) ``protocol/`` and ``fsm/`` do no I/O: no torch.distributed, sockets, threads, processes, asyncio,
    subprocess, select, http/urllib, no ``time.sleep`` and no builtin ``open()``.
    ``pipelines/`` (model code) never touches torch.distributed: collectives go through the
    Communicator handed in.
(b) Arrows point down: protocol -> nothing of ours; fsm -> protocol; pipelines -> protocol;
    adapters -> protocol, fsm, pipelines; server -> adapters and below; testing (test doubles, fault
    drills and dev tools, out of the shipped runtime) -> all but the CLI; pp1 (the CLI) -> anything.
    Inside adapters/, by layer: transport (torch.distributed runtime, wire, channels: nothing of fsm
    or pipelines) <- rank (one process of any role: options, startup, observe, faults) <- front (the
    front's engine, what the server drives) <- roles (the executors of each role) ; launch
    (launcher, bench) sees rank only. Nothing shipped imports ``pp1.testing``.
    Our code is imported as ``pp1.xxx``, never by its folder name.

A failure names the file, the line and the forbidden import or call.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> the subpackage it installs as (pyproject's package-dir).
FOLDERS: dict[str, str] = {
    "protocol": "pp1.protocol",
    "fsm": "pp1.fsm",
    "pipelines": "pp1.pipelines",
    "adapters": "pp1.adapters",
    "server": "pp1.server",
    "testing": "pp1.testing",
    "pp1": "pp1",
}
LAYERS = ("protocol", "fsm", "pipelines", "adapters", "server", "testing", "pp1")
_BELOW_ADAPTERS = {"protocol", "fsm", "pipelines"}
ALLOWED: dict[str, set[str] | None] = {  # None: anything
    "protocol": {"protocol"},
    "fsm": {"fsm", "protocol"},
    "pipelines": {"pipelines", "protocol"},
    "adapters": {"adapters", *_BELOW_ADAPTERS},
    "server": {"server", "adapters", *_BELOW_ADAPTERS},
    "testing": {"testing", "server", "adapters", *_BELOW_ADAPTERS},  # above the runtime, never imported by it
    "pp1": None,
}
# adapters/<sub>/ -> the adapters sub-layers it may import (its own included)
ADAPTER_SUBLAYERS = ("transport", "rank", "front", "roles", "launch")
ADAPTER_ALLOWED: dict[str, set[str]] = {
    "transport": {"transport"},
    "rank": {"transport", "rank"},
    "front": {"transport", "rank", "front"},
    "roles": {"transport", "rank", "front", "roles"},
    "launch": {"rank", "launch"},
}
# what each adapters sub-layer may import of the layers below adapters
ADAPTER_BELOW: dict[str, set[str]] = {
    "transport": {"protocol"},
    "rank": _BELOW_ADAPTERS,
    "front": _BELOW_ADAPTERS,
    "roles": _BELOW_ADAPTERS,
    "launch": _BELOW_ADAPTERS,
}

IO_MODULES = (
    "torch.distributed",
    "torch.multiprocessing",
    "socket",
    "socketserver",
    "ssl",
    "threading",
    "_thread",
    "multiprocessing",
    "concurrent",
    "asyncio",
    "subprocess",
    "select",
    "selectors",
    "http",
    "urllib",
    "requests",
    "httpx",
    "aiohttp",
)
NO_IO_LAYERS = {"protocol": IO_MODULES, "fsm": IO_MODULES, "pipelines": ("torch.distributed",)}
IO_CALLS = {"open", "time.sleep", "sleep", "io.open", "os.system", "os.popen", "os.fdopen"}
IO_CALL_LAYERS = {"protocol", "fsm"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} ({self.rule})"


def layer_of(module: str) -> str | None:
    """``pp1.fsm.chunk`` -> "fsm"; ``pp1`` / ``pp1.cli`` -> "pp1"; not ours -> None."""
    parts = module.split(".")
    if parts[0] != "pp1":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "pp1":
        return parts[1]
    return "pp1"


def adapter_sublayer(module: str) -> str | None:
    """``pp1.adapters.transport.wire`` -> "transport"; other modules -> None."""
    parts = module.split(".")
    if len(parts) > 2 and parts[:2] == ["pp1", "adapters"] and parts[2] in ADAPTER_SUBLAYERS:
        return parts[2]
    return None


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is_package) of a file in one of our folders."""
    rel = path.relative_to(root)
    pkg = FOLDERS[rel.parts[0]]
    rest = list(rel.parts[1:])
    is_pkg = rest[-1] == "__init__.py"
    rest = rest[:-1] if is_pkg else [*rest[:-1], rest[-1].removesuffix(".py")]
    return ".".join([pkg, *rest]), is_pkg


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def imported_modules(tree: ast.AST, module: str, is_pkg: bool):
    """Yield (line, absolute module name) for every import, relative ones resolved; ``from m import n``
    yields both ``m`` and ``m.n`` (n may be a submodule); literal dynamic imports count too."""
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if node.module or not node.level:
                yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call):
            fn = _dotted(node.func)
            if fn in {"importlib.import_module", "import_module", "__import__"} and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value


def io_calls(tree: ast.AST):
    """Yield (line, name) for calls that do I/O: open(), time.sleep(), os.system(), ...; plus any
    reference to ``torch.distributed`` through ``import torch``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = _dotted(node.func)
            if fn in IO_CALLS:
                yield node.lineno, f"{fn}()"


def scan_file(path: Path, root: Path) -> list[Violation]:
    rel = path.relative_to(root).as_posix()
    layer = rel.split("/")[0]
    module, is_pkg = module_name(path, root)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    except SyntaxError as exc:
        return [Violation(rel, exc.lineno or 0, f"syntax error: {exc.msg}", "every module must parse")]
    out: list[Violation] = []
    forbidden_io = NO_IO_LAYERS.get(layer, ())
    allowed = ALLOWED[layer]
    for line, name in imported_modules(tree, module, is_pkg):
        top = name.split(".")[0]
        for bad in forbidden_io:
            if name == bad or name.startswith(bad + "."):
                out.append(Violation(rel, line, f"imports {name}", f"{layer}/ does no I/O"))
        if top in FOLDERS and top != "pp1":
            out.append(
                Violation(rel, line, f"imports {name}", "import our code as pp1.xxx, not by folder name")
            )
        target = layer_of(name)
        sub = adapter_sublayer(module)
        if sub is not None and target is not None:
            target_sub = adapter_sublayer(name)
            if target == "adapters" and target_sub is not None and target_sub not in ADAPTER_ALLOWED[sub]:
                out.append(Violation(rel, line, f"imports {name}",
                                     f"adapters/{sub}/ may import only adapters/{sorted(ADAPTER_ALLOWED[sub])}"))
            elif target in _BELOW_ADAPTERS and target not in ADAPTER_BELOW[sub]:
                out.append(Violation(rel, line, f"imports {name}",
                                     f"adapters/{sub}/ may import only {sorted(ADAPTER_BELOW[sub])} below adapters"))
        if target is not None and allowed is not None and target not in allowed:
            # ``from pp1 import protocol`` yields "pp1" too; only the submodule form decides then.
            if target == "pp1" and name == "pp1" and _imports_only_subpackages(tree, line):
                continue
            out.append(
                Violation(rel, line, f"imports {name}", f"{layer}/ may import only {sorted(allowed)} of ours")
            )
    if layer in NO_IO_LAYERS:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _dotted(node) == "torch.distributed":
                out.append(Violation(rel, node.lineno, "uses torch.distributed", f"{layer}/ does no I/O"))
    if layer in IO_CALL_LAYERS:
        for line, call in io_calls(tree):
            out.append(Violation(rel, line, f"calls {call}", f"{layer}/ does no I/O"))
    return sorted(set(out), key=lambda v: (v.path, v.line, v.what))


def _imports_only_subpackages(tree: ast.AST, line: int) -> bool:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.lineno == line
            and node.module == "pp1"
            and not node.level
        ):
            return all(a.name in FOLDERS and a.name != "pp1" for a in node.names)
    return False


def scan(root: Path, layers: tuple[str, ...] = LAYERS) -> list[Violation]:
    out: list[Violation] = []
    for layer in layers:
        folder = root / layer
        if folder.is_dir():
            for path in sorted(folder.rglob("*.py")):
                out.extend(scan_file(path, root))
    return out


# -- the rules, on the real tree -----------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_holds(layer: str) -> None:
    violations = scan(ROOT, (layer,))
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


def test_every_layer_has_modules() -> None:
    for layer in LAYERS:
        assert list((ROOT / layer).rglob("*.py")), f"{layer}/ has no modules"


# -- the scanner catches what it should (a fake tree) ---------------------------------------------------


def _write(root: Path, rel: str, src: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(src)


BAD_SOURCES = [
    ("protocol/a.py", "import socket\n", "imports socket"),
    ("protocol/a.py", "import torch.distributed as dist\n", "imports torch.distributed"),
    ("protocol/a.py", "from torch import distributed\n", "imports torch.distributed"),
    ("protocol/a.py", "import torch\nx = torch.distributed.get_rank()\n", "uses torch.distributed"),
    ("fsm/a.py", "from threading import Thread\n", "imports threading"),
    ("fsm/a.py", "import asyncio\n", "imports asyncio"),
    ("fsm/a.py", "from concurrent.futures import Future\n", "imports concurrent.futures"),
    ("fsm/a.py", "import subprocess\n", "imports subprocess"),
    ("fsm/a.py", "import multiprocessing\n", "imports multiprocessing"),
    ("fsm/a.py", "import select\n", "imports select"),
    ("fsm/a.py", "from http import server\n", "imports http"),
    ("fsm/a.py", "import urllib.request\n", "imports urllib.request"),
    ("fsm/a.py", "import time\ntime.sleep(1)\n", "calls time.sleep()"),
    ("fsm/a.py", "from time import sleep\nsleep(1)\n", "calls sleep()"),
    ("protocol/a.py", "data = open('x').read()\n", "calls open()"),
    ("pipelines/reference/m.py", "import torch.distributed\n", "imports torch.distributed"),
    ("protocol/a.py", "from pp1.fsm import base\n", "imports pp1.fsm"),
    ("protocol/a.py", "from .. import fsm\n", "imports pp1.fsm"),
    ("protocol/a.py", "import pp1.cli\n", "imports pp1.cli"),
    ("fsm/a.py", "from pp1.pipelines.interface import ChunkCall\n", "imports pp1.pipelines.interface"),
    ("fsm/a.py", "from pp1 import adapters\n", "imports pp1.adapters"),
    ("pipelines/a.py", "from pp1.fsm.base import FAILED\n", "imports pp1.fsm.base"),
    ("pipelines/reference/a.py", "from ...adapters import runtime\n", "imports pp1.adapters"),
    ("adapters/a.py", "from pp1.server import app\n", "imports pp1.server"),
    (
        "adapters/a.py",
        "import importlib\nimportlib.import_module('pp1.server.app')\n",
        "imports pp1.server.app",
    ),
    ("server/a.py", "from pp1.cli import main\n", "imports pp1.cli"),
    ("server/a.py", "from pp1.testing.fake_front import FakeFront\n", "imports pp1.testing.fake_front"),
    ("adapters/a.py", "import pp1.testing\n", "imports pp1.testing"),
    ("adapters/a.py", "from protocol.messages import Action\n", "imports protocol.messages"),
    ("adapters/transport/a.py", "from pp1.fsm.chunk import ChunkMachine\n", "imports pp1.fsm.chunk"),
    ("adapters/transport/a.py", "from pp1.adapters.rank import observe\n", "imports pp1.adapters.rank.observe"),
    ("adapters/rank/a.py", "from pp1.adapters.roles.leader import x\n", "imports pp1.adapters.roles.leader"),
    ("adapters/front/a.py", "from pp1.adapters.roles import worker\n", "imports pp1.adapters.roles.worker"),
    ("adapters/launch/a.py", "from pp1.adapters.transport.runtime import x\n", "imports pp1.adapters.transport.runtime"),
    ("adapters/launch/a.py", "from pp1.testing import standin\n", "imports pp1.testing.standin"),
    ("server/a.py", "from pp1.testing.standin import factory\n", "imports pp1.testing.standin"),
    ("testing/a.py", "from pp1.cli import main\n", "imports pp1.cli"),
]


@pytest.mark.parametrize(("rel", "src", "what"), BAD_SOURCES, ids=[f"{r}:{w}" for r, _, w in BAD_SOURCES])
def test_scanner_catches(tmp_path: Path, rel: str, src: str, what: str) -> None:
    _write(tmp_path, rel, src)
    found = scan(tmp_path)
    assert any(v.what == what and v.path == rel and v.line >= 1 for v in found), found
    assert all(str(v).startswith(f"{rel}:") for v in found)


GOOD_SOURCES = [
    ("protocol/a.py", "from .messages import Action\nimport json, zlib, struct\nimport torch\n"),
    ("fsm/a.py", "import logging\nfrom pp1.protocol.messages import Action\nfrom .base import FAILED\n"),
    ("pipelines/reference/a.py", "from ..comm import Communicator\nfrom pp1.protocol import geometry\n"),
    (
        "adapters/a.py",
        "import threading, socket, time\nimport torch.distributed as dist\nfrom pp1 import fsm\n",
    ),
    ("server/a.py", "from pp1.adapters import runtime\nimport asyncio\n"),
    ("pp1/cli.py", "from pp1.server import app\nfrom pp1.adapters import launcher\n"),
    ("adapters/roles/a.py", "from pp1.adapters.front.engine import x\nfrom pp1.fsm import chunk\n"),
    ("adapters/transport/a.py", "from pp1.protocol.codec import encode\nfrom . import wire\n"),
    ("testing/a.py", "from pp1.adapters.roles import leader\n"),
    ("adapters/a.py", "with open('x') as f:\n    pass\nimport time\ntime.sleep(0)\n"),
]


@pytest.mark.parametrize(("rel", "src"), GOOD_SOURCES, ids=[r for r, _ in GOOD_SOURCES])
def test_scanner_allows(tmp_path: Path, rel: str, src: str) -> None:
    _write(tmp_path, rel, src)
    assert scan(tmp_path) == []
