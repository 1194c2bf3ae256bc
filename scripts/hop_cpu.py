"""The protocol's own CPU per round trip, warm, in one process (issue 10's hop, without the transport).

One chunk's round trip as the hop runs it, every step but the bytes' travel: the front's chunk machine plans
it, the envelope is built and announces its tensors, preflighted and encoded; the leader decodes it, its relay
machine takes it (validation, relay, the shard's intents), the shard is done, the result is built, preflighted,
encoded; the front decodes and validates it and the chunk machine judges it. Timed warm (min of REPEAT x N):
the floor of what ``pp1 bench --hop`` measures in a job, where the same code runs with cold caches.

    .venv/bin/python scripts/hop_cpu.py [--preset tiny] [-n 2000] [--profile]

Runs on any checkout that has these modules (``PYTHONPATH=<shim>`` for an older tree, as
``scripts/device_bench.sh`` maps one).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import timeit

import torch

from pp1.adapters.front.engine import announce
from pp1.fsm.chunk import ChunkMachine, envelope_from_plan
from pp1.fsm.leader import LeaderRelayMachine
from pp1.pipelines.loader import load_factory
from pp1.protocol import codec, preflight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("-n", type=int, default=2000, help="round trips per timing (default 2000)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="then cProfile 2000 round trips (top 15 by own time)")
    a = p.parse_args()

    factory = load_factory()
    g, timesteps = factory.geometry(a.preset), tuple(factory.timesteps(a.preset))
    leader = LeaderRelayMachine(1, g, 1, timesteps=timesteps)
    leader.start_warmup()  # no warm-up chunks: READY, then idle
    chunk = ChunkMachine(0, chunk_frames=g.latent_frames, window=g.max_context_frames, timesteps=timesteps,
                         recompute_every=1)
    dtype = getattr(torch, g.dtype.removeprefix("torch."))
    cond, noise = torch.zeros(g.conditioning_shape(), dtype=dtype), torch.zeros(g.noise_shape(), dtype=dtype)
    context = {f: torch.zeros(g.context_shape(f), dtype=dtype) for f in range(1, g.max_context_frames + 1)}
    latents = torch.zeros(g.latents_shape(), dtype=dtype)
    last_call: list[int | None] = [None]

    def round_trip() -> None:
        plan = chunk.plan_next(0.0)
        tensors = [cond, noise] + ([context[plan.context_frames]] if plan.do_kv_recompute else [])
        env = announce(envelope_from_plan(plan), tensors)
        frames = preflight.preflight_envelope(env, tensors, g, last_call[0])
        chunk.on_sent(0.0)
        last_call[0] = env.call_id
        got = codec.decode_meta(codec.decode_header(frames.header), frames.meta)
        leader.on_envelope(got, 0.0)
        (reply,) = leader.on_shard_done(got.expected_generator_calls, 0, {"total": 1.0}, 0.0)
        out = preflight.preflight_result(reply.result, [latents], g)  # type: ignore[attr-defined]
        leader.on_result_sent(0.0)
        res = codec.decode_meta(codec.decode_header(out.header), out.meta)
        preflight.validate_result(res, g)
        if chunk.on_result(res, 0.0).verdict.value != "emit":
            raise SystemExit("hop_cpu: the chunk was not accepted")

    for _ in range(200):
        round_trip()
    best = min(timeit.repeat(round_trip, number=a.n, repeat=a.repeat)) / a.n
    print(f"hop_cpu: {a.preset}: the protocol's CPU per round trip, warm, one process: {best * 1e6:.1f} us")
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [round_trip() for _ in range(2000)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
