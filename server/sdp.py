"""What an SDP offer must be before the server hands it to aiortc: a session description that
asks to *receive* video (a recvonly video section) and sends the server no media (text-to-video:
video input is not supported; a media stream nobody reads would also pile up in aiortc). A data
channel section is welcome (parameters travel on it)."""

from __future__ import annotations

import re

from aiortc.sdp import SessionDescription

from .errors import ApiError

_M_LINE = re.compile(r"^m=(\w+) \d+(?:/\d+)? \S+(?: \S+)*$")
SENDS_TO_SERVER = ("sendrecv", "sendonly")


def check_offer(sdp: str, field: str = "sdp") -> None:
    """ApiError (400 invalid_sdp / 422 unsupported_sdp) naming what is wrong with the offer."""
    lines = [ln.rstrip("\r") for ln in sdp.split("\n") if ln.strip()]
    if not lines or lines[0] != "v=0":
        raise ApiError.field(400, "invalid_sdp", field, "not an SDP session description (must start with 'v=0')")
    for prefix in ("o=", "s=", "t="):
        if not any(ln.startswith(prefix) for ln in lines):
            raise ApiError.field(400, "invalid_sdp", field, f"session description has no '{prefix}' line")
    m_lines = [ln for ln in lines if ln.startswith("m=")]
    if not m_lines:
        raise ApiError.field(400, "invalid_sdp", field, "no media section ('m=' line)")
    for ln in m_lines:
        if not _M_LINE.match(ln):
            raise ApiError.field(400, "invalid_sdp", field, f"malformed media line {ln[:80]!r}")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted errors on bad input
        raise ApiError.field(400, "invalid_sdp", field, f"SDP does not parse: {type(exc).__name__}: {exc}") from None
    if len(desc.media) != len(m_lines):
        raise ApiError.field(400, "invalid_sdp", field, "a media section did not parse")
    video_in = False
    for i, media in enumerate(desc.media):
        direction = media.direction or "sendrecv"
        if media.kind in ("audio", "video") and direction in SENDS_TO_SERVER:
            raise ApiError.field(422, "unsupported_sdp", field, f"media section {i} ({media.kind}) is {direction}: "
                                 "this server takes no media input (video-to-video is not supported on the PP1 "
                                 f"path); offer {media.kind} as recvonly")
        if media.kind == "video" and direction == "recvonly":
            if not media.rtp.codecs:
                raise ApiError.field(422, "unsupported_sdp", field, f"media section {i} (video) lists no codec")
            video_in = True
        if media.kind not in ("audio", "video", "application"):
            raise ApiError.field(422, "unsupported_sdp", field, f"media section {i} has kind {media.kind!r}")
    if not video_in:
        raise ApiError.field(422, "unsupported_sdp", field, "the offer has no recvonly video section: nothing would "
                             "carry the stream (pc.addTransceiver('video', {direction: 'recvonly'}))")
