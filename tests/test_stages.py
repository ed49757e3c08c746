"""SFT and DPO stages on the tiny model: the adapter moves, the base does not, stage.json tells the truth."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.artifacts import file_fingerprint, read_stage
from alignkit.modeling import ModelSettings, attach_adapter, load_base_model
from recipes.runner import run_recipe


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    """One SFT -> DPO run shared by the assertions below (training is the slow part)."""
    from tests.conftest import TINY_RECIPE
    import yaml

    tmp = tmp_path_factory.mktemp("chain")
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["run_dir"] = str(tmp / "run")
    for stage in raw["stages"]:
        stage["data"]["train"] = str((TINY_RECIPE.parent / stage["data"]["train"]).resolve())
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    base_before = file_fingerprint(tiny_model_dir)
    records = run_recipe(path, log=lambda *_: None)
    return {"run": tmp / "run", "records": records, "base_before": base_before, "base": tiny_model_dir}


def _lora(stage_dir):
    return load_file(str(stage_dir / "adapter_model.safetensors"))


def test_sft_adapter_moved_and_holds_only_adapter_weights(chain):
    weights = _lora(chain["run"] / "sft")
    assert weights and all("lora_" in k for k in weights), "the stage saved non-adapter weights"
    # PEFT initialises lora_B to zero: any non-zero B means training moved the adapter.
    b_norm = sum(v.float().norm() for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 1e-3


def test_base_weights_unchanged(chain):
    assert file_fingerprint(chain["base"]) == chain["base_before"]
    settings = ModelSettings(base=str(chain["base"]), quantization="4bit")
    plain = load_base_model(settings)
    with_adapter = attach_adapter(load_base_model(settings), chain["run"] / "dpo", trainable=False)
    base_params = dict(plain.named_parameters())
    compared = 0
    for name, p in with_adapter.named_parameters():
        if "lora_" in name:
            continue
        plain_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.data, base_params[plain_name].data), name
        compared += 1
    assert compared > 10


def test_stage_json_complete_and_correct(chain):
    sft, dpo = read_stage(chain["run"] / "sft"), read_stage(chain["run"] / "dpo")
    for stage in (sft, dpo):
        assert stage["complete"] is True
        assert stage["base"] == "alignkit-tiny"
        assert len(stage["config_hash"]) == 64
        assert stage["metrics"]["global_step"] > 0
        assert stage["wall_seconds"] > 0
        assert {"torch", "transformers", "trl", "peft"} <= set(stage["versions"])
        assert stage["data"]["rows_kept"] + stage["data"]["dropped_duplicate"] + stage["data"]["dropped_empty"] == stage["data"]["rows_read"]
        assert (chain["run"] / stage["name"] / "tokenizer_config.json").exists()
        assert any((chain["run"] / stage["name"] / "logs").iterdir()), "no TensorBoard logs"
        assert not (chain["run"] / stage["name"] / "checkpoints" / "runs").exists(), "final eval logged elsewhere"
        # Steady-state throughput of real tokens (TRL's num_tokens between the first and last log), in tokens per
        # second: within a small factor of the whole run's average, which also counts the warm-up.
        m = stage["metrics"]
        assert m["num_tokens"] > 0 and m["tokens_per_second"] > 0
        assert 0.2 < m["tokens_per_second"] / (m["num_tokens"] / m["train_runtime"]) < 20
    assert sft["data"]["dropped_duplicate"] > 0  # the tiny SFT file has duplicates on purpose
    for stage in (sft, dpo):
        assert stage["data"]["max_length"] == 128 and stage["data"]["rows_truncated"] == 0
        assert 0 < stage["data"]["longest_tokens"] <= 128
    assert dpo["parents"]["after"]["name"] == "sft"
    assert dpo["parents"]["after"]["config_hash"] == sft["config_hash"]
    assert dpo["lineage"] == ["sft"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in dpo["metrics"], key


def test_dpo_started_from_the_sft_adapter(chain):
    sft_dir, dpo_dir = chain["run"] / "sft", chain["run"] / "dpo"
    dpo = read_stage(dpo_dir)
    assert dpo["data"]["initialized_from_sha256"] == file_fingerprint(sft_dir / "adapter_model.safetensors")
    sft_w, dpo_w = _lora(sft_dir), _lora(dpo_dir)
    assert sft_w.keys() == dpo_w.keys()
    moved = sum((dpo_w[k].float() - sft_w[k].float()).norm() for k in sft_w)
    sft_b = sum(v.float().norm() for k, v in sft_w.items() if "lora_B" in k)
    dpo_b_from_zero = sum(v.float().norm() for k, v in dpo_w.items() if "lora_B" in k)
    assert moved > 0, "DPO did not train"
    # Started from SFT: DPO's B matrices are far closer to SFT's than SFT's are to their zero init.
    dist_b = sum((dpo_w[k].float() - sft_w[k].float()).norm() for k in sft_w if "lora_B" in k)
    assert dist_b < 0.5 * sft_b and dpo_b_from_zero > 0.5 * sft_b


def test_stage_dirs_are_model_specs(chain):
    from alignkit.generation import SamplingParams, generate_from_spec

    texts = generate_from_spec(str(chain["run"] / "dpo"), ["Describe the film?"], SamplingParams(max_new_tokens=5, temperature=0))
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_stage_json_records_the_memory_estimate(chain):
    from alignkit.estimate import estimate_memory, load_config

    for name, pairwise in (("sft", False), ("dpo", True)):
        record = read_stage(chain["run"] / name)
        memory, train = record["memory"], record["config"]["train"]
        assert memory["method"] == "qlora" and memory["fits"] is True
        assert memory["available_bytes"] > 0 and "MemAvailable" in memory["device"]
        # The figure is the estimate command's for this stage's batch (x2 for chosen + rejected) and length.
        expected = estimate_memory(load_config(str(chain["base"])), "qlora",
                                   batch_size=train.get("per_device_train_batch_size", 8) * (2 if pairwise else 1),
                                   seq_len=train["max_length"], lora_r=record["peft"]["r"],
                                   lora_dropout=record["peft"]["lora_dropout"],
                                   gradient_checkpointing=train.get("gradient_checkpointing", False),
                                   weight_dtype="float32", activation_dtype="float32", lm_head="fused")
        assert memory["expected_bytes"] == expected.total, name


def test_memory_preflight_warns_when_the_stage_will_not_fit(tmp_path, tiny_model_dir):
    from trl import SFTConfig

    from alignkit.modeling import PeftSettings
    from alignkit.training import memory_preflight
    from alignkit.stage import StageRun

    stage = StageRun("sft", "sft", tmp_path, ModelSettings(base=str(tiny_model_dir)), PeftSettings(), {}, {}, {}, 0)
    lines = []
    # 65k sequences of 64k tokens: petabytes of activations, far beyond any machine's memory.
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=65536, max_length=65536, use_cpu=True,
                     bf16=False, report_to="none")
    report = memory_preflight(stage, args, log=lines.append)
    assert report["fits"] is False and report["expected_bytes"] > report["available_bytes"]
    assert any(line.startswith("WARNING: sft expects") and "per_device_train_batch_size" in line for line in lines)
    assert any("activations" in line for line in lines)  # the estimate's table is shown first
    # An 8-bit optimizer keeps a quarter of AdamW's fp32 state (TRL stores optim as an enum, not a string).
    small = dict(output_dir=str(tmp_path), per_device_train_batch_size=1, max_length=64, use_cpu=True, bf16=False,
                 report_to="none")
    fp32 = memory_preflight(stage, SFTConfig(**small, optim="adamw_torch"), log=lambda *_: None)
    paged = memory_preflight(stage, SFTConfig(**small, optim="paged_adamw_8bit"), log=lambda *_: None)
    assert paged["breakdown"]["optimizer"] * 4 == fp32["breakdown"]["optimizer"]


def test_ppo_memory_preflight_counts_four_roles_and_warns_with_ppo_advice(tmp_path, tiny_model_dir):
    from alignkit.modeling import PeftSettings, load_tokenizer
    from alignkit.ppo.config import PPOConfig
    from alignkit.training import ppo_memory_preflight
    from alignkit.stage import StageRun

    stage = StageRun("ppo", "ppo", tmp_path, ModelSettings(base=str(tiny_model_dir)), PeftSettings(), {}, {}, {}, 0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = ["a short prompt", [{"role": "user", "content": "a chat prompt"}]]
    small = ppo_memory_preflight(stage, PPOConfig(mini_batch_size=1, max_new_tokens=8), prompts, tokenizer, log=lambda *_: None)
    assert small["fits"] is True and small["roles"] == 4
    # Two trained roles: gradients and optimizer states twice a single adapter's (fp32 AdamW: 8 bytes a parameter).
    assert small["breakdown"]["optimizer"] == 2 * small["breakdown"]["gradients"]
    lines = []
    huge_batches = PPOConfig(rollout_batch_size=65536, mini_batch_size=65536, max_new_tokens=65536)
    huge = ppo_memory_preflight(stage, huge_batches, prompts, tokenizer, log=lines.append)
    assert huge["fits"] is False
    assert any(line.startswith("WARNING: ppo expects") and "mini_batch_size" in line for line in lines)
    assert any("4 role adapters of which 2 trained" in line for line in lines)


def _lora_with_random_b(model):
    """A LoRA adapter on every linear layer whose B is not zero, so the adapter changes the output from the start."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_lora_gradients_survive_an_eval_forward_on_a_4bit_base(tiny_model_dir):
    """PPO rollouts, evaluation and precomputed reference log-probs run the training model in eval mode without
    grad. On AVX512-BF16 CPUs that made bitsandbytes switch the 4-bit layers to a kernel without autograd, and the
    LoRA gradients afterwards were wrong; prepare_for_training keeps them exact."""
    from alignkit.modeling import load_tokenizer, prepare_for_training

    settings = ModelSettings(base=str(tiny_model_dir), quantization="4bit")
    batch = load_tokenizer(str(tiny_model_dir))(["The film was very good. the cast felt rather dull"], return_tensors="pt")

    def lora_model():
        return _lora_with_random_b(prepare_for_training(load_base_model(settings), settings, gradient_checkpointing=False))

    def lora_grads(model):
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fresh = lora_grads(lora_model())
    model = lora_model()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after_eval = lora_grads(model)
    assert fresh.keys() == after_eval.keys() and len(fresh) > 0
    for name in fresh:
        assert torch.allclose(after_eval[name], fresh[name], rtol=1e-4, atol=1e-7), name


def test_kbit_preparation_keeps_a_bf16_base_in_bf16(tiny_model_dir):
    """peft's k-bit preparation upcasts every unquantized weight to fp32 (on Llama-3.1-8B: +2 GiB of embedding
    and LM head, and an fp32 residual stream). Ours keeps a bf16 base in bf16; the loss and the LoRA gradients
    under bf16 autocast, with gradient checkpointing, stay those of peft's preparation."""
    from peft import prepare_model_for_kbit_training

    from alignkit.estimate import parameter_bytes
    from alignkit.modeling import load_tokenizer, prepare_for_training

    settings = ModelSettings(base=str(tiny_model_dir), quantization="4bit", dtype="bfloat16", compute_dtype="bfloat16")
    batch = load_tokenizer(str(tiny_model_dir))(["The film was very good. the cast felt rather dull"] * 2, return_tensors="pt")
    ours = prepare_for_training(load_base_model(settings), settings, gradient_checkpointing=True)
    theirs = prepare_model_for_kbit_training(load_base_model(settings), use_gradient_checkpointing=True)

    unquantized = [p for p in ours.parameters() if p.dtype.is_floating_point]
    assert unquantized and all(p.dtype == torch.bfloat16 for p in unquantized)
    assert not any(p.requires_grad for p in ours.parameters())
    # 4 -> 2 bytes for each unquantized weight (embedding, head, norms)
    assert parameter_bytes(theirs) - parameter_bytes(ours) == 2 * sum(p.numel() for p in unquantized)

    def loss_and_grads(model):
        model = _lora_with_random_b(model)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    our_loss, our_grads = loss_and_grads(ours)
    their_loss, their_grads = loss_and_grads(theirs)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 0  # checkpointing still reaches every adapter
    assert our_loss == pytest.approx(their_loss, rel=1e-2)
    for name in our_grads:
        diff = (our_grads[name] - their_grads[name]).norm() / their_grads[name].norm()
        assert diff < 0.1, (name, diff)


def test_truncation_report_counts_sequences_as_trl_builds_them(tiny_model_dir):
    from alignkit.modeling import load_tokenizer
    from alignkit.training import truncation_report

    tok = load_tokenizer(str(tiny_model_dir))
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Describe the film?"}]
    reply = [{"role": "assistant", "content": "the film was very wonderful."}]
    whole = len(tok.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"])
    report = truncation_report(tok, [{"prompt": prompt, "completion": reply}], whole, "prompt_completion")
    assert report["longest_tokens"] == whole and report["rows_truncated"] == 0  # one pass, no header counted twice
    assert truncation_report(tok, [{"prompt": prompt, "completion": reply}], whole - 1, "prompt_completion")["rows_truncated"] == 1
    # Plain preference rows: prompt + the longer reply in tokens, with the EOS TRL appends.
    row = {"prompt": "The film was", "chosen": " good.", "rejected": " long and dull and slow."}
    longest = len(tok(row["prompt"] + row["rejected"])["input_ids"]) + 1
    assert truncation_report(tok, [row], 1000, "preference")["longest_tokens"] == longest
