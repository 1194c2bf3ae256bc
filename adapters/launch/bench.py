"""``pp1 bench``: run configurations one after another (each a whole job through ``launch()``), drop
the warmup chunks, and write ``<out>/bench-<label>.json`` and ``<out>/bench-<label>.md``.

Per configuration, from the front's per-chunk report: chunk period (median, p99), video fps, mesh
time, stage-0 time, PP round-trip overhead, overlap score = max(stage 0, mesh) / period, time to
first frame, and the peak memory of every rank (``peak_memory`` events the ranks emit at exit).

    pp1 bench --preset tiny                                  # CPU defaults: pp1:2, tp:2, tp:1, pp1:1
    pp1 bench --device cuda --preset krea-14b-shape --dtype bfloat16 --configs pp1:3,tp:4

``pp1 bench --hop``: the protocol hop against the raw transport instead (``pp1.adapters.launch.hop``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from pp1.adapters.launch.launcher import LaunchOptions, RunReport, launch
from pp1.adapters.rank import options
from pp1.adapters.rank.peak_memory import peak_bytes, peaks_by_rank
from pp1.pipelines.loader import DEFAULT_PIPELINE
from pp1.protocol.schedule import percentile

DEFAULT_OUT = os.path.join("specs", "bench")
TOPOLOGIES = ("pp1", "tp")
BENCH_VERSION = 1
MIN_CONFIG_S = 30.0  # with a budget: a configuration is not started with less than this left

OVERLAP_NOTE = (
    "Overlap = max(stage 0, mesh) / period (medians). 1.0: the period is set by the slower of the two "
    "alone, i.e. stage 0 (decode of chunk k) is fully hidden behind the mesh (generation of chunk k+1); "
    "max / (stage 0 + mesh) or lower: they run one after the other (pure TP is serial by construction); "
    "well below that: time goes elsewhere (PP round trip, scheduling, a busy host)."
)


# -- configurations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: ``pp1`` (front rank + TP mesh of ``tp``) or ``tp`` (pure TP of ``tp`` ranks)."""

    topology: str
    tp: int

    @property
    def name(self) -> str:
        return f"{self.topology}:{self.tp}"

    @property
    def nproc(self) -> int:
        return self.tp + 1 if self.topology == "pp1" else self.tp

    @property
    def title(self) -> str:
        if self.topology == "pp1":
            return f"PP1 front + TP={self.tp}"
        return "single process (TP=1)" if self.tp == 1 else f"pure TP={self.tp}"

    @classmethod
    def parse(cls, text: str) -> BenchConfig:
        """``pp1:2`` or ``tp:4``."""
        topo, sep, size = text.strip().partition(":")
        topo = topo.strip().lower()
        if not sep or topo not in TOPOLOGIES or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"bad config {text!r}: want TOPOLOGY:M with TOPOLOGY in {TOPOLOGIES} and M >= 1")
        return cls(topo, int(size))


def parse_configs(text: str) -> list[BenchConfig]:
    return [BenchConfig.parse(part) for part in text.split(",") if part.strip()]


def default_configs(device: str, gpu_count: int = 0) -> list[BenchConfig]:
    """CPU: PP1 front + TP=2, pure TP=2, TP=1 (single process), PP1 front + TP=1.

    CUDA with G GPUs, most telling first (a bench cut short by its budget keeps those): PP1 front +
    TP=G-1, pure TP=G, pure TP=G-1 (the same mesh without the front), TP=1 (the baseline), then PP1
    front + TP=M for M in {1, 2, 4} and pure TP=M for M in {2, 4, 8}, largest first; only what fits (PP1
    needs M+1 GPUs). G=4: pp1:3, tp:4, tp:3, tp:1, pp1:2, tp:2, pp1:1."""
    if device != "cuda":
        return [BenchConfig("pp1", 2), BenchConfig("tp", 2), BenchConfig("tp", 1), BenchConfig("pp1", 1)]
    g = max(0, gpu_count)
    first = [BenchConfig("pp1", g - 1), BenchConfig("tp", g), BenchConfig("tp", g - 1), BenchConfig("tp", 1)]
    rest = [BenchConfig("pp1", m) for m in (4, 2, 1)] + [BenchConfig("tp", m) for m in (8, 4, 2)]
    rest.sort(key=lambda c: (-c.tp, c.topology != "pp1"))
    out: list[BenchConfig] = []
    for c in first + rest:
        if c.tp >= 1 and c.nproc <= g and c not in out:
            out.append(c)
    return out


# -- metrics ------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def steady_chunks(chunks: Sequence[dict[str, Any]], warmup_chunks: int) -> list[dict[str, Any]]:
    """The shown chunks after the first ``warmup_chunks`` shown ones."""
    shown = [c for c in chunks if c.get("shown", True)]
    return shown[max(0, warmup_chunks):]


def compute_metrics(report: dict[str, Any], warmup_chunks: int) -> dict[str, Any]:
    """The bench's figures from the front's JSON report (``chunks``, ``summary``, ``startup_s``).

    Times in ms (medians over the steady chunks) unless named ``_s``. ``video_fps`` = frames of the
    steady chunks / the sum of their periods (each period: from the previous shown chunk's frames to
    this one's). ``stage0_ms`` is the front's decode of a chunk; ``pp_overhead_ms`` = round trip -
    the leader's own time (under pure TP: the in-process hand-over, no PP channel)."""
    chunks = list(report.get("chunks") or [])
    steady = steady_chunks(chunks, warmup_chunks)
    periods = [float(c["period_ms"]) for c in steady if isinstance(c.get("period_ms"), (int, float))]
    with_period = [c for c in steady if isinstance(c.get("period_ms"), (int, float))]
    frames = sum(int(c.get("frames", 0)) for c in with_period)
    span_ms = sum(periods)

    def med(key: str) -> float | None:
        return _median([float(c[key]) for c in steady if isinstance(c.get(key), (int, float))])

    period_p50 = _median(periods)
    mesh, stage0 = med("mesh_ms"), med("decode_ms")
    overlap = None
    if period_p50 and mesh is not None and stage0 is not None:
        overlap = max(mesh, stage0) / period_p50
    summary = report.get("summary") or {}
    return {
        "chunks_total": len([c for c in chunks if c.get("shown", True)]),
        "chunks_measured": len(steady),
        "warmup_chunks_dropped": min(max(0, warmup_chunks), len(chunks)),
        "frames_measured": frames,
        "period_p50_ms": period_p50,
        "period_p99_ms": percentile(periods, 99),
        "period_mean_ms": float(statistics.fmean(periods)) if periods else None,
        "video_fps": frames * 1000.0 / span_ms if span_ms > 0 else None,
        "mesh_ms": mesh,
        "stage0_ms": stage0,
        "pp_overhead_ms": med("pp_overhead_ms"),
        "round_trip_ms": med("round_trip_ms"),
        "leader_ms": med("leader_ms"),
        "overlap_score": overlap,
        "time_to_first_frame_s": summary.get("time_to_first_frame_s"),
        "startup_s": report.get("startup_s"),
        "recompute_chunks": sum(1 for c in steady if c.get("recompute")),
    }


def memory_by_rank(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per global rank (string keys, for JSON): the raw peak event fields and ``peak_bytes``."""
    out: dict[str, Any] = {}
    for rank, entry in sorted(peaks_by_rank(events).items()):
        out[str(rank)] = {**entry, "peak_bytes": peak_bytes(entry)}
    return out


def config_result(cfg: BenchConfig, rep: RunReport, warmup_chunks: int) -> dict[str, Any]:
    """Everything the JSON holds for one configuration."""
    shown = [c for c in rep.chunks if c.get("shown", True)]
    return {
        "config": cfg.name,
        "title": cfg.title,
        "topology": cfg.topology,
        "tp": cfg.tp,
        "nproc": cfg.nproc,
        "ok": rep.ok,
        "exit_code": rep.exit_code,
        "failure": rep.failure,
        "failing_rank": rep.failing_rank,
        "wall_s": rep.wall_s,
        "metrics": compute_metrics(rep.report or {"chunks": rep.chunks, "summary": rep.summary}, warmup_chunks),
        "peak_memory": memory_by_rank(rep.events),
        "warmup_ms": rep.warmup_ms,
        "stats": (rep.report or {}).get("stats", {}),
        "periods_ms": [c.get("period_ms") for c in shown],
        "chunks": [
            {k: c.get(k) for k in ("chunk_index", "frames", "recompute", "period_ms", "mesh_ms", "decode_ms",
                                   "pp_overhead_ms", "round_trip_ms", "leader_ms")}
            for c in shown
        ],
        "log_tail": [] if rep.ok else rep.log_tail[-40:],
    }


# -- the machine ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the host skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_names() -> list[str]:
    """Visible GPUs by name, from ``nvidia-smi`` (no CUDA context in this process), else torch."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            names = [line.strip() for line in out.splitlines() if line.strip()]
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            if vis is not None and vis.strip() and all(x.strip().isdigit() for x in vis.split(",")):
                names = [names[int(x)] for x in vis.split(",") if int(x) < len(names)]
            return names
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA
        return []


def gpu_count() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def machine_info(device: str) -> dict[str, Any]:
    """A hostname-free description of where the bench ran."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "os": platform.system(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device,
    }
    if device == "cuda":
        names = gpu_names()
        info.update(gpu_count=gpu_count(), gpus=names)
        try:
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001
            info["nccl"] = None
    else:
        info.update(gpu_count=0, gpus=[])
    return info


def preset_shape(pipeline: str, preset: str) -> dict[str, Any] | None:
    """The reference preset's shape (dims, blocks, video size), when the pipeline is the reference one."""
    if pipeline != DEFAULT_PIPELINE:
        return None
    try:
        from pp1.pipelines.reference.presets import get_preset

        return get_preset(preset).as_dict()
    except (ImportError, ValueError):
        return None


# -- output ---------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def _mem(cfg: dict[str, Any]) -> str:
    mem = cfg.get("peak_memory") or {}
    if not mem:
        return "-"
    gpu = any("cuda_max_allocated_bytes" in e for e in mem.values())
    unit, div, digits = ("GiB", 2**30, 2) if gpu else ("MiB", 2**20, 0)
    parts = []
    for rank, entry in sorted(mem.items(), key=lambda kv: int(kv[0])):
        b = entry.get("peak_bytes")
        parts.append(f"r{rank} {b / div:.{digits}f}" if isinstance(b, int) else f"r{rank} -")
    return f"{' / '.join(parts)} {unit}"


def markdown(result: dict[str, Any]) -> str:
    """The Markdown table: one row per configuration, then how to read the overlap score."""
    m, run = result["machine"], result["run"]
    gpus = f", {m.get('gpu_count')} x {m['gpus'][0]}" if m.get("gpus") else ""
    lines = [
        f"# pp1 bench: {result['label']}",
        "",
        f"Preset `{run['preset']}`, dtype {run['dtype']}, device {run['device']}{gpus}; "
        f"{m.get('cpu_usable')} usable CPU cores ({m.get('cpu_model')}); torch {m.get('torch')}. "
        f"{run['chunks']} measured chunks after {run['warmup_chunks']} dropped; KV recompute every "
        f"{run['recompute_every']} chunk(s). Host load average at start: {run.get('load_avg_start')}.",
        "",
        "| config | ranks | period p50 (ms) | period p99 (ms) | video fps | mesh (ms) | stage 0 (ms) "
        "| PP overhead (ms) | overlap | first frame (s) | peak memory per rank | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in result["configs"]:
        x = c["metrics"]
        status = "ok" if c["ok"] else ("skipped (budget)" if c.get("skipped") else
                                       f"FAILED: {str(c.get('failure') or '')[:80]}")
        if c.get("interrupted"):
            status += " (interrupted)"
        lines.append(
            f"| {c['title']} (`{c['config']}`) | {c['nproc']} | {_f(x['period_p50_ms'])} | {_f(x['period_p99_ms'])} "
            f"| {_f(x['video_fps'], 2)} | {_f(x['mesh_ms'])} | {_f(x['stage0_ms'])} | {_f(x['pp_overhead_ms'], 2)} "
            f"| {_f(x['overlap_score'], 2)} | {_f(x['time_to_first_frame_s'], 2)} | {_mem(c)} | {status} |"
        )
    lines += [
        "",
        OVERLAP_NOTE,
        "",
        "Period: time between the frames of consecutive chunks reaching the front (p50 / p99 over the "
        "measured chunks); video fps = their frames / the sum of their periods. Mesh: the leader's "
        "generator time per chunk; stage 0: the front's decode of a chunk; PP overhead: the front's round "
        "trip minus the leader's own time (pure TP: the in-process hand-over: noise, checks, encoding). "
        "First frame: from READY to the first chunk's frames. "
        "Peak memory: CUDA max allocated (GPU) or max RSS (CPU), per global rank.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: str, label: str,
                  render: Callable[[dict[str, Any]], str] | None = None) -> tuple[str, str]:
    """Write ``bench-<label>.json`` and ``.md`` (``render``: the Markdown, default :func:`markdown`), atomically;
    returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = (os.path.join(out_dir, f"bench-{label}.json"), os.path.join(out_dir, f"bench-{label}.md"))
    text_md = (render or markdown)(result)
    for path, text in zip(paths, (json.dumps(result, indent=1, default=str) + "\n", text_md), strict=True):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return paths


# -- running --------------------------------------------------------------------------------------------


@dataclass
class BenchOptions(options.JobOptions):
    """The option table's :class:`JobOptions` (shared by every configuration's job) plus the bench's own.
    ``warmup_chunks`` is the leader's warmup before READY (``--mesh-warmup`` here); ``drop_chunks`` are
    driven first and dropped from the statistics (``--warmup-chunks`` here)."""

    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    configs: list[BenchConfig] | None = None  # None: default_configs(device, GPU count)
    chunks: int = 10  # measured chunks per configuration
    drop_chunks: int = 2  # chunks driven first and dropped from the statistics
    out_dir: str = DEFAULT_OUT
    label: str | None = None  # None: "<device>-<preset>"
    budget_s: float | None = None  # the whole bench: later configurations are skipped, the running one cut

    def resolved_label(self) -> str:
        return self.label or f"{self.device}-{self.preset}"

    def launch_options(self, cfg: BenchConfig) -> LaunchOptions:
        shared = {f.name: getattr(self, f.name) for f in fields(options.JobOptions)}
        return LaunchOptions(**{**shared, "topology": cfg.topology, "tp": cfg.tp, "dtype": self.resolved_dtype(),
                                "chunks": self.chunks + self.drop_chunks})


def launch_job(lo: LaunchOptions, stop: threading.Event) -> RunReport:
    """One bench job through the launcher (the default ``launch_fn`` of every bench)."""
    return launch(lo, stop=stop)


def run_bench(
    opts: BenchOptions,
    launch_fn: Callable[[LaunchOptions, threading.Event], RunReport] = launch_job,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run every configuration in turn; rewrite the JSON / MD after each one (a cut-short run keeps
    what it measured). Setting ``stop`` drains the running job (launch() sends SIGTERM to torchrun,
    which forwards it to every rank) and ends the bench after it. Returns the result dict (also written)."""
    stop = stop or threading.Event()
    configs = opts.configs if opts.configs is not None else default_configs(opts.device, gpu_count())
    label = opts.resolved_label()
    result: dict[str, Any] = {
        "bench_version": BENCH_VERSION,
        "label": label,
        "machine": machine_info(opts.device),
        "run": {
            "preset": opts.preset, "pipeline": opts.pipeline, "device": opts.device, "dtype": opts.resolved_dtype(),
            "chunks": opts.chunks, "warmup_chunks": opts.drop_chunks, "mesh_warmup": opts.warmup_chunks,
            "recompute_every": opts.recompute_every, "compile": opts.compile, "seed": opts.seed,
            "configs": [c.name for c in configs], "started_unix": time.time(), "load_avg_start": _loadavg(),
        },
        "preset_shape": preset_shape(opts.pipeline, opts.preset),
        "configs": [],
    }
    t0 = time.monotonic()
    for i, cfg in enumerate(configs, 1):
        if stop.is_set():
            result["run"]["interrupted"] = True
            break
        lo = opts.launch_options(cfg)
        if opts.budget_s is not None:
            left = opts.budget_s - (time.monotonic() - t0)
            if left < MIN_CONFIG_S:
                log(f"pp1 bench [{i}/{len(configs)}] {cfg.name}: skipped ({left:.0f} s of the budget left)")
                res = config_result(cfg, RunReport(ok=False, exit_code=0, wall_s=0.0, failure="skipped: budget spent"),
                                    opts.drop_chunks)
                res["skipped"] = True
                result["configs"].append(res)
                write_outputs(result, opts.out_dir, label)
                continue
            lo.timeout_s = min(lo.timeout_s, left)
        log(f"pp1 bench [{i}/{len(configs)}] {cfg.title} ({cfg.nproc} process(es)), preset {opts.preset}, "
            f"{opts.drop_chunks}+{opts.chunks} chunks, bound {lo.timeout_s:.0f} s ...")
        with tempfile.TemporaryDirectory(prefix="pp1-bench-") as tmp:
            lo.report_json = os.path.join(tmp, "report.json")
            try:
                rep = launch_fn(lo, stop)
            except KeyboardInterrupt:  # a second signal: launch() killed torchrun on the way out
                result["run"]["interrupted"] = True
                write_outputs(result, opts.out_dir, label)
                raise
        res = config_result(cfg, rep, opts.drop_chunks)
        if stop.is_set():
            res["interrupted"] = True
            result["run"]["interrupted"] = True
        result["configs"].append(res)
        x = res["metrics"]
        if rep.ok:
            log(f"pp1 bench [{i}/{len(configs)}] {cfg.name}: period p50 {_f(x['period_p50_ms'])} ms, "
                f"{_f(x['video_fps'], 2)} fps, overlap {_f(x['overlap_score'], 2)} ({rep.wall_s:.1f} s)")
        else:
            log(f"pp1 bench [{i}/{len(configs)}] {cfg.name}: FAILED (exit {rep.exit_code}): {rep.failure}")
            for line in rep.log_tail[-15:]:
                log(f"    {line}")
        res["load_avg_after"] = _loadavg()
        result["run"]["finished_unix"] = time.time()
        write_outputs(result, opts.out_dir, label)
    return result
