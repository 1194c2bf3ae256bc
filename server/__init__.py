"""HTTP + WebRTC server (FastAPI, aiortc) on the front rank. It knows the job only through
``pp1.server.front_api.FrontAPI``; ``create_app(front, settings)`` in ``pp1.server.app``. See
server/README.md."""
