"""The viewer page in a real browser: Debian's headless Chromium driven by playwright (installed by
scripts/setup_browser.sh; skipped when absent). It opens ``/``, starts the stream, sees frames play
in the video element (currentTime advances, a canvas sample follows the prompt), changes the
prompt, then survives a server restart (the page polls /ready and renegotiates by itself).
The screenshots are kept under test-artifacts/server/ (git-ignored); their paths are printed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import serve_in_thread, wait_ready

from pp1.server.settings import ServerSettings
from pp1.testing.fake_front import FakeFront, prompt_colour

CHROMIUM = os.environ.get("PP1_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "server"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-features=WebRtcHideLocalIpsWithMdns",  # host candidates as IPs (no mDNS in a container)
]

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

SAMPLE = """() => {
  const v = document.getElementById('video');
  if (!v.videoWidth) return null;
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let r = 0, gg = 0, b = 0;
  for (let i = 0; i < d.length; i += 4) { r += d[i]; gg += d[i + 1]; b += d[i + 2]; }
  const n = d.length / 4;
  return {rgb: [r / n, gg / n, b / n], t: v.currentTime, frames: window.pp1.frames, fps: window.pp1.browserFps,
          id: window.pp1.id, kind: window.pp1.kind};
}"""


def _browser() -> Any:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/setup_browser.sh installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api


def _wait(page: Any, pred: Any, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = page.evaluate(SAMPLE)
        if last is not None and pred(last):
            return last
        time.sleep(0.1)
    log = page.evaluate("() => document.getElementById('log').innerText")
    raise AssertionError(f"{what}: not after {timeout_s} s; last sample {last}; page log:\n{log}")


def _nearest(rgb: list[float], prompts: list[str]) -> str:
    return min(prompts, key=lambda p: sum(abs(a - b) for a, b in zip(rgb, prompt_colour(p), strict=True)))


def test_viewer_page_streams_changes_prompt_and_reconnects_after_a_restart() -> None:
    sync_api = _browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    red, blue = "a red fox in the snow", "a blue whale"
    prompts = [red, blue]
    assert prompt_colour(red) != prompt_colour(blue)
    settings = ServerSettings(port=0, close_flush_s=0.3)
    front = FakeFront(width=256, height=256, fps=24.0)
    served_ctx = serve_in_thread(front, settings)
    served = served_ctx.__enter__()
    port = int(served.url.rsplit(":", 1)[1])
    second_front = None
    second_ctx = None
    try:
        wait_ready(front)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(served.url + "/")
                page.wait_for_function("() => document.getElementById('ready').textContent === 'ready'", timeout=15000)
                assert "random weights" in page.inner_text("#notice")
                assert "pipeline fake" in page.inner_text("#job")
                page.fill("#prompt", red)
                page.click("#start")
                first = _wait(page, lambda s: s["t"] > 0.2 and s["kind"] == "session", 20, "video playing")
                later = _wait(page, lambda s: s["t"] > first["t"] + 1.5, 10, "currentTime advancing")
                assert later["frames"] > first["frames"]
                assert _nearest(later["rgb"], prompts) == red, later
                steady = _wait(page, lambda s: s["fps"] is not None and s["t"] > 3, 10, "browser fps measured")
                browser_fps = steady["fps"]
                page.screenshot(path=str(ARTIFACTS / "viewer-streaming.png"))

                page.fill("#prompt", blue)
                page.click("#send")
                changed = _wait(page, lambda s: _nearest(s["rgb"], prompts) == blue, 10, "prompt change shown")
                page.wait_for_function("() => document.getElementById('log').innerText.includes('parameters applied')",
                                       timeout=5000)
                shot = ARTIFACTS / "viewer.png"
                page.screenshot(path=str(shot))
                rows = page.inner_text("#ranks")
                assert rows.count("serving") == 3, rows
                assert "frames superseded by cuts" in page.inner_text("#figures")

                # the job restarts: the server goes away, comes back on the same port with a new front
                t_down = time.monotonic()
                served_ctx.__exit__(None, None, None)
                served_ctx = None
                front.close()
                page.wait_for_function("() => document.getElementById('log').innerText.includes('stream ended')",
                                       timeout=10000)
                time.sleep(1.0)  # the page sees the server unreachable meanwhile
                second_front = FakeFront(width=256, height=256, fps=24.0)
                second_ctx = serve_in_thread(second_front, settings, port=port)
                second_ctx.__enter__()
                back = _wait(page, lambda s: s["id"] is not None and s["id"] != changed["id"] and s["frames"]
                             > changed["frames"] + 24, 30, "reconnected after the restart")
                reconnect_s = time.monotonic() - t_down
                assert _nearest(back["rgb"], prompts) == blue, back  # renegotiated with the prompt in the box
                page.screenshot(path=str(ARTIFACTS / "viewer-after-restart.png"))
            finally:
                browser.close()
        print(f"\nbrowser fps {browser_fps:.1f} (stream fps 24); prompt change seen; reconnected "
              f"{reconnect_s:.1f} s after the server went down (1 s of it down on purpose)")
        print(f"screenshot: {shot}")
        assert browser_fps > 10, browser_fps
    finally:
        if served_ctx is not None:
            served_ctx.__exit__(None, None, None)
        if second_ctx is not None:
            second_ctx.__exit__(None, None, None)
        front.close()
        if second_front is not None:
            second_front.close()


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_viewer_page_plays_the_real_job_and_reconnects_after_the_job_restarts() -> None:
    """``pp1 serve`` (1 front + 2 mesh ranks, CPU, tiny): the page starts the stream, frames play; the leader
    is SIGKILLed: the page says the stream ended, torchrun restarts the job, the page reconnects by itself."""
    import signal as _signal

    from pp1.testing.served_job import served_job

    sync_api = _browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fast = ["--heartbeat-s", "0.5", "--watchdog-s", "2.5", "--deadline-floor-s", "4", "--max-restarts", "1"]
    with served_job("--tp", "2", *fast) as job:
        job.wait_ready()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(job.url)
                page.wait_for_function("() => document.getElementById('ready').textContent === 'ready'", timeout=30000)
                assert "random weights" in page.inner_text("#notice")
                assert "reference" in page.inner_text("#job")
                page.fill("#prompt", "a lighthouse at night")
                t_start = time.monotonic()
                page.click("#start")
                first = _wait(page, lambda s: s["t"] > 0.2 and s["kind"] == "session", 60, "video playing")
                first_frame_s = time.monotonic() - t_start
                later = _wait(page, lambda s: s["t"] > first["t"] + 2.0, 20, "currentTime advancing")
                steady = _wait(page, lambda s: s["fps"] is not None and s["t"] > first["t"] + 3, 20, "fps")
                assert later["frames"] > first["frames"]
                rows = page.inner_text("#ranks")
                assert rows.count("serving") == 3, rows
                shot = ARTIFACTS / "viewer-real-job.png"
                page.screenshot(path=str(shot))
                os.kill(job.rank_pids()[1], _signal.SIGKILL)
                t_kill = time.monotonic()
                page.wait_for_function("() => document.getElementById('log').innerText.includes('stream ended')",
                                       timeout=20000)
                back = _wait(page, lambda s: s["id"] is not None and s["id"] != steady["id"]
                             and s["t"] > 1.0, 120, "reconnected after the job restarted")
                reconnect_s = time.monotonic() - t_kill
                page.screenshot(path=str(ARTIFACTS / "viewer-real-job-after-restart.png"))
                assert back["frames"] > 0
            finally:
                browser.close()
        print(f"\nreal job: first frame in the browser {first_frame_s:.2f} s after Start; browser fps "
              f"{steady['fps']:.1f} (stream fps 16); reconnected {reconnect_s:.1f} s after SIGKILL of the leader")
        print(f"screenshot: {shot}")
        assert job.stop(_signal.SIGINT, timeout_s=30) == 0, job.output()[-3000:]
