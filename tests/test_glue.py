"""finetune_glue.py: GLUE's file formats, the metrics against hand-computed values, a few steps of
fine-tuning end to end on a tiny checkpoint, and one clear error line for every bad input."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import BERT_from_scratch as bert
import finetune_glue as glue
from conftest import REPO, WORDS, tiny_config

GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def sentence(rng, n=6):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_glue(folder, n=12, seed=0):
    """Tiny train.tsv and dev.tsv for every task, in GLUE's own layouts; unbalanced quotes inside
    sentences, as in the real files."""
    rng = random.Random(seed)
    rows = {
        "SST-2": ("sentence\tlabel", lambda i: f'{sentence(rng)} " {i} \t{i % 2}'),
        "MRPC": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                 lambda i: f'{i % 2}\t{100 + i}\t{200 + i}\t"{sentence(rng)}\t{sentence(rng)}'),
        "RTE": ("index\tsentence1\tsentence2\tlabel",
                lambda i: f'{i}\t{sentence(rng)} "\t{sentence(rng)}\t{["entailment", "not_entailment"][i % 2]}'),
        "CoLA": (None, lambda i: f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\t{sentence(rng)} ."),
        "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                  lambda i: f"{i}\tmain-news\tf\t2012\t{i}\tnone\tnone\t{sentence(rng)}\t{sentence(rng)}\t{i % 6 * 0.8:.3f}"),
    }
    for task, (header, row) in rows.items():
        (folder / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev"):
            lines = ([header] if header else []) + [row(i) for i in range(n)]
            (folder / task / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_data):
    """A tiny model in this project's checkpoint format (untrained: fine-tuning only reads it)."""
    torch.manual_seed(1234)  # not a seed the tests fine-tune with: random_init must differ from it
    model = bert.BertForPreTraining(tiny_config())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    bert.save_checkpoint(path, model, tiny_data[0], step=0)
    return path


def finetune_json(capsys, checkpoint, glue_dir, *args):
    glue.main(["--checkpoint", str(checkpoint), "--data_dir", str(glue_dir), "--batch_size", "4",
               "--max_seq_len", "32", "--threads", "1", "--device", "cpu", "--json", *args])
    return json.loads(capsys.readouterr().out)


# Reading GLUE's files -------------------------------------------------------------------------

def test_each_task_format_is_read(glue_dir):
    for name in glue.TASKS:
        data = glue.load_task(name, glue_dir)
        for split in ("train", "dev"):
            texts, labels = data[split]
            assert len(labels) == 12 and all(len(t) == 12 for t in texts)
            assert len(texts) == (2 if name in ("mrpc", "rte", "stsb") else 1)
    sst2_texts, sst2_labels = glue.load_task("sst2", glue_dir)["train"]
    assert sst2_texts[0][1].endswith('" 1 ') and sst2_labels[:3] == [0, 1, 0]  # a quote is text
    mrpc_texts, mrpc_labels = glue.load_task("mrpc", glue_dir)["dev"]
    assert mrpc_texts[0][0].startswith('"') and mrpc_labels[:2] == [0, 1]  # BOM header skipped
    assert glue.load_task("rte", glue_dir)["dev"][1][:2] == [0, 1]  # entailment = 0
    cola_texts, cola_labels = glue.load_task("cola", glue_dir)["dev"]
    assert cola_labels[:2] == [0, 1] and cola_texts[0][0].endswith(" .")  # no header: row 1 is data
    assert glue.load_task("stsb", glue_dir)["dev"][1][:3] == pytest.approx([0.0, 0.8, 1.6])


def test_pairs_are_laid_out_and_truncated_longest_first(tiny_data):
    tokenizer = tiny_data[0]
    long_a, short_b = " ".join(["castle"] * 40), "the river"
    ex = glue.encode([[long_a, "a king"], [short_b, "the"]], [0, 1], tokenizer, 16, regression=False)
    n_b = len(tokenizer.encode(short_b, add_special_tokens=False).ids)
    ids, types = ex.input_ids[0], ex.token_type_ids[0]
    assert len(ids) == 16 and ids[0] == bert.CLS_ID and ids[-1] == bert.SEP_ID
    assert ids[16 - n_b - 2] == bert.SEP_ID and list(types) == [0] * (15 - n_b) + [1] * (n_b + 1)
    assert list(ex.lengths) == [16, len(ex.input_ids[1])] and ex.labels.dtype == np.int64
    single = glue.encode([[long_a]], [1.5], tokenizer, 16, regression=True)
    assert single.lengths[0] == 16 and single.input_ids[0][-1] == bert.SEP_ID and single.labels.dtype == np.float32


def test_length_grouped_batches_cover_every_example_once():
    lengths = np.random.default_rng(0).integers(5, 100, 103)
    batches = glue.length_grouped_batches(lengths, 8, np.random.default_rng(1), group=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert sorted(len(b) for b in batches)[0] == 103 % 8  # the smaller last batch is kept


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE not found at {GLUE_DIR}")
def test_real_glue_files_have_the_official_sizes():
    sizes = {"sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277), "cola": (8551, 1043),
             "stsb": (5749, 1500)}
    for name, (n_train, n_dev) in sizes.items():
        data = glue.load_task(name, GLUE_DIR)
        assert (len(data["train"][1]), len(data["dev"][1])) == (n_train, n_dev), name
    assert sum(glue.load_task("mrpc", GLUE_DIR)["dev"][1]) == 279  # label counts from the README
    assert glue.load_task("rte", GLUE_DIR)["dev"][1].count(0) == 146


# Metrics --------------------------------------------------------------------------------------

def test_classification_metrics_by_hand():
    pred, label = np.array([1, 1, 0, 0, 1, 1, 0, 1]), np.array([1, 0, 1, 0, 1, 1, 1, 0])
    # TP 3, FP 2, FN 2, TN 1
    assert glue.accuracy(pred, label) == 4 / 8
    assert glue.f1(pred, label) == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    assert glue.matthews(pred, label) == pytest.approx((3 * 1 - 2 * 2) / np.sqrt(5 * 5 * 3 * 3))
    assert glue.matthews(np.ones(4, int), np.array([1, 0, 1, 0])) == 0.0  # undefined: 0
    assert glue.matthews(label, label) == pytest.approx(1.0) and glue.matthews(1 - label, label) == pytest.approx(-1.0)
    assert glue.f1(np.zeros(3, int), np.zeros(3, int)) == 0.0


def test_correlations_by_hand():
    assert glue.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 12.666666666666666))
    assert glue.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert list(glue.average_ranks([10, 20, 20, 30, 20])) == [1, 3, 3, 5, 3]
    # ranks (1, 2.5, 2.5, 4) against (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert glue.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)


def test_main_score_of_each_task():
    outputs, labels = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), np.array([1, 0, 0, 1])
    score, m = glue.glue_metrics(glue.TASKS["mrpc"], outputs, labels)
    assert m == {"f1": pytest.approx(0.8), "accuracy": 0.75} and score == pytest.approx(0.775)
    score, m = glue.glue_metrics(glue.TASKS["cola"], outputs, labels)
    assert score == m["matthews"] == pytest.approx(glue.matthews(np.array([1, 0, 1, 1]), labels))
    score, m = glue.glue_metrics(glue.TASKS["stsb"], np.array([[1.0], [2.0], [2.0], [5.0]]), np.array([0.5, 1.0, 3.0, 4.0]))
    assert score == pytest.approx((m["pearson"] + m["spearman"]) / 2)


# Fine-tuning ----------------------------------------------------------------------------------

def test_finetuning_starts_from_the_checkpoint_and_random_init_does_not(checkpoint):
    ckpt = bert.read_checkpoint(checkpoint)
    encoder = {k: v for k, v in ckpt["model"].items() if not k.startswith(("mlm_head.", "nsp_head."))}
    model = glue.build_model(ckpt, 2, random_init=False, seed=0)
    state = model.state_dict()
    assert set(state) == set(encoder) | {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    fresh = glue.build_model(ckpt, 2, random_init=True, seed=0).state_dict()
    assert not any(torch.equal(fresh[k], v) for k, v in encoder.items() if "norm" not in k and v.dim() == 2)
    assert torch.equal(fresh["classifier.weight"], state["classifier.weight"])  # same seed, same head
    assert glue.build_model(ckpt, 1, random_init=True, seed=1).classifier.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_finetuning_dropout_is_its_own(checkpoint):
    """0.1 as in BERT's fine-tuning even when the pretraining had none; --dropout sets it everywhere."""
    ckpt = bert.read_checkpoint(checkpoint)
    ckpt["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for dropout in (0.1, 0.3):
        model = glue.build_model(ckpt, 2, random_init=False, seed=0, dropout=dropout)
        rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        rates += [m.dropout_p for m in model.modules() if isinstance(m, bert.SelfAttention)]
        assert len(rates) == 4 + 2 and set(rates) == {dropout}  # embeddings, 2 layers, classifier; attention


def test_finetune_end_to_end_json_and_deterministic(capsys, checkpoint, glue_dir):
    out = finetune_json(capsys, checkpoint, glue_dir, "--task", "rte", "--epochs", "2", "--seed", "3")
    assert set(out) == {"task", "metric", "score", "metrics", "settings", "seconds", "cpu_seconds",
                        "train_examples", "dev_examples"}
    assert out["task"] == "rte" and out["metric"] == "accuracy" and out["score"] == out["metrics"]["accuracy"]
    assert out["train_examples"] == out["dev_examples"] == 12 and 0 <= out["score"] <= 1
    s = out["settings"]
    assert (s["lr"], s["batch_size"], s["epochs"], s["seed"], s["max_seq_len"], s["dropout"], s["random_init"]) == \
        (1e-4, 4, 2, 3, 32, 0.1, False)
    assert s["steps"] == 6 and s["checkpoint"] == str(checkpoint) and s["device"] == "cpu"
    again = finetune_json(capsys, checkpoint, glue_dir, "--task", "rte", "--epochs", "2", "--seed", "3")
    assert again["metrics"] == out["metrics"]


def test_regression_and_classification_tasks_run(capsys, checkpoint, glue_dir):
    out = finetune_json(capsys, checkpoint, glue_dir, "--task", "stsb", "--lr", "1e-3")
    assert set(out["metrics"]) == {"pearson", "spearman"} and out["settings"]["epochs"] == 3
    assert out["score"] == pytest.approx((out["metrics"]["pearson"] + out["metrics"]["spearman"]) / 2)
    out = finetune_json(capsys, checkpoint, glue_dir, "--task", "mrpc", "--random_init", "--epochs", "1")
    assert set(out["metrics"]) == {"f1", "accuracy"} and out["settings"]["random_init"]
    assert finetune_json(capsys, checkpoint, glue_dir, "--task", "sst2")["settings"]["epochs"] == 1


def test_human_summary(capsys, checkpoint, glue_dir):
    glue.main(["--checkpoint", str(checkpoint), "--data_dir", str(glue_dir), "--task", "cola",
               "--epochs", "1", "--max_seq_len", "32", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith("cola (tiny.pt, lr 0.0001") and "matthews" in out and "12 dev examples" in out


def test_longer_inputs_than_pretraining_get_a_notice(capsys, checkpoint, glue_dir, tmp_path):
    short = tmp_path / "short.pt"
    torch.save({**torch.load(checkpoint, weights_only=True), "args": {"max_seq_len": 16}}, short)
    glue.main(["--checkpoint", str(short), "--data_dir", str(glue_dir), "--task", "rte", "--epochs", "1",
               "--max_seq_len", "32", "--threads", "1"])
    assert "pretrained on pairs of at most 16 tokens" in capsys.readouterr().err
    glue.main(["--checkpoint", str(short), "--data_dir", str(glue_dir), "--task", "rte", "--epochs", "1",
               "--max_seq_len", "16", "--threads", "1"])
    assert "notice" not in capsys.readouterr().err


def test_saved_model_classifies_as_in_transformers(tiny_data, checkpoint, glue_dir, tmp_path):
    """--save's folder loads as BertForSequenceClassification with the task's label names and
    gives this model's outputs, in a text-classification pipeline too (STS-B: the raw score)."""
    transformers = pytest.importorskip("transformers")
    tokenizer = tiny_data[0]
    for name in ("rte", "stsb"):
        task = glue.TASKS[name]
        model = glue.build_model(bert.read_checkpoint(checkpoint), task.num_labels, random_init=False, seed=0)
        dev = glue.encode(*glue.load_task(name, glue_dir)["dev"], tokenizer, 32, regression=task.num_labels == 1)
        ours = glue.predict(model, dev, torch.device("cpu"))
        glue.save(model, tokenizer, task, tmp_path / name)
        theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / name).eval()
        assert theirs.config.id2label == dict(enumerate(task.labels))
        batch = glue.collate(dev, np.arange(len(dev)))
        with torch.no_grad():
            logits = theirs(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(logits, torch.from_numpy(ours), atol=1e-5)
    texts = glue.load_task("stsb", glue_dir)["dev"][0]
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "stsb"), device="cpu")
    out = pipe({"text": texts[0][0], "text_pair": texts[1][0]})
    out = out[0] if isinstance(out, list) else out
    assert out["label"] == "similarity" and out["score"] == pytest.approx(float(ours[0, 0]), abs=1e-4)


def test_save_writes_a_folder_and_refuses_one_with_files(capsys, checkpoint, glue_dir, tmp_path):
    pytest.importorskip("transformers")
    out = finetune_json(capsys, checkpoint, glue_dir, "--task", "sst2", "--save", str(tmp_path / "sst2"))
    assert out["settings"]["save"] == str(tmp_path / "sst2") and (tmp_path / "sst2" / "config.json").is_file()
    line = error_of(capsys, "--task", "sst2", "--checkpoint", str(checkpoint), "--data_dir", str(glue_dir),
                    "--max_seq_len", "32", "--save", str(tmp_path / "sst2"), code=1)
    assert line == f"error: --save {tmp_path / 'sst2'} already has files; remove them or choose another folder"


# Bad input: one line on stderr, exit status 1 (2 for a bad flag), no traceback ------------------

def error_of(capsys, *argv, code=2):
    """The one-line error of a run that must fail: status 2 for a bad flag, 1 for bad input."""
    with pytest.raises(SystemExit) as info:
        glue.main(list(argv))
    err = capsys.readouterr().err
    assert info.value.code == code and "Traceback" not in err
    assert code != 2 or err.count("\n") == 1  # no usage block above a bad flag's line
    return err.strip().splitlines()[-1]


def test_errors(capsys, checkpoint, glue_dir, tmp_path):
    ok = ["--checkpoint", str(checkpoint), "--data_dir", str(glue_dir), "--max_seq_len", "32"]
    assert "invalid choice: 'qnli'" in error_of(capsys, "--task", "qnli", *ok)
    assert "--lr must be positive" in error_of(capsys, "--task", "rte", "--lr", "0", *ok)
    assert "--warmup" in error_of(capsys, "--task", "rte", "--warmup", "1", *ok)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert "CUDA is not available" in error_of(capsys, "--task", "rte", "--device", "cuda", *ok)
    line = error_of(capsys, "--task", "rte", "--checkpoint", str(checkpoint), "--max_seq_len", "32",
                    "--data_dir", str(tmp_path / "none"), code=1)
    assert line.startswith("error: ") and str(tmp_path / "none" / "RTE" / "train.tsv") in line
    assert "does not exist" in error_of(capsys, "--task", "rte", "--data_dir", str(glue_dir),
                                        "--checkpoint", str(tmp_path / "missing.pt"), code=1)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "not a checkpoint of BERT_from_scratch.py" in error_of(
        capsys, "--task", "rte", "--data_dir", str(glue_dir), "--checkpoint", str(foreign), code=1)
    assert "exceeds the checkpoint's 64 positions" in error_of(capsys, "--task", "rte", *ok, "--max_seq_len", "128",
                                                               code=1)
    mismatched = tmp_path / "mismatched.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["hidden_size"] *= 2  # weights of the other size
    torch.save(ckpt, mismatched)
    assert "do not fit together" in error_of(capsys, "--task", "rte", "--data_dir", str(glue_dir),
                                             "--checkpoint", str(mismatched), "--max_seq_len", "32", code=1)
    broken = write_glue(tmp_path / "broken", n=3)
    (broken / "CoLA" / "dev.tsv").write_text("gj04\tmaybe\t\tA sentence .\n")
    line = error_of(capsys, "--task", "cola", "--checkpoint", str(checkpoint), "--max_seq_len", "32",
                    "--data_dir", str(broken), code=1)
    assert "CoLA/dev.tsv, line 1" in line


def test_hub_failure_suggests_data_dir(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(bert.UserError, match="nyu-mll/glue 'rte'.*ConnectionError.*--data_dir") as info:
        glue.load_task("rte", None)
    assert "\n" not in str(info.value)


def test_grid_runner_runs_in_parallel_resumes_and_tables(checkpoint, glue_dir, tmp_path):
    """benchmarks/glue_runs.py: two runs at a time; each lr at seed 0, other seeds only at the best
    lr; a second call finds everything done and runs nothing; the table reads the file; a grid of
    other settings is refused on that file."""
    import subprocess
    import sys
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "glue_runs.py"), "--checkpoint", str(checkpoint),
           "--data_dir", str(glue_dir), "--tasks", "rte", "stsb", "--inits", "shipped", "--lrs", "1e-4", "3e-4",
           "--seeds", "0", "1", "--threads", "1", "--jobs", "2", "--results", str(results),
           "--", "--max_seq_len", "32", "--batch_size", "4", "--device", "cpu"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    keys = [(r["task"], r["settings"]["lr"], r["settings"]["seed"]) for r in runs]
    assert len(keys) == len(set(keys)) == 6  # 2 tasks x (2 lrs at seed 0 + seed 1 at one lr)
    for task in ("rte", "stsb"):
        seed0 = {lr: r["score"] for r in runs for t, lr, seed in [(r["task"], r["settings"]["lr"], r["settings"]["seed"])]
                 if t == task and seed == 0}
        (chosen,) = [lr for t, lr, seed in keys if t == task and seed == 1]
        assert seed0[chosen] == max(seed0.values())
    at = cmd.index("--")
    again = subprocess.run(cmd[:at] + ["--label", "seed command"] + cmd[at:], capture_output=True, text=True,
                           cwd=REPO, timeout=600)
    assert again.returncode == 0 and "running" not in again.stderr
    assert len(results.read_text().splitlines()) == 6
    assert "| seed command |" in again.stdout and "2 seeds" in again.stdout
    other = subprocess.run(cmd + ["--epochs", "1"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert other.returncode == 1 and "running" not in other.stderr  # not taken for the 3-epoch runs
    assert "holds rte runs of other settings: epochs 3 (here 1)" in other.stderr
    retrained = tmp_path / checkpoint.name  # the same name, other weights
    torch.save({**torch.load(checkpoint, weights_only=True), "step": 1}, retrained)
    other = subprocess.run([*cmd[:3], str(retrained), *cmd[4:]], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert other.returncode == 1 and "holds rte runs of other settings: checkpoint" in other.stderr


def test_readme_glue_table_is_the_one_the_results_file_gives():
    """The README's GLUE rows are what `glue_runs.py --table_only` prints from the committed results."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("glue_runs", REPO / "benchmarks" / "glue_runs.py")
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)
    printed = runs.table(runs.read_results(runs.RESULTS), runs.TASKS, {1e-4, 3e-4}).splitlines()
    readme = (REPO / "README.md").read_text().splitlines()
    for init in ("| shipped |", "| random |", "| Google BERT-Mini"):
        assert [line for line in readme if line.startswith(init)] == [l for l in printed if l.startswith(init)]
    seed_command = runs.read_results(REPO / "benchmarks" / "glue_results_seed_command.jsonl")
    printed = runs.table(seed_command, runs.TASKS, {1e-4, 3e-4}, "seed command").splitlines()
    row = [line for line in readme if line.startswith("| seed command |")]
    assert row and row == [line for line in printed if line.startswith("| seed command |")]
