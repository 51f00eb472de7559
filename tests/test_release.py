"""The pretrained model shipped in checkpoints/: it loads, it is what the README says it is, and it
scores on the WikiText-2 test split what the README reports."""

import json
import re

import pytest
import torch

import BERT_from_scratch as bert
import test_mini_bert
from conftest import REPO, WIKITEXT_DIR, needs_wikitext, run_script

SHIPPED = test_mini_bert.SHIPPED_CHECKPOINT
needs_shipped = pytest.mark.skipif(not SHIPPED.exists(), reason=f"no shipped model at {SHIPPED}")


def readme_figures():
    """The README's results, from its machine-readable comment beside the results table."""
    match = re.search(r"<!-- shipped-test-metrics (\{.*?\}) -->", (REPO / "README.md").read_text())
    assert match, "README.md has no shipped-test-metrics comment"
    return json.loads(match.group(1))


@needs_shipped
def test_shipped_file_is_a_small_complete_release():
    assert SHIPPED.stat().st_size <= 40 * 10 ** 6
    ckpt = torch.load(SHIPPED, weights_only=True)
    assert "train_state" not in ckpt  # weights only: nothing to resume, nothing extra to download
    assert ckpt["command"].startswith("python BERT_from_scratch.py") and len(ckpt["git_commit"]) == 40
    assert {"validation", "test"} <= set(ckpt["metrics"]) and ckpt["history"]
    model, tokenizer = bert.load_checkpoint(SHIPPED)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 4  # mini
    assert tokenizer.get_vocab_size() == model.config.vocab_size


@needs_shipped
def test_shipped_model_predicts_from_a_fresh_clone_without_flags(tmp_path):
    result = run_script("test_mini_bert.py", cwd=tmp_path)  # no checkpoints/ of the user's here
    assert result.returncode == 0, result.stderr
    assert f"loaded {SHIPPED}" in result.stdout and result.stdout.count("P(IsNext)") == 2


@needs_shipped
@needs_wikitext
def test_shipped_model_scores_what_the_readme_reports():
    expected = readme_figures()
    result = run_script("test_mini_bert.py", "--checkpoint", SHIPPED, "--eval", "--json",
                        "--data_dir", WIKITEXT_DIR, "--device", "cpu", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads(result.stdout)["test"]
    # fp32 on any CPU: the same pairs and masks; only float summation order may differ.
    assert test["mlm_accuracy"] == pytest.approx(expected["mlm_accuracy"], abs=2e-3)
    assert test["nsp_accuracy"] == pytest.approx(expected["nsp_accuracy"], abs=2e-3)
    assert test["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-2)
    assert test["masked_tokens"] == expected["masked_tokens"] and test["pairs"] == expected["pairs"]


def test_readme_seed_command_row_and_output_are_its_log():
    """The README's seed-command row and sample output are the committed log of that run."""
    log = [json.loads(line) for line in (REPO / "benchmarks" / "seed_command_cpu.metrics.jsonl").open()]
    (test,) = [e for e in log if e["kind"] == "eval" and e["split"] == "test"]
    assert test["masked_tokens"] == readme_figures()["masked_tokens"]  # the same test set as the shipped row
    readme = (REPO / "README.md").read_text()
    row = f"| {test['mlm_accuracy']:.2%} | {test['perplexity']:.1f} | {test['nsp_accuracy']:.2%} |"
    assert [line for line in readme.splitlines() if line.startswith("| the seed command")][0].endswith(row)
    (valid,) = [e for e in log if e["kind"] == "eval" and e["split"] == "validation" and e["epoch"] == 1]
    assert f"validation @ step {valid['step']:,}: {bert.format_metrics(valid)}" in readme
    (epoch,) = [e for e in log if e["kind"] == "epoch" and e["epoch"] == 0]
    assert f"epoch 1/2: {epoch['pairs']:,} pairs" in readme
