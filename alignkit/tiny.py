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
from dataclasses import dataclass
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


def _save_quietly(model, out: Path) -> None:
    """save_pretrained without transformers' shard progress bar: a model built on the way to another command
    (a dry run, an error message) must not print a bar into that command's output."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


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
    _save_quietly(model, out)
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


# --- Real architectures with random weights -------------------------------------------------------------------
#
# The shipped hub recipes name Llama-3.2-1B-Instruct and Llama-3.1-8B-Instruct. To run them offline the model
# directory must look like the download: its config.json (so rope scaling, tied embeddings, heads and KV heads
# are what the recipe meets), the 128,256-token vocabulary with Llama 3's special tokens at their real ids (so the
# embedding and LM head have their real shapes), and the chat template. Only the weights are random, and the
# depth may be cut (`num_layers`) so that an 8B-wide model fits a CPU machine.

LLAMA3_VOCAB_SIZE = 128256
LLAMA3_FIRST_SPECIAL = 128000
# Llama 3.1 / 3.2's named special tokens; every other id from 128000 up is <|reserved_special_token_N|>.
LLAMA3_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}


@dataclass(frozen=True)
class RealArchitecture:
    """A hub model as its files describe it: config.json, generation_config.json and its chat template."""

    hub_id: str
    config: dict
    generation_config: dict
    chat_template: str  # file name in trl/chat_templates/ (TRL ships Llama 3.1 / 3.2's own templates)


_LLAMA3_GENERATION = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                      "temperature": 0.6, "top_p": 0.9}
_LLAMA3_COMMON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": LLAMA3_VOCAB_SIZE,
}
LLAMA_3_2_1B_INSTRUCT = RealArchitecture(
    hub_id="meta-llama/Llama-3.2-1B-Instruct",
    config={**_LLAMA3_COMMON, "head_dim": 64, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": True, "transformers_version": "4.45.0.dev0"},
    generation_config=_LLAMA3_GENERATION,
    chat_template="llama3_2.jinja",
)
LLAMA_3_1_8B_INSTRUCT = RealArchitecture(
    hub_id="meta-llama/Llama-3.1-8B-Instruct",
    config={**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False, "transformers_version": "4.43.0.dev0"},
    generation_config=_LLAMA3_GENERATION,
    chat_template="llama3_1.jinja",
)
REAL_ARCHITECTURES = {a.hub_id: a for a in (LLAMA_3_2_1B_INSTRUCT, LLAMA_3_1_8B_INSTRUCT)}


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.1 / 3.2, in id order from 128000."""
    reserved = iter(range(256))
    return [LLAMA3_NAMED_SPECIALS.get(i) or f"<|reserved_special_token_{next(reserved)}|>"
            for i in range(LLAMA3_FIRST_SPECIAL, LLAMA3_VOCAB_SIZE)]


def trl_chat_template(name: str) -> str:
    """A chat template TRL ships (trl/chat_templates/NAME), read from the installed package."""
    from importlib.resources import files

    return files("trl").joinpath("chat_templates", name).read_text()


def llama3_corpus() -> list[str]:
    """tiny_corpus plus the text Llama 3's chat template writes around every conversation, so that header
    costs a handful of tokens, as it does with the real tokenizer, not one token per byte."""
    header = ["system", "user", "assistant", "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
              "Environment: ipython", "Tell me about", "Write a short note on", "What do you think of", "Because"]
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    dates = [f"Today Date: {d:02d} {m} 20{y}" for d in range(1, 32) for m in months for y in (24, 25, 26)]
    return tiny_corpus() + header * 50 + dates


def build_llama3_tokenizer(chat_template: str, corpus: list[str] | None = None, merges_vocab: int = 4000):
    """A byte-level BPE tokenizer with Llama 3's vocabulary size, special tokens at their real ids, BOS added
    like Llama 3's post-processor, `<|eot_id|>` as EOS (the Instruct models') and the given chat template.

    The ordinary tokens are BPE trained on `corpus` up to `merges_vocab`, then unreachable fillers up to id
    127999: real embedding and LM-head shapes, sensible token counts for English text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=merges_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus if corpus is not None else llama3_corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    filler = (f"<unused_{i}>" for i in range(LLAMA3_FIRST_SPECIAL))
    while len(vocab) < LLAMA3_FIRST_SPECIAL:
        token = next(filler)
        if token not in vocab:
            vocab[token] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    specials = llama3_special_tokens()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == LLAMA3_VOCAB_SIZE and tok.token_to_id("<|eot_id|>") == 128009
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", LLAMA3_FIRST_SPECIAL)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=chat_template, model_max_length=131072)


def build_real_architecture(out_dir: str | os.PathLike, arch: RealArchitecture, *, num_layers: int | None = None,
                            seed: int = 0) -> Path:
    """Write `arch` with random bf16 weights to `out_dir` (reused when already built with the same settings).

    config.json is the hub's, verbatim but for `num_hidden_layers` when `num_layers` cuts the depth: hidden and
    intermediate sizes, heads, KV heads, vocabulary, rope scaling and tied embeddings stay the real ones."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    out = Path(out_dir)
    config = {**arch.config, "num_hidden_layers": num_layers or arch.config["num_hidden_layers"]}
    corpus = hashlib.sha256("\n".join(llama3_corpus()).encode()).hexdigest()
    settings = {"hub_id": arch.hub_id, "config": config, "seed": seed, "template": arch.chat_template, "corpus": corpus}
    marker = out / "alignkit_real_arch.json"
    if marker.exists() and json.loads(marker.read_text()).get("hash") == _settings_hash(settings):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    _save_quietly(model, out)
    del model
    # save_pretrained writes this transformers' own spelling of the config: put the hub's file back.
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(arch.generation_config, indent=2))
    build_llama3_tokenizer(trl_chat_template(arch.chat_template)).save_pretrained(out)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hash": _settings_hash(settings), "settings": settings}, indent=2))
    os.replace(tmp, marker)
    return out
