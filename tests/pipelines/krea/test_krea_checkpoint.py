"""The checkpoint: header validation names the file and the key (missing key, wrong shape, wrong dtype,
truncated file, not safetensors, extra blocks), every rank refuses alike without hanging, the
fingerprint is the header's digest (equal on every rank, changed by any change to the file), and
``get_slice`` reads exactly the rows / columns of the full tensors."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import CPU, PRESET, options_with
from safetensors.torch import load_file, save_file

from pp1.pipelines.krea import KreaFactory, factory, get_model
from pp1.pipelines.krea.checkpoint import CheckpointError, ShardReader, expected_tensors, validate_checkpoint
from pp1.pipelines.krea.writer import write_random_checkpoint
from pp1.pipelines.loader import PipelineOptionError, load_factory
from pp1.pipelines.threaded_comm import ThreadedMesh

CFG = get_model(PRESET)


def test_writer_output_reads_back_with_safetensors(tiny) -> None:
    sd = load_file(str(tiny.checkpoint))
    assert set(sd) == {"model." + k for k in expected_tensors(CFG)}
    assert all(tuple(sd["model." + k].shape) == s for k, s in expected_tensors(CFG).items())


def test_get_slice_reads_rows_and_columns_of_the_full_tensor(tiny) -> None:
    sd = load_file(str(tiny.checkpoint))
    r = ShardReader(validate_checkpoint(tiny.checkpoint, CFG), CPU, torch.float32)
    q, o = "blocks.1.self_attn.q.weight", "blocks.1.self_attn.o.weight"
    assert torch.equal(r.rows(q, (48, 48), 12, 36), sd["model." + q][12:36])
    assert torch.equal(r.cols(o, (48, 48), 24, 36), sd["model." + o][:, 24:36])
    assert torch.equal(r.rows("blocks.0.ffn.0.bias", (64,), 22, 43), sd["model.blocks.0.ffn.0.bias"][22:43])
    assert r.bytes_loaded == (24 * 48 + 48 * 12 + 21) * 4


def test_an_unprefixed_file_in_the_original_layout_is_accepted(tmp_path: Path, tiny) -> None:
    sd = load_file(str(tiny.checkpoint))
    save_file({k.removeprefix("model."): v for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    info = validate_checkpoint(tmp_path / "plain.safetensors", CFG)
    assert info.prefix == ""


def _bad(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "bad.safetensors"
    write_random_checkpoint(path, CFG, **kw)
    return path


def bad_files(tmp_path: Path, tiny) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, key the message must name, words it must say)."""
    out = {
        "missing_key": (_bad(tmp_path / "a", drop=("blocks.1.cross_attn.k.weight",)) if (tmp_path / "a").mkdir()
                        is None else None, "model.blocks.1.cross_attn.k.weight", "missing"),
        "wrong_shape": (_bad(tmp_path / "b", override={"blocks.0.ffn.0.weight": torch.zeros(65, 48)})
                        if (tmp_path / "b").mkdir() is None else None, "model.blocks.0.ffn.0.weight",
                        "shape [65, 48] does not match preset krea-tiny: expected [64, 48]"),
        "wrong_dtype": (_bad(tmp_path / "c", override={"head.head.bias": torch.zeros(64, dtype=torch.int32)})
                        if (tmp_path / "c").mkdir() is None else None, "model.head.head.bias", "dtype I32"),
    }
    trunc = tmp_path / "truncated.safetensors"
    shutil.copy(tiny.checkpoint, trunc)
    with open(trunc, "r+b") as fh:
        fh.truncate(trunc.stat().st_size - 1000)
    out["truncated"] = (trunc, "model.", "the file is truncated")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out["not_safetensors"] = (junk, "file", "not a safetensors file")
    return out


def test_bad_checkpoints_are_refused_naming_file_and_key(tmp_path: Path, tiny) -> None:
    for name, (path, key, words) in bad_files(tmp_path, tiny).items():
        with pytest.raises(CheckpointError) as err:
            validate_checkpoint(path, CFG)
        msg = str(err.value)
        assert str(path) in msg and key in msg and words in msg, (name, msg)


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    other = get_model("krea-tiny").__class__(name="x", dim=48, num_heads=4, num_blocks=3, ffn_dim=64, text_len=16,
                                              text_dim=32, freq_dim=32)
    path = tmp_path / "three.safetensors"
    write_random_checkpoint(path, other)
    with pytest.raises(CheckpointError, match="blocks.2: the file has more blocks"):
        validate_checkpoint(path, CFG)


def test_every_rank_refuses_a_bad_checkpoint_alike_and_none_hangs(tmp_path: Path, tiny) -> None:
    """build_generator validates the header before any collective: each rank raises the same error."""
    for name, (path, key, _) in bad_files(tmp_path, tiny).items():
        f = KreaFactory(replace(factory().with_options(tiny.options()).options, checkpoint=path))
        with ThreadedMesh(3, timeout_s=20) as mesh:
            def build(r: int, comm, f=f):
                try:
                    f.build_generator(PRESET, r, 3, comm, CPU, torch.float32)
                except CheckpointError as exc:
                    return str(exc)
                return "loaded"
            msgs = mesh.map(build)
        assert len(set(msgs)) == 1 and key in msgs[0], (name, msgs)


def test_with_options_refuses_a_bad_file_before_any_process_starts(tmp_path: Path, tiny) -> None:
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(tiny.checkpoint.read_bytes()[:64])
    with pytest.raises(PipelineOptionError) as err:
        load_factory("pp1.pipelines.krea:factory", options_with(tiny, checkpoint=trunc))
    assert err.value.key == "checkpoint" and "truncated" in str(err.value)
    for key, value, words in (("checkpoint", tmp_path / "nope", "does not exist"), ("resolution", "320x570", "16"),
                              ("kv_bias", "0", "(0, 1]"), ("steps", "1000,2000", "0..1000"), ("colour", "x", "unknown")):
        with pytest.raises(PipelineOptionError) as err:
            load_factory("pp1.pipelines.krea:factory", options_with(tiny, **{key: value}))
        assert err.value.key == key and words in str(err.value), (key, str(err.value))


def test_fingerprint_is_the_header_digest_equal_on_every_rank(tmp_path: Path, tiny, krea) -> None:
    with ThreadedMesh(3, timeout_s=30) as mesh:
        fps = mesh.map(lambda r, comm: krea.build_generator(PRESET, r, 3, comm, CPU, torch.float32).fingerprint())
    assert len(set(fps)) == 1 and fps[0].startswith("krea/krea-tiny/")
    from pp1.pipelines.krea.checkpoint import read_header

    base = read_header(tiny.checkpoint).digest()
    copy = tmp_path / "copy.safetensors"
    shutil.copy(tiny.checkpoint, copy)
    assert read_header(copy).digest() == base  # the same bytes elsewhere: the same fingerprint
    other = tmp_path / "other.safetensors"
    write_random_checkpoint(other, CFG, seed=1)  # same names and shapes, other weights
    layout = tmp_path / "layout.safetensors"
    write_random_checkpoint(layout, CFG, dtype=torch.bfloat16)  # another dtype
    assert len({base, read_header(other).digest(), read_header(layout).digest()}) == 3


def test_the_weights_as_held_feed_the_weight_tripwire(krea) -> None:
    """Krea shards expose their weights as held (the runtime checksums them at load, at READY and every N
    chunks): equal for two loads of the same file, changed by a drift after load."""
    from pp1.pipelines.checksum import checksum
    from pp1.pipelines.comm import SoloCommunicator

    a = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    b = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    assert a.held_weights() and checksum(a.held_weights()) == checksum(b.held_weights())
    with torch.inference_mode():  # as the weight drill does (PP1_FAULT do=perturb_weights)
        b.held_weights()[0].add_(0.5)
    assert checksum(a.held_weights()) != checksum(b.held_weights())
