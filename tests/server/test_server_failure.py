"""The failure policy as the server shows it (pp1.md §5): readiness while the ranks start, a mesh
failure (503 with the cause, every stream closed with the reason on its data channel, nothing
admitted), and shutdown (every stream closed with the reason, the job asked to drain)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import Served, wait_ready
from rtc_client import RtcClient

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("front_options", [{"startup_s": 1.5}])
def test_readiness_while_ranks_start(served: Served) -> None:
    seen_states: set[str] = set()
    seen_stages: set[str] = set()
    sdp = _sdp()
    with httpx.Client(base_url=served.url, timeout=10) as http:
        deadline = time.monotonic() + 10
        while True:
            r = http.get("/ready")
            body = r.json()
            if r.status_code == 200:
                break
            assert r.status_code == 503 and body["ready"] is False, body
            assert len(body["ranks"]) == 3 and body["reason"].startswith("rank 0 (front)"), body
            seen_states |= {rk["state"] for rk in body["ranks"]}
            ps = http.get("/api/v1/pipeline/status").json()
            assert ps["status"] in ("not_loaded", "loading", "loaded"), ps
            if ps["loading_stage"]:
                seen_stages.add(ps["loading_stage"])
            offer = http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
            assert offer.status_code in (503, 200), offer.text  # 200 only if it became ready meanwhile
            if offer.status_code == 503:
                assert offer.json()["error"] == "not_ready" and "rank 0 (front)" in offer.json()["detail"]
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert "loading" in seen_states and len(seen_states - {"serving"}) >= 3, seen_states
        assert "loading" in seen_stages, seen_stages
        assert http.get("/api/v1/pipeline/status").json()["status"] == "loaded"
    assert [c for c, _ in served.front.calls] in ([], ["start"])


def _sdp() -> str:
    async def make() -> str:
        from test_server_bad_input import make_offer_sdp

        return await make_offer_sdp()

    return asyncio.run(make())


def test_mesh_failure_closes_streams_with_the_cause(served: Served) -> None:
    wait_ready(served.front)

    async def run() -> None:
        session = RtcClient(served.url)
        watcher = RtcClient(served.url, kind="watcher")
        assert (await session.connect({"prompts": [{"text": "a fox", "weight": 1.0}]})).status_code == 200
        assert (await watcher.connect()).status_code == 200
        await session.wait_frames(12, 20)
        await watcher.wait_frames(12, 20)
        await session.wait_open()
        await watcher.wait_open()
        t0 = time.monotonic()
        cause = served.front.fail("leader lost: Connection closed by peer", rank=1)
        for c in (session, watcher):
            ended = await c.wait_notice("stream_ended", 10)
            assert ended["reason"] == "mesh_failed", ended
            assert ended["cause"] == cause.model_dump(), ended
            assert "Connection closed by peer" in ended["detail"]
        notice_s = time.monotonic() - t0
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
            r = await http.get("/ready")
            body = r.json()
            assert r.status_code == 503 and body["failure"]["rank"] == 1, body
            assert "Connection closed by peer" in body["reason"]
            states = {rk["rank"]: rk["state"] for rk in body["ranks"]}
            assert set(states.values()) == {"failed"}, states
            assert body["ranks"][1]["cause"]["kind"] == "local" and body["ranks"][0]["cause"]["kind"] == "remote"
            assert body["session_state"] == "failed"
            for _ in range(100):  # the peers close
                st = (await http.get("/api/v1/status")).json()
                if not st["server"]["viewers"]:
                    break
                await asyncio.sleep(0.05)
            assert st["server"]["viewers"] == [], st["server"]
            again = await http.post("/api/v1/webrtc/offer", json={"sdp": _sdp_async_cache[0], "type": "offer"})
            assert again.status_code == 503 and again.json()["error"] == "failed", again.text
            w = await http.post("/api/v1/webrtc/watch", json={"sdp": _sdp_async_cache[0], "type": "offer"})
            assert w.status_code == 503
            p = await http.post("/api/v1/session/parameters", json={"seed": 1})
            assert p.status_code == 503, p.text
            assert (await http.get("/api/v1/pipeline/status")).json()["status"] == "error"
            assert "pp1_ready 0.0" in (await http.get("/metrics")).text
        print(f"mesh failure -> stream_ended on both viewers in {notice_s * 1000:.0f} ms")
        await session.close(delete=False)
        await watcher.close(delete=False)

    async def prepare() -> None:
        from test_server_bad_input import make_offer_sdp

        _sdp_async_cache.append(await make_offer_sdp())

    asyncio.run(prepare())
    asyncio.run(run())


_sdp_async_cache: list[str] = []


def test_shutdown_closes_streams_and_drains_the_job(served: Served) -> None:
    wait_ready(served.front)

    async def run() -> None:
        session = RtcClient(served.url)
        assert (await session.connect()).status_code == 200
        await session.wait_frames(12, 20)
        await session.wait_open()
        fut = asyncio.run_coroutine_threadsafe(served.core.shutdown("SIGTERM"), served.core._loop)  # type: ignore[arg-type]
        ended = await session.wait_notice("stream_ended", 10)
        assert ended["reason"] == "shutdown" and "SIGTERM" in ended["detail"], ended
        await asyncio.wrap_future(fut)
        assert ("request_shutdown", {"reason": "SIGTERM"}) in served.front.calls
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
            r = await http.get("/ready")
            assert r.status_code == 503 and r.json()["session_state"] == "shutdown", r.text
            st = (await http.get("/api/v1/status")).json()
            assert {rk["state"] for rk in st["front"]["ranks"]} == {"shutdown"}, st["front"]["ranks"]
            refused = await http.post("/api/v1/webrtc/offer", json={"sdp": session.pc.localDescription.sdp,
                                                                     "type": "offer"})
            assert refused.status_code == 503 and refused.json()["error"] == "shutting_down", refused.text
        await session.close(delete=False)

    asyncio.run(run())


def test_session_ends_when_its_peer_goes_and_the_next_one_is_admitted(served: Served) -> None:
    wait_ready(served.front)

    async def run() -> None:
        first = RtcClient(served.url)
        assert (await first.connect()).status_code == 200
        await first.wait_frames(6, 20)
        second = RtcClient(served.url)
        busy = await second.connect()
        assert busy.status_code == 409 and busy.json()["error"] == "busy", busy.text
        await second.pc.close()
        await first.close(delete=False)  # no DELETE: the server sees the peer connection close
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
            for _ in range(200):
                st = (await http.get("/api/v1/status")).json()["server"]
                if st["session_state"] == "idle":
                    break
                await asyncio.sleep(0.05)
            assert st["session_state"] == "idle" and st["viewers"] == [], st
        third = RtcClient(served.url)
        assert (await third.connect()).status_code == 200
        await third.wait_frames(6, 20)
        await third.close()
        assert [c for c, _ in served.front.calls] == ["start", "stop", "start", "stop"]

    asyncio.run(run())


@pytest.mark.parametrize("server_options", [{"negotiation_timeout_s": 0.5}])
def test_a_session_that_never_connects_is_closed(served: Served) -> None:
    wait_ready(served.front)

    async def run() -> None:
        from test_server_bad_input import make_offer_sdp

        sdp = await make_offer_sdp()  # its peer connection is closed: nobody will answer ICE
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
            r = await http.post("/api/v1/webrtc/offer", json={"sdp": sdp, "type": "offer"})
            assert r.status_code == 200, r.text
            for _ in range(100):
                st = (await http.get("/api/v1/status")).json()["server"]
                if st["session_state"] == "idle":
                    break
                await asyncio.sleep(0.05)
            assert st["session_state"] == "idle" and st["viewers"] == [], st
        assert [c for c, _ in served.front.calls] == ["start", "stop"]

    asyncio.run(run())
