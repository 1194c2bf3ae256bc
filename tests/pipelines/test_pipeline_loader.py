"""load_factory: the default, and a clear PipelineLoadError for every way a path can be wrong."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from pp1.pipelines.loader import DEFAULT_PIPELINE, PipelineLoadError, load_factory
from pp1.pipelines.reference.factory import ReferenceFactory


def test_default_is_the_reference_pipeline() -> None:
    assert DEFAULT_PIPELINE == "pp1.pipelines.reference:factory"
    f = load_factory()
    assert isinstance(f, ReferenceFactory) and f.name == "reference"
    assert isinstance(load_factory("pp1.pipelines.reference.factory:ReferenceFactory"), ReferenceFactory)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "pp1_test_plugin.py").write_text(textwrap.dedent("""
        from pp1.pipelines.reference import factory as _ref

        instance = _ref()
        not_callable = 42

        def returns_junk():
            return object()

        def raises():
            raise RuntimeError("no GPU here")
    """))
    (tmp_path / "pp1_test_broken_plugin.py").write_text("import definitely_not_a_module_xyz\n")
    (tmp_path / "pp1_test_raising_plugin.py").write_text("raise ValueError('bad config at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pp1_test_plugin"
    for m in ("pp1_test_plugin", "pp1_test_broken_plugin", "pp1_test_raising_plugin"):
        sys.modules.pop(m, None)


def test_an_instance_is_accepted(plugin: str) -> None:
    assert isinstance(load_factory(f"{plugin}:instance"), ReferenceFactory)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("pp1.pipelines.reference", "expected 'package.module:factory'"),
        ("pp1.pipelines.reference:factory:x", "expected 'package.module:factory'"),
        ("", "expected 'package.module:factory'"),
        ("no_such_pkg_abc.mod:factory", "module 'no_such_pkg_abc' not found"),
        ("pp1_test_broken_plugin:factory", "module 'definitely_not_a_module_xyz' not found"),
        ("pp1_test_raising_plugin:factory", "raised ValueError: bad config at import"),
        ("pp1_test_plugin:missing", "has no attribute 'missing'"),
        ("pp1_test_plugin:not_callable", "not callable"),
        ("pp1_test_plugin:returns_junk", "missing name (str), geometry(), timesteps()"),
        ("pp1_test_plugin:raises", "raised RuntimeError: no GPU here"),
    ],
)
def test_load_errors_say_what_is_wrong(plugin: str, path: str, message: str) -> None:
    with pytest.raises(PipelineLoadError) as e:
        load_factory(path)
    assert message in str(e.value)
    assert repr(path) in str(e.value)


def test_options_go_through_with_options_and_refusals_name_the_key(tmp_path: Path, monkeypatch) -> None:
    from pp1.pipelines.loader import PipelineOptionError, parse_pipeline_option

    (tmp_path / "pp1_test_opts_plugin.py").write_text(textwrap.dedent("""
        from pp1.pipelines.loader import PipelineOptionError
        from pp1.pipelines.reference.factory import ReferenceFactory

        class Configurable(ReferenceFactory):
            options = {}

            def with_options(self, options):
                for key in options:
                    if key != "steps":
                        raise PipelineOptionError(key, "unknown option; known: steps")
                made = Configurable()
                made.options = dict(options)
                return made

        def factory():
            return Configurable()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        f = load_factory("pp1_test_opts_plugin:factory", {"steps": "2"})
        assert f.options == {"steps": "2"}  # type: ignore[attr-defined]
        with pytest.raises(PipelineOptionError) as e:
            load_factory("pp1_test_opts_plugin:factory", {"stepz": "2"})
        assert e.value.key == "stepz" and "unknown option" in str(e.value)
        with pytest.raises(PipelineOptionError) as e:  # the reference knows fp8_linears only
            load_factory(DEFAULT_PIPELINE, {"steps": "2"})
        assert e.value.key == "steps" and "unknown option" in str(e.value) and "fp8_linears" in str(e.value)
        assert load_factory(DEFAULT_PIPELINE, {"fp8_linears": "true"}).fp8_linears is True  # type: ignore[attr-defined]
        with pytest.raises(PipelineOptionError) as e:
            load_factory(DEFAULT_PIPELINE, {"fp8_linears": "maybe"})
        assert e.value.key == "fp8_linears" and "true or false" in str(e.value)
    finally:
        sys.modules.pop("pp1_test_opts_plugin", None)
    assert parse_pipeline_option("checkpoint=/a=b") == ("checkpoint", "/a=b")
    for bad in ("nokey", "=v", "1x=2"):
        with pytest.raises(ValueError):
            parse_pipeline_option(bad)
