"""The shipped hub recipes run as shipped, on their models' real architecture, offline.

Every YAML under recipes/configs/ that names a hub model (the Llama 3.2 1B and Llama 3.1 8B SFT -> DPO and
SFT -> reward -> PPO recipes) runs with its own settings — 4-bit NF4 with double quantization, bf16, packing,
gradient checkpointing, batch sizes, gradient accumulation, max lengths, loss types, DPO's precomputed
reference, the reward stage's eval set — on a model directory built here with that model's real config.json
(hidden and intermediate sizes, heads, KV heads, rope scaling, tied embeddings), its 128,256-token vocabulary
with Llama 3's special tokens at their real ids, and the chat template TRL ships for it; the weights are random
(alignkit.tiny.build_real_architecture). The depth is cut: Llama-3.1-8B-Instruct to 1 decoder layer (the full
model does not fit this 24 GiB CPU machine) and Llama-3.2-1B-Instruct to 2 (its 16 layers would take too long
on 2 cores). Everything else about each layer, the embedding and the LM head is the real size.

The model and data reach the recipe the way a user gives them, with `--set` (run_recipe's overrides):
model.base is the local directory, data paths are a few rows in the shape of the recipe's `hf:` dataset
(UltraChat messages, UltraFeedback-binarized chosen / rejected message lists, ultrafeedback-prompt prompts).
What this CPU cannot run is overridden in one place, CPU_ONLY; how small the run is, in TEST_SIZE. Nothing
else in the recipe changes.

Each recipe runs in its own process (`python -m tests.test_real_recipes SPEC`), training one stage at a time
and recording per stage its wall time and peak resident memory (VmHWM, reset before each stage) beside
`alignkit estimate`'s figure for the same shape. With ALIGNKIT_REAL_RECIPES_OUT=DIR set, the test copies those
records there (one JSON per recipe; benchmarks/RESULTS.md's "Shipped hub recipes" section is made from them).
Nothing about time or memory is asserted.

The suite runs the two SFT -> DPO recipes (~3.5 minutes); ALIGNKIT_REAL_RECIPES=all adds the two RLHF recipes,
whose one PPO step takes minutes on 2 cores (OUTSIDE_THE_SUITE; all four: ~13 minutes).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
# How deep each model is built: the real depth does not fit (8B) or takes too long (1B) on a 2-core CPU.
LAYERS = {"meta-llama/Llama-3.2-1B-Instruct": 2, "meta-llama/Llama-3.1-8B-Instruct": 1}

# What this CPU machine cannot run, and nothing else; applied to every stage whose `train:` sets the key.
# Empty: every shipped setting runs here. `optim: paged_adamw_8bit` runs as bitsandbytes' 8-bit AdamW without
# paging (bitsandbytes 0.50 warns "Paged optimizers are not supported on CPU" and keeps the 8-bit state);
# `bf16: true` and `compute_dtype: bfloat16` run under CPU autocast (native on AVX512-BF16, emulated elsewhere);
# liger is only turned on on CUDA; `attn_implementation: sdpa` has a CPU kernel.
CPU_ONLY: dict[str, object] = {}

# How small the run is: two optimizer steps (one would train nothing: the recipes' warmup ratio makes the first
# step's learning rate 0), and a PPO iteration of one optimizer step over short rollouts. Batch sizes, gradient
# accumulation and max lengths stay the recipe's; a few short rows keep every sequence short.
TEST_SIZE = {
    "sft": {"max_steps": 2},
    "dpo": {"max_steps": 2},
    "reward": {"max_steps": 2},
    # steps 500 -> 1; rollout_batch_size -> one optimizer step's worth (mini_batch_size x gradient_accumulation_steps,
    # both as shipped); one epoch over it; 8 new tokens instead of 256 (random weights never emit EOS, so every
    # rollout would run to 256, hours on a CPU); a 2-step reward model is at chance, so the accuracy gate is off.
    "ppo": {"steps": 1, "ppo_epochs": 1, "max_new_tokens": 8, "min_reward_accuracy": 0},
}


def hub_recipes() -> list[Path]:
    """Every shipped recipe whose model.base is a hub id (not alignkit-tiny or a local path)."""
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        base = (yaml.safe_load(path.read_text()).get("model") or {}).get("base", "")
        if base.count("/") == 1 and not Path(base).exists() and not base.startswith((".", "/", "~")):
            found.append(path)
    return found


# --- data in the shape of each recipe's hf: dataset ----------------------------------------------------------

_TOPICS = ["the film", "the book", "the music", "the food", "the story", "the ending", "the cast", "the show"]
_WORDS = ["good", "dull", "brilliant", "slow", "warm", "clever", "long", "funny"]


def ultrachat_rows(n: int) -> list[dict]:
    """HuggingFaceH4/ultrachat_200k train_sft: prompt, prompt_id, multi-turn messages (loss on every assistant turn)."""
    rows = []
    for i in range(n):
        topic, word = _TOPICS[i % len(_TOPICS)], _WORDS[i % len(_WORDS)]
        prompt = f"Tell me about {topic}, number {i}."
        rows.append({"prompt": prompt, "prompt_id": f"{i:064x}", "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"{topic.capitalize()} was {word}."},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": f"Because {topic} felt {word} to me."},
        ]})
    return rows


def ultrafeedback_rows(n: int, offset: int = 0) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized *_prefs: a text prompt, chosen / rejected whole conversations, scores."""
    rows = []
    for i in range(offset, offset + n):
        topic = _TOPICS[i % len(_TOPICS)]
        prompt = f"Write a short note on {topic} ({i})."
        chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{topic.capitalize()} was lovely."}]
        rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{topic.capitalize()} was bad."}]
        rows.append({"prompt": prompt, "prompt_id": f"{i:064x}", "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def prompt_rows(n: int) -> list[dict]:
    """trl-lib/ultrafeedback-prompt train: a conversational `prompt` column."""
    return [{"prompt": [{"role": "user", "content": f"What do you think of {_TOPICS[i % len(_TOPICS)]}?"}]} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_overrides(raw: dict, tmp: Path) -> list[str]:
    """--set items pointing every `hf:` data key of the recipe at a few local rows of the same shape."""
    files = {
        "sft": {"train": _write_jsonl(tmp / "ultrachat.jsonl", ultrachat_rows(3))},  # eval_fraction holds one out
        "pairs": {"train": _write_jsonl(tmp / "prefs_train.jsonl", ultrafeedback_rows(2)),
                  "eval": _write_jsonl(tmp / "prefs_test.jsonl", ultrafeedback_rows(1, offset=100))},
        "ppo": {"prompts": _write_jsonl(tmp / "prompts.jsonl", prompt_rows(8))},
    }
    items = []
    for stage in raw["stages"]:
        source = files["pairs" if stage["kind"] in ("dpo", "reward") else stage["kind"]]
        for key, value in stage["data"].items():
            if str(value).startswith("hf:"):
                items.append(f"stages.{stage['name']}.data.{key}={source[key]}")
    return items


def train_overrides(raw: dict) -> list[str]:
    """--set items for CPU_ONLY (where the stage sets the key) and TEST_SIZE, plus PPO's rollout batch size."""
    items = []
    for stage in raw["stages"]:
        train, prefix = stage.get("train") or {}, f"stages.{stage['name']}.train"
        items += [f"{prefix}.{k}={v}" for k, v in CPU_ONLY.items() if k in train]
        items += [f"{prefix}.{k}={v}" for k, v in TEST_SIZE.get(stage["kind"], {}).items()]
        if stage["kind"] == "ppo":
            items.append(f"{prefix}.rollout_batch_size={train['mini_batch_size'] * train['gradient_accumulation_steps']}")
    return items


def recipe_overrides(recipe: Path, model_dir: Path, tmp: Path) -> list[str]:
    """Everything the test gives the shipped recipe, as `alignkit run RECIPE --set ...` would take it."""
    raw = yaml.safe_load(recipe.read_text())
    return [f"model.base={model_dir}", f"run_dir={tmp / 'run'}", *data_overrides(raw, tmp), *train_overrides(raw)]


# --- one recipe in its own process: train stage by stage, peak memory per stage -------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so each stage's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _packed_tokens(record: dict) -> int:
    """Tokens of every row of the SFT stage's data file through its chat template: the one pack they make."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(record["base_resolved"])
    rows = [json.loads(line) for line in Path(record["config"]["data"]["train"]).read_text().splitlines()]
    return sum(len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows)


def _estimate_at_run_shape(stage_dir: Path) -> dict:
    """`alignkit estimate`'s figure for the shape the stage ran: stage.json's preflight is at max_length, which
    these few short rows never reach. Pairwise stages: the batch x2 at the longest pair; packed SFT: one
    sequence of the tokens a step trained (every row fits one pack); PPO's preflight is already at its run
    shape (mini_batch_size x (longest prompt + max_new_tokens))."""
    from alignkit.estimate import estimate_memory, load_config

    record = json.loads((stage_dir / "stage.json").read_text())
    memory, train, data, metrics = record["memory"], record["config"]["train"], record["data"], record["metrics"]
    if record["kind"] == "ppo":
        return {"batch": train["mini_batch_size"], "seq_len": None, "total": memory["expected_bytes"]}
    if train.get("packing"):  # no per-row lengths in stage.json: the rows of the data file, in one pack
        batch, seq = 1, _packed_tokens(record)
    else:
        batch, seq = train["per_device_train_batch_size"] * (2 if record["kind"] in ("dpo", "reward") else 1), data["longest_tokens"]
    est = estimate_memory(load_config(record["base_resolved"]), memory["method"], batch_size=batch, seq_len=seq,
                          lora_r=record["peft"]["r"], lora_dropout=record["peft"]["lora_dropout"],
                          gradient_checkpointing=bool(train.get("gradient_checkpointing")),
                          weight_dtype=record["model"]["dtype"], activation_dtype="bfloat16" if train.get("bf16") else "float32",
                          optimizer="adamw_8bit" if "8bit" in str(train.get("optim")) else "adamw",
                          lm_head="score" if record["kind"] == "reward" else "fused")
    return {"batch": batch, "seq_len": seq, "total": est.total}


def run_one_recipe(recipe: str, overrides: list[str], out: str) -> None:
    """Train the recipe's stages one at a time in this process, recording each stage's memory and time."""
    import ctypes

    import torch  # imported before the first reset, so the peak is the stage's, not the imports'

    from recipes.runner import run_recipe
    import alignkit.training  # noqa: F401  (TRL, transformers, peft)

    raw = yaml.safe_load(Path(recipe).read_text())
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))
    results = {"recipe": Path(recipe).name, "torch_threads": torch.get_num_threads(), "stages": []}
    for stage in raw["stages"]:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the last stage's freed arenas back, so RSS starts low
        reset = _reset_peak()
        start_kib, t0 = _status_kib("VmRSS"), time.time()
        run_recipe(recipe, overrides, only=[stage["name"]], log=lambda *a: print(*a, flush=True))
        peak_kib = _status_kib("VmHWM") if reset else None
        record = json.loads((run_dir / stage["name"] / "stage.json").read_text())
        results["stages"].append({
            "name": stage["name"], "kind": stage["kind"], "seconds": round(time.time() - t0, 1),
            "rss_start_bytes": start_kib * 1024, "rss_peak_bytes": peak_kib * 1024 if peak_kib else None,
            "preflight_bytes": record["memory"].get("expected_bytes"),
            "preflight_breakdown": record["memory"].get("breakdown"),
            "estimate_at_run_shape": _estimate_at_run_shape(run_dir / stage["name"]),
        })
        Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_one_recipe(spec["recipe"], spec["overrides"], spec["out"])


# --- the test ---------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.slow
RECIPES = hub_recipes()
# The suite's share of this test is ~4 minutes on 2 cores. The RLHF recipes take 4.5 (1B) and 6 (8B) minutes each,
# their one PPO step most of it (benchmarks/RESULTS.md), so they run when ALIGNKIT_REAL_RECIPES=all asks for every
# hub recipe; the suite runs the two SFT -> DPO recipes.
OUTSIDE_THE_SUITE = {"llama-3.2-1b_rlhf.yaml", "llama-3.1-8b_rlhf.yaml"}
SELECTED = [p for p in RECIPES if os.environ.get("ALIGNKIT_REAL_RECIPES") == "all" or p.name not in OUTSIDE_THE_SUITE]


@pytest.fixture(scope="module")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """hub id -> a local directory with that model's real architecture (cut depth) and random weights."""
    from alignkit.tiny import REAL_ARCHITECTURES, build_real_architecture

    root = tmp_path_factory.mktemp("real-arch")
    needed = {yaml.safe_load(p.read_text())["model"]["base"] for p in SELECTED}
    return {hub: build_real_architecture(root / hub.split("/")[1], REAL_ARCHITECTURES[hub], num_layers=LAYERS[hub])
            for hub in LAYERS if hub in needed}


@pytest.fixture(scope="module", params=[p.name for p in SELECTED])
def recipe_run(request, real_models, tmp_path_factory) -> dict:
    """One shipped recipe, run in its own process on its model's real architecture; base fingerprinted around it."""
    from alignkit.artifacts import file_fingerprint

    recipe = CONFIGS / request.param
    raw = yaml.safe_load(recipe.read_text())
    model_dir = real_models[raw["model"]["base"]]
    tmp = tmp_path_factory.mktemp(recipe.stem)
    spec = {"recipe": str(recipe), "overrides": recipe_overrides(recipe, model_dir, tmp), "out": str(tmp / "measured.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    before = file_fingerprint(model_dir)
    proc = subprocess.run([sys.executable, "-m", "tests.test_real_recipes", str(tmp / "spec.json")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-5000:])
    measured = json.loads(Path(spec["out"]).read_text())
    measured.update(model=raw["model"]["base"], layers=LAYERS[raw["model"]["base"]])
    if os.environ.get("ALIGNKIT_REAL_RECIPES_OUT"):
        out = Path(os.environ["ALIGNKIT_REAL_RECIPES_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{recipe.stem}.json").write_text(json.dumps(measured, indent=2))
    return {"raw": raw, "run": tmp / "run", "model_dir": model_dir, "base_before": before,
            "base_after": file_fingerprint(model_dir), "measured": measured}


def _adapter(stage_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(stage_dir / "adapter_model.safetensors"))


def _moved(before: dict, after: dict) -> float:
    """How far the LoRA tensors both adapters hold moved (sum of norms of the differences)."""
    shared = [k for k in after if k in before and before[k].shape == after[k].shape]
    assert shared, "no LoRA tensor in common with the parent"
    return float(sum((after[k].float() - before[k].float()).norm() for k in shared))


def _lora_a(weights: dict, module: str):
    return next(v for k, v in weights.items() if f".{module}." in k and "lora_A" in k)


def test_recipe_covers_every_hub_recipe():
    assert {p.name for p in RECIPES} >= {"llama-3.2-1b_sft_dpo.yaml", "llama-3.2-1b_rlhf.yaml",
                                         "llama-3.1-8b_sft_dpo.yaml", "llama-3.1-8b_rlhf.yaml"}
    assert {yaml.safe_load(p.read_text())["model"]["base"] for p in RECIPES} <= set(LAYERS)


def test_every_stage_completes_with_the_recipes_own_settings(recipe_run):
    raw, run = recipe_run["raw"], recipe_run["run"]
    shipped_model = {k: v for k, v in raw["model"].items() if k != "base"}
    for stage in raw["stages"]:
        record = json.loads((run / stage["name"] / "stage.json").read_text())
        assert record["complete"] is True and record["kind"] == stage["kind"]
        assert record["base"] == str(recipe_run["model_dir"])
        assert {k: record["model"][k] for k in shipped_model} == shipped_model
        assert record["peft"] == {**record["peft"], **raw["peft"]}
        changed = set(CPU_ONLY) | set(TEST_SIZE.get(stage["kind"], {})) | {"rollout_batch_size"}
        kept = {k: v for k, v in stage["train"].items() if k not in changed}
        got = {k: record["config"]["train"][k] for k in kept}
        assert got == {k: ([v] if k == "loss_type" and isinstance(v, str) else v) for k, v in kept.items()}, stage["name"]
        steps = TEST_SIZE[stage["kind"]].get("max_steps") or TEST_SIZE[stage["kind"]].get("steps")
        assert record["metrics"]["global_step"] == steps, stage["name"]
        assert record["memory"]["expected_bytes"] > 0 and record["wall_seconds"] > 0


def test_adapters_have_the_real_shapes_and_moved(recipe_run):
    raw, run = recipe_run["raw"], recipe_run["run"]
    config = json.loads((recipe_run["model_dir"] / "config.json").read_text())
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * config.get(
        "head_dim", config["hidden_size"] // config["num_attention_heads"])
    r = raw["peft"]["r"]
    sft = _adapter(run / "sft")
    assert _lora_a(sft, "q_proj").shape == (r, h) and _lora_a(sft, "down_proj").shape == (r, i)
    assert next(v for k, v in sft.items() if ".k_proj." in k and "lora_B" in k).shape == (kv, r)
    assert sum(float(v.float().norm()) for k, v in sft.items() if "lora_B" in k) > 0  # PEFT starts B at zero
    for stage in raw["stages"][1:]:
        weights = _adapter(run / stage["name"])
        assert _moved(sft, weights) > 0, f"{stage['name']} did not move from the SFT adapter it started from"
        if stage["kind"] == "reward":
            head = next(v for k, v in weights.items() if "score" in k)
            assert head.shape == (1, h)
        if stage["kind"] == "ppo":
            assert (run / stage["name"] / "value" / "value_head.safetensors").exists()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / raw["stages"][-1]["name"]))
    assert len(tok) == config["vocab_size"] == 128256 and tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert "<|start_header_id|>" in tok.chat_template


def test_base_weights_unchanged(recipe_run):
    assert recipe_run["base_after"] == recipe_run["base_before"]


def test_peak_memory_is_measured_per_stage(recipe_run):
    """The measurement ran (figures go to benchmarks/RESULTS.md, never into an assertion about their size)."""
    stages = recipe_run["measured"]["stages"]
    assert [s["name"] for s in stages] == [s["name"] for s in recipe_run["raw"]["stages"]]
    assert all(s["rss_peak_bytes"] and s["estimate_at_run_shape"]["total"] > 0 for s in stages)
