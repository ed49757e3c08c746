"""`alignkit estimate MODEL --method full|lora|qlora`: memory to train a model, from its config.json alone.

Nothing but config.json is read (a local directory, a path to the file, or a hub
id — then only that one file is fetched), so a user can pick a GPU before
downloading any weights. `estimate_memory(config, method, ...)` returns a
`MemoryEstimate` that stages can print when they start.

The model is taken to be a Llama-style decoder (Llama, Mistral, Qwen, Gemma, ...):
per layer q/k/v/o projections, a gated MLP (gate/up/down), two norms; token
embeddings and an LM head (shared when tie_word_embeddings). Other layouts
(fused qkv, ungated MLPs) come out approximately right.

Notation: h hidden_size, L layers, i intermediate_size, V vocab, q = heads x head_dim,
kv = kv_heads x head_dim, b batch, s sequence length, T = b*s tokens, r LoRA rank,
a bytes per activation element (2: bf16/fp16 autocast), w bytes per base weight (2: bf16).

Parameters
  P_lin   = L * (h*q + 2*h*kv + q*h + 3*h*i)         the decoder's Linear layers (MoE: experts x MLP + router)
  P_other = V*h * (1 if tied else 2) + (2L+1)*h      embeddings, LM head, norms (+ biases if any)
  P_lora  = r * sum over every Linear in P_lin of (in + out)   (PEFT "all-linear": every Linear but the LM head)

Weights
  full    w * P
  lora    w * P + 4 * P_lora                              (PEFT keeps adapter weights in fp32)
  qlora   NF4(P_lin) + w' * P_other + 4 * P_lora
          NF4(n) = n/2 + ceil(n/64) * 1 + ceil(ceil(n/64)/256) * 4  with double quantization
                   (8-bit absmax per 64-weight block, one fp32 constant per 256 blocks), or
                 = n/2 + ceil(n/64) * 4                               without (fp32 absmax per block),
          per weight matrix; ~0.516 bytes/weight with double quant. alignkit's k-bit preparation
          (modeling.prepare_for_training) keeps the unquantized weights in their dtype: w' = w,
          except fp16, where it takes peft's upcast of them all to fp32 (w' = 4).
Gradients (trainable parameters only)
  full    w * P;   lora / qlora   4 * P_lora
Optimizer (AdamW)
  full    (8 + 4) * P: fp32 m and v, plus an fp32 master copy when w < 4 (mixed precision);
          adamw_8bit: 2 bytes of state (+ the master copy)
  lora / qlora   8 * P_lora (adamw_8bit: 2 * P_lora); the adapter is already fp32, no master copy
Several adapters on one base (PPO's roles: `adapters` loaded, `trained_adapters` of them trained):
  4 * P_lora weights per adapter; gradients and optimizer states per trained adapter
Activations (bytes autograd keeps for backward; tests/test_estimate.py checks them within 5% against the
tensors PyTorch actually saves for a bf16 Llama (full, LoRA) and for alignkit's QLoRA under bf16 autocast,
and the qlora weight figure byte for byte against a real bitsandbytes model)
  per token per layer A =
    norms      2 x (4 + 2a) h   full: each RMSNorm keeps its fp32 input, the normalised value and its output
               2 x 4 h          lora / qlora: frozen norm weights, only the fp32 input is kept
    attention  a (2q + 2kv)     q, k, v and the output (SDPA / flash attention keeps no s x s matrix;
                                eager attention adds b * heads * s^2 * (4 + a) per layer: fp32 softmax + its cast)
    MLP        4a i             full: gate, up, silu(gate) and their product (the down projection's input)
               3a i             lora / qlora: the frozen down projection keeps no input
    adapters   sum over the adapted Linears of 4 in + 4 r   (lora: PEFT casts each adapted Linear's input
               to the fp32 adapter dtype and lora_A keeps that copy; lora_B keeps the fp32 rank-r output),
               a in + a r       (qlora under autocast: the copies autocast casts for lora_A and lora_B),
               + 1 byte per input element with lora_dropout > 0 (the dropout mask; bool on CUDA)
  head   by lm_head, after the final norm's input n = (4 + 2a) h (full) or 4h (lora / qlora):
         full    n + V (a + 4 + 4): the logits, the fp32 log-softmax the loss keeps and its fp32 gradient
                 in backward (the vocabulary is often the largest single activation). A model's own loss.
         fused   n + a h + 4 h + 44, plus one min(T, 4096) x min(V, 32768) logits tile (a bytes) at a time:
                 TRL's chunked log-prob head (trl.kernels.chunked_logprob, used by its SFT, DPO, GRPO and RLOO
                 trainers) keeps the normed hidden state, builds an fp32 gradient for it in backward, and per
                 token 44 bytes of targets, log-sum-exp, entropy and running statistics; no full logits.
         score   n: a reward model's one-output score head.
  without gradient checkpointing   T * L * A + T * head (+ the fused head's one tile)
  with gradient checkpointing      T * L * h * a (each layer's input) + T * A (one layer recomputed) + T * head (+ tile)
  Ungated MLPs keep 2a i (full) / a i (adapters); MoE layers multiply the MLP terms by the experts
  each token uses and add a router logit per expert.
Total = weights + gradients + optimizer + activations. Not included: the CUDA context and allocator
slack (~0.5-1 GiB), temporary buffers (bnb dequantizes one weight at a time), a DPO reference forward
(no grad: small) — for DPO pass twice the batch size, as chosen and rejected run together.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

METHODS = ("full", "lora", "qlora")
LM_HEADS = ("full", "fused", "score")
OPTIMIZERS = ("adamw", "adamw_8bit")
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
NF4_BLOCK = 64
DQ_BLOCK = 256
GIB = 1024**3
# Architectures whose MLP is up/down only (no gate).
UNGATED = {"gpt_neox", "falcon", "phi", "starcoder2", "opt", "gpt2", "gpt_bigcode", "bloom", "gptj"}


@dataclass
class ModelShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    gated_mlp: bool = True
    num_experts: int = 1  # MoE: experts per layer (all held in memory)
    experts_per_token: int = 1  # MoE: experts each token runs through
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, in_features, out_features, copies) of the Linear layers of ONE decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        out = [("q_proj", h, q, 1), ("k_proj", h, kv, 1), ("v_proj", h, kv, 1), ("o_proj", q, h, 1)]
        mlp = [("gate_proj", h, i, 1), ("up_proj", h, i, 1), ("down_proj", i, h, 1)] if self.gated_mlp \
            else [("up_proj", h, i, 1), ("down_proj", i, h, 1)]
        if self.num_experts > 1:
            mlp = [(n, fi, fo, self.num_experts) for n, fi, fo, _ in mlp] + [("router", h, self.num_experts, 1)]
        return out + mlp


def _get(cfg: dict, keys: tuple[str, ...], where: str, default: Any = None, required: bool = True):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if required and default is None:
        raise UserError(f"{where}: no {keys[0]} (needed for the estimate)")
    return default


def shape_from_config(cfg: dict, where: str = "config.json") -> ModelShape:
    """The dimensions the estimate needs, from a transformers config dict (multimodal: its text_config)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    h = int(_get(cfg, ("hidden_size", "n_embd", "d_model"), where))
    heads = int(_get(cfg, ("num_attention_heads", "n_head"), where))
    model_type = str(cfg.get("model_type", "unknown"))
    experts = int(_get(cfg, ("num_local_experts", "num_experts", "n_routed_experts"), where, default=1, required=False))
    inter = _get(cfg, ("moe_intermediate_size",), where, required=False) if experts > 1 else None
    inter = inter or _get(cfg, ("intermediate_size", "n_inner", "ffn_dim"), where, default=4 * h, required=False)
    return ModelShape(
        model_type=model_type,
        vocab_size=int(_get(cfg, ("vocab_size",), where)),
        hidden_size=h,
        num_layers=int(_get(cfg, ("num_hidden_layers", "n_layer", "num_layers"), where)),
        intermediate_size=int(inter),
        num_heads=heads,
        num_kv_heads=int(_get(cfg, ("num_key_value_heads",), where, default=heads, required=False)),
        head_dim=int(cfg.get("head_dim") or h // heads),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        gated_mlp=model_type not in UNGATED,
        num_experts=experts,
        experts_per_token=int(_get(cfg, ("num_experts_per_tok", "moe_topk"), where, default=1, required=False))
        if experts > 1 else 1,
        attention_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def load_config(model: str) -> dict:
    """config.json of a local model directory, a path to a config file, or a hub id (fetching only that file)."""
    path = Path(model).expanduser()
    if path.is_file():
        config_path = path
    elif path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise UserError(f"model directory {model} has no config.json")
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model path does not exist: {model}")
    else:
        try:
            from huggingface_hub import hf_hub_download

            config_path = Path(hf_hub_download(model, "config.json"))
        except Exception as err:  # offline, gated, or no such repo: one line, not a traceback
            raise UserError(f"cannot fetch config.json of {model} from the hub: {str(err).splitlines()[0]}") from None
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}:{err.lineno}: not valid JSON ({err.msg})") from None


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """Bytes of one n-element weight matrix in bitsandbytes NF4 (packed 4-bit + block constants)."""
    blocks = math.ceil(n / NF4_BLOCK)
    if double_quant:
        return math.ceil(n / 2) + blocks * 1 + math.ceil(blocks / DQ_BLOCK) * 4
    return math.ceil(n / 2) + blocks * 4


@dataclass
class MemoryEstimate:
    """Bytes needed to train, by component (see the module docstring for every formula)."""

    model_type: str
    method: str
    params_total: int
    params_linear: int
    params_trainable: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    lora_r: int | None
    weights: int
    gradients: int
    optimizer: int
    activations: int
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def format(self) -> str:
        """A small table (GiB, or MiB for small models), for the CLI and a stage's first log lines."""
        ckpt = "on" if self.gradient_checkpointing else "off"
        lora = f", LoRA r={self.lora_r} all-linear" if self.method != "full" else ""
        unit, div = ("GiB", GIB) if self.total >= GIB / 4 else ("MiB", 1024**2)
        rows = [
            f"{self.method} training of a {self.model_type} model: {_count(self.params_total)} parameters, "
            f"{_count(self.params_trainable)} trainable{lora}",
            f"batch {self.batch_size} x {self.seq_len} tokens, gradient checkpointing {ckpt}, "
            f"optimizer {self.settings.get('optimizer')}, LM head {self.settings.get('lm_head', 'full')}",
        ]
        for name in ("weights", "gradients", "optimizer", "activations", "total"):
            rows.append(f"  {name:<12} {getattr(self, name) / div:9.2f} {unit}")
        rows[-1] += "  (+ ~0.5-1 GiB CUDA context and allocator slack)"
        return "\n".join(rows)


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f} {suffix}"
    return str(n)


def parameter_bytes(model) -> int:
    """Bytes a loaded model's parameters hold, 4-bit block constants included: what `weights` estimates."""
    held = 0
    for p in model.parameters():
        held += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:  # packed 4-bit weights + block constants (8-bit absmax, fp32 second level)
            held += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return held


def saved_activation_bytes(model, forward) -> tuple[int, object]:
    """Bytes of the distinct tensors autograd saves for backward while `forward()` runs (the model's parameters
    excluded), and forward's result: the real counterpart of `activations`."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(saved.values()), result


def estimate_memory(
    config: dict | ModelShape,
    method: str = "qlora",
    *,
    batch_size: int = 1,
    seq_len: int = 2048,
    lora_r: int = 16,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = True,
    weight_dtype: str = "bfloat16",
    activation_dtype: str = "bfloat16",
    optimizer: str = "adamw",
    double_quant: bool = True,
    attention: str = "sdpa",
    lm_head: str = "full",
    adapters: int = 1,
    trained_adapters: int = 1,
) -> MemoryEstimate:
    """Memory to train `config` (a config.json dict or a ModelShape) with `method`; formulas in the module docstring."""
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if attention not in ("sdpa", "eager"):
        raise UserError(f"attention must be sdpa or eager, got {attention!r}")
    if lm_head not in LM_HEADS:
        raise UserError(f"lm_head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
    for name, dt in (("weight_dtype", weight_dtype), ("activation_dtype", activation_dtype)):
        if dt not in DTYPE_BYTES:
            raise UserError(f"{name} must be one of {', '.join(DTYPE_BYTES)}, got {dt!r}")
    if batch_size < 1 or seq_len < 1 or (method != "full" and lora_r < 1):
        raise UserError("batch size, sequence length and LoRA rank must be positive")
    if not 1 <= trained_adapters <= adapters:
        raise UserError(f"need 1 <= trained_adapters <= adapters, got {trained_adapters} of {adapters}")
    shape = config if isinstance(config, ModelShape) else shape_from_config(config)
    w, a = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[activation_dtype]
    h, L, V = shape.hidden_size, shape.num_layers, shape.vocab_size

    linears = shape.linear_shapes()
    p_lin_layer = sum(fi * fo * c for _, fi, fo, c in linears)
    p_bias_layer = 0
    if shape.attention_bias:
        p_bias_layer += shape.q_dim + 2 * shape.kv_dim + h
    if shape.mlp_bias:
        p_bias_layer += sum(fo * c for n, _, fo, c in linears if n != "router" and n not in ("q_proj", "k_proj", "v_proj", "o_proj"))
    p_lin = L * p_lin_layer
    p_other = V * h * (1 if shape.tie_word_embeddings else 2) + (2 * L + 1) * h + L * p_bias_layer
    p_total = p_lin + p_other
    p_lora = 0 if method == "full" else L * lora_r * sum((fi + fo) * c for _, fi, fo, c in linears)

    # Weights, gradients, optimizer.
    if method == "full":
        weights = w * p_total
        gradients = w * p_total
        master = 4 * p_total if w < 4 else 0
        optimizer_bytes = master + (8 if optimizer == "adamw" else 2) * p_total
        trainable = p_total
    else:
        if method == "lora":
            base = w * p_total
        else:
            w_other = 4 if weight_dtype in ("float16", "fp16") else w
            base = L * sum(nf4_bytes(fi * fo, double_quant) * c for _, fi, fo, c in linears) + w_other * p_other
        weights = base + 4 * p_lora * adapters
        gradients = 4 * p_lora * trained_adapters
        optimizer_bytes = (8 if optimizer == "adamw" else 2) * p_lora * trained_adapters
        trainable = p_lora * trained_adapters

    # Activations, per token per layer (bytes).
    tokens = batch_size * seq_len
    frozen = method != "full"
    mlp_i = shape.intermediate_size * (shape.experts_per_token if shape.num_experts > 1 else 1)
    norms = 2 * (4 * h if frozen else (4 + 2 * a) * h)
    attn = a * (2 * shape.q_dim + 2 * shape.kv_dim)
    mlp = a * mlp_i * ((3 if frozen else 4) if shape.gated_mlp else (1 if frozen else 2))
    layer = norms + attn + mlp
    if shape.num_experts > 1:
        layer += a * shape.num_experts  # router logits
    if frozen:
        # Per token, each adapted Linear runs once (MoE experts: for the experts the token uses).
        adapter_bytes = a if method == "qlora" else 4
        for _, fi, _, copies in linears:
            k = shape.experts_per_token if copies > 1 else 1
            layer += k * (adapter_bytes * (fi + lora_r) + (fi if lora_dropout > 0 else 0))
    eager_layer = batch_size * shape.num_heads * seq_len * seq_len * (4 + a) if attention == "eager" else 0
    norm_in = 4 * h if frozen else (4 + 2 * a) * h
    if lm_head == "full":
        head = tokens * (norm_in + V * (a + 4 + 4))
    elif lm_head == "fused":
        head = tokens * (norm_in + a * h + 4 * h + 44) + min(tokens, 4096) * min(V, 32768) * a
    else:
        head = tokens * norm_in
    if gradient_checkpointing:
        activations = tokens * L * h * a + tokens * layer + eager_layer + head
    else:
        activations = tokens * L * layer + L * eager_layer + head

    return MemoryEstimate(
        model_type=shape.model_type,
        method=method,
        params_total=p_total,
        params_linear=p_lin,
        params_trainable=trainable,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        lora_r=None if method == "full" else lora_r,
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer_bytes),
        activations=int(activations),
        settings=dict(weight_dtype=weight_dtype, activation_dtype=activation_dtype, optimizer=optimizer,
                      double_quant=double_quant, lora_dropout=lora_dropout, attention=attention, lm_head=lm_head),
    )


def spec_settings(model: str) -> tuple[str, dict]:
    """(what load_config reads, the method and LoRA rank the spec records) for any model spec: a stage directory
    (its base; qlora / lora / full and r from its stage.json and adapter), an adapter directory (its base and r),
    `alignkit-tiny`, a model directory, a config.json file or a hub id."""
    from alignkit.modeling import TINY_SPEC, resolve_model_spec

    if Path(model).expanduser().is_file() or (model != TINY_SPEC and not Path(model).expanduser().exists()):
        return model, {}  # a config file, or a hub id (load_config fetches only its config.json)
    spec = resolve_model_spec(model)
    found: dict = {}
    if spec.adapter_dir is not None:
        rank = spec.adapter_config.get("r")
        if isinstance(rank, int):
            found["lora_r"] = rank
        quantization = spec.model_settings.get("quantization")
        if quantization in ("4bit", "8bit", "none"):
            # 8-bit: the 16-bit LoRA figures, an upper bound, as the stage's own preflight records them
            found["method"] = "qlora" if quantization == "4bit" else "lora"
    elif spec.stage is not None:
        found["method"] = "full"
    kind = (spec.stage or {}).get("kind")
    if kind in ("reward", "ppo"):  # a reward model's score head; PPO computes its policy's full logits
        found["lm_head"] = "score" if kind == "reward" else "full"
    return spec.base, found


def estimate_from_cli(args) -> int:
    """`alignkit estimate MODEL --method ... --batch-size --seq-len --lora-r --[no-]gradient-checkpointing --lm-head`.

    --method, --lora-r and --lm-head default to what a stage or adapter directory records, else qlora, 16, fused."""
    model, recorded = spec_settings(args.model)
    settings = {"method": "qlora", "lora_r": 16, "lm_head": "fused", **recorded}
    settings.update({k: v for k, v in (("method", args.method), ("lora_r", args.lora_r), ("lm_head", args.lm_head))
                     if v is not None})
    cfg = load_config(model)
    est = estimate_memory(
        shape_from_config(cfg, where=f"{model} config.json"),
        settings["method"],
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora_r=settings["lora_r"],
        gradient_checkpointing=args.gradient_checkpointing,
        lm_head=settings["lm_head"],
    )
    print(est.format())
    return 0
