"""`alignkit merge STAGE_DIR --out DIR`: a stage's adapter merged into a full model for vLLM / TGI / transformers.

What it does, in order:
  1. resolve the spec (stage directory or PEFT adapter directory) to its base and adapter;
  2. load the base *unquantized* in the requested dtype — a stage trained on a 4-bit NF4
     base is merged onto the base's original weights, not onto a re-quantized copy, so the
     result is a plain dense checkpoint that any server can load;
  3. attach the adapter and `merge_and_unload()` (W' = W + scale * B @ A per LoRA layer;
     DoRA and IA3 merge too; prompt/prefix tuning cannot be merged and is refused);
  4. write model (safetensors) + tokenizer (the stage's, so its chat template is kept) +
     README.md (a model card naming the lineage) + alignkit_merge.json, into a temp
     directory that is renamed to DIR only when everything is written.

The stage's adapter already holds its whole chain: a child stage (DPO, PPO, ...)
continues training its parent's adapter rather than stacking a new one, so
merging the one adapter merges the chain. A reward stage (task SEQ_CLS, with its
`score` head) merges into an `AutoModelForSequenceClassification` with one label.

Tolerance. Before and after merging, `merge_model` runs the same probe tokens
through the model and records the largest absolute logit difference in the card
and in alignkit_merge.json. In float32 the merged model matches the unmerged
adapter model (on the same unquantized base) to |Δlogit| <= 1e-4 (tests assert
it on the tiny model; the difference is float rounding of W + BA). In bfloat16
the merged weights are rounded once more and differences of ~1e-2 are normal.

Relative to the 4-bit model the adapter was trained on, the merged model also
differs by the base's NF4 quantization error (the adapter was fitted to the
NF4-rounded weights). `base_weights="dequantized"` merges onto the NF4 weights
dequantized instead (the base is loaded in 4-bit exactly as in training, then
`model.dequantize()`), which reproduces the trained 4-bit model up to float
rounding; the default, "original", is what the brief and most serving users
want: the full-precision base plus the learned update. tests/test_merge.py
measures both against the 4-bit adapter model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

MERGE_JSON = "alignkit_merge.json"
BASE_WEIGHTS = ("original", "dequantized")
# Float32 merge tolerance we state and test: max |logit(merged) - logit(adapter model)|.
FP32_ATOL = 1e-4
PROBE_TEXT = "The film was very good. Tell me about the plot?"


@dataclass
class MergeResult:
    out_dir: Path
    model_class: str
    dtype: str
    base: str
    base_weights: str
    max_abs_logit_diff: float | None  # merged vs unmerged adapter model on the probe, same base weights
    lineage: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "model_class": self.model_class, "dtype": self.dtype, "base": self.base,
                "base_weights": self.base_weights, "max_abs_logit_diff": self.max_abs_logit_diff,
                "lineage": self.lineage}


def lineage_of(stage_dir: Path | None, stage: dict | None) -> list[dict]:
    """This stage and its `after` ancestors, newest first: name, kind, path, config_hash (read from each stage.json)."""
    chain: list[dict] = []
    seen: set[str] = set()
    current_dir, current = stage_dir, stage
    while current is not None:
        entry = {"name": current.get("name"), "kind": current.get("kind"), "path": str(current_dir),
                 "config_hash": current.get("config_hash"), "complete": bool(current.get("complete"))}
        others = {role: p.get("name") for role, p in (current.get("parents") or {}).items() if role != "after"}
        if others:
            entry["other_parents"] = others  # e.g. PPO's reward stage: lineage, not merged weights
        chain.append(entry)
        parent = (current.get("parents") or {}).get("after")
        if not parent or not parent.get("path") or parent["path"] in seen:
            break
        seen.add(parent["path"])
        parent_dir = Path(parent["path"])
        try:
            current = json.loads((parent_dir / "stage.json").read_text())
            current_dir = parent_dir
        except (OSError, json.JSONDecodeError):
            # The parent directory moved or is gone: record what the child remembers of it.
            chain.append({"name": parent.get("name"), "kind": None, "path": parent["path"],
                          "config_hash": parent.get("config_hash"), "complete": None, "missing": True})
            break
    return chain


def _model_class(adapter_cfg: dict):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = (adapter_cfg.get("task_type") or "CAUSAL_LM").upper()
    if task == "SEQ_CLS":
        return AutoModelForSequenceClassification
    if task in ("CAUSAL_LM", ""):
        return AutoModelForCausalLM
    raise UserError(f"adapter task_type {task!r} cannot be merged by alignkit (CAUSAL_LM or SEQ_CLS)")


def _probe_logits(model, tokenizer):
    import torch

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :32]
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device)).logits.float().cpu()


def _prepare_out(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def load_adapter_model(spec: str, *, dtype: str = "float32", base_weights: str = "original"):
    """(peft_model, tokenizer, resolved, adapter_cfg): the base unquantized (or NF4-dequantized) with the adapter attached."""
    from alignkit.modeling import (ModelSettings, attach_adapter, load_base_model, load_tokenizer, resolve_model_spec,
                                   tokenizer_source)

    if base_weights not in BASE_WEIGHTS:
        raise UserError(f"base_weights must be one of {', '.join(BASE_WEIGHTS)}, got {base_weights!r}")
    resolved = resolve_model_spec(spec)
    if resolved.adapter_dir is None:
        raise UserError(f"{spec} has no adapter to merge (it is already a full model; load it directly)")
    adapter_cfg = resolved.adapter_config
    peft_type = str(adapter_cfg.get("peft_type", "LORA")).upper()
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        raise UserError(f"{spec}: a {peft_type.lower()} adapter has no weights to merge into the base; "
                        f"serve it with PEFT on top of the base instead")
    model_class = _model_class(adapter_cfg)

    tokenizer = load_tokenizer(tokenizer_source(resolved.adapter_dir, resolved.base))
    recorded = dict(resolved.model_settings)
    settings = ModelSettings(
        base=resolved.base,
        quantization="none",
        dtype=dtype,
        trust_remote_code=bool(recorded.get("trust_remote_code", False)),
    )
    extra: dict[str, Any] = {}
    if model_class.__name__ == "AutoModelForSequenceClassification":
        extra = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id}
    if base_weights == "dequantized":
        settings.quantization = "4bit"
        for key in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
            if key in recorded:
                setattr(settings, key, recorded[key])
        settings.compute_dtype = dtype
        model = load_base_model(settings, model_class=model_class, **extra)
        model = model.dequantize()
        model = model.to(getattr(__import__("torch"), dtype))
    else:
        model = load_base_model(settings, model_class=model_class, **extra)
    if extra:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = attach_adapter(model, resolved.adapter_dir, trainable=False)
    model.eval()
    return model, tokenizer, resolved, adapter_cfg


def merge_model(spec: str, out_dir: str | Path, *, dtype: str = "float32", base_weights: str = "original",
                verify: bool = True, log=print) -> MergeResult:
    """Merge the adapter of `spec` into its base and write a standalone model directory at `out_dir`."""
    from alignkit.artifacts import file_fingerprint, write_json_atomic

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose a new directory")
    started = time.time()
    model, tokenizer, resolved, adapter_cfg = load_adapter_model(spec, dtype=dtype, base_weights=base_weights)
    before = _probe_logits(model, tokenizer) if verify else None
    merged = model.merge_and_unload()
    diff = None
    if verify:
        diff = float((_probe_logits(merged, tokenizer) - before).abs().max())
    lineage = lineage_of(resolved.stage_dir, resolved.stage)
    stage = resolved.stage or {}
    weights = resolved.adapter_dir / "adapter_model.safetensors"
    info = {
        "source": str(Path(spec).resolve()),
        "base": stage.get("base") or adapter_cfg.get("base_model_name_or_path"),
        "base_resolved": resolved.base,
        "base_weights": base_weights,
        "trained_quantization": (resolved.model_settings or {}).get("quantization"),
        "dtype": dtype,
        "model_class": type(merged).__name__,
        "peft_type": adapter_cfg.get("peft_type"),
        "lora_r": adapter_cfg.get("r"),
        "adapter_sha256": file_fingerprint(weights) if weights.exists() else None,
        "config_hash": stage.get("config_hash"),
        "lineage": lineage,
        "max_abs_logit_diff_vs_adapter_model": diff,
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    tmp = _prepare_out(out)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(info))
        write_json_atomic(tmp / MERGE_JSON, info)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"merged {spec} -> {out} ({type(merged).__name__}, {dtype}, {time.time() - started:.1f}s"
        + (f", max |Δlogit| vs adapter model {diff:.2e})" if diff is not None else ")"))
    return MergeResult(out, type(merged).__name__, dtype, resolved.base, base_weights, diff, lineage)


def model_card(info: dict) -> str:
    """README.md for the merged directory: YAML front matter (hub conventions) + lineage and how to load it."""
    base = info.get("base") or info.get("base_resolved")
    head = ["---", "library_name: transformers", f"base_model: {base}", "tags:", "- alignkit", "- merged-adapter",
            "---", ""]
    lines = [f"# Merged model from `{Path(info['source']).name}`", ""]
    lines += [
        f"A full `{info['model_class']}` checkpoint: the base model with the alignkit stage's "
        f"{info.get('peft_type') or 'PEFT'} adapter merged in (`merge_and_unload`), in {info['dtype']}. "
        "It loads without PEFT or alignkit:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")" if info["model_class"].endswith("CausalLM")
        else "from transformers import AutoModelForSequenceClassification\n"
             "model = AutoModelForSequenceClassification.from_pretrained(\"THIS_DIR\")  # one label: a reward score",
        "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR\")  # carries the chat template the stage trained with",
        "```",
        "",
        "and serves as a plain model directory with vLLM (`vllm serve THIS_DIR`) or TGI (`--model-id THIS_DIR`).",
        "",
        "## Lineage",
        "",
        f"- base model: `{base}` (loaded from `{info['base_resolved']}`)",
        f"- trained on the base quantized as: `{info.get('trained_quantization') or 'unknown'}`; "
        f"merged onto the base's {'original full-precision' if info['base_weights'] == 'original' else 'NF4-dequantized'} weights",
        f"- source: `{info['source']}`",
        f"- adapter sha256: `{info.get('adapter_sha256')}`" + (f", LoRA r = {info['lora_r']}" if info.get("lora_r") else ""),
    ]
    if info.get("config_hash"):
        lines.append(f"- stage config hash: `{info['config_hash']}`")
    if info.get("lineage"):
        lines += ["", "Stages, newest first (each continued its parent's adapter):", "",
                  "| stage | kind | config hash | path |", "|---|---|---|---|"]
        for s in info["lineage"]:
            note = " (missing)" if s.get("missing") else ""
            others = s.get("other_parents")
            kind = (s.get("kind") or "?") + (f" (with {', '.join(f'{k}: {v}' for k, v in others.items())})" if others else "")
            lines.append(f"| {s.get('name')}{note} | {kind} | `{(s.get('config_hash') or '')[:16]}` | `{s.get('path')}` |")
    lines += ["", "## Fidelity", ""]
    diff = info.get("max_abs_logit_diff_vs_adapter_model")
    if diff is not None:
        lines.append(f"On a probe sentence the merged model's logits differ from the unmerged adapter model's "
                     f"(same base weights) by at most {diff:.2e}.")
    lines.append(f"alignkit's stated tolerance in float32 is {FP32_ATOL:g}; bfloat16 / float16 merges round the "
                 "merged weights once more (differences around 1e-2 are normal).")
    if info.get("trained_quantization") == "4bit" and info["base_weights"] == "original":
        lines.append("The adapter was trained against the 4-bit NF4 base, so this model also differs from the "
                     "trained 4-bit model by the base's quantization error (it uses the full-precision weights).")
    lines += ["", f"Merged with alignkit at {info['merged_at']}.", ""]
    return "\n".join(head + lines)


def merge_from_cli(args) -> int:
    """`alignkit merge SPEC --out DIR [--dtype ...] [--base-weights original|dequantized]`."""
    merge_model(args.spec, args.out, dtype=args.dtype, base_weights=args.base_weights)
    return 0
