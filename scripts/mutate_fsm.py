#!/usr/bin/env python3
"""Mutation score of the protocol's rules: a fixed list of planted one-line mutations of ``fsm/*.py`` (and
``protocol/schedule.py``), each applied alone to a temporary copy of the tree and run against

  (model)  the Hypothesis model of all ranks alone (``tests/model/test_model_cluster.py``),
  (+regr)  the model's directory (``tests/model``: the model plus its scripted regressions),
  (fast)   the fast suite: ``tests/fsm tests/fsm_chunk tests/model tests/adapters`` (no processes).

A mutation is caught when the run fails (or times out). Each level includes the one before, so a mutation
caught by one is caught by the next without running it. The Hypothesis tests run with the ci profile's
examples without shrinking (``PP1_HYPOTHESIS_PROFILE=mutation``).

Usage (from the repository root, after ``bash scripts/setup.sh test``):

    .venv/bin/python scripts/mutate_fsm.py                 # every mutation, one at a time
    .venv/bin/python scripts/mutate_fsm.py --only M07 M31  # some of them
    .venv/bin/python scripts/mutate_fsm.py --list          # the mutations
    .venv/bin/python scripts/mutate_fsm.py --jobs 2 --json mutation-score.json

The copy imports as ``pp1`` from its own folders (links inside its ``pp1/`` folder, as pyproject's
``package-dir`` maps them), never from the checkout the virtual environment was installed from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEVELS: dict[str, list[str]] = {
    "model": ["tests/model/test_model_cluster.py"],
    "regr": ["tests/model/test_regressions.py"],
    "fast": ["tests/fsm", "tests/fsm_chunk", "tests/adapters"],
}
LEVEL_TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    what: str


def m(i: int, path: str, old: str, new: str, what: str) -> Mutation:
    return Mutation(f"M{i:02d}", path, old, new, what)


S, C, K, F, L, W, LC, B = ("protocol/schedule.py", "fsm/chunk.py", "fsm/kv_cache.py", "fsm/front.py", "fsm/leader.py",
                           "fsm/worker.py", "fsm/lifecycle.py", "fsm/base.py")

MUTATIONS: list[Mutation] = [
    # -- the schedule's rules (protocol/schedule.py) ---------------------------------------------------------
    m(1, S, "return every > 0 and chunk_index > 0 and chunk_index % every == 0",
      "return every > 0 and chunk_index >= 0 and chunk_index % every == 0", "recompute on an epoch's first chunk"),
    m(2, S, "return every > 0 and chunk_index > 0 and chunk_index % every == 0",
      "return every > 0 and chunk_index > 0 and chunk_index % every == 1 % every", "recompute schedule off by one"),
    m(3, S, "return steps + (1 if do_kv_recompute else 0)", "return steps", "expected calls forget the recompute"),
    m(4, S, "return min(chunk_index * latent_frames, window)", "return chunk_index * latent_frames",
      "warmup context not capped at the window (issue 11)"),
    m(5, S, "DEADLINE_SAMPLES = 200", "DEADLINE_SAMPLES = 2", "p99 window of 2 samples (issue 11)"),
    m(6, S, "return chunk_index * latent_frames - context_frames", "return chunk_index * latent_frames - context_frames + 1",
      "recompute window starts one frame late"),
    m(7, S, "return s if s > 0 else None", "return s if s >= 0 else None", "re-encode the epoch's first frame too"),
    m(8, S, "return (chunk_index + 1) * latent_frames - window", "return (chunk_index + 2) * latent_frames - window",
      "history trimmed one chunk too early"),
    m(9, S, "return s is not None and s >= decoded_upto", "return s is not None and s > decoded_upto",
      "decode-first rule off by one"),
    m(10, S, "return percentile(samples, 99) or 0.0", "return percentile(samples, 50) or 0.0", "p50 instead of p99"),
    m(11, S, "FIRST_CALL_ID = PING_CALL_ID + 1", "FIRST_CALL_ID = PING_CALL_ID", "first chunk reuses the PING's id"),
    # -- the chunk machine (fsm/chunk.py) -----------------------------------------------------------------------
    m(12, C, "init_cache=k == 0,", "init_cache=k <= 1,", "init_cache on the second chunk too"),
    m(13, C, "reset_cache=k == 0 and self._reset_pending,", "reset_cache=k == 0,", "reset_cache on epoch 0"),
    m(14, C, "        self.cache_epoch += 1\n", "        self.cache_epoch += 0\n", "a hard cut keeps the epoch"),
    m(15, C, "self.position = plan.chunk_index + 1", "self.position = plan.chunk_index + 2", "a chunk index skipped"),
    m(16, C, "if fatal or self.consecutive_failures >= 1:", "if fatal or self.consecutive_failures >= 2:",
      "retry twice"),
    m(17, C, "        self.consecutive_failures = 0\n        self.stats.emitted += 1",
      "        self.stats.emitted += 1", "failures in a row never reset"),
    m(18, C, "return max(self.deadline_factor * p99(self.stats.round_trips_s), self.deadline_floor_s)",
      "return min(self.deadline_factor * p99(self.stats.round_trips_s), self.deadline_floor_s)", "deadline: min"),
    m(19, C, "return self._out.sent_at + self.deadline_s()", "return self._out.sent_at + self.deadline_floor_s",
      "deadline ignores the p99"),
    m(20, C, "if plan.action is Action.INFER and result.ok:", "if plan.action is Action.NOOP and result.ok:",
      "p99 of heartbeat round trips"),
    m(21, C, "if self.state == CUTTING or (self.state == DRAINING and stale):", "if self.state == CUTTING:",
      "a stale result accepted while draining"),
    m(22, C, "return cache_epoch == self.cache_epoch and self.state != FAILED",
      "return cache_epoch <= self.cache_epoch and self.state != FAILED", "older epochs count as current"),
    m(23, C, "if self.state != FAILED or self.poisoned or self.waiting:", "if self.state != FAILED or self.waiting:",
      "farewell on a poisoned channel"),
    m(24, C, "return self.last_activity is None or now - self.last_activity >= self.heartbeat_s",
      "return self.last_activity is None or now - self.last_activity >= 2 * self.heartbeat_s", "heartbeat late"),
    m(25, C, "if recompute_due(self.position, self.recompute_every):",
      "if recompute_due(self.position + 1, self.recompute_every):", "KV recompute marked for the wrong chunk"),
    m(26, C, "elif plan.cache_epoch != self.cache_epoch:\n            self.fire(\"sent_stale\")",
      "elif plan.cache_epoch == self.cache_epoch + 1:\n            self.fire(\"sent_stale\")",
      "a stale send taken as current"),
    m(27, C, "            self._stop_while_building = True\n", "            pass\n", "a stop while building is lost"),
    m(28, C, "self.stats.discarded_stale += 1", "pass", "stale results not counted"),
    m(29, C, "        self._reset_pending = True\n        self.stats.hard_cuts += 1",
      "        self._reset_pending = False\n        self.stats.hard_cuts += 1", "no reset_cache after a cut"),
    # -- the KV cache model (fsm/kv_cache.py) -------------------------------------------------------------------
    m(30, K, "cached = min(self.cached_frames + self.chunk_frames, self.window)",
      "cached = self.cached_frames + self.chunk_frames", "context frames not capped at the window"),
    m(31, K, "self.fire(ROLLING_EVENT if cached >= self.window else FILLING_EVENT)",
      "self.fire(ROLLING_EVENT if cached > self.window else FILLING_EVENT)", "rolling one chunk late"),
    m(32, K, "        self.cached_frames = 0\n        self.timeline_frames = 0\n        return self.state",
      "        self.timeline_frames = 0\n        return self.state", "a cut keeps the cached frames"),
    # -- the front's loop (fsm/front.py) ----------------------------------------------------------------------
    m(33, F, "if self._pending is not None and not self.overlap:", "if self._pending is not None and self.overlap:",
      "overlap order swapped"),
    m(34, F, "if self.done and self.after_chunks == \"shutdown\" and c.state == IDLE:",
      "if self.done and self.after_chunks == \"idle\" and c.state == IDLE:", "headless after_chunks= swapped"),
    m(35, F, "keep_from=oldest_needed_frame(d.chunk_index, self.latent_frames, self.window)",
      "keep_from=oldest_needed_frame(d.chunk_index + 1, self.latent_frames, self.window)", "history trimmed too early"),
    m(36, F, "        if self.chunk.is_current(rec.cache_epoch):\n            self.shown += 1",
      "        if True:\n            self.shown += 1", "a chunk cut during decode is shown"),
    m(37, F, "if self._pending is not None and not self.chunk.is_current(self._pending.cache_epoch):",
      "if False:", "a stale undecoded chunk is decoded"),
    m(38, F, "        if not poisoned and not self.chunk.is_terminal:\n",
      "        if not self.chunk.is_terminal:\n", "farewell after a poisoned startup failure"),
    m(39, F, "return [Exit(EXIT_OK, \"stopped\")]", "return [Exit(EXIT_FAILED, \"stopped\")]", "SHUTDOWN exits 1"),
    m(40, F, "self._stop_pending = not self.is_terminal", "self._stop_pending = False",
      "a stop before serving is lost"),
    m(41, F, "        self.ready = ready\n        self._lifecycle_event(\"warmup_done\")",
      "        self.ready = ready", "READY does not move the lifecycle"),
    m(42, F, "            self.chunk.request_stop()\n            self._lifecycle_drain()",
      "            self.chunk.request_stop()", "a stop does not move the lifecycle to draining"),
    m(43, F, "return [AwaitResult(until=now + self.warm_timeout_s)]", "return [AwaitResult(until=now + self.ready_timeout_s)]",
      "PING waited with the READY bound"),
    m(44, F, "        return decode_before_next(k, self.latent_frames, c.kv.context_frames(),",
      "        return False and decode_before_next(k, self.latent_frames, c.kv.context_frames(),",
      "re-encode decode-first rule dropped"),
    m(45, F, "first = d.chunk_index * self.latent_frames", "first = (d.chunk_index + 1) * self.latent_frames",
      "history kept at the wrong frame"),
    m(46, F, "            plan = c.plan_shutdown()\n", "            plan = None\n", "closing never sends SHUTDOWN"),
    # -- the leader's relay (fsm/leader.py) ---------------------------------------------------------------------
    m(47, L, "if observed_calls != expected:", "if observed_calls < expected:", "tripwire misses extra calls"),
    m(48, L, "out.append(SendTP(header, with_tensors=not warmup,", "out.append(SendTP(header, with_tensors=True,",
      "WARMUP tensors travel"),
    m(49, L, "            self.validate(env, self.geometry, self.last_call_id)\n", "            pass\n",
      "envelopes not validated"),
    m(50, L, "relay = event in (\"envelope_noop\", \"envelope_shutdown\") and self.mesh_size > 1",
      "relay = event in (\"envelope_shutdown\",) and self.mesh_size > 1", "heartbeats not relayed"),
    m(51, L, "        if now is not None:\n            self.last_activity_at = now\n        try:",
      "        try:", "an envelope does not re-arm the watchdog"),
    m(52, L, "if self.watchdog_s is None or self.state != IDLE:", "if self.watchdog_s is None:",
      "watchdog armed while running"),
    m(53, L, "if env.action is not Action.PING or env.call_id != PING_CALL_ID or env.tensors:",
      "if env.action is not Action.PING:", "the PING's id not checked"),
    m(54, L, "                do_kv_recompute=recompute,\n", "                do_kv_recompute=False,\n",
      "warmup never recomputes"),
    m(55, L, "if observed != expected_calls(header):", "if observed < expected_calls(header):",
      "warmup tripwire misses extra calls"),
    m(56, L, "return [SendResult(result), Exit(EXIT_FAILED, cause.reason)]", "return [SendResult(result)]",
      "the leader lives on after a mesh failure"),
    # -- the worker's loop (fsm/worker.py) ----------------------------------------------------------------------
    m(57, W, "        self.fire(\"shard_done\")\n        self.last_header_at = now",
      "        self.fire(\"shard_done\")", "watchdog counts from the header, not the shard's end"),
    m(58, W, "first_serving = header.action is not Action.WARMUP and not self.serving and self.state == WAITING",
      "first_serving = header.action is Action.INFER and not self.serving and self.state == WAITING",
      "warmup_done only at the first INFER"),
    m(59, W, "validate_tp_header(header, self.geometry, self._last_ids[header.action == Action.WARMUP])",
      "validate_tp_header(header, self.geometry, None)", "header call ids not checked"),
    m(60, W, "            out: list[Intent] = [MakeWarmupTensors(header)]",
      "            out: list[Intent] = [RecvTensors(header.tensors)]", "worker receives WARMUP tensors"),
    m(61, W, "        if event == \"heartbeat\":\n            return [*check, *self._next()]",
      "        if event == \"heartbeat\":\n            return [Exit(EXIT_OK, \"heartbeat\")]", "a NOOP ends the worker"),
    # -- the lifecycle (fsm/lifecycle.py) and the base ------------------------------------------------------------
    m(62, LC, "        if report:\n            kind", "        if False:\n            kind", "parity ignored"),
    m(63, LC, "kind = \"local\" if self._config != configs[0] else \"remote\"",
      "kind = \"remote\" if self._config != configs[0] else \"local\"", "parity blames the wrong rank"),
    m(64, LC, "if len(set(fingerprints)) == 1:", "if len(set(fingerprints)) >= 1:", "fingerprint drift ignored"),
    m(65, LC, "if min_verdict < 1:", "if min_verdict < 0:", "the barrier's verdict ignored"),
    m(66, LC, "        if self.state in (WARMING_CHANNELS, WARMUP, SERVING):\n            return \"drain\"",
      "        if self.state in (WARMING_CHANNELS, SERVING):\n            return \"drain\"",
      "a signal in warmup fails the job (not kept until serving)"),
    m(67, LC, "return 2 * deadline + 2 * config.heartbeat_s + 5", "return deadline + 2 * config.heartbeat_s + 5",
      "the front's drain bound too short"),
    m(68, LC, "return 1 if ok else 0", "return 1", "a failed load votes ok"),
    m(69, LC, "self.fail_with(f\"load failed: {self.load_error}\", \"local\")",
      "self.fail_with(f\"load failed: {self.load_error}\", \"remote\")", "a failed load blamed on others"),
    m(70, LC, "        self.fire(\"barrier_done\")\n", "        pass\n", "barrier_done dropped"),
    m(71, LC, "        if lc is not None and not lc.is_terminal:\n            lc.fail_with(cause.reason, cause.kind, cause.blame)",
      "        if lc is not None and not lc.is_terminal:\n            pass", "a role's failure not passed to its lifecycle"),
    m(72, B, "        if self.is_terminal:\n            log.warning", "        if False:\n            log.warning",
      "a later cause overwrites the first"),
    # -- rules added after the first score (the bugs the model found, and the farewell's guard) -------------------
    m(73, F, "before_ready = self.ping and self.ready is None", "before_ready = False", "a farewell before READY"),
    m(74, F, "        if due is None:  # nothing awaited: the send itself ran out\n",
      "        if False:\n", "a send that ran out taken for a missed deadline"),
    m(75, L, "        if self.state != IDLE:\n            return self.on_fatal(f\"a channel operation ran out",
      "        if False:\n            return self.on_fatal(f\"a channel operation ran out", "a timed-out send ignored"),
    m(76, W, "        if self.state == RUNNING:\n            return self._exit(", "        if False:\n            return self._exit(",
      "a timed-out tensor receive ignored"),
    m(77, LC, "        return self._exit(f\"a startup collective timed out during {self.state}\", \"remote\")",
      "        return []", "a startup collective that ran out ignored"),
    # -- rules added after the model was merged (issue 11's teardown and blame) ------------------------------------
    m(78, LC, "        if job_failed:\n            return \"fail\"", "        if job_failed:\n            pass",
      "a signal to a failed job drains (waits out its bound)"),
    m(79, LC, "    def on_peer_gone(self, reason: str, peer: int | None = None) -> list[Intent]:\n        return self._exit(f\"a peer was lost during {self.state}: {reason}\", \"remote\", peer)",
      "    def on_peer_gone(self, reason: str, peer: int | None = None) -> list[Intent]:\n        return self._exit(f\"a peer was lost during {self.state}: {reason}\", \"remote\")",
      "a peer lost in startup not blamed"),
]


@dataclass
class Outcome:
    id: str
    path: str
    what: str
    caught: dict[str, bool] = field(default_factory=dict)  # level -> caught
    seconds: dict[str, float] = field(default_factory=dict)
    detail: str = ""


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def package_dirs() -> dict[str, str]:
    """pyproject's ``[tool.setuptools.package-dir]``: import name -> folder."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', section, flags=re.M))


def make_copy(files: list[str]) -> Path:
    """A copy of the tree that imports as ``pp1`` from its own folders."""
    dst = Path(tempfile.mkdtemp(prefix="pp1-mutate-"))
    for rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    package_dir = package_dirs()
    for name, folder in package_dir.items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "pp1":
            link = dst / package_dir["pp1"] / parts[1]
            if not link.exists():
                link.symlink_to(os.path.relpath(dst / folder, link.parent), target_is_directory=True)
    probe = subprocess.run([sys.executable, "-c", "import pp1.fsm.chunk as c; print(c.__file__)"], cwd=dst,
                           env=_env(dst), capture_output=True, text=True)
    if not probe.stdout.strip().startswith(str(dst)):
        raise SystemExit(f"the copy does not import as pp1 from itself: {probe.stdout} {probe.stderr}")
    return dst


def _env(dst: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(dst)
    env.setdefault("PP1_HYPOTHESIS_PROFILE", "mutation")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_level(dst: Path, paths: list[str]) -> tuple[bool, float, str]:
    """(failed, seconds, last lines)."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *paths]
    try:
        proc = subprocess.run(cmd, cwd=dst, env=_env(dst), capture_output=True, text=True, timeout=LEVEL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return True, time.monotonic() - t0, "timed out"
    tail = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED tests", "ERROR tests"))][:2]
    return proc.returncode != 0, time.monotonic() - t0, " | ".join(tail)[:300]


def apply(dst: Path, mu: Mutation) -> str:
    path = dst / mu.path
    text = path.read_text()
    n = text.count(mu.old)
    if n != 1:
        raise SystemExit(f"{mu.id}: {mu.old!r} occurs {n} times in {mu.path} (must be once)")
    path.write_text(text.replace(mu.old, mu.new))
    return text


def evaluate(dst: Path, mu: Mutation) -> Outcome:
    out = Outcome(mu.id, mu.path, mu.what)
    original = apply(dst, mu)
    try:
        caught = False
        for level, paths in LEVELS.items():
            if not caught:
                caught, secs, detail = run_level(dst, paths)
                out.seconds[level] = round(secs, 1)
                if caught:
                    out.detail = f"{level}: {detail}"
            out.caught[level] = caught
    finally:
        (dst / mu.path).write_text(original)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="mutation ids to run (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="mutations run at once (each in its own copy)")
    p.add_argument("--json", help="write the outcomes here")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = p.parse_args(argv)
    chosen = [mu for mu in MUTATIONS if not args.only or mu.id in args.only]
    if args.list:
        for mu in chosen:
            print(f"{mu.id} {mu.path:22} {mu.what}")
        return 0
    files = tracked_files()
    for mu in chosen:  # every mutation applies (before spending minutes)
        if (ROOT / mu.path).read_text().count(mu.old) != 1:
            raise SystemExit(f"{mu.id}: {mu.old!r} must occur exactly once in {mu.path}")
    copies = [make_copy(files) for _ in range(max(1, args.jobs))]
    try:
        if not args.no_baseline:
            failed, secs, detail = run_level(copies[0], [x for paths in LEVELS.values() for x in paths])
            print(f"baseline (no mutation): {'FAILS' if failed else 'passes'} in {secs:.0f} s {detail}", flush=True)
            if failed:
                return 2
        free = list(copies)
        results: list[Outcome] = []

        def job(mu: Mutation) -> Outcome:
            dst = free.pop()
            try:
                res = evaluate(dst, mu)
            finally:
                free.append(dst)
            marks = " ".join(f"{lv}:{'caught' if c else 'SURVIVED'}" for lv, c in res.caught.items())
            print(f"{res.id} {res.what:50.50} {marks} {res.seconds} {res.detail[:120]}", flush=True)
            return res

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            results = list(pool.map(job, chosen))
    finally:
        for dst in copies:
            shutil.rmtree(dst, ignore_errors=True)
    n = len(results)
    print(f"\nmutations: {n}")
    for level in LEVELS:
        caught = sum(r.caught[level] for r in results)
        print(f"  caught by {level:6}: {caught}/{n}")
    survivors = [r for r in results if not r.caught["fast"]]
    print("survivors of the fast suite:" + ("".join(f"\n  {r.id} {r.path}: {r.what}" for r in survivors) or " none"))
    model_missed = [r for r in results if not r.caught["model"]]
    print("missed by the model alone:" + ("".join(f"\n  {r.id} {r.path}: {r.what}" for r in model_missed) or " none"))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
