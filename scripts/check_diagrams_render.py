#!/usr/bin/env python3
"""Render every Mermaid block of specs/diagrams/*.md with the real Mermaid library in headless
Chromium, and fail if any does not render.

`pp1 diagrams --check` and tests/fsm/test_fsm_diagrams.py only check the generated text's
structure; this runs Mermaid's own parser and renderer on it (``mermaid.parse`` then
``mermaid.render``), reports per diagram ok / the Mermaid error (with the line in the .md file),
the SVG's size and how many state nodes and edges it drew, and saves a PNG of each to --out.

Dev-only prerequisites (none is a project dependency; CI has none of them):

    apt-get install -y chromium                     # the browser (do NOT run `playwright install`)
    .venv/bin/pip install playwright                # the Python driver
    mkdir -p /tmp/mmd && cd /tmp/mmd && npm install mermaid   # dist/mermaid.min.js

Run:  .venv/bin/python scripts/check_diagrams_render.py [--mermaid-js PATH] [--out DIR]
Exit: 0 all rendered; 1 some diagram failed; 2 a prerequisite is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIAGRAMS_DIR = REPO / "specs" / "diagrams"
DEFAULT_OUT = Path("/tmp/diagram-renders")
MERMAID_JS_ENV = "PP1_MERMAID_JS"
MERMAID_JS_CANDIDATES = (
    Path("/tmp/mmd/node_modules/mermaid/dist/mermaid.min.js"),
    REPO / "node_modules" / "mermaid" / "dist" / "mermaid.min.js",
)
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--headless"]

FENCE_OPEN = re.compile(r"^```mermaid\s*$")
FENCE_CLOSE = re.compile(r"^```\s*$")
PARSE_LINE = re.compile(r"(?:Parse error on line|Lexical error on line) (\d+)")


@dataclass(frozen=True)
class Block:
    """One ```mermaid fenced block: its file, the file line of its first text line, its text."""

    path: Path
    first_line: int  # 1-based line in the .md file of the block's first line (after the fence)
    text: str

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class Result:
    block: Block
    ok: bool
    error: str = ""
    svg_chars: int = 0
    width: float = 0.0
    height: float = 0.0
    nodes: int = 0
    edges: int = 0
    png: Path | None = None
    seconds: float = 0.0

    def line(self) -> str:
        if self.ok:
            return (
                f"ok    {self.block.name:20s} svg {self.width:.0f}x{self.height:.0f} px, "
                f"{self.svg_chars} chars, {self.nodes} nodes, {self.edges} edges -> {self.png}"
            )
        return f"FAIL  {self.block.name:20s} {self.error}"


def extract_blocks(diagrams_dir: Path = DEFAULT_DIAGRAMS_DIR) -> list[Block]:
    """Every ```mermaid block of ``diagrams_dir/*.md``, files in name order."""
    blocks: list[Block] = []
    for path in sorted(diagrams_dir.glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if FENCE_OPEN.match(lines[i]):
                j = i + 1
                while j < len(lines) and not FENCE_CLOSE.match(lines[j]):
                    j += 1
                if j == len(lines):
                    raise ValueError(f"{path}:{i + 1}: ```mermaid block is never closed")
                blocks.append(Block(path, i + 2, "\n".join(lines[i + 1 : j]) + "\n"))
                i = j
            i += 1
    return blocks


def find_mermaid_js(explicit: str | Path | None = None) -> Path | None:
    """--mermaid-js, else $PP1_MERMAID_JS, else the first candidate that exists."""
    if explicit:
        p = Path(explicit)
        return p if p.is_file() else None
    env = os.environ.get(MERMAID_JS_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    return next((p for p in MERMAID_JS_CANDIDATES if p.is_file()), None)


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    return next((found for c in CHROMIUM_CANDIDATES if (found := shutil.which(c))), None)


def missing_prerequisite(mermaid_js: str | Path | None = None, chromium: str | None = None) -> str | None:
    """Why the render check cannot run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the `playwright` Python package is not installed (.venv/bin/pip install playwright)"
    if find_chromium(chromium) is None:
        return "no chromium browser on PATH (apt-get install -y chromium)"
    if find_mermaid_js(mermaid_js) is None:
        where = mermaid_js or os.environ.get(MERMAID_JS_ENV) or ", ".join(map(str, MERMAID_JS_CANDIDATES))
        return f"no mermaid.min.js at {where} (cd /tmp/mmd && npm install mermaid)"
    return None


PAGE = """<!doctype html><html><head><meta charset="utf-8">
<style>body{margin:0;background:white;font-family:sans-serif}
#out{display:inline-block;padding:16px;background:white}</style></head>
<body><div id="out"></div><div id="scratch"></div></body></html>"""

# Parse first (the clearest error), then render; report the SVG's natural size and what it drew.
RENDER_JS = """async ([id, text]) => {
  const out = document.getElementById('out');
  out.innerHTML = '';
  try {
    await mermaid.parse(text);
  } catch (e) {
    return {ok: false, stage: 'parse', error: String((e && e.message) || e)};
  }
  let svg;
  try {
    ({svg} = await mermaid.render(id, text, document.getElementById('scratch')));
  } catch (e) {
    return {ok: false, stage: 'render', error: String((e && e.message) || e)};
  } finally {
    document.getElementById('scratch').innerHTML = '';
  }
  out.innerHTML = svg;
  const el = out.querySelector('svg');
  const vb = el.viewBox && el.viewBox.baseVal;
  const width = vb && vb.width ? vb.width : el.getBoundingClientRect().width;
  const height = vb && vb.height ? vb.height : el.getBoundingClientRect().height;
  el.style.maxWidth = 'none';  // draw at natural size, not squeezed into the viewport
  el.setAttribute('width', width);
  el.setAttribute('height', height);
  const errorDrawn = svg.includes('Syntax error in text') || !!out.querySelector('.error-icon');
  return {
    ok: !errorDrawn, stage: errorDrawn ? 'render' : '',
    error: errorDrawn ? 'Mermaid drew its error graphic' : '',
    svg_chars: svg.length, width, height,
    nodes: out.querySelectorAll('g.node').length,
    edges: out.querySelectorAll('path.transition, .edgePaths path, g.edgePath').length,
  };
}"""


def _error_text(block: Block, stage: str, message: str) -> str:
    message = message.strip()
    where = f"{block.path.relative_to(REPO) if block.path.is_relative_to(REPO) else block.path}"
    m = PARSE_LINE.search(message)
    if m:
        n = int(m.group(1))
        file_line = block.first_line + n - 1
        text_lines = block.text.splitlines()
        src = text_lines[n - 1] if 0 < n <= len(text_lines) else ""
        where += f":{file_line} (diagram line {n}: {src.strip()!r})"
    return f"{where}: Mermaid {stage} error: " + " | ".join(message.splitlines())


def render_diagrams(
    blocks: list[Block],
    mermaid_js: Path,
    out_dir: Path = DEFAULT_OUT,
    chromium: str | None = None,
    timeout_ms: int = 60_000,
) -> list[Result]:
    """Render each block with Mermaid in headless Chromium; save ``<out_dir>/<name>.png`` of each."""
    from playwright.sync_api import sync_playwright

    exe = find_chromium(chromium)
    if exe is None:
        raise FileNotFoundError("no chromium browser found")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=2)
            page.set_default_timeout(timeout_ms)
            console_errors: list[str] = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            page.set_content(PAGE)
            page.add_script_tag(path=str(mermaid_js))
            page.evaluate(
                "() => mermaid.initialize({startOnLoad: false, securityLevel: 'strict',"
                " theme: 'default', suppressErrorRendering: true})"
            )
            for k, block in enumerate(blocks):
                t0 = time.perf_counter()
                console_errors.clear()
                r = page.evaluate(RENDER_JS, [f"diagram{k}", block.text])
                res = Result(block, ok=bool(r["ok"]))
                if res.ok:
                    res.svg_chars = r["svg_chars"]
                    res.width, res.height = r["width"], r["height"]
                    res.nodes, res.edges = r["nodes"], r["edges"]
                    res.png = out_dir / f"{block.name}.png"
                    page.locator("#out").screenshot(path=str(res.png))
                else:
                    msg = r["error"] + (
                        f" (page errors: {'; '.join(console_errors)})" if console_errors else ""
                    )
                    res.error = _error_text(block, r["stage"], msg)
                res.seconds = time.perf_counter() - t0
                results.append(res)
        finally:
            browser.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diagrams-dir", type=Path, default=DEFAULT_DIAGRAMS_DIR)
    ap.add_argument(
        "--mermaid-js",
        help=f"mermaid's dist/mermaid.min.js (default: ${MERMAID_JS_ENV}, else "
        + ", else ".join(map(str, MERMAID_JS_CANDIDATES))
        + ")",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG folder (default {DEFAULT_OUT})")
    ap.add_argument("--chromium", help="browser executable (default: chromium on PATH)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    why = missing_prerequisite(args.mermaid_js, args.chromium)
    if why:
        print(f"check_diagrams_render: cannot run: {why}", file=sys.stderr)
        return 2
    blocks = extract_blocks(args.diagrams_dir)
    if not blocks:
        print(f"check_diagrams_render: no ```mermaid blocks under {args.diagrams_dir}", file=sys.stderr)
        return 1
    mermaid_js = find_mermaid_js(args.mermaid_js)
    assert mermaid_js is not None
    t0 = time.perf_counter()
    results = render_diagrams(blocks, mermaid_js, args.out, args.chromium)
    elapsed = time.perf_counter() - t0
    for r in results:
        print(r.line())
    failed = [r for r in results if not r.ok]
    print(
        f"check_diagrams_render: {len(results) - len(failed)}/{len(results)} rendered with "
        f"{mermaid_js} in {elapsed:.1f} s; PNGs in {args.out}"
    )
    if args.json:
        rows = [
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(r).items() if k != "block"}
            | {"file": str(r.block.path), "first_line": r.block.first_line}
            for r in results
        ]
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
