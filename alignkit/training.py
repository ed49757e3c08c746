"""What every Trainer-based stage shares: TRL config from `train:`, divergence guard, logging, saving.

Defaults that differ from TRL's (a recipe's `train:` overrides any of them):
  bf16           true only on a GPU that supports it (TRL defaults to true, which fails on CPU)
  use_cpu        true when no GPU is visible
  logging_steps  5        (TRL: 10) tiny stages should still log a few points
  save_steps     50       (TRL: 500) so --resume has something to continue from
  save_total_limit 2      (TRL: unlimited) checkpoints of adapters are small, but not free
  seed           the recipe's seed
Set by alignkit and not settable (alignkit.stage.MANAGED_TRAIN_KEYS): output_dir, logging_dir, and report_to,
run_name, project (from the recipe's `report_to:` and the stage's identity: alignkit.tracking).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

from alignkit.artifacts import kept_checkpoint_note
from alignkit.errors import TrainingDiverged, UserError
from alignkit.modeling import liger_available
from alignkit.tracking import TrackerRuns, hf_report_to, stage_identity, tracking_callback

if TYPE_CHECKING:
    from alignkit.stage import StageRun


def alignkit_defaults(seed: int) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    return {
        "bf16": bool(gpu and torch.cuda.is_bf16_supported()),
        "use_cpu": not gpu,
        "logging_steps": 5,
        "save_steps": 50,
        "save_total_limit": 2,
        "seed": seed,
        # Fused AdamW is CUDA-only in some torch builds; plain AdamW is the portable default on CPU.
        **({} if gpu else {"optim": "adamw_torch"}),
    }


def fused_kernel_defaults() -> dict:
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) for the SFT and DPO stages, on a CUDA GPU with liger-kernel installed.

    TRL already fuses the LM head and loss in these trainers; Liger adds the layer kernels on top.
    Only SFT and DPO take it: on a sequence-classification model Liger would swap in a causal-LM forward.
    """
    import torch

    return {"use_liger_kernel": True} if torch.cuda.is_available() and liger_available() else {}


# Train values that must be at least 1 where set; TRL's configs accept 0 or less for them.
POSITIVE_TRAIN_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length",
                       "max_completion_length", "num_generations")


def train_settings_error(stage: StageRun, message: str, *, key: str | None = None) -> UserError:
    """A UserError for a train value the trainer's config refused, carrying the key (`err.key`) when it is
    known or can be told from the message, so the runner can name its YAML line or --set."""
    if key is None:
        named = [k for k in stage.train if k in message]
        by_value = [k for k, v in stage.train.items() if len(str(v)) >= 3 and str(v) in message]
        key = (named or by_value or [None])[0]
    err = UserError(f"stage {stage.name}: invalid train settings: {message}")
    err.key = key
    return err


def trl_args(config_cls, stage: StageRun, extra_defaults: dict | None = None, choices: dict | None = None):
    """The stage's TRL config: alignkit defaults < recipe-kind defaults < the recipe's `train:`.

    Values are checked against the choices TRL's fields list (and `choices`, field -> allowed values, for those
    it lists only in prose): TRL checks them only when training reaches them, after earlier stages have run.
    """
    values = {**alignkit_defaults(stage.seed), **(extra_defaults or {}), **stage.train}
    values["output_dir"] = str(Path(stage.stage_dir) / "checkpoints")
    # TensorBoard is attached explicitly, writing to stage_dir/logs; the HF integrations log to the others.
    values["report_to"] = hf_report_to(stage.report.report_to)
    identity = stage_identity(stage)
    values.update(run_name=identity.run_name, project=identity.project)
    try:
        config = config_cls(**values)
    except (ValueError, TypeError) as err:
        raise train_settings_error(stage, str(err).splitlines()[0]) from None
    for key in POSITIVE_TRAIN_KEYS:
        value = stage.train.get(key)
        if isinstance(value, (int, float)) and value < 1:  # TRL takes 0 and fails in the middle of the stage
            raise train_settings_error(stage, f"{key}={value!r} must be at least 1", key=key)
    epochs = stage.train.get("num_train_epochs")
    if isinstance(epochs, (int, float)) and not epochs > 0:  # a fraction of an epoch is fine
        raise train_settings_error(stage, f"num_train_epochs={epochs!r} must be above 0", key="num_train_epochs")
    # On the built config: TRL maps deprecated aliases (packing_strategy bfd-requeue) in __post_init__.
    allowed = {f.name: list(f.metadata["choices"]) for f in dataclasses.fields(config_cls) if f.metadata.get("choices")}
    allowed.update(choices or {})
    for key, options in allowed.items():
        if key not in stage.train:
            continue  # defaults are TRL's own
        given = getattr(config, key, None)
        for value in given if isinstance(given, list) else [given]:
            if value is not None and value not in options:
                raise train_settings_error(stage, f"{key}={value!r}; one of {', '.join(options)}", key=key)
    return config


def tensorboard_callback(stage_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    logs = str(Path(stage_dir) / "logs")
    callback = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=logs))
    # It closes the writer when training ends and opens a new one for the final evaluate(): same folder.
    callback.logging_dir = logs
    return callback


def divergence_guard():
    """A TrainerCallback that stops training on a non-finite loss or gradient, before the optimizer step.

    The Trainer's own `logging_nan_inf_filter` only hides NaN losses in the logs
    and keeps stepping; we raise instead, so the last checkpoint stays the last
    good one and the stage is left incomplete.
    """
    import torch
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # fp16's loss scaler overflows now and then by design: it skips that step and lowers the scale.
            if model is None or args.fp16:
                return
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            # One fused norm and one host sync per step (a norm is non-finite iff some entry is); a check per
            # parameter would sync once per LoRA matrix, hundreds of times a step on a GPU.
            if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                return
            for name, p in model.named_parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise TrainingDiverged(
                        f"non-finite gradient in {name} at step {state.global_step + 1}; "
                        f"{kept_checkpoint_note(Path(args.output_dir).parent)}, stage left incomplete "
                        "(lower the learning rate?)"
                    )

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss") + (() if args.fp16 else ("grad_norm",)):
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise TrainingDiverged(f"{key} is {value} at step {state.global_step}; stage left incomplete")

    return DivergenceGuard()


def throughput_meter():
    """A TrainerCallback that times the real (non-padding) tokens TRL counts in its `num_tokens` log.

    Tokens per second between the first and the last logged step: the steady state, without the
    first steps' warm-up (kernel compilation, allocator growth) or DPO's reference precompute, which
    the Trainer's train_runtime includes. Read by final_metrics as `tokens_per_second`.
    """
    import time

    from transformers import TrainerCallback

    class ThroughputMeter(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []  # (seconds, cumulative tokens) at each train log

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The log follows a loss .item(), so on a GPU the step's kernels have finished by now.
            if logs and "num_tokens" in logs and "loss" in logs:
                self.marks.append((time.perf_counter(), float(logs["num_tokens"])))

        @property
        def tokens_per_second(self) -> float | None:
            if len(self.marks) < 2 or self.marks[-1][0] <= self.marks[0][0]:
                return None
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
            return (n1 - n0) / (t1 - t0)

    return ThroughputMeter()


def stage_callbacks(stage: StageRun, tokenizer, score=None) -> list:
    """What every Trainer-based stage attaches: the divergence guard, TensorBoard logs (when the stage reports
    to it), the throughput meter, the stage's identity on its trackers, and completion samples if asked for."""
    from alignkit.completions import completion_log, completions_callback

    runs = TrackerRuns.for_stage(stage, hf_logs=True)
    callbacks = [divergence_guard(), throughput_meter(), tracking_callback(runs)]
    if "tensorboard" in stage.report.report_to:
        callbacks.insert(1, tensorboard_callback(stage.stage_dir))
    samples = completion_log(stage, runs, score)
    if samples is not None:
        callbacks.append(completions_callback(samples, tokenizer))
    return callbacks


def final_metrics(trainer, train_output=None) -> dict:
    """Last logged value of each metric, plus the train summary and an evaluation if there is eval data."""
    metrics: dict = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                metrics[k] = v
    if train_output is not None:
        metrics.update({k: v for k, v in train_output.metrics.items() if isinstance(v, (int, float))})
    if trainer.eval_dataset is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    metrics["global_step"] = trainer.state.global_step
    meter = next((cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "tokens_per_second")), None)
    if meter is not None and meter.tokens_per_second is not None:
        metrics["tokens_per_second"] = meter.tokens_per_second
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def stage_tokenizer(stage: StageRun, *, padding_side: str = "right"):
    """The parent stage's tokenizer (it carries the chat template the parent trained with), else the base's —
    also for a parent this run trains first, which saves the base's tokenizer."""
    from alignkit.modeling import load_tokenizer, resolve_base, tokenizer_source

    return load_tokenizer(tokenizer_source(stage.parents.get("after"), resolve_base(stage.model.base)),
                          padding_side=padding_side)


def build_trainer(trainer_cls, stage: StageRun, *, model, tokenizer, train, eval=None, **extra):
    """A TRL trainer on the stage's config (`stage.args`, built once by the runner) with every callback a
    stage attaches. `train` / `eval` are rows or datasets; `extra` is what only this kind passes
    (peft_config, reward_funcs)."""
    from datasets import Dataset

    def dataset(rows):
        return rows if rows is None or isinstance(rows, Dataset) else Dataset.from_list(rows)

    score = (extra.get("reward_funcs") or [None])[0]  # an online stage's reward also scores its samples
    return trainer_cls(model=model, args=stage.args, train_dataset=dataset(train), eval_dataset=dataset(eval or None),
                       processing_class=tokenizer, callbacks=stage_callbacks(stage, tokenizer, score), **extra)


def fit(stage: StageRun, trainer, tokenizer) -> dict:
    """The trainer-stage body every TRL kind ends with: train (continuing the checkpoint the runner chose),
    save the policy and tokenizer at the stage directory's top level, and return the final metrics; the
    stage's tracker runs are open from before training to after the final evaluation."""
    runs = next(cb.runs for cb in trainer.callback_handler.callbacks if hasattr(cb, "runs")).open()
    metrics = None
    try:
        output = trainer.train(resume_from_checkpoint=str(stage.resume_from) if stage.resume_from else None)
        save_policy(trainer.model, tokenizer, stage.stage_dir)
        metrics = final_metrics(trainer, output)
    finally:
        runs.close(metrics)
    return metrics


def save_policy(model, tokenizer, stage_dir: Path, adapter_name: str = "default") -> None:
    """The trained adapter (only the policy's, not TRL's frozen `ref` copy) + tokenizer at the stage dir top level."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return  # data-parallel ranks hold identical weights; one writer, no race on the files
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(stage_dir), selected_adapters=[adapter_name], safe_serialization=True)
        # PEFT writes non-default adapters into a subfolder; the policy must sit at the top level.
        sub = Path(stage_dir) / adapter_name
        if adapter_name != "default" and sub.is_dir():
            for f in sub.iterdir():
                f.replace(Path(stage_dir) / f.name)
            sub.rmdir()
    else:
        model.save_pretrained(str(stage_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(stage_dir))


def load_policy(stage: StageRun, gradient_checkpointing: bool):
    """(model, new_adapter_config, info): the base with the parent's policy, or ready for a fresh adapter.

    - parent with an adapter: the base (quantized as configured) + that adapter, trainable;
    - parent that was fully fine-tuned: the parent's weights are the base;
    - no parent: the base, and the PEFT config of a new adapter for the trainer to add.
    """
    import dataclasses

    from alignkit.modeling import attach_adapter, load_base_model, peft_config, prepare_for_training

    parent = stage.parents.get("after")
    settings = stage.model
    info: dict = {}
    if parent is not None and not (Path(parent) / "adapter_config.json").exists():
        settings = dataclasses.replace(settings, base=str(parent))
        info["initialized_from"] = str(parent)
    model = load_base_model(settings)
    model = prepare_for_training(model, settings, gradient_checkpointing)
    if parent is not None and (Path(parent) / "adapter_config.json").exists():
        info["initialized_from"] = str(parent)
        return attach_adapter(model, parent, trainable=True), None, info
    if stage.peft.method == "full":
        return model, None, info
    return model, peft_config(stage.peft), info


def reference_info(stage: StageRun) -> dict:
    """What a DPO / KTO stage's reference is (and the parent adapter it starts from), for stage.json."""
    from alignkit.artifacts import file_fingerprint

    parent = stage.parents.get("after")
    if parent and (parent / "adapter_model.safetensors").exists():
        return {"initialized_from_sha256": file_fingerprint(parent / "adapter_model.safetensors"),
                "reference": f"{parent} (frozen copy of the parent adapter)"}
    if parent:
        return {"reference": f"{parent} " + ("(a second full copy, loaded by TRL)" if stage.peft.method == "full"
                                             else "(the fully fine-tuned parent with this stage's adapter disabled)")}
    return {"reference": "base model (adapter disabled)"}


def _render(tokenizer, value, *, prompt: bool = False) -> str:
    if isinstance(value, str):
        return value
    return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=prompt)


def truncation_report(tokenizer, rows: list[dict], max_length: int | None, fmt: str) -> dict:
    """How many rows exceed max_length (TRL truncates them silently), and the longest, in tokens.

    Each sequence is counted as TRL builds it (alignkit.reward_model.reward_input_ids: a conversation
    through the chat template in one pass, plain text with special tokens and EOS); for preference rows
    the longer of chosen and rejected.
    """
    from alignkit.reward_model import reward_input_ids

    if not rows or not max_length:
        return {}
    lengths = []
    for r in rows:
        if fmt == "messages":
            sequences = [(r["messages"], [])]
        elif fmt == "text":
            sequences = [(r["text"], "")]
        else:
            replies = [r["completion"]] if fmt == "prompt_completion" else [r["chosen"], r["rejected"]]
            sequences = [(r["prompt"], reply) for reply in replies]
        lengths.append(max(len(reward_input_ids(tokenizer, prompt, reply)) for prompt, reply in sequences))
    over = sum(n > max_length for n in lengths)
    if over:
        import logging

        logging.getLogger("alignkit").warning("%d of %d rows are longer than max_length=%d tokens and will be truncated",
                                              over, len(rows), max_length)
    return {"max_length": max_length, "rows_truncated": over, "longest_tokens": max(lengths)}


def config_fields(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def available_memory() -> tuple[int | None, str]:
    """Bytes free to train in, and where: the current CUDA device's free memory, else the host's MemAvailable."""
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return free, f"{torch.cuda.get_device_name()} (cuda:{torch.cuda.current_device()}, free)"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host RAM (MemAvailable)"
    except OSError:
        pass
    return None, "unknown"


def _longest_sequence(args) -> int:
    """Tokens in the longest training sequence: max_length, or prompt + completion for online stages."""
    if getattr(args, "max_length", None):
        return int(args.max_length)
    return int(getattr(args, "max_prompt_length", None) or 512) + int(getattr(args, "max_completion_length", None) or 256)


def memory_preflight(stage: StageRun, args, *, sequences_per_example: int = 1, lm_head: str = "fused", log=print) -> dict:
    """Print the estimate command's numbers for this stage against the memory free now; warn when it will not fit.

    `sequences_per_example` is 2 for pairwise stages (DPO, reward), whose chosen and rejected
    sequences run in one batch. `lm_head`: "fused" for TRL's SFT / DPO / GRPO / RLOO trainers (chunked
    log-probs, no full logits), "score" for a reward model. The figures are `alignkit estimate`'s
    (alignkit/estimate.py).
    """
    half = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    return _preflight(stage, batch_size=args.per_device_train_batch_size * sequences_per_example,
                      seq_len=_longest_sequence(args), gradient_checkpointing=bool(args.gradient_checkpointing),
                      half=half, optimizer="adamw_8bit" if "8bit" in getattr(args.optim, "value", str(args.optim)) else "adamw",
                      lm_head=lm_head, log=log,
                      advice="Lower per_device_train_batch_size or max_length (raise gradient_accumulation_steps to keep "
                             "the batch), turn on gradient_checkpointing, use optim: paged_adamw_8bit, or load the base "
                             "in 4-bit.")


def ppo_memory_preflight(stage: StageRun, config, prompts: list, tokenizer, *, log=print) -> dict:
    """The same report for a PPO stage: four role adapters on one base, two of them (policy, value) trained
    with fp32 AdamW, a minibatch of the longest prompt plus max_new_tokens, no gradient checkpointing."""
    longest = max(len(ids) for ids in tokenizer([_render(tokenizer, p, prompt=True) for p in prompts],
                                                add_special_tokens=False)["input_ids"])
    return _preflight(stage, batch_size=config.mini_batch_size, seq_len=longest + config.max_new_tokens,
                      gradient_checkpointing=False, half=False, optimizer="adamw", roles=4, trained_roles=2,
                      lm_head="full", log=log,  # alignkit's PPO takes log-probs from the model's full logits
                      advice="Lower mini_batch_size (raise gradient_accumulation_steps to keep the batch) or "
                             "max_new_tokens, or load the base in 4-bit.")


def _preflight(stage: StageRun, *, batch_size: int, seq_len: int, gradient_checkpointing: bool, half: bool, optimizer: str,
               advice: str, lm_head: str, roles: int = 1, trained_roles: int = 1, log=print) -> dict:
    import os

    from alignkit.estimate import estimate_memory, load_config, shape_from_config
    from alignkit.modeling import resolve_base

    base = resolve_base(stage.model.base)
    try:
        shape = shape_from_config(load_config(base), where=f"{base} config.json")
    except UserError as err:  # an architecture the estimator does not know: say so, train anyway
        log(f"{stage.name}: no memory estimate ({err})")
        return {}
    if stage.peft.method == "full":
        method = "full"
    else:
        # 8-bit bases are estimated as 16-bit LoRA: an upper bound on their weights.
        method = "qlora" if stage.model.quantization == "4bit" else "lora"
    weight_dtype = stage.model.dtype if stage.model.dtype in ("float32", "bfloat16", "float16") else "bfloat16"
    est = estimate_memory(
        shape, method,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_r=stage.peft.r,
        lora_dropout=stage.peft.lora_dropout,
        gradient_checkpointing=gradient_checkpointing,
        weight_dtype=weight_dtype,
        activation_dtype="bfloat16" if half else "float32",
        optimizer=optimizer,
        double_quant=stage.model.bnb_4bit_use_double_quant,
        adapters=roles,
        trained_adapters=trained_roles,
        lm_head=lm_head,
    )
    available, where = available_memory()
    fits = available is None or est.total <= available
    report = {"method": method, "roles": roles, "expected_bytes": est.total, "available_bytes": available, "device": where,
              "fits": fits, "breakdown": {k: getattr(est, k) for k in ("weights", "gradients", "optimizer", "activations")}}
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate: one report, from the main process
        return report
    gib = 1024**3
    what = f", {roles} role adapters of which {trained_roles} trained" if roles > 1 else ""
    log(f"{stage.name}: expected memory (alignkit estimate, at the longest sequence{what}):\n{est.format()}")
    if available is not None:
        log(f"{stage.name}: available {available / gib:.2f} GiB on {where}")
    if not fits:
        log(f"WARNING: {stage.name} expects ~{est.total / gib:.2f} GiB but {where} has {available / gib:.2f} GiB: "
            f"it will likely run out of memory. {advice}")
    return report
