"""HTTP + WebRTC server (FastAPI, aiortc). Imports `pp1.adapters` only; arrives with its own issue."""
