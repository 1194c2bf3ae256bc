"""The docs name only what exists: every repository path, module and ``path: Name`` that the READMEs and
``specs/*.md`` cite in backticks is checked against the tree, so a move or a rename cannot leave them
behind. And no doc names an absolute path of one machine.

- ``a/b.py`` (or ``a/b/``): exists, from the repository root or from the doc's own folder;
- ``b.py`` alone: some tracked file has that name;
- ``a/b.py: Name`` or ``a/b.py: Class.method``: the file defines (or at least names) ``Name``;
- ``pp1.x.y`` (``python -m pp1.x.y``, ``pp1.x.y:factory``, also ``fsm.x.name``): the module exists (and
  names ``factory`` / ``name``);
- ``CamelCase`` or ``CamelCase.method`` (a class of ours): some module defines the class (and names the
  method); classes of other projects are listed in ``NOT_OURS``.

Backticked text that only looks like a path (URL routes, globs, examples, files a command writes) is
skipped by shape (``/route``, ``*``, ``<...>``, ``{...}``, ``://``) or named in ``NOT_PATHS``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DOCS = sorted(p for p in {*ROOT.glob("README.md"), *ROOT.glob("*/README.md"), *ROOT.glob("*/*/README.md"),
                          *ROOT.glob("specs/*.md")}
              if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))  # not .venv, .carry-*

# folder -> import name (pyproject's package-dir); what is not here lives under pp1/
PACKAGES = {"protocol": "protocol", "fsm": "fsm", "pipelines": "pipelines", "adapters": "adapters",
            "server": "server", "testing": "testing"}

EXTENSIONS = (".py", ".md", ".sh", ".toml", ".json", ".html", ".js", ".css", ".txt", ".yml", ".yaml", ".cfg")

# Backticked tokens that are deliberately not paths of this repository.
NOT_PATHS = {
    "pp1.md", "krea-model.md",  # the team's design notes (outside the repository)
    "google/umt5-xxl/", "text_encoder/", "tokenizer/", "vae/",  # folders of a Hugging Face checkpoint
    "_state.py", "_connection.py",  # h11's modules (the style reference)
    ".ci/run",  # CI's entry (a tracked file without an extension; checked below anyway)
}
# Docs about the past (they name files that were removed on purpose): only the machine-path check.
HISTORY = {"specs/restructure.md"}
# Prefixes of files a command writes, or that live outside the tree.
NOT_PATH_PREFIXES = (".venv/", ".whl/", "bench-out/", "test-artifacts/", "/", "~")

# Classes the docs cite that are not ours (libraries, other projects).
NOT_OURS = {
    "GraphMachine", "AutoencoderKLWan", "WanTransformer3DModel", "FastAPI", "OpenAPI", "WebRTC", "PyTorch",
    "ReduceOp", "TorchElastic", "HuggingFace", "FrameBatch",
}

PATH_RE = re.compile(r"^[\w.-]+(?:/[\w.-]+)*/?$")
MODULE_RE = re.compile(r"^pp1(?:\.\w+)+(?::\w+)?$")  # pp1.a.b, pp1.a.b.Name, pp1.a.b:name


def _tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = set(out.split())
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file below the root
        files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts}
    return files


TRACKED = _tracked()
BASENAMES = {Path(f).name for f in TRACKED}
SOURCES = {f: (ROOT / f).read_text() for f in TRACKED  # the code's modules (tests name anything)
           if f.endswith(".py") and not f.startswith("tests/") and (ROOT / f).is_file()}
CLASSES = {m for text in SOURCES.values() for m in re.findall(r"^\s*class (\w+)", text, re.M)}
ALL_SOURCE = "\n".join(SOURCES.values())
CLASS_RE = re.compile(r"^([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)(?:\.(\w+))?(?:\(\))?$")  # two capitals at least


def _backticked(text: str) -> list[tuple[int, str]]:
    """(line, text) of every inline code span (fenced blocks skipped)."""
    out: list[tuple[int, str]] = []
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out += [(n, m) for m in re.findall(r"`([^`]+)`", line)]
    return out


def _exists(path: str, doc: Path) -> Path | None:
    for base in (ROOT, doc.parent):
        p = (base / path).resolve()
        if p.exists() and ROOT in (p, *p.parents) and ".venv" not in p.relative_to(ROOT).parts:
            return p
    return None


def _module_file(module: str) -> tuple[Path, list[str]] | None:
    """The file of the longest module prefix of ``module`` and the attribute names after it."""
    names = module.split(".")[1:]
    for n in range(len(names), 0, -1):
        parts = names[:n]
        parts = [PACKAGES[parts[0]], *parts[1:]] if parts[0] in PACKAGES else ["pp1", *parts]
        base = ROOT.joinpath(*parts)
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p, names[n:]
    return None


def _problems(doc: Path, text: str | None = None) -> list[str]:
    found: list[str] = []
    for line, span in _backticked(doc.read_text() if text is None else text):
        head, _, name = (part.strip() for part in span.partition(": "))
        where = f"{doc.relative_to(ROOT)}:{line}: `{span}`"
        for i, raw in enumerate(head.split()):
            token = raw.strip(",;()[]'\"")
            problem = _check(token, doc, name if i == 0 else "")
            if problem:
                found.append(f"{where}: {problem}")
    return found


def _check(token: str, doc: Path, name: str) -> str | None:
    """Why ``token`` (cited with ``name`` after a colon, if any) is not in the tree; None when it is, or
    when it is not a path or a module at all."""
    if not token or token in NOT_PATHS or token.startswith(NOT_PATH_PREFIXES) or "://" in token \
            or any(c in token for c in "*<>{}$="):
        return None
    cls = CLASS_RE.match(token)
    if cls and sum(c.isupper() for c in cls.group(1)) >= 2:
        if cls.group(1) in NOT_OURS:
            return None
        if cls.group(1) not in CLASSES:
            return f"no class {cls.group(1)} in the code"
        if cls.group(2) and not re.search(rf"\b{cls.group(2)}\b", ALL_SOURCE):
            return f"nothing named {cls.group(2)} in the code"
        return None
    if re.match(r"^(protocol|fsm|pipelines|adapters|server|testing)\.\w", token):  # fsm.chunk.x: pp1.fsm.chunk.x
        token = "pp1." + token
    if MODULE_RE.match(token):
        module, _, attr = token.partition(":")
        resolved = _module_file(module)
        if resolved is None:
            return f"no module {module}"
        path, attrs = resolved
        for ident in [*attrs[:1], *([attr] if attr else [])]:
            if not re.search(rf"\b{ident}\b", path.read_text()):
                return f"{path.relative_to(ROOT)} does not name {ident}"
        return None
    if not PATH_RE.match(token) or not (token.endswith(EXTENSIONS) or token.endswith("/")):
        return None
    if "/" not in token.rstrip("/"):
        if token.endswith("/"):
            return None if _exists(token, doc) is not None else f"no folder {token}"
        return None if token in BASENAMES else f"no file named {token} in the repository"
    path = _exists(token, doc)
    if path is None:
        return f"no {token}"
    ident = re.match(r"[A-Za-z_][\w.]*", name)
    if ident and path.is_file() and path.suffix == ".py":
        first = ident.group(0).split(".")[0]
        if not re.search(rf"\b{re.escape(first)}\b", path.read_text()):
            return f"{token} does not name {first}"
    return None


CURRENT = [d for d in DOCS if str(d.relative_to(ROOT)) not in HISTORY]


@pytest.mark.parametrize("doc", CURRENT, ids=[str(d.relative_to(ROOT)) for d in CURRENT])
def test_cited_paths_exist(doc: Path) -> None:
    problems = _problems(doc)
    assert not problems, "docs cite what is not in the tree:\n" + "\n".join(problems)


MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|Users|root|mnt|scratch|data)/[\w.-]")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_no_machine_paths(doc: Path) -> None:
    hits = [f"{doc.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(doc.read_text().splitlines(), 1)
            if MACHINE_PATH.search(line)]
    assert not hits, "an absolute path of one machine in the docs:\n" + "\n".join(hits)


def test_the_check_sees_a_stale_path() -> None:
    text = ("`adapters/chunk_engine.py`, `pp_channel.py`, `adapters/roles/main.py: NoSuchThing`, "
            "`pp1.adapters.no_such`, `adapters/roles/main.py: Exiter`, `/api/v1/status`, `specs/bench/*.json`, "
            "`pp1.testing.fake_front.NoFront`, `pp1.testing.fake_front.FakeFront`, `pp1.pipelines.reference:factory`, "
            "`PPControlPlane`, `FrontEngine.request_stop`, `ChunkMachine.no_such_method`, `fsm.chunk.no_such_rule`, "
            "`protocol.schedule.recompute_due`")
    problems = _problems(ROOT / "specs" / "probe.md", text)
    assert len(problems) == 8, problems
