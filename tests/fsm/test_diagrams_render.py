"""specs/diagrams/*.md really render with Mermaid (scripts/check_diagrams_render.py).

Needs headless chromium, the `playwright` package and a mermaid.min.js (see the script's docstring);
skips with the missing piece named when any is absent, as on CI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_diagrams_render.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_diagrams_render", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


check = _load_script()


def test_every_diagram_file_has_one_mermaid_block() -> None:
    blocks = check.extract_blocks()
    pages = sorted(p.stem for p in check.DEFAULT_DIAGRAMS_DIR.glob("*.md") if p.name != "README.md")
    assert sorted(b.name for b in blocks) == pages
    assert all(b.text.startswith("stateDiagram-v2\n") for b in blocks)


@pytest.mark.timeout(120)
def test_diagrams_render_with_mermaid(tmp_path: Path) -> None:
    why = check.missing_prerequisite()
    if why:
        pytest.skip(f"Mermaid render check not run: {why}")
    blocks = check.extract_blocks()
    results = check.render_diagrams(blocks, check.find_mermaid_js(), tmp_path)
    failures = [r.error for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    for r in results:
        states = sum(1 for line in r.block.text.splitlines() if line.lstrip().startswith('state "'))
        edges = sum(1 for line in r.block.text.splitlines() if " --> " in line)
        # every state plus the [*] start and end markers drawn, every edge drawn, a PNG saved
        assert r.nodes == states + 2, r.line()
        assert r.edges == edges, r.line()
        assert r.png is not None and r.png.stat().st_size > 0, r.line()
