"""One chunk's path through the code, counted the same way on any checkout (issue 7's before / after).

Runs ``pp1 run`` (CPU, gloo, the tiny reference pipeline, 1 front + 2 mesh ranks) with a profiler in every
rank's process, installed by a ``sitecustomize`` on ``PYTHONPATH`` (no change to the checkout measured, so the
same tracer runs on an old commit). Each rank records, during ONE period of its steady-state loop, every call
whose callee is a file of the checkout (not ``tests/``, not ``.venv``):

- the window of a rank opens the first time chunk 3's INFER message (envelope or TP header) passes through its
  codec (``pp1.protocol.codec.encode`` or ``decode_meta``: the front sends it, the leader and the worker
  receive it) and closes the first time chunk 4's does: everything the rank does for one chunk, once;
- a cross-file call: the callee's file differs from the file of the nearest calling frame that belongs to the
  checkout (calls through a library, e.g. ``transitions`` invoking a machine's callback, count from the repo
  frame that made them);
- per rank: the files entered and the distinct caller-file -> callee-file edges (and caller -> callee
  functions), on the thread that handles the chunk (the role's thread, ``pp1-<role>``, in every version);
  the rank's background threads (liveness beats, progress, drain watch) are counted apart, as they tick
  into the window or not depending on timing.

    .venv/bin/python scripts/chunk_path.py                       # this checkout, its .venv
    .venv/bin/python scripts/chunk_path.py --repo ../old --pp1 ../old/.venv/bin/pp1 --json old.json

Prints a Markdown summary: per role, and summed over front, leader and worker (as issue 7 counts it), for the
runtime's files (everything but ``pipelines/``) and for all files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SITECUSTOMIZE = r'''
import os, sys, threading, json
_OUT = os.environ.get("PP1_TRACE_DIR")
if _OUT and "RANK" in os.environ:
    _ROOT = os.path.realpath(os.environ["PP1_TRACE_ROOT"]) + os.sep
    _SKIP = (_ROOT + "tests" + os.sep, _ROOT + ".venv" + os.sep)
    _OPEN, _CLOSE = int(os.environ.get("PP1_TRACE_CHUNK", "3")), int(os.environ.get("PP1_TRACE_CHUNK", "3")) + 1
    _state = {"on": False, "done": False}
    _threads = {}
    _lock = threading.Lock()

    def _inrepo(fn):
        return fn.startswith(_ROOT) and not fn.startswith(_SKIP)

    def _chunk_of(msg):
        try:
            if getattr(getattr(msg, "action", None), "value", None) in ("infer", "INFER") or \
                    str(getattr(msg, "action", "")).lower().endswith("infer"):
                if getattr(msg, "cache_epoch", 0) == 0:
                    return int(msg.chunk_index)
        except Exception:
            pass
        return None

    def _sighting(chunk):
        if chunk == _OPEN and not _state["on"] and not _state["done"]:
            _state["on"] = True
        elif chunk == _CLOSE and _state["on"]:
            _state["on"] = False
            _state["done"] = True
            _dump()

    def _dump():
        out = {"rank": int(os.environ["RANK"]), "root": _ROOT, "threads": {}}
        with _lock:
            for name, t in _threads.items():
                out["threads"][name] = {"files": sorted(t["files"]), "edges": sorted(t["edges"]),
                                        "func_edges": sorted(t["func_edges"]), "calls": t["calls"]}
        path = os.path.join(_OUT, "rank%s.json" % os.environ["RANK"])
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)

    def _rel(fn):
        return fn[len(_ROOT):]

    def _prof(frame, event, arg):
        if _state["done"]:
            return
        code = frame.f_code
        fn = code.co_filename
        if event == "call" and fn.endswith("codec.py") and code.co_name == "encode" and _inrepo(fn):
            c = _chunk_of(frame.f_locals.get("msg"))
            if c is not None:
                _sighting(c)
        elif event == "return" and fn.endswith("codec.py") and code.co_name == "decode_meta" and _inrepo(fn):
            c = _chunk_of(arg)
            if c is not None:
                _sighting(c)
        if event != "call" or not _state["on"] or not _inrepo(fn):
            return
        callee = _rel(fn)
        caller = None
        f = frame.f_back
        while f is not None:
            if _inrepo(f.f_code.co_filename):
                caller = f
                break
            f = f.f_back
        name = threading.current_thread().name
        with _lock:
            t = _threads.setdefault(name, {"files": set(), "edges": set(), "func_edges": set(), "calls": 0})
            t["files"].add(callee)
            if caller is not None and caller.f_code.co_filename != fn:
                cfile = _rel(caller.f_code.co_filename)
                t["edges"].add((cfile, callee))
                t["func_edges"].add((cfile + ":" + getattr(caller.f_code, "co_qualname", caller.f_code.co_name),
                                     callee + ":" + getattr(code, "co_qualname", code.co_name)))
                t["calls"] += 1

    sys.setprofile(_prof)
    threading.setprofile(_prof)
'''

ROLES = {0: "front", 1: "leader", 2: "worker"}
RUNTIME_EXCLUDE = ("pipelines/",)


def run(repo: Path, pp1: str, chunks: int, timeout_s: float) -> dict[int, dict]:
    with tempfile.TemporaryDirectory(prefix="pp1-chunk-path-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        out = Path(tmp) / "out"
        out.mkdir()
        env = {**os.environ, "PYTHONPATH": str(site), "PP1_TRACE_DIR": str(out), "PP1_TRACE_ROOT": str(repo)}
        # generous liveness bounds: the profiler slows every rank down
        cmd = [pp1, "run", "--chunks", str(chunks), "--tp", "2", "--preset", "tiny", "--device", "cpu",
               "--heartbeat-s", "2", "--watchdog-s", "30", "--deadline-floor-s", "120"]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"pp1 run failed ({proc.returncode})")
        ranks = {}
        for p in sorted(out.glob("rank*.json")):
            data = json.loads(p.read_text())
            ranks[int(data["rank"])] = data
        missing = set(ROLES) - set(ranks)
        if missing:
            raise SystemExit(f"no trace from ranks {sorted(missing)} (did the job reach chunk 4?)")
        return ranks


def summarise(ranks: dict[int, dict], runtime_only: bool, background: bool = False) -> dict[str, dict[str, int]]:
    """Per role and summed; ``background``: the rank's other threads instead of its role thread."""

    def keep(path: str) -> bool:
        return not (runtime_only and path.startswith(RUNTIME_EXCLUDE))

    rows: dict[str, dict[str, int]] = {}
    union_files: set[str] = set()
    union_edges: set[tuple[str, str]] = set()
    for rank, data in sorted(ranks.items()):
        files: set[str] = set()
        edges: set[tuple[str, str]] = set()
        funcs: set[tuple[str, str]] = set()
        role_thread = f"pp1-{ROLES.get(rank)}"
        for name, t in data["threads"].items():
            if (name == role_thread) == background:
                continue
            files |= {f for f in t["files"] if keep(f)}
            edges |= {(a, b) for a, b in t["edges"] if keep(a) and keep(b)}
            funcs |= {(a, b) for a, b in t["func_edges"] if keep(a.split(":")[0]) and keep(b.split(":")[0])}
        rows[ROLES.get(rank, f"rank{rank}")] = {"files": len(files), "file_edges": len(edges),
                                                 "func_edges": len(funcs)}
        union_files |= files
        union_edges |= edges
    rows["sum"] = {k: sum(r[k] for r in rows.values()) for k in ("files", "file_edges", "func_edges")}
    rows["union"] = {"files": len(union_files), "file_edges": len(union_edges), "func_edges": -1}
    return rows


def markdown(ranks: dict[int, dict]) -> str:
    lines = ["| scope | role | files | file -> file edges | function -> function calls |", "|---|---|---:|---:|---:|"]
    for label, runtime_only, bg in (("runtime (no pipelines/)", True, False), ("all repo files", False, False),
                                    ("background threads, all files", False, True)):
        for role, r in summarise(ranks, runtime_only, bg).items():
            fe = "" if r["func_edges"] < 0 else str(r["func_edges"])
            lines.append(f"| {label} | {role} | {r['files']} | {r['file_edges']} | {fe} |")
    threads = {ROLES.get(k, k): sorted(v["threads"]) for k, v in sorted(ranks.items())}
    lines.append("")
    lines.append(f"threads seen in the window: {threads}")
    return "\n".join(lines)


def main() -> int:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=here, help="the checkout to measure (default: this one)")
    p.add_argument("--pp1", default=None, help="its pp1 command (default: REPO/.venv/bin/pp1)")
    p.add_argument("--chunks", type=int, default=7)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="also write every rank's raw trace here")
    args = p.parse_args()
    repo = args.repo.resolve()
    pp1 = args.pp1 or str(repo / ".venv" / "bin" / "pp1")
    ranks = run(repo, pp1, args.chunks, args.timeout_s)
    if args.json is not None:
        args.json.write_text(json.dumps({str(k): v for k, v in ranks.items()}, indent=1))
    print(markdown(ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
