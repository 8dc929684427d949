"""Tiny random checkpoints for tests, benchmarks and `configs/tiny.yaml`.

`python -m slm_dist.testing OUT_DIR` writes a 6-layer random Llama (hidden 32) with a real
word-level tokenizer, saved in several small shards so that one layer straddles two files.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

TINY_WORDS = ("the of and to in a is was for on as with by he at from his an were are which this be or "
              "first new after had also one two city year time film team season game music world war "
              "school river state town north south east west king church family line album station").split()

log = logging.getLogger(__name__)


def hf_layer_outputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The embedding output and every decoder layer's output of a full HF causal LM, as stages see them.

    HF's last hidden state is after the final norm; the stages report layer outputs before it, so
    the last layer's raw output is taken with a forward hook instead.
    """
    last = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, inp, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.inference_mode():
            hidden = model(input_ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    return [*hidden[:model.config.num_hidden_layers], last["h"]]


def tiny_tokenizer():
    """A word-level tokenizer built offline (no hub): every word outside the list maps to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(10):
        vocab.setdefault(str(i), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(model_type: str = "llama", num_layers: int = 6, hidden: int = 32, vocab_size: int = 128,
                **overrides):
    from transformers import AutoConfig

    kwargs = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type in ("qwen2", "qwen3"):
        kwargs.update(use_sliding_window=False)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_model(out_dir: Path, model_type: str = "llama", num_layers: int = 6, hidden: int = 32,
                    max_shard_size: str | int = "24KB", seed: int = 0, dtype: torch.dtype = torch.float32,
                    **config_overrides) -> Path:
    """Write a random model folder (config, shards, index, tokenizer) and return its path."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = tiny_tokenizer()
    config = tiny_config(model_type, num_layers, hidden, vocab_size=max(len(tokenizer), 64), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random norms, so merge rules that pick norms from different layers give different results.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def layer_split_across_shards(model_dir: Path) -> list[int]:
    """Layers whose tensors live in more than one shard file (tests want at least one)."""
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[int, set[str]] = {}
    for key, f in index.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            files.setdefault(int(parts[2]), set()).add(f)
    return sorted(layer for layer, fs in files.items() if len(fs) > 1)


def tiny_text(num_words: int = 20000, seed: int = 0) -> str:
    """Deterministic pseudo-English in the tiny vocabulary, paragraphs separated by blank lines."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(TINY_WORDS), (num_words,), generator=g).tolist()
    words = [TINY_WORDS[i] for i in idx]
    paragraphs = [" ".join(words[i:i + 120]) for i in range(0, len(words), 120)]
    return "\n\n".join(paragraphs) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args()
    make_tiny_model(args.out_dir, args.model_type, args.layers, args.hidden)
    (args.out_dir.parent / "tiny-text.txt").write_text(tiny_text())
    logging.basicConfig(level=logging.INFO)
    log.info("wrote %s and %s", args.out_dir, args.out_dir.parent / "tiny-text.txt")


if __name__ == "__main__":
    main()
