"""``--dump-frames DIR``: the front saves every SHOWN chunk's frames (a debugging / test aid).

``DIR/epoch{e}_chunk{k}.pt``: the uint8 ``[F, H, W, 3]`` frames as shown (``torch.save``), and
``DIR/epoch{e}_chunk{k}_latents.pt``: the latents they were decoded from, as received from the mesh.
A frame sink of the front's engine (it sees each shown chunk's frames and latents); the files are
written by one background thread, so the comms thread only queues references. ``close()`` waits (bounded) until everything queued is on disk.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pp1.adapters.rank.options import check_dump_dir

if TYPE_CHECKING:  # pragma: no cover
    from pp1.adapters.front.engine import FrameBatch

log = logging.getLogger("pp1.adapters.front.frame_dump")

_STOP = object()


def frames_path(directory: str | os.PathLike[str], cache_epoch: int, chunk_index: int) -> Path:
    return Path(directory) / f"epoch{cache_epoch}_chunk{chunk_index}.pt"


def latents_path(directory: str | os.PathLike[str], cache_epoch: int, chunk_index: int) -> Path:
    return Path(directory) / f"epoch{cache_epoch}_chunk{chunk_index}_latents.pt"


class FrameDump:
    """Saves shown chunks to ``directory``; ``on_frames`` is the engine's callback."""

    def __init__(self, directory: str, save: Callable[[Any, Path], None] = torch.save) -> None:
        check_dump_dir(directory)
        self.directory = Path(directory)
        self._save = save
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.saved = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._write_loop, name="pp1-frame-dump", daemon=True)
        self._thread.start()

    def on_frames(self, batch: FrameBatch) -> None:
        """A chunk was shown (a frame sink of the engine): queue its frames and latents for the writer."""
        e, k = batch.record.cache_epoch, batch.record.chunk_index
        self._queue.put((batch.frames, frames_path(self.directory, e, k)))
        self._queue.put((batch.latents, latents_path(self.directory, e, k)))

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
