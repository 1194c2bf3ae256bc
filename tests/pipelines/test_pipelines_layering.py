"""pipelines/ imports only pp1.protocol (and itself), never torch.distributed (pp1.md section 9)."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def test_pipelines_import_only_protocol() -> None:
    files = sorted(PIPELINES.rglob("*.py"))
    assert files
    bad = []
    for f in files:
        for mod in _imports(f):
            ours = mod == "pp1" or mod.startswith("pp1.")
            if ours and not mod.startswith(("pp1.protocol", "pp1.pipelines")):
                bad.append(f"{f.relative_to(PIPELINES)}: {mod}")
            if mod.startswith("torch.distributed"):
                bad.append(f"{f.relative_to(PIPELINES)}: {mod} (go through the Communicator)")
    assert not bad, bad
