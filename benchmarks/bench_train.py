"""
Training-step speed of this project's BERT against transformers' BertForPreTraining built with
the identical config and weights, on identical static-shape batches.

Both models train through the very same step, the training script's own (TrainStep, or
CudaGraphStep on CUDA): forward, backward, gradient clipping, fused AdamW. transformers' model
sits behind a thin adapter that computes its loss as transformers does (the vocabulary projection
at every position, cross-entropy over the labelled ones). Each side runs in the variants asked for
(eager, torch.compile, a CUDA graph of the whole step, or both); rounds alternate over all of them
after warm-up. Prints tokens/s (real tokens, padding excluded), the ratio of each side's best,
model FLOPs per token, MFU against a matmul measured in the same run, and peak memory.

    python benchmarks/bench_train.py                                  # CPU: mini, vocab 30522, 32 x 128 synthetic
    python benchmarks/bench_train.py --data_dir DATA --batch_size 16
    python benchmarks/bench_train.py --device cuda --modes fp32 bf16 --variants eager compile graphs compile+graphs
    python benchmarks/bench_train.py --device cuda --model_size base --modes bf16 --sides ours --variants graphs
"""

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import BERT_from_scratch as bert  # noqa: E402
from test_mini_bert import to_transformers as hf_model_like  # noqa: E402  (same config, same weights)

VARIANTS = ["eager", "compile", "graphs", "compile+graphs"]


def synthetic_batches(n, batch_size, seq_len, vocab_size, mask_prob, pad_multiple):
    """Full-length pairs of random tokens, built and masked by the project's own pipeline."""
    rng = np.random.default_rng(0)
    len_a = (seq_len - 3) // 2
    lengths = np.tile([len_a, seq_len - 3 - len_a], n * batch_size)
    corpus = bert.Corpus(rng.integers(bert.N_SPECIAL, vocab_size, lengths.sum()).astype(np.int32),
                         np.concatenate([[0], np.cumsum(lengths)]), np.arange(len(lengths)) // 2)
    pairs = np.stack([np.arange(0, len(lengths), 2), np.arange(1, len(lengths), 2),
                      rng.integers(0, 2, len(lengths) // 2)], axis=1)
    batches = [np.arange(i * batch_size, (i + 1) * batch_size) for i in range(n)]
    dataset = bert.PretrainingBatches(corpus, pairs, batches, seq_len, mask_prob, vocab_size, 0, 0, pad_multiple)
    return [dataset[i] for i in range(n)]


def wikitext_batches(n, args):
    """Real batches from the project's own pipeline: length-grouped, padded to static shapes."""
    articles = bert.split_articles(bert.load_wikitext("wikitext-2-v1", args.data_dir, ["train"])["train"])
    tokenizer = bert.train_tokenizer(articles, args.vocab_size)
    corpus = bert.tokenize_corpus(articles, tokenizer)
    run = argparse.Namespace(seed=0, max_seq_len=args.seq_len, batch_size=args.batch_size, grad_accum_steps=1,
                             pad_multiple=args.pad_multiple)
    pairs, batches, _ = bert.training_batches(corpus, run, epoch=0)
    dataset = bert.PretrainingBatches(corpus, pairs, batches, args.seq_len, 0.15,
                                      tokenizer.get_vocab_size(), 0, 0, args.pad_multiple)
    return [dataset[i] for i in range(n)], tokenizer.get_vocab_size()


class TransformersAdapter(torch.nn.Module):
    """transformers' BertForPreTraining behind this project's call signature and output, so that
    both models train through the same step. The losses are computed as transformers computes
    them: logits for every position, cross-entropy over the labelled ones."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, token_type_ids, attention_mask, mlm_labels, nsp_labels, mlm_positions):
        out = self.hf(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        logits = out.prediction_logits.flatten(0, 1)  # (B * T, V)
        mlm_loss = F.cross_entropy(logits.float(), mlm_labels.view(-1))
        nsp_loss = F.cross_entropy(out.seq_relationship_logits.float(), nsp_labels)
        return bert.PreTrainingOutput(mlm_loss + nsp_loss, mlm_loss, nsp_loss, logits[mlm_positions],
                                      out.seq_relationship_logits)


def make_side(reference, side, variant, device, dtype):
    """A training step for one side in one variant, on its own copy of the reference weights."""
    model = copy.deepcopy(reference) if side == "ours" else TransformersAdapter(hf_model_like(reference))
    model = model.to(device).train()
    graphs = "graphs" in variant
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=True, capturable=graphs)
    wrapped = torch.compile(model, dynamic=False) if "compile" in variant else model
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    step = (bert.CudaGraphStep if graphs else bert.TrainStep)(wrapped, optimizer, scaler, device, dtype)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, repeats=10):
    """Measured FLOP/s of a large square matmul: the practical ceiling for this machine."""
    n = 8192 if device.type == "cuda" else 2048  # (a large GPU needs large products to reach its peak)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        for _ in range(2):
            a @ b
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t))
    return best


def step_flops(model, batch, every_position):
    """Model matmul FLOPs of one training step on this batch's real (unpadded) tokens."""
    n_masked, _, tokens = bert.batch_counts(batch)
    # transformers projects every position onto the vocabulary; we only the masked ones.
    fraction = 1.0 if every_position else n_masked / tokens
    return model.flops_per_token(batch["input_ids"].size(1), fraction) * tokens, tokens


def peak_memory_child(args, side, mode):
    """Peak resident memory of a process that only trains `side` eagerly (CPU), in GiB."""
    cmd = [sys.executable, __file__, "--_memory_of", side, "--modes", mode, "--variants", "eager",
           "--model_size", args.model_size, "--vocab_size", str(args.vocab_size), "--pad_multiple",
           str(args.pad_multiple), "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
           "--device", args.device]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def run_mode(args, mode, device, batches, reference):
    dtype = torch.float32 if mode == "fp32" else bert.resolve_dtype("auto", device)
    configs = [(side, variant) for side in args.sides for variant in args.variants]
    steps, failed = {}, {}
    print(f"\n[{mode}] dtype {str(dtype)[6:]}; warm-up: every batch twice per configuration ...", flush=True)
    peak_mem = {}  # CUDA: what building and warming up (capturing) a configuration allocated at most
    for config in configs:
        t = time.perf_counter()
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        try:
            steps[config] = make_side(reference, *config, device, dtype)
            for b in batches + batches:  # every shape twice: compiled, and captured, before timing
                steps[config]([b], 1e-4)
            sync(device)
        except Exception as e:  # a variant that cannot run here is reported, not fatal
            failed[config] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            steps.pop(config, None)
            continue
        if device.type == "cuda":
            peak_mem[config] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
        if getattr(steps[config], "eager", False):
            failed[config] = "CUDA graph capture failed (ran eagerly)"
        print(f"  {config[0]:12s} {config[1]:15s} ready in {time.perf_counter() - t:5.1f}s", flush=True)
    times = {c: [] for c in steps}
    totals = {c: {"flops": 0.0, "tokens": 0, "seconds": 0.0} for c in steps}
    order = list(steps)
    k = 0
    for r in range(args.rounds):
        for config in (order if r % 2 == 0 else order[::-1]):
            round_batches = [batches[(k + i) % len(batches)] for i in range(args.steps)]
            sync(device)
            t = time.perf_counter()
            for b in round_batches:
                steps[config]([b], 1e-4)
            sync(device)
            dt = time.perf_counter() - t
            n_tok = 0
            for b in round_batches:
                f, n = step_flops(reference, b, every_position=config[0] == "transformers")
                totals[config]["flops"] += f
                n_tok += n
            totals[config]["tokens"] += n_tok
            totals[config]["seconds"] += dt
            times[config].append(n_tok / dt)
        k += args.steps
    peak = matmul_peak(device, dtype)
    result = {"mode": mode, "dtype": str(dtype)[6:], "peak_flops": peak, "configs": {},
              "failed": {f"{s} {v}": why for (s, v), why in failed.items()}}
    for config in steps:
        t = totals[config]
        achieved = t["flops"] / t["seconds"]
        result["configs"][f"{config[0]} {config[1]}"] = {
            "side": config[0], "variant": config[1], "tokens_per_s": statistics.median(times[config]),
            "tokens_per_s_rounds": times[config], "flops_per_token": t["flops"] / t["tokens"],
            "achieved_flops": achieved, "mfu": achieved / peak,
            **({"peak_memory_gib": peak_mem[config]} if device.type == "cuda" else {})}
    best = {}
    for side in args.sides:
        runs = [c for c in result["configs"].values() if c["side"] == side and f"{side} {c['variant']}" not in result["failed"]]
        if runs:
            best[side] = max(runs, key=lambda c: c["tokens_per_s"])
    result["best"] = {side: c["variant"] for side, c in best.items()}
    if len(best) == 2:
        result["ratio"] = best["ours"]["tokens_per_s"] / best["transformers"]["tokens_per_s"]
    if args.profile:
        for config in steps:
            print_profile(" ".join(config), steps[config], batches[:3], device)
    return result


def print_profile(name, step, batches, device, top=12):
    """Where a training step's time goes: the top operators by self time, per step."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for b in batches:
            step([b], 1e-4)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    print(f"  profile of {name}, per step ({'GPU' if device.type == 'cuda' else 'CPU'} time):")
    for e in events[:top]:
        t = getattr(e, key)
        print(f"    {t / len(batches) / 1000:7.2f} ms  {t / total:5.1%}  {e.key[:70]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default="mini", choices=list(bert.PRESETS))
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--pad_multiple", type=int, default=16)
    p.add_argument("--data_dir", default=None, help="real WikiText-2 batches instead of synthetic ones")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="bf16: autocast to bf16 where the CPU/GPU supports it")
    p.add_argument("--variants", nargs="+", default=["eager"], choices=VARIANTS,
                   help="graphs: CUDA only; compile: torch.compile with one graph per batch shape")
    p.add_argument("--sides", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"])
    p.add_argument("--batches", type=int, default=24, help="distinct batches, cycled through")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="steps per configuration per round")
    p.add_argument("--memory", action="store_true", help="also peak RSS per side (CPU, child processes)")
    p.add_argument("--profile", action="store_true", help="also the top operators of each step")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--_memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the training script does
        torch.backends.cudnn.allow_tf32 = True
    elif any("graphs" in v for v in args.variants):
        p.error("the graphs variants need --device cuda")

    if args.data_dir:
        batches, vocab_size = wikitext_batches(args.batches, args)
    else:
        vocab_size = args.vocab_size
        batches = synthetic_batches(args.batches, args.batch_size, args.seq_len, vocab_size, 0.15,
                                    args.pad_multiple)
    if device.type == "cuda":  # as training's loader delivers them: copies to the GPU then never wait
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    torch.manual_seed(0)
    reference = bert.BertForPreTraining(bert.config_for(args.model_size, vocab_size))

    if args._memory_of:  # child process: train one side a few steps, print peak RSS in GiB
        dtype = torch.float32 if args.modes[0] == "fp32" else bert.resolve_dtype("auto", device)
        step = make_side(reference, args._memory_of, "eager", device, dtype)
        del reference
        for b in batches[:5]:
            step([b], 1e-4)
        print(bert.peak_memory_gib())
        return

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:
        pass
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    source = "WikiText-2 batches (length-grouped)" if args.data_dir else "synthetic full-length batches"
    shapes = sorted({tuple(b["input_ids"].shape) for b in batches})
    print(f"machine: {where}; torch {torch.__version__}")
    print(f"model: {args.model_size}, vocab {vocab_size:,}; batch {args.batch_size}, {source}, padded to "
          f"multiples of {args.pad_multiple}: {len(shapes)} shape(s) among {len(batches)} batches")
    print(f"{args.rounds} alternating rounds x {args.steps} steps per configuration, after warm-up")
    results = []
    for mode in args.modes:
        r = run_mode(args, mode, device, batches, reference)
        if args.memory and device.type == "cpu":
            for side in args.sides:
                r["configs"][f"{side} eager"]["peak_rss_gib"] = peak_memory_child(args, side, mode)
        results.append(r)
        for name, s in r["configs"].items():
            mem = (f", peak RSS {s['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in s else
                   f", peak GPU memory {s['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in s else "")
            note = f"  [{r['failed'][name]}]" if name in r["failed"] else ""
            print(f"  {name:28s} {s['tokens_per_s']:10,.0f} tokens/s  (rounds {min(s['tokens_per_s_rounds']):,.0f}"
                  f"-{max(s['tokens_per_s_rounds']):,.0f})  {s['flops_per_token'] / 1e6:5.1f} MFLOP/token  "
                  f"{s['achieved_flops'] / 1e9:8.1f} GFLOP/s = {s['mfu']:.1%} of peak{mem}{note}")
        for name, why in r["failed"].items():
            if name not in r["configs"]:
                print(f"  {name:28s} did not run: {why}")
        if "ratio" in r:
            print(f"  ratio of the best: ours ({r['best']['ours']}) / transformers ({r['best']['transformers']}): "
                  f"{r['ratio']:.2f}x   (matmul peak {r['peak_flops'] / 1e9:,.0f} GFLOP/s in {r['dtype']})")
        else:
            print(f"  matmul peak {r['peak_flops'] / 1e9:,.0f} GFLOP/s in {r['dtype']}")
        if args.json:  # after every mode: a run stopped by a time limit keeps what it measured
            Path(args.json).write_text(json.dumps({"machine": where, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
