"""An aiortc client against the served fake front: >= 2 s of frames, and the picture changes after
a prompt change sent on the data channel (a hard cut: new colour)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from conftest import Served, wait_ready
from rtc_client import RtcClient

from pp1.testing.fake_front import prompt_colour

pytestmark = pytest.mark.timeout(90)

RED, BLUE = "a red fox in the snow", "a blue whale"


def _colour_distance(a: tuple[float, ...], b: tuple[int, ...]) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b, dtype=float)).mean())


def test_frames_flow_and_follow_a_prompt_change(served: Served) -> None:
    wait_ready(served.front)
    assert prompt_colour(RED) != prompt_colour(BLUE)

    async def run() -> None:
        c = RtcClient(served.url)
        r = await c.connect({"prompts": [{"text": RED, "weight": 1.0}]})
        assert r.status_code == 200, r.text
        fps = served.front.info().fps
        await c.wait_frames(int(2.0 * fps), timeout_s=20)
        span = c.frames[-1].t - c.frames[0].t
        assert span >= 1.5, span  # paced: 2 s of video takes about 2 s
        await c.wait_open()
        before = c.frames[-1].mean_rgb
        c.send({"prompts": [{"text": BLUE, "weight": 1.0}]})
        applied = await c.wait_notice("parameters_applied", 10)
        assert applied["parameters"]["prompts"][0]["text"] == BLUE
        n = len(c.frames)
        await c.wait_frames(n + int(2 * fps), timeout_s=20)
        after = c.frames[-1].mean_rgb
        # the background follows the prompt (the bar and the stripe move the mean a little)
        assert _colour_distance(before, prompt_colour(RED)) < _colour_distance(before, prompt_colour(BLUE))
        assert _colour_distance(after, prompt_colour(BLUE)) < _colour_distance(after, prompt_colour(RED))
        async with httpx.AsyncClient(base_url=served.url) as http:
            params = (await http.get("/api/v1/session/parameters")).json()
            assert params["sessionId"] == c.session_id and params["parameters"]["prompts"][0]["text"] == BLUE
            st = (await http.get("/api/v1/status")).json()
            assert st["server"]["session_state"] == "streaming"
            assert st["front"]["counters"]["hard_cuts"] >= 2
        await c.close()
        async with httpx.AsyncClient(base_url=served.url) as http:
            for _ in range(50):
                st = (await http.get("/api/v1/status")).json()
                if st["server"]["session_state"] == "idle":
                    break
                await asyncio.sleep(0.05)
            assert st["server"]["session_state"] == "idle" and st["server"]["viewers"] == []
        assert [name for name, _ in served.front.calls] == ["start", "update", "stop"]

    asyncio.run(run())
