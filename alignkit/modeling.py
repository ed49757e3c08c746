"""Loading models: base (hub id or local dir), 4-bit NF4 / 8-bit / unquantized, LoRA / DoRA / other PEFT.

The model spec contract: wherever a command needs a model it takes
one string, which is
  - `alignkit-tiny`: the offline tiny model, built on first use into the cache;
  - a local model directory or a hub id;
  - a PEFT adapter directory (its adapter_config.json names the base);
  - a stage directory (its stage.json names base, quantization and adapter).
`resolve_model_spec` turns any of them into a `ResolvedSpec`; everything else
here works from that.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

TINY_SPEC = "alignkit-tiny"

# Used when a tokenizer ships without a chat template. ChatML-like, with role
# markers that are plain strings so any tokenizer can encode them; the
# {% generation %} markers let TRL compute an assistant-only loss mask.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)

QUANTIZATIONS = ("4bit", "8bit", "none")
PEFT_METHODS = ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSettings:
    """How to load the base model. Mirrors the `model:` section of a recipe."""

    base: str
    quantization: str = "4bit"  # 4bit | 8bit | none
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    compute_dtype: str = "float32"  # bnb compute dtype; bfloat16 on GPUs that have it
    bnb_4bit_quant_storage: str | None = None  # e.g. "bfloat16": FSDP can then shard the 4-bit weights
    dtype: str = "float32"  # dtype of the non-quantized weights
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    trust_remote_code: bool = False


@dataclass
class PeftSettings:
    """The adapter to train. Mirrors the `peft:` section of a recipe."""

    method: str = "lora"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    modules_to_save: list[str] | None = None
    num_virtual_tokens: int = 16  # prompt / prefix tuning
    use_rslora: bool = False


@dataclass
class ResolvedSpec:
    """What a model spec points to: the base to load and the adapter (if any) on top."""

    spec: str
    base: str  # local directory or hub id of the base weights
    adapter_dir: Path | None = None
    stage_dir: Path | None = None
    model_settings: dict = field(default_factory=dict)  # quantization etc. recorded by the stage
    stage: dict | None = None  # the stage.json, for stage directories

    @functools.cached_property
    def adapter_config(self) -> dict:
        """The adapter's adapter_config.json ({} without an adapter): its rank, task type, PEFT type."""
        if self.adapter_dir is None:
            return {}
        return json.loads((self.adapter_dir / "adapter_config.json").read_text())

    @property
    def display_name(self) -> str:
        if self.stage_dir is not None:
            return self.stage_dir.name
        return Path(self.spec).name or self.spec


def resolve_base(base: str) -> str:
    """A base model name as a loadable local path or hub id; builds the tiny model on demand."""
    if base == TINY_SPEC:
        from alignkit.tiny import build_tiny_model, default_tiny_dir

        return str(build_tiny_model(default_tiny_dir()))
    try:
        path = Path(base).expanduser()
    except RuntimeError:  # `~someone` with no such user
        raise UserError(f"model path does not exist: {base}") from None
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model directory {base} has no config.json")
        return str(path)
    # Anything that looks like a path but is not there is a mistake, not a hub id (`gpt2`, `org/name`).
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base)
    except HFValidationError:
        raise UserError(f"model path does not exist: {base}") from None
    if base.startswith((".", "~")):
        raise UserError(f"model path does not exist: {base}")
    return base


def resolve_model_spec(spec: str) -> ResolvedSpec:
    """Resolve a model spec (see module docstring) without loading any weights."""
    from alignkit.artifacts import PENDING_JSON

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "stage.json").exists():
        try:
            stage = json.loads((path / "stage.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path / 'stage.json'}: not valid JSON ({err})") from None
        if not stage.get("complete"):
            raise UserError(f"stage directory {spec} is not complete (its stage.json does not say so)")
        settings = dict(stage.get("model", {}))
        base = stage["base"]
        adapter = path if (path / "adapter_config.json").exists() else None
        if adapter is None and (path / "config.json").exists():
            base = str(path)  # a fully fine-tuned stage is itself the model
            settings["quantization"] = "none"
        return ResolvedSpec(spec, resolve_base(base), adapter, path, settings, stage)
    if path.is_dir() and (path / PENDING_JSON).exists():
        # An adapter left from an earlier run may sit beside it; it is not what the stage would produce.
        raise UserError(f"stage directory {spec} is not complete (training started, no stage.json yet)")
    if path.is_dir() and (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path / 'adapter_config.json'}: no base_model_name_or_path")
        return ResolvedSpec(spec, resolve_base(base), path)
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"{spec} is a directory but neither a model, an adapter nor a stage directory")
    return ResolvedSpec(spec, resolve_base(spec))


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def liger_available() -> bool:
    """TRL's own check (installed and recent enough), so we never turn on what TRL would refuse;
    find_spec first, so a bad-input check without Liger does not import TRL (and bitsandbytes' noise)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return False
    from trl.import_utils import is_liger_kernel_available

    return is_liger_kernel_available()


def load_tokenizer(name_or_path: str, *, padding_side: str = "right"):
    """Tokenizer with a pad token and a chat template (the default one if it ships none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise UserError(f"cannot load tokenizer from {name_or_path}: {str(err).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Reusing EOS as pad is safe because labels mask padding by attention, not token id.
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise UserError(f"tokenizer of {name_or_path} has no EOS token")
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = padding_side
    return tok


def quantization_config(settings: ModelSettings):
    from transformers import BitsAndBytesConfig

    if settings.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=torch_dtype(settings.compute_dtype),
            **({"bnb_4bit_quant_storage": torch_dtype(settings.bnb_4bit_quant_storage)} if settings.bnb_4bit_quant_storage else {}),
        )
    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


class _ExpectedScorerReport:
    """A logging filter dropping transformers' load report when all it lists is what loading a causal LM as a
    one-label scorer must do — its lm_head unused, a new score head (trained by the reward stage, or loaded from
    its adapter next) — which it prints as an alarming table. Any other row keeps the report."""

    def filter(self, record) -> bool:
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # on a terminal the cells are coloured
        if "LOAD REPORT" not in text:
            return True
        rows = [[cell.strip() for cell in line.split("|")[:2]] for line in text.splitlines()
                if line.count("|") >= 2 and not line.lstrip().startswith(("Key", "-"))]
        expected = {("lm_head.", "UNEXPECTED"), ("score.", "MISSING")}
        return not rows or not all((key.split(".")[0] + ".", status) in expected for key, status in rows)


def load_base_model(settings: ModelSettings, *, model_class=None, **kwargs):
    """Load the base weights as the settings say (quantized or not), on the one available device."""
    import torch
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    base = resolve_base(settings.base)
    init = dict(dtype=torch_dtype(settings.dtype), trust_remote_code=settings.trust_remote_code, **kwargs)
    qconf = quantization_config(settings)
    if qconf is not None:
        init["quantization_config"] = qconf
        init["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    if settings.attn_implementation:
        init["attn_implementation"] = settings.attn_implementation
    import logging

    report_logger, quiet = logging.getLogger("transformers.modeling_utils"), _ExpectedScorerReport()
    report_logger.addFilter(quiet)
    try:
        model = model_class.from_pretrained(base, **init)
    except OSError as err:
        raise UserError(f"cannot load model {settings.base}: {str(err).splitlines()[0]}") from None
    finally:
        report_logger.removeFilter(quiet)
    return model


def check_model(settings: ModelSettings, adapter: PeftSettings) -> None:
    """The base's config.json loads (a hub id is reachable or cached) and the adapter's named target modules
    exist in its architecture: built on the meta device, so no weights are read. A UserError otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = resolve_base(settings.base)
    def refused(err: Exception) -> UserError:
        return UserError(f"cannot load the config of model {settings.base}: {str(err).strip().splitlines()[0]}")

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as err:
        raise refused(err) from None
    targets = adapter.target_modules
    if adapter.method not in ("lora", "dora", "ia3") or not isinstance(targets, list):
        return  # "all-linear" always matches; a regex string is PEFT's to match
    import torch

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    except (ValueError, KeyError) as err:  # no causal-LM class for this config
        raise refused(err) from None
    names = [n for n, _ in model.named_modules()]
    # PEFT's rule (check_target_module_exists): a module's full name, or a dotted ending of it
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"peft.target_modules: {', '.join(map(str, missing))} not in {settings.base} "
                        f"(its linear layers: {', '.join(linear)})")


def peft_config(settings: PeftSettings, task_type: str = "CAUSAL_LM"):
    """The PEFT config for a recipe's `peft:` section; None for full fine-tuning."""
    import peft

    if settings.method == "full":
        return None
    if settings.method in ("lora", "dora"):
        return peft.LoraConfig(
            r=settings.r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules,
            modules_to_save=settings.modules_to_save,
            use_dora=settings.method == "dora",
            use_rslora=settings.use_rslora,
            task_type=task_type,
        )
    if settings.method == "ia3":
        targets = settings.target_modules if settings.target_modules != "all-linear" else None
        return peft.IA3Config(target_modules=targets, task_type=task_type)
    if settings.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)
    if settings.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=task_type)
    raise UserError(f"unknown peft method {settings.method!r}; one of {', '.join(PEFT_METHODS)}")


def prepare_for_training(model, settings: ModelSettings, gradient_checkpointing: bool):
    """k-bit preparation for quantized bases (frozen base, input grads for checkpointing); a no-op otherwise.

    peft's prepare_model_for_kbit_training also upcasts every unquantized weight to fp32: on Llama-3.1-8B the
    1 GiB embedding and 1 GiB LM head become 4 GiB, and fp32 norm weights turn the residual stream fp32, so each
    checkpointed layer input and the MLP activations take twice the memory. Under autocast the matmuls run in the
    compute dtype either way. So a bf16 base stays bf16, as torchtune and Unsloth train QLoRA; an fp16 base takes
    peft's upcast, since fp16 lacks the range for a residual stream.
    """
    import torch
    from peft import prepare_model_for_kbit_training

    if settings.quantization not in ("4bit", "8bit"):
        return model
    if any(p.dtype == torch.float16 for p in model.parameters()):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:  # as peft does: the frozen embedding's output must carry grad into checkpoints
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable()
    if settings.quantization == "4bit":
        keep_4bit_differentiable(model)
    return model


def keep_4bit_differentiable(model) -> None:
    """Turn off bitsandbytes' CPU bfloat16 inference kernel on a model that will be trained.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place the first time it runs in
    eval mode without grad (generation, PPO rollouts, evaluation, precomputed reference log-probs), and from then on
    routes every forward through `gemv_4bit`, which has no autograd formula: the gradient through the frozen base
    is dropped and LoRA gradients come out ~100% wrong (tests/test_stages.py measures it). Without the kernel every
    forward dequantizes to the compute dtype, as it does on GPUs.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_adapter(model, adapter_dir: str | Path, *, trainable: bool, adapter_name: str = "default"):
    """Wrap `model` with the adapter saved in `adapter_dir` (a PEFT dir or a stage dir)."""
    from peft import PeftModel

    if hasattr(model, "peft_config"):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)


def tokenizer_source(adapter_dir: str | Path | None, base: str | Path) -> str:
    """An adapter or stage directory's own tokenizer when it saved one (a stage may have changed it), else the base's."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").exists():
        return str(adapter_dir)
    return str(base)


def load_model_for_inference(spec: str | ResolvedSpec, *, quantization: str | None = None, padding_side: str = "left"):
    """(model, tokenizer, resolved) for any model spec, in eval mode, adapter attached. A reward model's spec is
    refused: its adapter was trained under a score head, and generating from it gives fluent-looking noise."""
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve_model_spec(spec)
    architectures = []
    if resolved.adapter_dir is None and (Path(resolved.base) / "config.json").exists():
        # a merged reward model is a sequence classifier
        architectures = json.loads((Path(resolved.base) / "config.json").read_text()).get("architectures") or []
    if ((resolved.stage or {}).get("kind") == "reward" or resolved.adapter_config.get("task_type") == "SEQ_CLS"
            or any(a.endswith("ForSequenceClassification") for a in architectures)):
        raise UserError(f"{resolved.spec} is a reward model (a scorer, not a policy): generate from a policy stage "
                        f"such as sft, dpo or ppo, and use it as a judge with --judge reward:{resolved.spec}")
    settings = dict(resolved.model_settings)
    settings["base"] = resolved.base
    settings.setdefault("quantization", "none")
    if quantization is not None:
        settings["quantization"] = quantization
    model_settings = ModelSettings(**settings)
    tok_source = str(resolved.stage_dir or resolved.adapter_dir or resolved.base)
    if resolved.adapter_dir is not None and not (Path(tok_source) / "tokenizer_config.json").exists():
        tok_source = resolved.base
    tokenizer = load_tokenizer(tok_source, padding_side=padding_side)
    model = load_base_model(model_settings)
    if resolved.adapter_dir is not None:
        model = attach_adapter(model, resolved.adapter_dir, trainable=False)
    model.eval()
    return model, tokenizer, resolved


def count_parameters(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}
