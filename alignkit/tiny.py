"""An offline tiny Llama model + byte-level BPE tokenizer, written to a local directory.

Tests and the demo load the result with `alignkit.modeling` exactly as they
would a hub model: it is a plain `save_pretrained` directory. Building is
deterministic for a given seed and shape, and cached by content: calling
`build_tiny_model` twice on the same directory with the same settings reuses it.

The tokenizer deliberately has no chat template, so the default template of
`alignkit.modeling` is exercised on every test run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

_SUBJECTS = ["the film", "this movie", "the story", "the cast", "the plot", "the ending", "the music", "the director",
             "the script", "the acting", "the book", "the show", "the food", "the service", "the room"]
_VERBS = ["was", "is", "felt", "seemed", "looked", "sounded", "became", "remained"]
_ADJECTIVES = ["good", "bad", "great", "awful", "fine", "dull", "brilliant", "boring", "wonderful", "terrible",
               "lovely", "weak", "strong", "clever", "silly", "warm", "cold", "funny", "sad", "long", "short"]
_ADVERBS = ["very", "quite", "really", "rather", "truly", "somewhat", "so", "too"]
_QUESTIONS = ["what do you think of", "tell me about", "describe", "write a review of", "give me a note on",
              "how was", "summarize"]
_CODE = ["def add(a, b):\n    return a + b", "for i in range(3):\n    print(i)", "x = [1, 2, 3]\ny = sum(x)"]


def tiny_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines (reviews, questions, a little code) to train the tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.6:
            lines.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADVERBS)} {rng.choice(_ADJECTIVES)}.")
        elif kind < 0.9:
            lines.append(f"{rng.choice(_QUESTIONS).capitalize()} {rng.choice(_SUBJECTS)}?")
        else:
            lines.append(rng.choice(_CODE))
    lines += [" ".join(SPECIAL_TOKENS), "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) [ ] { } < > / \\ - + = * & % $ # @"]
    return lines


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus`; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        model_max_length=512,
    )


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
) -> Path:
    """Write a randomly initialised Llama model and its tokenizer to `out_dir`; reuse it if already built."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    corpus = corpus if corpus is not None else tiny_corpus(seed=seed)
    settings = dict(seed=seed, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    vocab_size=vocab_size, corpus=hashlib.sha256("\n".join(corpus).encode()).hexdigest())
    marker = out / "alignkit_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("hash") == _settings_hash(settings):
        return out

    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The marker goes last: a directory without it is rebuilt, never half-used.
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hash": _settings_hash(settings), "settings": settings}, indent=2))
    os.replace(tmp, marker)
    return out


def default_tiny_dir() -> Path:
    """Where the `alignkit-tiny` model spec is materialised ($ALIGNKIT_CACHE or ~/.cache/alignkit)."""
    root = Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))
    return root / "tiny-llama"
