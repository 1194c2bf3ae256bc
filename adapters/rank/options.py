"""The one option table: every option of a job, written once.

Each field of :class:`JobOptions` is an option: its flag, default, help, which commands take it
(``rank``: the torchrun entry of every rank; ``run``: ``pp1 run``; ``bench``: ``pp1 bench``;
``serve``: ``pp1 serve``) and whether it is a field of the parity-checked :class:`RunConfig`.
Everything else is derived from the table: each command's argparse options
(:func:`add_arguments`), the typed options back from argparse (:func:`from_namespace`), the argv a
launcher hands every rank (:func:`rank_argv`), the run config (:func:`run_config`), and the checks
that refuse an impossible option before any process starts, naming it (:func:`check`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from pp1.pipelines.loader import DEFAULT_PIPELINE, parse_pipeline_option
from pp1.protocol.config import RunConfig

RANK, RUN, BENCH, SERVE, SERVE_RANK = "rank", "run", "bench", "serve", "serve_rank"
COMMANDS = (RANK, RUN, BENCH, SERVE, SERVE_RANK)
JOB = frozenset({RANK, RUN, BENCH, SERVE})  # every command that starts a job (and the rank entry)
HEADLESS = frozenset({RANK, RUN})  # the front drives N chunks itself
PROCESS = frozenset({RANK, SERVE})  # knobs of one rank process (pp1 serve passes them on)
SERVER = frozenset({SERVE, SERVE_RANK})  # the HTTP/WebRTC server on the front rank (pp1 serve)
LAUNCH_SERVE = frozenset({SERVE})  # how pp1 serve starts torchrun


class InvalidOption(ValueError):
    """An option that cannot work; raised before any process starts. ``option`` is the flag."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason


@dataclass(frozen=True)
class Spec:
    """How one field appears on the command line."""

    flag: str
    help: str
    to: frozenset[str]
    config: bool = False  # a RunConfig field of the same name
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None  # argparse ``type``
    kind: str = "value"  # "value" | "flag" (store_true) | "append" | "pairs" (KEY=VALUE, repeatable)
    metavar: str | None = None
    flags: dict[str, str] = field(default_factory=dict)  # command -> another flag for this option
    defaults: dict[str, Any] = field(default_factory=dict)  # command -> another default

    def flag_for(self, command: str) -> str:
        return self.flags.get(command, self.flag)


def opt(default: Any, flag: str, help: str, to: Iterable[str] = JOB, **spec: Any) -> Any:
    """A field of the table: its default and its :class:`Spec`."""
    meta = {"spec": Spec(flag=flag, help=help, to=frozenset(to), **spec)}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _parse_pair(text: str) -> tuple[str, str]:
    try:
        return parse_pipeline_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class JobOptions:
    """Every option of a job (the typed context role code takes, never an argparse namespace)."""

    # -- the topology and the model (RunConfig: every rank must agree) --------------------------------
    topology: str = opt("pp1", "--topology", "pp1: front rank 0 + M mesh ranks; tp: M ranks, rank 0 leads and "
                        "fronts", choices=("pp1", "tp"))
    tp: int | None = opt(None, "--tp", "mesh size M (default: 2 on CPU; from WORLD_SIZE under an external "
                         "torchrun)", parse=int, defaults={RUN: 2, BENCH: None})
    preset: str = opt("tiny", "--preset", "model preset of the pipeline (reference: micro, tiny, wan-1.3b-shape, "
                      "krea-14b-shape)", config=True)
    pipeline: str = opt(DEFAULT_PIPELINE, "--pipeline", "the pipeline, as module:factory", config=True)
    pipeline_options: dict[str, str] = opt({}, "--pipeline-option", "an option of the pipeline, e.g. "
                                           "checkpoint=PATH (repeatable)", config=True, kind="pairs",
                                           parse=_parse_pair, metavar="KEY=VALUE")
    device: str = opt("cpu", "--device", "cpu: gloo; cuda: NCCL + gloo control", choices=("cpu", "cuda"))
    dtype: str | None = opt("float32", "--dtype", "float32, float16 or bfloat16 (bench: float32 on cpu, "
                            "bfloat16 on cuda)", config=True, defaults={BENCH: None})
    compile: bool = opt(False, "--compile", "compile the generator (during warmup, before READY)", config=True,
                        kind="flag")
    seed: int = opt(0, "--seed", "base seed of the noise", config=True, parse=int)
    recompute_every: int = opt(1, "--recompute-every", "K: KV recompute every K chunks (0 = never)", config=True,
                               parse=int)
    heartbeat_s: float = opt(1.0, "--heartbeat-s", "H: the front sends NOOP when idle this long", config=True,
                             parse=float)
    watchdog_s: float = opt(5.0, "--watchdog-s", "W (> 3H): a mesh rank with no header for W exits", config=True,
                            parse=float)
    deadline_floor_s: float = opt(30.0, "--deadline-floor-s", "the front waits for a result at most "
                                  "max(c x rolling p99, this)", config=True, parse=float)
    deadline_factor: float = opt(4.0, "--deadline-factor", "c in max(c x rolling p99, floor)", config=True,
                                 parse=float)
    warmup_chunks: int = opt(1, "--warmup-chunks", "warmup chunks the leader drives before READY", config=True,
                             parse=int, flags={BENCH: "--mesh-warmup"})
    context_source: str = opt("latents", "--context-source", "KV-recompute context frames: the previous latents "
                              "(cheap), or with the window's first latent frame re-encoded from its decoded "
                              "frame by the VAE (parity with single-GPU)", config=True,
                              choices=("latents", "reencode"))
    # -- the front's headless run ------------------------------------------------------------------
    chunks: int = opt(8, "--chunks", "chunks the front drives (then see --after-chunks)", to=HEADLESS, parse=int)
    after_chunks: str = opt("shutdown", "--after-chunks", "after the chunks: shut the job down, or stay idle "
                            "(heartbeats) until SIGTERM; serve: no headless chunks, a stream runs while a viewer's "
                            "session asks for it", to={RANK}, choices=("shutdown", "idle", "serve"))
    prompt: str = opt("a calm sea at dawn", "--prompt", "the prompt", to=HEADLESS | {SERVE})
    prompt_changes: list[str] = opt([], "--prompt-change", 'after CHUNK shown chunks change the prompt to TEXT '
                                    '(a hard cut: new epoch, the chunk in flight is dropped); repeatable, e.g. '
                                    '--prompt-change 4:"a red fox in the snow"', to=HEADLESS, kind="append",
                                    metavar="CHUNK:TEXT")
    report_json: str | None = opt(None, "--report-json", "the front writes its JSON report (per-chunk timings) "
                                  "here", to=HEADLESS)
    dump_frames: str | None = opt(None, "--dump-frames", "debugging/test aid: the front saves each shown chunk's "
                                  "frames (uint8 [F,H,W,3]) and latents as DIR/epoch{e}_chunk{k}.pt and "
                                  "..._latents.pt (torch.save, off the comms thread); DIR is created",
                                  to=HEADLESS, metavar="DIR")
    # -- one rank process ----------------------------------------------------------------------------
    pg_timeout_s: float = opt(600.0, "--pg-timeout-s", "process-group timeout (startup waits)", to=PROCESS,
                              parse=float)
    ready_timeout_s: float = opt(600.0, "--ready-timeout-s", "front: wait for READY at most this", to=PROCESS,
                                 parse=float)
    fail_grace_s: float = opt(1.0, "--fail-grace-s", "front: delay before a non-zero exit", to=PROCESS,
                              parse=float)
    teardown_s: float = opt(3.0, "--teardown-s", "bound on destroy_process_group", to=PROCESS, parse=float)
    log_level: str = opt("INFO", "--log-level", "rank log level", to=PROCESS)
    # -- the launcher ------------------------------------------------------------------------------
    timeout_s: float = opt(900.0, "--timeout-s", "bound on the whole job, startup included (bench: each "
                           "configuration's job)", to={RUN, BENCH}, parse=float)
    # -- the server (pp1 serve) ----------------------------------------------------------------------
    host: str = opt("127.0.0.1", "--host", "the server's bind address (127.0.0.1 unless told otherwise)", to=SERVER)
    port: int = opt(8000, "--port", "the server's port (0: any free port)", to=SERVER, parse=int)
    fps: float = opt(16.0, "--fps", "the stream's frame rate at the browser (frames are paced at it)", to=SERVER,
                     parse=float)
    no_pace: bool = opt(False, "--no-pace", "plan chunks as fast as the mesh computes them, not at the stream's "
                        "frame rate (frames beyond a viewer's queue are then dropped)", to=SERVER, kind="flag")
    max_viewers: int = opt(16, "--max-viewers", "peers at once: the session and its watchers", to=SERVER, parse=int)
    max_restarts: int = opt(0, "--max-restarts", "torchrun restarts the whole job after a failure this many times "
                            "(the viewer page reconnects)", to=LAUNCH_SERVE, parse=int)
    nnodes: int = opt(1, "--nnodes", "hosts of the job (torchrun agents); more than 1 needs --rdzv-endpoint",
                      to=LAUNCH_SERVE, parse=int)
    nproc_per_node: int | None = opt(None, "--nproc-per-node", "ranks on this host (default: the whole job on one "
                                     "host; with --nnodes, the front's host runs 1, the mesh's M)", to=LAUNCH_SERVE,
                                     parse=int)
    node_rank: int | None = opt(None, "--node-rank", "this host's rank (static rendezvous; the front's host is 0)",
                                to=LAUNCH_SERVE, parse=int)
    rdzv_backend: str = opt("c10d", "--rdzv-backend", "torchrun's rendezvous (c10d, or static with --node-rank)",
                            to=LAUNCH_SERVE, choices=("c10d", "static"))
    rdzv_endpoint: str | None = opt(None, "--rdzv-endpoint", "HOST:PORT of the rendezvous (every host the same)",
                                    to=LAUNCH_SERVE)
    rdzv_id: str = opt("pp1", "--rdzv-id", "the job's id at the rendezvous", to=LAUNCH_SERVE)

    # -- derived -----------------------------------------------------------------------------------
    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.device == "cuda" else "float32")

    def mesh_size(self, world_size: int | None = None) -> int:
        """M: ``--tp``, else from the world size (an external torchrun), else 2."""
        if self.tp is not None:
            return self.tp
        if world_size is not None:
            return world_size - 1 if self.topology == "pp1" else world_size
        return 2

    @property
    def nproc(self) -> int:
        """Processes of the job: 1 + M under pp1, M under pure TP."""
        m = self.mesh_size()
        return m + 1 if self.topology == "pp1" else m


def specs() -> list[tuple[Field[Any], Spec]]:
    return [(f, f.metadata["spec"]) for f in fields(JobOptions)]


def spec_of(name: str) -> Spec:
    for f, s in specs():
        if f.name == name:
            return s
    raise KeyError(name)


def _default(f: Field[Any], spec: Spec, command: str) -> Any:
    if command in spec.defaults:
        return spec.defaults[command]
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def add_arguments(p: argparse.ArgumentParser, command: str, skip: Sequence[str] = ()) -> None:
    """The options of ``command`` on ``p`` (``dest`` = the field's name)."""
    for f, s in specs():
        if command not in s.to or f.name in skip:
            continue
        default = _default(f, s, command)
        kw: dict[str, Any] = {"dest": f.name, "help": s.help}
        if s.kind == "flag":
            p.add_argument(s.flag_for(command), action="store_true", default=bool(default), **kw)
            continue
        if s.kind in ("append", "pairs"):
            kw.update(action="append", default=[])
        else:
            kw["default"] = default
        if s.choices:
            kw["choices"] = list(s.choices)
        if s.parse is not None:
            kw["type"] = s.parse
        if s.metavar:
            kw["metavar"] = s.metavar
        p.add_argument(s.flag_for(command), **kw)


def from_namespace(ns: argparse.Namespace, cls: type[JobOptions] = JobOptions, **extra: Any) -> JobOptions:
    """The typed options back from a parsed namespace (fields the command does not take keep defaults)."""
    values: dict[str, Any] = {}
    for f, s in specs():
        if not hasattr(ns, f.name):
            continue
        v = getattr(ns, f.name)
        if s.kind == "pairs":
            v = dict(v or [])
        elif s.kind == "append":
            v = list(v or [])
        values[f.name] = v
    return cls(**{**values, **extra})


def rank_argv(opts: JobOptions, world_size: int | None = None, commands: frozenset[str] = frozenset({RANK})
              ) -> list[str]:
    """The argv every rank of ``opts``'s job gets (``--tp`` resolved): the options of the rank entry
    (``commands``: RANK, plus SERVE_RANK for pp1 serve's)."""
    out: list[str] = []
    for f, s in specs():
        if not s.to & commands:
            continue
        v = getattr(opts, f.name)
        if f.name == "tp":
            v = opts.mesh_size(world_size)
        if f.name == "dtype":
            v = opts.resolved_dtype()
        if v is None:
            continue
        if s.kind == "flag":
            out += [s.flag] if v else []
        elif s.kind == "append":
            for item in v:
                out += [s.flag, str(item)]
        elif s.kind == "pairs":
            for key, value in v.items():
                out += [s.flag, f"{key}={value}"]
        else:
            out += [s.flag, str(v)]
    return out


def run_config(opts: JobOptions, world_size: int | None = None) -> RunConfig:
    """The parity-checked RunConfig of ``opts`` (pydantic ValidationError on a rule it breaks)."""
    m = opts.mesh_size(world_size)
    if opts.topology == "pp1":
        world, mesh = 1 + m, tuple(range(1, 1 + m))
    else:
        world, mesh = m, tuple(range(m))
    values = {f.name: getattr(opts, f.name) for f, s in specs() if s.config}
    values["dtype"] = opts.resolved_dtype()
    return RunConfig(topology=opts.topology, world_size=world, mesh_global_ranks=mesh,
                     device_backend="nccl" if opts.device == "cuda" else "gloo", control_backend="gloo", **values)


# -- checks before anything starts ------------------------------------------------------------------


def _flag(name: str, command: str) -> str:
    return spec_of(name).flag_for(command)


def check(opts: JobOptions, command: str = RUN) -> RunConfig:
    """Refuse what cannot work, naming the option (InvalidOption), before any process starts; returns
    the run config. Checks needing the pipeline or the machine are the launcher's."""
    if opts.tp is not None and opts.tp < 1:
        raise InvalidOption("--tp", f"the mesh needs at least one rank, got {opts.tp}")
    if command in HEADLESS and opts.chunks < 1:
        raise InvalidOption("--chunks", f"drive at least one chunk, got {opts.chunks}")
    for name in ("timeout_s", "pg_timeout_s", "ready_timeout_s", "teardown_s"):
        v = getattr(opts, name)
        if not (math.isfinite(v) and v > 0):
            raise InvalidOption(_flag(name, command), f"must be a positive, finite number of seconds, got {v}")
    if not (math.isfinite(opts.fail_grace_s) and opts.fail_grace_s >= 0):
        raise InvalidOption("--fail-grace-s", f"must be a finite number of seconds >= 0, got {opts.fail_grace_s}")
    if opts.resolved_dtype().removeprefix("torch.") not in ("float32", "float16", "bfloat16"):
        raise InvalidOption("--dtype", f"expected float32, float16 or bfloat16, got {opts.dtype!r}")
    if opts.dump_frames:
        try:
            check_dump_dir(opts.dump_frames)
        except ValueError as exc:
            raise InvalidOption("--dump-frames", str(exc)) from None
    try:
        parse_prompt_changes(opts.prompt_changes, opts.chunks if command in HEADLESS else None)
    except ValueError as exc:
        raise InvalidOption("--prompt-change", str(exc)) from None
    try:
        return run_config(opts)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        try:
            flag = _flag(name, command)
        except KeyError:
            flag = "--" + name.replace("_", "-") if name else "options"
        raise InvalidOption(flag, err["msg"].removeprefix("Value error, ")) from None


def check_dump_dir(directory: str) -> None:
    """Create ``directory`` (and parents); raise ValueError when it cannot be created or written."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {directory!r}: {exc.strerror or exc}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{directory!r} is not writable")


# -- --prompt-change CHUNK:TEXT -------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptChange:
    after_chunks: int  # change once this many chunks were shown
    prompt: str


def parse_prompt_change(text: str) -> PromptChange:
    """``"CHUNK:TEXT"`` -> PromptChange; ValueError (saying what is wrong) for anything else."""
    head, sep, prompt = text.partition(":")
    if not sep:
        raise ValueError(f"expected CHUNK:TEXT (e.g. 4:\"a red fox\"), got {text!r}")
    try:
        after = int(head.strip())
    except ValueError:
        raise ValueError(f"CHUNK must be an integer in CHUNK:TEXT, got {head!r}") from None
    if after < 1:
        raise ValueError(f"CHUNK must be >= 1 (chunks shown before the change), got {after}")
    if not prompt.strip():
        raise ValueError(f"TEXT must not be empty in CHUNK:TEXT, got {text!r}")
    return PromptChange(after, prompt)


def parse_prompt_changes(texts: Sequence[str], chunks: int | None = None) -> list[PromptChange]:
    """Every ``CHUNK:TEXT``, sorted by CHUNK; one change per CHUNK; with ``chunks`` (the run's total),
    each CHUNK must come before the run ends (CHUNK < chunks)."""
    changes = sorted((parse_prompt_change(t) for t in texts), key=lambda c: c.after_chunks)
    seen: set[int] = set()
    for c in changes:
        if c.after_chunks in seen:
            raise ValueError(f"two prompt changes after chunk {c.after_chunks}")
        seen.add(c.after_chunks)
        if chunks is not None and c.after_chunks >= chunks:
            raise ValueError(f"a change after {c.after_chunks} chunks never happens in a run of {chunks} chunks")
    return changes


# -- the protocol hop (pp1 bench --hop) -------------------------------------------------------------------


@dataclass
class HopOptions:
    """The hop's own options (``pp1 bench --hop`` and its rank entry ``pp1.adapters.roles.hop``): round trips
    of each kind measured and dropped first, and where each rank's profile goes (None: no profile)."""

    iterations: int = 200
    warmup: int = 20
    profile_dir: str | None = None


def add_hop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hop-iterations", dest="hop_iterations", type=int, default=HopOptions.iterations,
                   help=f"measured round trips of each kind (default {HopOptions.iterations})")
    p.add_argument("--hop-warmup", dest="hop_warmup", type=int, default=HopOptions.warmup,
                   help=f"round trips of each kind run first and dropped (default {HopOptions.warmup})")
    p.add_argument("--hop-profile", dest="hop_profile", default=None, metavar="DIR",
                   help="each rank's protocol phase under cProfile: DIR/hop-rank<r>.prof and .txt")


def hop_from_namespace(ns: argparse.Namespace) -> HopOptions:
    hop = HopOptions(iterations=ns.hop_iterations, warmup=ns.hop_warmup, profile_dir=ns.hop_profile)
    if hop.iterations < 1:
        raise InvalidOption("--hop-iterations", f"measure at least one round trip, got {hop.iterations}")
    if hop.warmup < 1:
        raise InvalidOption("--hop-warmup", f"at least one round trip (the raw series sends its bytes), got "
                            f"{hop.warmup}")
    return hop


def hop_argv(hop: HopOptions) -> list[str]:
    """The hop's options as its rank entry takes them (the inverse of :func:`add_hop_arguments`)."""
    out = ["--hop-iterations", str(hop.iterations), "--hop-warmup", str(hop.warmup)]
    return out + (["--hop-profile", hop.profile_dir] if hop.profile_dir else [])
