"""Prometheus metrics (``/metrics``): the server's own counters, plus the front's status read at
scrape time. One registry per app (tests build many apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .front_api import FrontStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_in = Counter("pp1_server_frames_in", "Frames received from the front (decoded chunks x frames)",
                                 registry=r)
        self.frames_dropped = Counter("pp1_server_frames_dropped", "Frames dropped before a viewer's track: "
                                      "queue_full (oldest dropped), not_live (no live session), superseded (an older epoch's frames "
                                      "still queued when a hard cut's first frames came)", ["reason"],
                                      registry=r)
        self.offers = Counter("pp1_server_offers", "Offers by outcome", ["kind", "outcome"], registry=r)
        self.refusals = Counter("pp1_server_refusals", "Requests refused (4xx/5xx), by code", ["code"], registry=r)
        self.channel_messages = Counter("pp1_server_channel_messages", "Data-channel messages by outcome",
                                        ["outcome"], registry=r)
        self.viewers = Gauge("pp1_server_viewers", "Connected peers by kind", ["kind"], registry=r)
        for kind in ("session", "watcher"):
            self.viewers.labels(kind=kind).set(0)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FrontCollector(Collector):
    """The front's status (``FrontAPI.status``) and the session slot's state, read at scrape time."""

    def __init__(self, status: Callable[[], FrontStatus], session_state: Callable[[], str],
                 states: list[str], frames_sent: Callable[[], int]) -> None:
        self._status = status
        self._session_state = session_state
        self._states = states
        self._frames_sent = frames_sent

    def describe(self) -> Iterator:  # no fixed description: collected at scrape time only
        return iter(())

    def collect(self) -> Iterator:
        st = self._status()
        yield GaugeMetricFamily("pp1_ready", "1 when the mesh is READY", value=1 if st.ready else 0)
        yield GaugeMetricFamily("pp1_streaming", "1 while a stream runs", value=1 if st.streaming else 0)
        ranks = GaugeMetricFamily("pp1_rank_state", "1 for each rank's current lifecycle state",
                                  labels=["rank", "role", "state"])
        for r in st.ranks:
            ranks.add_metric([str(r.rank), r.role, r.state], 1)
        yield ranks
        c = st.counters
        for name, value, help_ in (
            ("pp1_chunks_emitted", c.emitted, "Chunks decoded and shown"),
            ("pp1_chunks_stale_dropped", c.stale_dropped, "Results dropped by the epoch fence"),
            ("pp1_chunk_retries", c.retries, "Chunks retried after ok=False"),
            ("pp1_kv_recomputes", c.recomputes, "KV-cache recomputes"),
            ("pp1_hard_cuts", c.hard_cuts, "Hard cuts (epoch + 1)"),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        t = st.timings
        for name, value, help_ in (
            ("pp1_stream_fps", t.fps, "Video frames per second produced by the front"),
            ("pp1_period_p50_seconds", _s(t.period_p50_ms), "Chunk period, median"),
            ("pp1_period_p99_seconds", _s(t.period_p99_ms), "Chunk period, p99"),
            ("pp1_mesh_seconds", _s(t.mesh_ms), "Mesh compute per chunk"),
            ("pp1_decode_seconds", _s(t.decode_ms), "Stage-0 decode per chunk"),
            ("pp1_overlap_score", t.overlap_score, "Share of decode hidden behind mesh compute"),
            ("pp1_pp_overhead_seconds", _s(t.pp_overhead_ms), "PP round-trip overhead per chunk"),
            ("pp1_time_to_first_frame_seconds", t.time_to_first_frame_s, "Stream start -> first frame"),
            ("pp1_prompt_to_first_frame_seconds", t.prompt_to_first_frame_s, "Last prompt change -> its first frame"),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, help_, value=value)
        state = self._session_state()
        sess = GaugeMetricFamily("pp1_session_state", "1 for the session slot's current state", labels=["state"])
        for s in self._states:
            sess.add_metric([s], 1 if s == state else 0)
        yield sess
        yield CounterMetricFamily("pp1_server_frames_sent", "Frames sent on viewers' tracks (all viewers)",
                                  value=self._frames_sent())


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0
