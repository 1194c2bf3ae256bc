"""Load a pipeline by import path: ``package.module:factory``.

``factory`` is a callable returning a ``PipelineFactory`` (or an object that already is one).
Every way this can go wrong raises ``PipelineLoadError`` naming the path and what to fix.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping

import torch

from .comm import Communicator
from .interface import Generator, PipelineFactory

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


class PipelineOptionError(ValueError):
    """A pipeline option (``--pipeline-option KEY=VALUE``) that the pipeline refuses: names the key."""

    def __init__(self, key: str, reason: str) -> None:
        self.key, self.reason = key, reason
        super().__init__(f"pipeline option {key!r}: {reason}")


BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_bool(key: str, value: str) -> bool:
    """A yes/no pipeline option (true/false, 1/0, yes/no, on/off); PipelineOptionError naming ``key`` else."""
    flag = BOOLEANS.get(value.strip().lower())
    if flag is None:
        raise PipelineOptionError(key, f"expected true or false, got {value!r}")
    return flag


def parse_pipeline_option(text: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` -> (key, value); ValueError saying what is wrong for anything else."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
        raise ValueError(f"expected KEY=VALUE (e.g. checkpoint=/models/krea.safetensors), got {text!r}")
    return key, value


def load_factory(path: str = DEFAULT_PIPELINE, options: Mapping[str, str] | None = None) -> PipelineFactory:
    """Import ``module``, resolve ``attr`` (dots allowed), call it if needed, check the result; with
    ``options`` (``--pipeline-option KEY=VALUE``), return ``factory.with_options(options)``: a pipeline
    without ``with_options`` refuses options, and one that refuses a key raises PipelineOptionError."""
    factory = _load(path)
    if not options:
        return factory
    configure = getattr(factory, "with_options", None)
    if not callable(configure):
        raise PipelineOptionError(sorted(options)[0], f"pipeline {path!r} takes no options")
    try:
        configured = configure(dict(options))
    except PipelineOptionError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise PipelineOptionError(getattr(exc, "key", "?"), str(exc)) from exc
    missing = _missing(configured)
    if missing:
        raise PipelineLoadError(path, f"with_options() returned a {type(configured).__name__} that is not a "
                                f"PipelineFactory: missing {', '.join(missing)}")
    return configured  # type: ignore[no-any-return]


def _load(path: str) -> PipelineFactory:
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


def supports_compile(factory: PipelineFactory) -> bool:
    """Whether the factory declares ``supports_compile = True`` (its ``build_generator`` takes ``compile``)."""
    return getattr(factory, "supports_compile", False) is True


def require_compile_support(factory: PipelineFactory, path: str) -> None:
    """Refuse ``--compile`` for a pipeline that does not compile (before any process starts)."""
    if not supports_compile(factory):
        raise PipelineLoadError(path, f"pipeline {getattr(factory, 'name', '?')!r} does not compile: its factory "
                                "does not declare supports_compile = True (build_generator(..., compile=True))")


def build_generator(
    factory: PipelineFactory,
    preset: str,
    mesh_rank: int,
    mesh_size: int,
    comm: Communicator,
    device: torch.device,
    dtype: torch.dtype,
    *,
    compile: bool = False,
    path: str = "?",
) -> Generator:
    """The runtime's one way to build a generator shard: ``compile=True`` (``--compile``) asks the factory
    for a compiled one (compiled before this returns: the load step), and refuses a factory that does
    not declare ``supports_compile``; without it the factory's plain six-argument call."""
    if not compile:
        return factory.build_generator(preset, mesh_rank, mesh_size, comm, device, dtype)
    require_compile_support(factory, path)
    return factory.build_generator(preset, mesh_rank, mesh_size, comm, device, dtype, compile=True)  # type: ignore[call-arg]
