"""The text encoder of stage 0: UMT5-XXL's encoder through ``transformers`` (``UMT5EncoderModel``).

Accepted forms of ``--pipeline-option text_encoder=PATH``:
- a ``transformers`` folder (``config.json`` + weights, e.g. the ``text_encoder/`` folder of a
  diffusers-format Wan 2.1 repository): ``UMT5EncoderModel.from_pretrained``;
- one file (``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``) with either the transformers names
  (``encoder.block.N.layer.0.SelfAttention.q.weight``, ...) or Wan's own names
  (``blocks.N.attn.q.weight``, ``blocks.N.ffn.gate.0.weight``, ...: ``models_t5_umt5-xxl-enc-bf16.pth``
  of the Wan 2.1 release, which Krea uses); the shapes give the config (no config file needed).

Encoding (Wan's ``T5EncoderModel``): clean the text (HTML unescape, collapse whitespace), tokenize to
``text_len`` tokens (padding, truncation, the EOS token), run the encoder with the attention mask,
and zero every position past the prompt's tokens. Output ``[text_len, d_model]``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


class TextEncoderError(ValueError):
    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"text encoder {path}: {reason}")


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy (if installed) + HTML unescape twice, whitespace collapsed."""
    try:
        import ftfy  # type: ignore[import-not-found]

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def wan_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's T5 encoder names -> transformers' UMT5EncoderModel names."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k == "token_embedding.weight":
            out["shared.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        elif m:
            i, rest = m.groups()
            p = f"encoder.block.{i}.layer."
            name = {
                "norm1.weight": "0.layer_norm.weight",
                "attn.q.weight": "0.SelfAttention.q.weight",
                "attn.k.weight": "0.SelfAttention.k.weight",
                "attn.v.weight": "0.SelfAttention.v.weight",
                "attn.o.weight": "0.SelfAttention.o.weight",
                "pos_embedding.embedding.weight": "0.SelfAttention.relative_attention_bias.weight",
                "norm2.weight": "1.layer_norm.weight",
                "ffn.gate.0.weight": "1.DenseReluDense.wi_0.weight",
                "ffn.fc1.weight": "1.DenseReluDense.wi_1.weight",
                "ffn.fc2.weight": "1.DenseReluDense.wo.weight",
            }.get(rest)
            if name is None:
                raise TextEncoderError("<state dict>", f"unexpected Wan T5 key {k!r}")
            out[p + name] = v
        else:
            raise TextEncoderError("<state dict>", f"unexpected Wan T5 key {k!r}")
    return out


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TextEncoderError(path, "is not a state dict")
    return state


def hf_state_from_file(path: Path) -> dict[str, torch.Tensor]:
    state = _load_state(path)
    if "token_embedding.weight" in state:
        return wan_to_hf(state)
    if "shared.weight" in state or "encoder.embed_tokens.weight" in state:
        state = {k: v for k, v in state.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
        if "shared.weight" not in state:
            state["shared.weight"] = state["encoder.embed_tokens.weight"]
        return state
    raise TextEncoderError(path, f"neither Wan T5 names (token_embedding.weight) nor transformers UMT5 names "
                           f"(shared.weight); first keys: {list(state)[:3]}")


def config_from_state(state: dict[str, torch.Tensor], path: Path):
    """The UMT5 config implied by the weights' shapes (UMT5-XXL: 256384 x 4096, 24 layers, 64 heads)."""
    from transformers import UMT5Config

    try:
        vocab, d_model = state["shared.weight"].shape
        layers = len({k.split(".")[2] for k in state if k.startswith("encoder.block.")})
        buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        d_ff = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    except KeyError as exc:
        raise TextEncoderError(path, f"missing {exc.args[0]!r}") from None
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False, is_encoder_decoder=False,
    )


def load_umt5(path: Path, device: torch.device, dtype: torch.dtype):
    """A ``UMT5EncoderModel`` in eval mode on ``device`` in ``dtype``."""
    from transformers import UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderError(path, "a folder needs config.json (a transformers UMT5EncoderModel folder)")
        model = UMT5EncoderModel.from_pretrained(str(path), dtype=dtype)
    else:
        state = hf_state_from_file(path)
        cfg = config_from_state(state, path)
        with torch.device("meta"):
            model = UMT5EncoderModel(cfg)
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if "relative_attention_bias" not in k or k.endswith("layer.0.SelfAttention."
                                                                                          "relative_attention_bias.weight")]
        if missing or unexpected:
            raise TextEncoderError(path, f"weights do not fit UMT5EncoderModel: missing {missing[:4]}, unexpected "
                                   f"{unexpected[:4]}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TextEncoderError(path, f"the tokenizer must be a folder with one of {TOKENIZER_FILES} "
                               "(google/umt5-xxl): --pipeline-option tokenizer=DIR")
    return AutoTokenizer.from_pretrained(str(path))


class UMT5TextEncoder:
    """prompt -> ``[text_len, d_model]`` (padding zeroed), on ``device`` in ``dtype``."""

    def __init__(self, encoder_path: Path, tokenizer_path: Path, text_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = load_umt5(encoder_path, device, dtype)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.text_len, self.device, self.dtype = text_len, device, dtype
        self.d_model = int(self.model.config.d_model)

    @torch.inference_mode()
    def __call__(self, prompt: str) -> torch.Tensor:
        tok = self.tokenizer([clean_prompt(prompt)], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
        n = int(mask[0].sum())
        out = out.clone()
        out[n:] = 0
        return out
