"""Training: schedule, checkpoints (atomic, round trip, bad files), gradient accumulation,
exact resume, interruption by signals, and data parallelism with torchrun."""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import numpy as np
import torch

import BERT_from_scratch as bert
from conftest import REPO, TINY_TRAIN, run_script, tiny_config


def test_lr_schedule_warms_up_then_decays_linearly_to_zero():
    lrs = [bert.lr_at(s, total_steps=100, warmup_steps=10, peak_lr=1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-3 * 45 / 90) and bert.lr_at(100, 100, 10, 1e-3) == 0.0


# Checkpoints ------------------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_predictions(tmp_path, tiny_data):
    tokenizer, _ = tiny_data
    torch.manual_seed(0)
    model = bert.BertForPreTraining(tiny_config(tokenizer.get_vocab_size())).eval()
    path = tmp_path / "model.pt"
    bert.save_checkpoint(path, model, tokenizer, step=3, metrics={"test": {"mlm_accuracy": 0.5}})
    raw = torch.load(path, weights_only=True)  # no pickled code: tensors, numbers, strings
    assert raw["step"] == 3 and raw["metrics"]["test"]["mlm_accuracy"] == 0.5
    loaded, loaded_tokenizer = bert.load_checkpoint(path)
    assert not loaded.training
    assert loaded.mlm_head.decoder.weight is loaded.embeddings.word_embeddings.weight  # still tied
    enc = loaded_tokenizer.encode("the castle was [MASK] near the river", "a second sentence")
    assert enc.ids == tokenizer.encode("the castle was [MASK] near the river", "a second sentence").ids
    ids, types = torch.tensor([enc.ids]), torch.tensor([enc.type_ids])
    with torch.no_grad():
        a, b = model(ids, types, torch.ones_like(ids)), loaded(ids, types, torch.ones_like(ids))
    assert torch.equal(a.mlm_logits, b.mlm_logits) and torch.equal(a.nsp_logits, b.nsp_logits)


def test_evaluation_counts_nsp_per_class(tiny_data):
    """A model that always answers "B follows A" is right on every positive and wrong on every
    negative: 50% overall, since the evaluation pairs are half positives."""
    tokenizer, corpora = tiny_data
    torch.manual_seed(0)
    model = bert.BertForPreTraining(tiny_config(tokenizer.get_vocab_size()))
    with torch.no_grad():
        model.nsp_head.weight.zero_()
        model.nsp_head.bias.copy_(torch.tensor([5.0, -5.0]))  # label 0 = IsNext
    dataset = bert.eval_batches(corpora["validation"], 64, 0.15, tokenizer.get_vocab_size())
    m = bert.evaluate(model, dataset, torch.device("cpu"), torch.float32)
    assert m["nsp_accuracy_positives"] == 1.0 and m["nsp_accuracy_negatives"] == 0.0
    assert m["nsp_accuracy"] == 0.5 and m["pairs"] % 2 == 0


def test_half_precision_weights_load_back_into_fp32(tmp_path, tiny_data):
    tokenizer, _ = tiny_data
    model = bert.BertForPreTraining(tiny_config(tokenizer.get_vocab_size()))
    bert.atomic_save({"format": bert.CHECKPOINT_FORMAT, "config": bert.asdict(model.config),
                      "tokenizer": tokenizer.to_str(),
                      "model": {k: v.half() for k, v in model.state_dict().items()}}, tmp_path / "h.pt")
    loaded, _ = bert.load_checkpoint(tmp_path / "h.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.allclose(loaded.pooler.weight, model.pooler.weight, atol=1e-3)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    bert.atomic_save({"version": 1}, path)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        bert.atomic_save({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_bad_checkpoint_files_are_clear_errors(tmp_path, tiny_data):
    tokenizer, _ = tiny_data
    with pytest.raises(bert.UserError, match="does not exist"):
        bert.read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(bert.UserError, match="is a folder; give the path of a checkpoint file in it"):
        bert.read_checkpoint(tmp_path)
    good = tmp_path / "good.pt"
    bert.save_checkpoint(good, bert.BertForPreTraining(tiny_config(tokenizer.get_vocab_size())), tokenizer)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(bert.UserError, match="not a readable checkpoint"):
        bert.read_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(bert.UserError, match="not a readable checkpoint"):
        bert.read_checkpoint(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(bert.UserError, match="not a checkpoint of BERT_from_scratch.py"):
        bert.read_checkpoint(foreign)


# Runs of the training script ------------------------------------------------------------------

def train(tmp_path, data_dir, name, *extra, check=True):
    path = tmp_path / f"{name}.pt"
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", data_dir,
                        "--checkpoint", path, *extra)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return path, result


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, tiny_data_dir):
    common = ["--dropout", "0", "--max_steps", "4"]
    big, _ = train(tmp_path, tiny_data_dir, "big", "--batch_size", "8", *common)
    accumulated, result = train(tmp_path, tiny_data_dir, "acc", "--batch_size", "4",
                                "--grad_accum_steps", "2", *common)
    assert "batch 8 = 4 x 2 accumulation" in result.stderr + result.stdout
    assert max_difference(weights(big), weights(accumulated)) < 1e-5
    # The check has teeth: one step more is far away.
    longer, _ = train(tmp_path, tiny_data_dir, "longer", "--batch_size", "8", "--dropout", "0", "--max_steps", "5")
    assert max_difference(weights(big), weights(longer)) > 1e-4


@pytest.mark.parametrize("first_half", [4, 9])  # mid-epoch, and exactly at the epoch's end
def test_resume_is_exact(tmp_path, tiny_data_dir, first_half):
    # batch 32 on the tiny corpus: 9 steps per epoch, so 14 steps cross an epoch boundary.
    common = ["--batch_size", "32", "--epochs", "3", "--num_workers", "1"]  # dropout on
    straight, _ = train(tmp_path, tiny_data_dir, "straight", *common, "--max_steps", "14")
    half, _ = train(tmp_path, tiny_data_dir, "half", *common, "--max_steps", first_half)
    assert torch.load(half, weights_only=True)["step"] == first_half
    result = run_script("BERT_from_scratch.py", "--resume", half, "--max_steps", "14")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {first_half}" in result.stdout + result.stderr
    resumed = torch.load(half, weights_only=True)
    assert resumed["step"] == 14
    assert all(torch.equal(resumed["model"][k], v) for k, v in weights(straight).items())
    steps = [json.loads(line)["step"] for line in open(half.with_suffix(".metrics.jsonl"))
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 15))  # one log line per step, none repeated or missing


def test_resume_refuses_to_change_the_run_definition(tmp_path, tiny_data_dir):
    half, _ = train(tmp_path, tiny_data_dir, "half", "--max_steps", "2")
    for flag, value in [("--batch_size", "8"), ("--epochs", "5")]:  # --epochs would bend the LR schedule
        result = run_script("BERT_from_scratch.py", "--resume", half, flag, value)
        assert result.returncode == 2 and "cannot change when resuming" in result.stderr
    weights_only = tmp_path / "weights_only.pt"
    ckpt = torch.load(half, weights_only=True)
    del ckpt["train_state"]
    torch.save(ckpt, weights_only)
    result = run_script("BERT_from_scratch.py", "--resume", weights_only, "--max_steps", "4",
                        "--checkpoint", tmp_path / "x.pt")
    assert result.returncode == 1 and "cannot be resumed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_resumable_checkpoint(tmp_path, tiny_data_dir, signum):
    path = tmp_path / "run.pt"
    log = path.with_suffix(".metrics.jsonl")
    cmd = [sys.executable, str(REPO / "BERT_from_scratch.py"), *TINY_TRAIN, "--num_workers", "1",
           "--data_dir", str(tiny_data_dir), "--checkpoint", str(path), "--epochs", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are logged
        if log.exists() and sum('"train"' in line for line in open(log)) >= 3:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"{signal.Signals(signum).name}: stopping at step" in out + err
    assert f"Resume with: python BERT_from_scratch.py --resume {path}" in out + err
    assert "Traceback" not in err
    ckpt = torch.load(path, weights_only=True)
    step = ckpt["step"]
    assert step >= 3 and ckpt["train_state"]["step"] == step
    result = run_script("BERT_from_scratch.py", "--resume", path, "--max_steps", step + 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(path, weights_only=True)["step"] == step + 3


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = bert.StopRequest()
        stop(signal.SIGTERM, None)
        assert stop.signum == signal.SIGTERM and exits == []  # first: finish the step, then save
        stop(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]  # second: out now
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_metrics_log_and_learning_curves(tmp_path, tiny_data_dir):
    pytest.importorskip("matplotlib")
    path, result = train(tmp_path, tiny_data_dir, "curves", "--max_steps", "6", "--plot")
    assert f"learning curves {path.with_suffix('.png')}" in result.stdout
    records = [json.loads(line) for line in open(path.with_suffix(".metrics.jsonl"))]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "lr", "tokens_per_s", "padding"):
        assert all(isinstance(r[key], float) for r in train_records), key
    assert {r["split"] for r in records if r["kind"] == "eval"} == {"validation", "test"}
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(path, weights_only=True)["history"] == records


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_data_dir):
    common = [*TINY_TRAIN, "--data_dir", str(tiny_data_dir), "--dropout", "0", "--max_steps", "5"]
    ddp_path = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "BERT_from_scratch.py"), *common, "--checkpoint", str(ddp_path)]
    # A hung process group must fail the test, not hang CI.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "replicas identical across 2 processes: yes" in output
    assert "batch 8 = 4 x 1 accumulation x 2 processes" in output
    assert output.count("test @ step 5") == 1  # only rank 0 evaluates and prints
    single, _ = train(tmp_path, tiny_data_dir, "single", "--batch_size", "8", "--dropout", "0", "--max_steps", "5")
    assert max_difference(weights(ddp_path), weights(single)) < 1e-5
    # Its position in the epoch is counted in 2-process steps: one process cannot resume it.
    result = run_script("BERT_from_scratch.py", "--resume", ddp_path, "--max_steps", "7")
    assert result.returncode == 1 and "resume it with the same number" in result.stderr


# Static shapes ----------------------------------------------------------------------------

def test_static_shapes_give_the_same_loss_and_gradients(tiny_data):
    """Padding a batch to its bucket length and its masked positions to the bucket's capacity
    changes neither the loss nor the gradients: the padding slots carry no loss."""
    tokenizer, corpora = tiny_data
    c, V = corpora["train"], tokenizer.get_vocab_size()
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    torch.manual_seed(0)
    model = bert.BertForPreTraining(tiny_config(V, dropout=0.0))
    static = bert.PretrainingBatches(c, pairs, [np.arange(8)], 64, 0.15, V, 0, 0, pad_multiple=64)[0]
    # The same pairs and masks padded only to the longest pair, with exactly the masked positions.
    T = int(static["attention_mask"].sum(1).max())
    dynamic = {k: v[:, :T].contiguous() for k, v in static.items() if v.dim() == 2}
    dynamic["nsp_labels"] = static["nsp_labels"]
    dynamic["mlm_positions"] = (dynamic["mlm_labels"].reshape(-1) != -100).nonzero().squeeze(1)
    assert static["input_ids"].shape[1] == 64 > T and len(static["mlm_positions"]) > len(dynamic["mlm_positions"])

    def loss_and_grads(batch):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]
    (a, grads_a), (b, grads_b) = loss_and_grads(static), loss_and_grads(dynamic)
    assert torch.allclose(a.mlm_loss, b.mlm_loss, atol=1e-6) and torch.allclose(a.nsp_loss, b.nsp_loss, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(grads_a, grads_b))


def test_compile_builds_one_graph_per_batch_shape(tiny_data, monkeypatch):
    """With static shapes, --compile compiles once per bucket and then reuses it (dynamo's own
    counters; the eager backend stands in for inductor, which only changes the generated code)."""
    tokenizer, corpora = tiny_data
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    args = bert.parse_args(["--device", "cpu", "--model_size", "tiny", "--compile", "--max_seq_len", "64",
                            "--pad_multiple", "16", "--dtype", "fp32"])
    procs = bert.Processes(torch.device("cpu"))
    model, step = bert.build_model(args, procs, torch.float32, tokenizer.get_vocab_size(), None)
    pairs, batches, _ = bert.training_batches(corpora["train"], argparse.Namespace(
        seed=0, max_seq_len=64, batch_size=4, grad_accum_steps=1, pad_multiple=16), epoch=0)
    dataset = bert.PretrainingBatches(corpora["train"], pairs, batches, 64, 0.15, tokenizer.get_vocab_size(), 0, 0)
    shapes = set()
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    for i in range(len(dataset)):
        batch = dataset[i]
        shapes.add(tuple(batch["input_ids"].shape) + tuple(batch["mlm_positions"].shape))
        step([batch], 1e-4)
    assert len(shapes) >= 2 and len(dataset) > 2 * len(shapes)
    assert counters["stats"]["unique_graphs"] == len(shapes)


def test_a_batch_with_nothing_to_mask_trains_on_nsp_alone(tiny_data):
    """A pair of only [UNK] and specials (WikiText-2 has such "sentences") has no token to mask:
    its MLM loss counts 0, not 0/0, alone or among other micro-batches, and the logs stay finite."""
    ids = np.array([[bert.CLS_ID, bert.UNK_ID, bert.SEP_ID, bert.UNK_ID, bert.SEP_ID]])
    assert (bert.mask_tokens(ids, np.array([0]), 0, 0, 0.15, 300) == -100).all()
    tokenizer, corpora = tiny_data
    c, V = corpora["train"], tokenizer.get_vocab_size()
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    normal = bert.PretrainingBatches(c, pairs, [np.arange(4)], 64, 0.15, V, 0, 0)[0]
    empty = {**normal, "mlm_labels": torch.full_like(normal["mlm_labels"], -100)}  # as such pairs come
    torch.manual_seed(0)
    model = bert.BertForPreTraining(tiny_config(V, dropout=0.0))
    out = model(**empty)
    assert out.mlm_loss.item() == 0 and torch.equal(out.loss, out.nsp_loss)
    out.loss.backward()
    assert model.mlm_head.dense.weight.grad.abs().max() == 0  # no MLM gradient
    assert model.nsp_head.weight.grad.abs().max() > 0

    def step(micro_batches):
        torch.manual_seed(0)
        model = bert.BertForPreTraining(tiny_config(V, dropout=0.0))
        optimizer = torch.optim.AdamW(model.optimizer_groups(0.01), lr=1e-3)
        train_step = bert.TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                    torch.device("cpu"), torch.float32)
        train_step(micro_batches, 1e-3)
        return model, train_step.stats
    alone, stats = step([empty])
    assert torch.isfinite(stats).all() and stats[0] == 0
    assert all(torch.isfinite(p).all() for p in alone.parameters())
    _, with_normal = step([normal, empty])
    _, normal_only = step([normal])
    assert torch.isfinite(with_normal).all() and torch.allclose(with_normal[:2], normal_only[:2])
