"""The rank entry of ``pp1 serve``: ``python -m pp1.server.rank [options]`` (torchrun runs it on every rank).

Every rank runs the rank entry (``pp1.adapters.roles.main``); the rank that hosts the front (rank 0: the
PP1 front, or pure TP's rank 0) also runs the HTTP/WebRTC server in a thread of its own, from the start
of the process: progress shows while the ranks load; the stream starts when a viewer's session asks.
A port that cannot be bound fails the rank before anything distributed starts.
"""

from __future__ import annotations

import logging
import threading

from pp1.adapters.rank import options
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.roles import main as rank_main
from pp1.adapters.roles.context import RankContext

from .app import create_app
from .front import RankFront
from .runner import bind, url_of, uvicorn_server
from .settings import ServerSettings

log = logging.getLogger("pp1.server.rank")


def attach_server(ctx: RankContext) -> None:
    """On the rank that hosts the front: bind the port, then serve in a daemon thread."""
    if not ctx.rt.hosts_front:
        return
    opts = ctx.options
    settings = ServerSettings.from_env(host=opts.host, port=opts.port, max_viewers=opts.max_viewers)
    sock = bind(settings.host, settings.port)  # fails now (port taken) rather than after loading
    port = sock.getsockname()[1]
    app = create_app(RankFront(ctx, fps=opts.fps), settings)
    server = uvicorn_server(app, settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pp1-http", daemon=True)
    thread.start()
    url = url_of(settings.host, port)
    log.info("viewer at %s", url)
    emit_event("serving", url=url, host=settings.host, port=port, token=bool(settings.token))


def main(argv: list[str] | None = None) -> int:
    parser = rank_main.build_parser((options.RANK, options.SERVE_RANK), prog="python -m pp1.server.rank")
    return rank_main.main(argv, ctx_hook=attach_server, parser=parser)


if __name__ == "__main__":
    raise SystemExit(main())
