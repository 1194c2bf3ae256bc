"""specs/protocol.md stays in step with the code: every error code and limit it documents is the
code's, and every code the code raises is documented."""

from __future__ import annotations

import re
from pathlib import Path

from pp1.protocol import codec, preflight
from pp1.protocol.messages import PROTOCOL_VERSION, MessageKind

SPEC = Path(__file__).resolve().parents[2] / "specs" / "protocol.md"


def test_every_error_code_is_documented() -> None:
    text = SPEC.read_text()
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = sorted((set(codec.CODEC_CODES) | set(preflight.CODES)) - documented)
    assert not missing, f"codes raised by the code but absent from {SPEC.name}: {missing}"


def test_limits_and_layout_match() -> None:
    text = SPEC.read_text()
    assert f"`HEADER_SIZE = {codec.HEADER_SIZE}`" in text
    assert f"`MAX_META_BYTES` ({codec.MAX_META_BYTES})" in text
    assert f"`MAX_TENSORS` ({codec.MAX_TENSORS})" in text
    assert f'`b"{codec.MAGIC.decode()}"`' in text
    assert f"`PROTOCOL_VERSION` ({PROTOCOL_VERSION})" in text
    for kind in MessageKind:
        assert f"kind {kind.value}" in text, kind
