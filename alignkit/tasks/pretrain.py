"""Pretraining the tiny Llama on a task's corpus, so it writes the task's language before SFT.

`pretrained_tiny_model(cache_dir)` builds the offline tiny model
(`alignkit.tiny.build_tiny_model`) with a tokenizer trained on the sentiment
corpus, trains it as a causal LM for a fixed number of steps on the CPU (about
a minute on two cores), and saves it as a plain `save_pretrained` directory.
The directory is keyed by a hash of every setting that changes the result, and
`pretrained.json` is written last (temp file + rename): a directory without it
is rebuilt, never half-used, and a second call with the same settings returns
at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "pretrained.json"
# Bump when the training code changes in a way that changes the weights.
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainSettings:
    corpus_size: int = 20_000
    corpus_seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    vocab_size: int = 512
    steps: int = 150
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_length: int = 48
    seed: int = 0

    def key(self) -> str:
        from alignkit.tasks import sentiment

        corpus_hash = hashlib.sha256("\n".join(sentiment.corpus(self.corpus_size, self.corpus_seed)).encode()).hexdigest()
        blob = json.dumps({**asdict(self), "corpus": corpus_hash, "version": PRETRAIN_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    from alignkit.tiny import default_tiny_dir

    return default_tiny_dir().parent


def is_pretrained(model_dir: Path, settings: PretrainSettings) -> bool:
    try:
        marker = json.loads((Path(model_dir) / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return marker.get("key") == settings.key()


def pretrained_tiny_model(cache_dir: str | os.PathLike | None = None, settings: PretrainSettings | None = None,
                          *, log=print) -> Path:
    """The sentiment-pretrained tiny Llama directory under `cache_dir`, trained on first use."""
    settings = settings or PretrainSettings()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / f"sentiment-tiny-{settings.key()}"
    if is_pretrained(out, settings):
        log(f"pretrained tiny model: cached at {out}")
        return out
    from alignkit.tasks import sentiment

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    texts = sentiment.corpus(settings.corpus_size, settings.corpus_seed)
    start = time.time()
    stats = _pretrain(staging, texts, settings, log=log)
    stats["wall_seconds"] = round(time.time() - start, 1)
    (staging / MARKER).write_text(json.dumps({"key": settings.key(), "settings": asdict(settings),
                                               "version": PRETRAIN_VERSION, "stats": stats}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    log(f"pretrained tiny model: {out} ({stats['wall_seconds']:.0f}s, final loss {stats['final_loss']:.3f})")
    return out


def _pretrain(out_dir: Path, texts: list[str], s: PretrainSettings, *, log=print) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from alignkit.tiny import build_tiny_model

    init_dir = out_dir / "init"
    build_tiny_model(init_dir, seed=s.seed, hidden_size=s.hidden_size, num_layers=s.num_layers,
                     num_heads=s.num_heads, vocab_size=s.vocab_size, corpus=texts)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    model = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    shutil.rmtree(init_dir)

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    # Each review is one sequence, no BOS (prompts are encoded the same way at generation), ending in EOS.
    encoded = [ids[: s.max_length - 1] + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.learning_rate, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    order = torch.randperm(len(encoded), generator=gen).tolist()
    cursor = 0
    bar = tqdm(range(s.steps), desc="pretraining tiny model", leave=False)
    for step in bar:
        if cursor + s.batch_size > len(order):
            order, cursor = torch.randperm(len(encoded), generator=gen).tolist(), 0
        batch = [encoded[i] for i in order[cursor : cursor + s.batch_size]]
        cursor += s.batch_size
        width = max(len(b) for b in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-20:]
    return {"final_loss": sum(tail) / len(tail), "first_loss": losses[0], "steps": s.steps,
            "parameters": sum(p.numel() for p in model.parameters())}
