"""Load a pipeline by import path: ``package.module:factory``.

``factory`` is a callable returning a ``PipelineFactory`` (or an object that already is one).
Every way this can go wrong raises ``PipelineLoadError`` naming the path and what to fix.
"""

from __future__ import annotations

import importlib
import re

from .interface import PipelineFactory

DEFAULT_PIPELINE = "pp1.pipelines.reference:factory"
_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_METHODS = ("geometry", "timesteps", "build_stage0", "build_generator")


class PipelineLoadError(Exception):
    """The pipeline named on the command line / in the run config cannot be loaded."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot load pipeline {path!r}: {reason}")


def _missing(obj: object) -> list[str]:
    out = [] if isinstance(getattr(obj, "name", None), str) else ["name (str)"]
    return out + [m + "()" for m in _METHODS if not callable(getattr(obj, m, None))]


def _is_factory(obj: object) -> bool:
    return not isinstance(obj, type) and not _missing(obj)


def load_factory(path: str = DEFAULT_PIPELINE) -> PipelineFactory:
    """Import ``module``, resolve ``attr`` (dots allowed), call it if needed, check the result."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise PipelineLoadError(str(path), "expected 'package.module:factory' (a module path, a colon, "
                                f"an attribute), e.g. {DEFAULT_PIPELINE!r}")
    module_name, attr = path.split(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PipelineLoadError(path, f"module {exc.name!r} not found (is the package installed and on "
                                "PYTHONPATH?)") from exc
    except Exception as exc:
        raise PipelineLoadError(path, f"importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PipelineLoadError(path, f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if _is_factory(obj):
        return obj  # type: ignore[return-value]
    if not callable(obj):
        raise PipelineLoadError(path, f"{attr!r} is a {type(obj).__name__}, not callable and not a "
                                "PipelineFactory")
    try:
        made = obj()
    except Exception as exc:
        raise PipelineLoadError(path, f"calling {attr}() raised {type(exc).__name__}: {exc}") from exc
    missing = _missing(made)
    if missing:
        raise PipelineLoadError(path, f"{attr}() returned a {type(made).__name__} that is not a "
                                f"PipelineFactory: missing {', '.join(missing)}")
    return made  # type: ignore[return-value]
