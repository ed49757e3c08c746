"""`alignkit eval` on the tiny model against metric scripts the test writes, loaded by evaluate.load from a
local directory (no hub here): extraction, integer-input metrics, perplexity, the report's files."""

import json
import math

import pytest

from alignkit.cli import main
from alignkit.evaluation import EvalConfig, extract_answer, read_eval_rows

# A GSM8K-style reference has its answer after '####'; the other two have none to extract.
ROWS = [{"prompt": "Describe the music?", "reference": "six sevens.\n#### 42"},
        {"prompt": "Describe the plot?", "answer": "#### 1,000"},
        {"messages": [{"role": "user", "content": "Tell me about the film?"}, {"role": "assistant", "content": "no marker"}]},
        {"prompt": "Describe the food?", "reference": "also none"}]

METRIC = '''
import datasets
import evaluate


class {cls}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="test metric", citation="", inputs_description="",
                                   features=datasets.Features({{"predictions": datasets.Value("{dtype}"),
                                                                "references": datasets.Value("{dtype}")}}))

    def _compute(self, predictions, references):
        return {{"{name}": sum(p == r for p, r in zip(predictions, references)) / len(predictions)}}
'''


def metric_dir(root, name, dtype):
    """A metric script directory as evaluate.load takes it: DIR/DIR.py."""
    d = root / name
    d.mkdir()
    (d / f"{name}.py").write_text(METRIC.format(cls=name.title().replace("_", ""), name=name, dtype=dtype))
    return d


@pytest.fixture
def eval_files(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"data": data, "string": metric_dir(tmp_path, "same_text", "string"),
            "ints": metric_dir(tmp_path, "same_id", "int32"), "out": tmp_path / "out"}


def test_gsm8k_extraction_and_normalisation():
    config = EvalConfig(extract="gsm8k", normalize=["whitespace"])
    assert [extract_answer(t, config) for t in ("a\n#### 42", "#### 1,000.", "#### -3 apples\nmore", "42")] == \
        ["42", "1000", "-3 apples", ""]
    assert extract_answer("So x = 12, then 7.", EvalConfig(extract="last_number")) == "7"
    assert extract_answer("The Cat,  sat!", EvalConfig(normalize=["lowercase", "punctuation", "whitespace"])) == "the cat sat"


def test_eval_scores_the_tiny_model_against_local_metrics(eval_files, tiny_model_dir):
    out = eval_files["out"]
    code = main(["eval", f"tiny={tiny_model_dir}", "--data", str(eval_files["data"]), "--metric", str(eval_files["string"]),
                 "--metric", str(eval_files["ints"]), "--extract", "gsm8k", "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference_extracted"] for p in predictions] == ["42", "1000", "", ""]
    # The tiny model's vocabulary has no '#': no answer is extracted from its text, so by hand the two rows
    # whose reference has none either match, and the two with "42" and "1000" do not: 2/4.
    assert all("####" not in p["prediction"] and p["extracted"] == "" for p in predictions)
    report = json.loads((out / "eval.json").read_text())
    (model,) = report["models"]
    assert model["metrics"]["same_text"] == 0.5 and model["metrics"]["same_id"] == 0.5
    assert report["_evaluate_version"] and "_timestamp" in report and report["rows"] == 4
    assert model["metrics"]["perplexity"] == pytest.approx(reference_perplexity(tiny_model_dir, eval_files["data"]), rel=1e-4)
    assert "| tiny |" in (out / "eval.md").read_text() and not (out / "eval.png").exists()


def reference_perplexity(model_dir, data):
    """The references' perplexity computed apart: transformers' own loss, prompt tokens masked out."""
    import torch

    from alignkit.generation import encode_prompt
    from alignkit.modeling import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(str(model_dir))
    nll, count = 0.0, 0
    for row in read_eval_rows(data):
        prompt = encode_prompt(tokenizer, row.prompt)
        reply = tokenizer(row.reference, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + reply])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            nll += model(input_ids=ids, labels=labels).loss.item() * len(reply)
        count += len(reply)
    return math.exp(nll / count)


def test_several_models_get_a_plot_and_a_row_each(eval_files, tiny_model_dir):
    out = eval_files["out"]
    assert main(["eval", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--data", str(eval_files["data"]), "--metric",
                 str(eval_files["string"]), "--no-perplexity", "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in report["models"]] == ["a", "b"]
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_metric_that_does_not_load_is_one_line_exit_2(eval_files, tiny_model_dir, capsys):
    code = main(["eval", str(tiny_model_dir), "--data", str(eval_files["data"]), "--metric",
                 str(eval_files["out"] / "missing_metric"), "--out", str(eval_files["out"])])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
