"""Tiny random files in the released layouts, for tests and a CPU demo without any download:

    python -m pp1.pipelines.krea.tiny DIR     # writes DIR/{krea-tiny.safetensors, umt5/, tokenizer/, vae/}
    pp1 run --pipeline pp1.pipelines.krea:factory --preset krea-tiny --device cpu --dtype float32 \
        --pipeline-option checkpoint=DIR/krea-tiny.safetensors --pipeline-option text_encoder=DIR/umt5 \
        --pipeline-option tokenizer=DIR/tokenizer --pipeline-option vae=DIR/vae

- the generator: ``krea-tiny`` shapes, original Wan names with the ``model.`` prefix (``writer.py``);
- the text encoder: a ``transformers`` UMT5EncoderModel folder (d_model = the preset's text_dim), and
  the same weights as one file with Wan's T5 names (``umt5-wan.pth``);
- the tokenizer: a word-level ``tokenizers`` tokenizer (pad 0, EOS 1, unknown 2) saved as a folder;
- the VAE: a diffusers ``AutoencoderKLWan`` with Wan 2.1's structure at small widths (x8 / x4).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import get_model
from .writer import write_random_checkpoint

WORDS = ["a", "an", "the", "red", "blue", "green", "calm", "sea", "fox", "whale", "snow", "water", "deep", "dawn", "dusk", "running", "through", "in", "on", "at", "of", "paper", "boat", "rainy", "street", "city", "night", "light", "forest", "river", "mountain", "sky", "cloud"]


@dataclass(frozen=True)
class TinyFiles:
    checkpoint: Path
    text_encoder: Path
    text_encoder_wan: Path
    tokenizer: Path
    vae: Path

    def options(self) -> dict[str, str]:
        return {"checkpoint": str(self.checkpoint), "text_encoder": str(self.text_encoder),
                "tokenizer": str(self.tokenizer), "vae": str(self.vae)}


def hf_to_wan_t5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers UMT5 encoder names -> Wan's T5 names (the inverse of ``text_encoder.wan_to_hf``)."""
    from .text_encoder import wan_to_hf

    probe = {"token_embedding.weight": 0, "norm.weight": 0}
    layers = {k.split(".")[2] for k in state if k.startswith("encoder.block.")}
    for i in layers:
        for rest in ("norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                     "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
                     "ffn.fc2.weight"):
            probe[f"blocks.{i}.{rest}"] = 0
    inverse = {hf: wan for wan, hf in zip(probe, wan_to_hf(probe), strict=True)}
    return {inverse[k]: v for k, v in state.items() if k in inverse}


def write_tiny_files(root: Path | str, preset: str = "krea-tiny", seed: int = 0) -> TinyFiles:
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = get_model(preset)
    ckpt = root / f"{preset}.safetensors"
    write_random_checkpoint(ckpt, cfg, seed=seed)
    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    t5 = UMT5EncoderModel(UMT5Config(
        vocab_size=len(vocab), d_model=cfg.text_dim, d_kv=8, d_ff=2 * cfg.text_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        tie_word_embeddings=False)).eval()
    t5.save_pretrained(str(root / "umt5"))
    torch.save(hf_to_wan_t5(t5.state_dict()), root / "umt5-wan.pth")
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(root / "tokenizer"))
    vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    vae.save_pretrained(str(root / "vae"))
    return TinyFiles(ckpt, root / "umt5", root / "umt5-wan.pth", root / "tokenizer", root / "vae")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp1.pipelines.krea.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    files = write_tiny_files(p.parse_args(argv).dir)
    for k, v in files.options().items():
        print(f"--pipeline-option {k}={v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
