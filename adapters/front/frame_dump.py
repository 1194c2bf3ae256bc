"""``--dump-frames DIR``: the front saves every SHOWN chunk's frames (a debugging / test aid).

``DIR/epoch{e}_chunk{k}.pt``: the uint8 ``[F, H, W, 3]`` frames as shown (``torch.save``), and
``DIR/epoch{e}_chunk{k}_latents.pt``: the latents they were decoded from, as received from the mesh.
Hooks only: the chunk engine's ``on_frames`` callback and a wrapper around its Link's ``recv`` (to see
the latents); the files are written by one background thread, so the comms thread only queues
references. ``close()`` waits (bounded) until everything queued is on disk.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pp1.adapters.rank.options import check_dump_dir

log = logging.getLogger("pp1.adapters.front.frame_dump")

_STOP = object()


def frames_path(directory: str | os.PathLike[str], cache_epoch: int, chunk_index: int) -> Path:
    return Path(directory) / f"epoch{cache_epoch}_chunk{chunk_index}.pt"


def latents_path(directory: str | os.PathLike[str], cache_epoch: int, chunk_index: int) -> Path:
    return Path(directory) / f"epoch{cache_epoch}_chunk{chunk_index}_latents.pt"


class DumpLink:
    """A Link that hands every received result's latents to the dump, then to the engine."""

    def __init__(self, link: Any, dump: FrameDump) -> None:
        self._link, self._dump = link, dump
        self.overlaps = link.overlaps

    def send(self, env: Any, tensors: Sequence[torch.Tensor], preflight: bool = True,
             timeout_s: float | None = None) -> None:
        self._link.send(env, tensors, preflight=preflight, timeout_s=timeout_s)

    def recv(self, deadline_at: float | None) -> tuple[Any, list[torch.Tensor]]:
        result, tensors = self._link.recv(deadline_at)
        if tensors:
            self._dump.note_latents(int(result.call_id), tensors[0])
        return result, tensors


class FrameDump:
    """Saves shown chunks to ``directory``; ``on_frames`` is the engine's callback."""

    def __init__(self, directory: str, save: Callable[[Any, Path], None] = torch.save) -> None:
        check_dump_dir(directory)
        self.directory = Path(directory)
        self._save = save
        self._latents: dict[int, torch.Tensor] = {}  # call_id -> latents received, not shown yet
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.saved = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._write_loop, name="pp1-frame-dump", daemon=True)
        self._thread.start()

    def wrap(self, link: Any) -> DumpLink:
        return DumpLink(link, self)

    def note_latents(self, call_id: int, latents: torch.Tensor) -> None:
        self._latents[call_id] = latents

    def on_frames(self, frames: torch.Tensor, rec: Any) -> None:
        """A chunk was shown: queue its frames (and latents) for the writer thread."""
        latents = self._latents.pop(rec.call_id, None)
        for cid in [c for c in self._latents if c < rec.call_id]:  # stale results: never shown
            del self._latents[cid]
        e, k = rec.cache_epoch, rec.chunk_index
        self._queue.put((frames, frames_path(self.directory, e, k)))
        if latents is not None:
            self._queue.put((latents, latents_path(self.directory, e, k)))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            tensor, path = item
            try:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                self._save(tensor.detach().cpu(), tmp)
                os.replace(tmp, path)
                self.saved += 1
            except Exception as exc:  # a debugging aid: never fail the run for it
                self.errors.append(f"{path}: {exc}")
                log.warning("--dump-frames: could not write %s: %s", path, exc)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued (bounded by ``timeout_s``), then stop the writer."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("--dump-frames: writer still busy after %.0f s; some files may be missing", timeout_s)
        else:
            log.info("--dump-frames: %d files in %s", self.saved, self.directory)
