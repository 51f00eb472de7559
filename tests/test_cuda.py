"""CUDA: the training step replayed from CUDA graphs trains the same model as the eager step, its
dropout stays random, a failed capture falls back to eager steps, and resuming stays exact; GLUE
fine-tuning runs on the GPU and predicts as on the CPU.
These tests need a CUDA GPU and skip without one (benchmarks/gpu_checks.sh runs them)."""

import json
from argparse import Namespace

import pytest
import torch

import BERT_from_scratch as bert
import finetune_glue as glue
from conftest import TINY_TRAIN, run_script, tiny_config
from test_glue import write_glue

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def tiny_batches(tiny_data):
    tokenizer, corpora = tiny_data
    args = Namespace(seed=0, max_seq_len=64, batch_size=4, grad_accum_steps=1, pad_multiple=16)
    pairs, batches, _ = bert.training_batches(corpora["train"], args, epoch=0)
    return bert.PretrainingBatches(corpora["train"], pairs, batches, 64, 0.15, tokenizer.get_vocab_size(),
                                   0, 0, 16)


def make_step(tiny_data, step_class, dropout):
    torch.manual_seed(0)
    model = bert.BertForPreTraining(tiny_config(tiny_data[0].get_vocab_size(), dropout)).to(CUDA)
    graphs = step_class is bert.CudaGraphStep
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.01), lr=1e-3, fused=True, capturable=graphs)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return model, step_class(model, optimizer, scaler, CUDA, torch.float32)


def train_steps(tiny_data, step_class, dropout, n=40):
    dataset = tiny_batches(tiny_data)
    model, step = make_step(tiny_data, step_class, dropout)
    torch.cuda.manual_seed(1)
    for i in range(n):
        step([dataset[i % len(dataset)]], 1e-3 * (1 - i / n))
    torch.cuda.synchronize()
    return model, step


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_graph_steps_train_the_same_model_as_eager_steps(tiny_data, dropout):
    """With dropout too: each replay draws its masks from the CUDA generator where the eager
    step would."""
    eager, eager_step = train_steps(tiny_data, bert.TrainStep, dropout)
    graphed, graph_step = train_steps(tiny_data, bert.CudaGraphStep, dropout)
    assert not graph_step.eager and len(graph_step.graphs) >= 2  # several shapes, each captured
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.allclose(eager_step.stats, graph_step.stats, rtol=1e-4)  # the logged sums too


def test_dropout_stays_random_under_replay(tiny_data):
    batch = tiny_batches(tiny_data)[0]
    _, step = make_step(tiny_data, bert.CudaGraphStep, dropout=0.1)
    losses = []
    for _ in range(6):  # warm-up, capture, then replays; lr 0 keeps the weights as they are
        step([batch], 0.0)
        losses.append(step.stats[0].item())
        step.stats.zero_()
    assert len(step.graphs) == 1 and len(set(losses)) == len(losses)


def test_a_failed_capture_falls_back_to_eager_steps(tiny_data, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    fallback, step = train_steps(tiny_data, bert.CudaGraphStep, dropout=0.0)
    assert step.eager and not step.graphs
    eager, _ = train_steps(tiny_data, bert.TrainStep, dropout=0.0)
    for a, b in zip(eager.parameters(), fallback.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_resume_on_cuda_continues_the_run(tmp_path, tiny_data_dir):
    """CUDA graphs by default; the scatter-add of the masked positions' backward uses atomics, so
    the comparison allows for float reordering."""
    common = [*TINY_TRAIN, "--device", "cuda", "--data_dir", tiny_data_dir, "--batch_size", "32", "--epochs", "3"]
    straight, half = tmp_path / "straight.pt", tmp_path / "half.pt"
    for path, steps in ((straight, 14), (half, 4)):
        result = run_script("BERT_from_scratch.py", *common, "--checkpoint", path, "--max_steps", steps)
        assert result.returncode == 0 and "CUDA graphs" in result.stdout + result.stderr, result.stderr[-3000:]
    result = run_script("BERT_from_scratch.py", "--resume", half, "--max_steps", "14")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(p, weights_only=True)["model"] for p in (straight, half))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_glue_finetuning_on_cuda(tmp_path, tiny_data, capsys):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    bert.save_checkpoint(path, bert.BertForPreTraining(tiny_config()), tiny_data[0], step=0)
    glue_dir = write_glue(tmp_path / "glue")
    glue.main(["--task", "stsb", "--checkpoint", str(path), "--data_dir", str(glue_dir), "--device", "cuda",
               "--batch_size", "4", "--max_seq_len", "32", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["device"] == "cuda" and -1 <= out["score"] <= 1
    model = glue.build_model(bert.read_checkpoint(path), 2, random_init=False, seed=0)
    dev = glue.encode(*glue.load_task("rte", glue_dir)["dev"], tiny_data[0], 32, regression=False)
    on_cpu = glue.predict(model, dev, torch.device("cpu"))
    assert torch.allclose(torch.from_numpy(glue.predict(model.to(CUDA), dev, CUDA)), torch.from_numpy(on_cpu),
                          atol=1e-4)
