"""Batched sampling from a model spec: used by label import, compare, PPO rollouts and `alignkit generate`.

A prompt is either a string (used as raw text, as TRL's "standard" format) or a
list of chat messages (rendered with the tokenizer's chat template plus the
generation prompt). Prompts are sorted by length before batching, so padding
is small, and results come back in the caller's order.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from alignkit.errors import UserError

Prompt = "str | list[dict[str, str]]"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, recorded with every generated response so it can be reproduced."""

    max_new_tokens: int = 48
    temperature: float = 0.7  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        # Checked here, once, for every command that samples: transformers would raise mid-run, or accept
        # top_p > 1 and a negative temperature silently.
        problems = []
        for name in ("max_new_tokens", "batch_size", "num_return_sequences"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0 = greedy decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise UserError(f"sampling: {problems[0]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    texts: list[str]  # decoded responses, special tokens removed
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # up to and including EOS when the response ended
    finished: list[bool]  # the response emitted EOS within max_new_tokens


def render_prompt(tokenizer, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Any) -> list[int]:
    """Prompt token ids as TRL tokenizes them: a chat prompt's template carries its own special tokens;
    plain text gets the ones the tokenizer adds (Llama's BOS), minus an EOS, since a prompt is continued."""
    if not isinstance(prompt, str):
        return list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt)["input_ids"])
    if ids and ids[-1] == tokenizer.eos_token_id and not (tokenizer.eos_token and prompt.endswith(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


@contextmanager
def _only_these_settings(model):
    """Sample with the settings passed to generate() and nothing else.

    transformers fills every field a generate() call leaves unset from the model's own
    generation_config (a repetition_penalty, min_new_tokens, no_repeat_ngram_size shipped with
    the checkpoint), which would make samples differ from what SamplingParams records and from
    the distribution PPO's log-probs describe. A blank config (special token ids kept) stands in.
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = inner.generation_config
    inner.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id,
                                               pad_token_id=shipped.pad_token_id)
    try:
        yield
    finally:
        inner.generation_config = shipped


def generate_batch(model, tokenizer, prompts: Sequence[Any], params: SamplingParams, *, progress: bool = False) -> GenerationResult:
    """Sample one response per prompt (num_return_sequences each, consecutively) with batched `generate`."""
    import torch
    from tqdm.auto import tqdm

    n_ret = params.num_return_sequences
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise UserError(f"prompt {empty[0]} is empty (no tokens to continue); {len(empty)} empty prompt(s)")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out_ids: dict[int, list[list[int]]] = {}
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    torch.manual_seed(params.seed)
    batches = [order[i : i + params.batch_size] for i in range(0, len(order), params.batch_size)]
    sample = params.temperature > 0
    kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=sample, pad_token_id=pad_id,
                  eos_token_id=eos_id, num_return_sequences=n_ret)
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    with torch.no_grad(), _only_these_settings(model):
        for batch in tqdm(batches, desc="generating", disable=not progress):
            width = max(len(encoded[i]) for i in batch)
            # Left padding so every row's continuation starts at the same column.
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
            gen = gen[:, width:].cpu().tolist()
            for row, i in enumerate(batch):
                out_ids[i] = gen[row * n_ret : (row + 1) * n_ret]

    result = GenerationResult([], [], [], [])
    for i in range(len(prompts)):
        for seq in out_ids[i]:
            ended = eos_id in seq
            seq = seq[: seq.index(eos_id) + 1] if ended else [t for t in seq if t != pad_id]
            # Exactly what was sampled: a raw continuation often starts with a space, and prompt + text must
            # re-tokenize as it was generated (TRL checks the prompt is a prefix of prompt + completion).
            result.texts.append(tokenizer.decode(seq, skip_special_tokens=True))
            result.prompt_ids.append(encoded[i])
            result.response_ids.append(seq)
            result.finished.append(ended)
    return result


def generate_from_spec(spec: str, prompts: Sequence[Any], params: SamplingParams, *, progress: bool = False) -> list[str]:
    """Load any model spec (base, adapter dir, stage dir) and sample responses to `prompts`."""
    from alignkit.modeling import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(spec)
    return generate_batch(model, tokenizer, prompts, params, progress=progress).texts
