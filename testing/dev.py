"""The server on a stand-in front, to try it by hand: ``python -m pp1.testing.dev [--port 8000]``.

No model: frames coloured by the prompt's colour word, a moving bar (the real job: ``pp1 serve``).
"""

from __future__ import annotations

import argparse
import logging

from pp1.server.runner import serve
from pp1.server.settings import ServerSettings

from .fake_front import FakeFront


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp1.testing.dev", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="bearer token for state-changing routes (or $PP1_TOKEN)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--fps", type=float, default=24.0, help="stream fps")
    p.add_argument("--chunk-frames", type=int, default=12)
    p.add_argument("--mesh-size", type=int, default=2)
    p.add_argument("--topology", choices=["pp1", "tp"], default="pp1")
    p.add_argument("--startup-s", type=float, default=3.0, help="time the fake ranks take to become READY")
    p.add_argument("--max-viewers", type=int, default=16)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    front = FakeFront(width=args.width, height=args.height, fps=args.fps, chunk_frames=args.chunk_frames,
                      mesh_size=args.mesh_size, topology=args.topology, startup_s=args.startup_s)
    settings = ServerSettings.from_env(host=args.host, port=args.port, token=args.token,
                                       max_viewers=args.max_viewers)
    try:
        serve(front, settings, log_level=args.log_level)
    finally:
        front.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
