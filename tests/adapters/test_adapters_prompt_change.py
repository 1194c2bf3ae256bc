"""Prompt changes (a hard cut with a new conditioning) and re-encoded context frames in the chunk
engine, in one process: the in-process leader of pure TP (mesh of 1, stand-in pipeline) or a fake
mesh. Checks orderings and tensors, not speeds."""

from __future__ import annotations

import threading

import pytest
import torch

from pp1.adapters.front.engine import FrontEngine
from pp1.adapters.front.prompt_script import PromptScript
from pp1.adapters.front.report import summarise
from pp1.adapters.launch.launcher import InvalidOption, LaunchOptions, check_options
from pp1.adapters.rank import options
from pp1.adapters.rank.options import PromptChange, parse_prompt_changes
from pp1.adapters.roles.main import build_parser
from pp1.fsm.chunk import ChunkMachine
from pp1.fsm.front import FrontMachine
from pp1.protocol.config import RunConfig
from pp1.protocol.errors import LocalProtocolError
from pp1.protocol.messages import T_CONTEXT, Action, PPResultV1
from pp1.testing.inprocess import pure_tp_job
from pp1.testing.standin import factory

FOX = "a red fox in the snow"


class HookChannel:
    """Wraps the front's way to the leader: records what was sent and calls test hooks after a send /
    before a result returns."""

    def __init__(self, inner, log: list, overlaps: bool = True) -> None:
        self.inner, self.log, self.overlaps, self.sent = inner, log, overlaps, []
        self.on_send = self.on_recv = None

    def send_envelope(self, env, tensors, timeout_s=None, preflight=True):
        self.inner.send_envelope(env, tensors, timeout_s=timeout_s, preflight=preflight)
        self.sent.append((env, list(tensors)))
        if env.action is Action.INFER:
            self.log.append(f"send {env.cache_epoch}:{env.chunk_index}")
        if self.on_send:
            self.on_send(env)

    def recv_result(self, until):
        res, tensors = self.inner.recv_result(until)
        if self.on_recv:
            self.on_recv(res)
        return res, tensors


class SpyStage0:
    """The stand-in stage 0, made to decode a different image per frame (so that which frame is
    re-encoded matters); records decodes, encodes and the threads that encode prompts."""

    def __init__(self, inner, log: list) -> None:
        self.inner, self.log, self.geometry = inner, log, inner.geometry
        self.decoded: list[tuple[torch.Tensor, torch.Tensor]] = []  # (latents, frames)
        self.prompt_threads: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_prompt(self, prompt):
        self.prompt_threads.append(threading.get_ident())
        return self.inner.encode_prompt(prompt)

    def decode(self, latents, first_chunk):
        frames = self.inner.decode(latents, first_chunk)
        ramp = 17 * torch.arange(frames.shape[0], dtype=torch.int32)[:, None, None, None]
        frames = ((frames.to(torch.int32) + ramp) % 256).to(torch.uint8)
        self.decoded.append((latents.clone(), frames))
        self.log.append("decode")
        return frames


def _engine(context_source: str = "latents", chunks: int = 4, overlaps: bool = True, on_frames=None,
            channel=None, window: int | None = None):
    log: list[str] = []
    hooks: list[HookChannel] = []
    spies: list[SpyStage0] = []

    def hook(inner):
        hooks.append(HookChannel(channel or inner, log, overlaps))
        return hooks[0]

    def spy(st):
        spies.append(SpyStage0(st, log))
        return spies[0]

    job = pure_tp_job(chunks=chunks, context_source=context_source, channel=hook, stage0=spy)
    eng = job.engine
    if window is not None:  # the same job with a narrower attention window
        geo = job.engine.geometry.model_copy(update={"max_context_frames": window})
        chunk = ChunkMachine(0, chunk_frames=geo.latent_frames, window=window, timesteps=job.relay.timesteps,
                             recompute_every=1, context_source=context_source)
        machine = FrontMachine(0, chunk=chunk, geometry=geo, overlap=overlaps, ping=False, max_chunks=chunks)
        eng = FrontEngine(machine, hooks[0], spies[0], geo, conditioning=spies[0].inner.encode_prompt(
            "a calm sea at dawn"))
    shown: list[tuple[int, int]] = []

    def frames_cb(batch) -> None:
        shown.append((batch.record.cache_epoch, batch.record.chunk_index))
        if on_frames is not None:
            on_frames(batch.frames, batch.record)

    eng.add_sink(frames_cb)
    return eng, hooks[0], spies[0], shown


def _in_thread(fn) -> int:
    """Run ``fn`` on a thread of its own (as the HTTP server will), wait for it; returns its ident."""
    box: dict = {}

    def run() -> None:
        box["ident"] = threading.get_ident()
        fn()

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return box["ident"]


def _infers(link: HookChannel) -> list:
    return [(e, t) for e, t in link.sent if e.action is Action.INFER]


def _assert_new_epoch(link: HookChannel, index: int, conditioning: torch.Tensor) -> None:
    env, tensors = _infers(link)[index]
    assert (env.cache_epoch, env.chunk_index, env.init_cache, env.reset_cache, env.do_kv_recompute) == (
        1, 0, True, True, False)
    assert torch.equal(tensors[0], conditioning)
    assert all(torch.equal(t[0], conditioning) for _, t in _infers(link)[index:])
    assert not any(torch.equal(t[0], conditioning) for _, t in _infers(link)[:index])


# -- prompt changes ---------------------------------------------------------------------------------


def test_prompt_change_with_a_chunk_in_flight_drops_its_result_and_starts_a_new_epoch() -> None:
    eng, link, spy, shown = _engine(chunks=4)
    engine_thread: list[int] = []
    caller: list[int] = []

    def on_send(env) -> None:
        if (env.action, env.cache_epoch, env.chunk_index) == (Action.INFER, 0, 2):  # chunk 2 is in flight
            engine_thread.append(threading.get_ident())
            caller.append(_in_thread(lambda: eng.request_prompt(FOX)))

    link.on_send = on_send
    out = eng.run_to_end()
    assert out.ok
    assert shown == [(0, 0), (0, 1), (1, 0), (1, 1)]  # never (0, 2): the epoch fence
    assert [(r.cache_epoch, r.chunk_index, r.shown, r.frames) for r in out.records if not r.shown] == [(0, 2, False, 0)]
    assert len(spy.decoded) == 4  # the dropped result was never decoded
    assert out.stats["discarded_stale"] == 1 and out.stats["prompt_changes"] == 1 and out.stats["hard_cuts"] == 1
    _assert_new_epoch(link, 3, spy.inner.encode_prompt(FOX))
    assert eng.prompt == FOX
    # the conditioning was encoded on the caller's thread, never on the engine's
    assert spy.prompt_threads == caller and engine_thread[0] not in spy.prompt_threads
    s = summarise(out.records, None)
    assert s["chunks"] == 4 and s["stale"] == 1 and s["epochs"] == 2


def test_prompt_change_while_idle_cuts_without_a_stale_result() -> None:
    """Serial link (pure TP): chunk k is shown before k+1 is sent, so nothing is in flight at the cut."""
    states: list[str] = []
    eng = None

    def on_frames(frames, rec) -> None:
        if (rec.cache_epoch, rec.chunk_index) == (0, 1):
            states.append(eng.machine.chunk.state)
            _in_thread(lambda: eng.request_prompt(FOX))

    eng, link, spy, shown = _engine(chunks=4, overlaps=False, on_frames=on_frames)
    out = eng.run_to_end()
    assert out.ok and states == ["idle"]
    assert shown == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r.shown for r in out.records) and out.stats["discarded_stale"] == 0
    assert [(e.cache_epoch, e.chunk_index) for e, _ in _infers(link)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _assert_new_epoch(link, 2, spy.inner.encode_prompt(FOX))


def test_prompt_change_while_a_result_arrives_is_never_decoded() -> None:
    """The cut lands after result k was received but before it was decoded: k is dropped undecoded."""
    eng, link, spy, shown = _engine(chunks=3)

    def on_recv(res) -> None:
        if (res.action, res.cache_epoch, res.chunk_index) == (Action.INFER, 0, 1):
            _in_thread(lambda: eng.request_prompt(FOX))

    link.on_recv = on_recv
    out = eng.run_to_end()
    assert out.ok
    assert shown == [(0, 0), (1, 0), (1, 1)]
    assert [(r.cache_epoch, r.chunk_index) for r in out.records if not r.shown] == [(0, 1)]
    assert len(spy.decoded) == 3 and out.stats["discarded_stale"] == 0  # the machine emitted it; the cut came after
    _assert_new_epoch(link, 2, spy.inner.encode_prompt(FOX))


def test_request_prompt_refuses_to_encode_on_the_engine_thread_and_checks_the_shape() -> None:
    errors: list[Exception] = []
    eng = None

    def on_frames(frames, rec) -> None:  # runs on the engine's thread
        try:
            eng.request_prompt(FOX)
        except LocalProtocolError as exc:
            errors.append(exc)

    eng, link, spy, shown = _engine(chunks=2, on_frames=on_frames)
    assert eng.run_to_end().ok and len(errors) == 2 and errors[0].code == "encode_on_engine_thread"
    assert spy.prompt_threads == [] and eng.machine.chunk.cache_epoch == 0
    with pytest.raises(LocalProtocolError) as exc:
        eng.request_prompt(FOX, conditioning=torch.zeros(2, 2))
    assert exc.value.code == "bad_conditioning"


def test_prompt_script_changes_after_n_shown_chunks_with_conditioning_encoded_up_front() -> None:
    eng, link, spy, shown = _engine(chunks=5)
    script = PromptScript(parse_prompt_changes(["3:" + FOX, "1:a grey wolf"], chunks=5)).encode(spy)
    before_run = list(spy.prompt_threads)
    script.attach(eng)
    out = eng.run_to_end()
    assert out.ok and spy.prompt_threads == before_run  # nothing encoded once the engine ran
    epochs = [e for e, _ in shown]
    assert epochs[0] == 0 and epochs[1] == 1 and epochs[3:] == [2, 2] and len(shown) == 5
    assert out.stats["prompt_changes"] == 2 and eng.prompt == FOX


# -- re-encoded context frames ------------------------------------------------------------------------


def _context(env, tensors) -> torch.Tensor:
    return tensors[list(env.tensor_names()).index(T_CONTEXT)]


def test_reencode_context_replaces_the_window_s_first_latent_frame_by_its_decoded_frame() -> None:
    eng, link, spy, shown = _engine("reencode", chunks=5)
    out = eng.run_to_end()
    assert out.ok and out.stats["reencoded"] == 2
    lat = [latents for latents, _ in spy.decoded]  # chunk p's latents and frames, in order
    frames = [f for _, f in spy.decoded]
    assert [f.shape[0] for f in frames] == [9, 12, 12, 12, 12]
    infers = _infers(link)
    # chunks 1 and 2: the window starts at the epoch's first latent frame (a causal start): kept as is
    assert torch.equal(_context(*infers[1]), lat[0])
    assert torch.equal(_context(*infers[2]), torch.cat(lat[:2], dim=1))
    # chunks 3 and 4: window = chunks p-2 and p-1; its first latent frame comes from the last video frame
    # that frame decoded to (frame 3 of a 12-frame chunk), encoded alone (1 = 4k+1 frames: a causal start)
    for p in (3, 4):
        ctx = _context(*infers[p])
        prev = torch.cat(lat[p - 2:p], dim=1)
        assert ctx.shape == prev.shape
        assert torch.equal(ctx[:, 1:], prev[:, 1:])
        assert torch.equal(ctx[:, :1], spy.inner.encode(frames[p - 2][3:4]))
        assert not torch.equal(ctx[:, :1], spy.inner.encode(frames[p - 2][0:1]))


class FakeMesh:
    """A leader that answers every envelope ok with seeded latents (no generator)."""

    overlaps = True

    def __init__(self, geometry) -> None:
        self.geometry, self.env = geometry, None

    def send_envelope(self, env, tensors, timeout_s=None, preflight=True):
        self.env = env

    def recv_result(self, until):
        env, self.env = self.env, None
        res = PPResultV1(action=env.action, ok=True, call_id=env.call_id, chunk_index=env.chunk_index,
                         cache_epoch=env.cache_epoch, observed_generator_calls=env.expected_generator_calls)
        if env.action is not Action.INFER:
            return res, []
        g = torch.Generator().manual_seed(env.call_id)
        return res, [torch.randn(self.geometry.latents_shape(), generator=g)]


def test_reencode_with_a_one_chunk_window_decodes_chunk_k_before_sending_k_plus_1() -> None:
    geo = factory().geometry("tiny")
    eng, link, spy, shown = _engine("reencode", chunks=4, channel=FakeMesh(geo), window=geo.latent_frames)
    out = eng.run_to_end()
    assert out.ok and out.stats["reencoded"] == 2
    # chunk 1's window is chunk 0 (starts at frame 0: kept, overlap as usual); chunks 2, 3 need chunk 1, 2 decoded
    assert link.log == ["send 0:0", "send 0:1", "decode", "decode", "send 0:2", "decode", "send 0:3", "decode"]
    infers = _infers(link)
    for p in (2, 3):
        ctx = _context(*infers[p])
        assert torch.equal(ctx[:, :1], spy.inner.encode(spy.decoded[p - 1][1][3:4]))
        assert torch.equal(ctx[:, 1:], spy.decoded[p - 1][0][:, 1:])


# -- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "needle"),
    [(["4"], "CHUNK:TEXT"), (["x:fox"], "integer"), (["0:fox"], ">= 1"), (["4:  "], "empty"),
     (["8:fox"], "never happens"), (["2:a", "2:b"], "two prompt changes")],
)
def test_bad_prompt_changes_are_refused_naming_the_option(changes: list[str], needle: str) -> None:
    with pytest.raises(InvalidOption) as exc:
        check_options(LaunchOptions(chunks=8, prompt_changes=changes))
    assert exc.value.option == "--prompt-change" and needle in exc.value.reason


def test_options_reach_the_ranks_and_context_source_is_part_of_the_run_config() -> None:
    opts = LaunchOptions(chunks=10, prompt_changes=["4:" + FOX], context_source="reencode")
    check_options(opts)
    with pytest.raises(InvalidOption) as exc:
        check_options(LaunchOptions(context_source="pixels"))
    assert exc.value.option == "--context-source"
    args = options.from_namespace(build_parser().parse_args(opts.rank_args("/tmp/r.json")))
    assert args.prompt_changes == ["4:" + FOX]
    assert parse_prompt_changes(args.prompt_changes) == [PromptChange(4, FOX)]
    cfg = options.run_config(args, opts.nproc)
    assert cfg.context_source == "reencode"
    assert cfg.digest() != cfg.model_copy(update={"context_source": "latents"}).digest()
    assert RunConfig().context_source == "latents"
