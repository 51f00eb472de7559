"""
Training-step speed of this project's BERT against transformers' BertForPreTraining built with
the identical config and weights, on identical batches.

Each side runs full training steps (forward, backward, gradient clipping, AdamW step); rounds
alternate A/B after warm-up so that both see the same machine state. Prints tokens/s per side,
the ratio, model FLOPs per token, achieved FLOP/s as a fraction of the matmul peak measured on
the same machine (MFU), and peak memory.

    python benchmarks/bench_train.py                                  # mini, vocab 30522, 32 x 128, synthetic
    python benchmarks/bench_train.py --data_dir ../shared/data/wikitext-2-v1 --batch_size 16
    python benchmarks/bench_train.py --device cuda --modes fp32 best
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import BERT_from_scratch as bert  # noqa: E402
from test_mini_bert import to_transformers as hf_model_like  # noqa: E402  (same config, same weights)


def synthetic_batches(n, batch_size, seq_len, vocab_size, mask_prob, seed=0):
    """Full-length pairs (no padding), mask_prob of the ordinary tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(bert.N_SPECIAL, vocab_size, (batch_size, seq_len), generator=g)
        ids[:, 0], ids[:, seq_len // 2], ids[:, -1] = bert.CLS_ID, bert.SEP_ID, bert.SEP_ID
        types = torch.zeros_like(ids)
        types[:, seq_len // 2 + 1:] = 1
        labels = torch.full_like(ids, -100)
        chosen = (torch.rand(ids.shape, generator=g) < mask_prob) & (ids >= bert.N_SPECIAL)
        labels[chosen] = ids[chosen]
        ids[chosen] = bert.MASK_ID
        batches.append({"input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids),
                        "mlm_labels": labels, "nsp_labels": torch.randint(0, 2, (batch_size,), generator=g),
                        "mlm_positions": labels.view(-1).ne(-100).nonzero().squeeze(1)})
    return batches


def wikitext_batches(n, args):
    """Real batches from the project's own pipeline: length-grouped, dynamically padded."""
    articles = bert.split_articles(bert.load_wikitext("wikitext-2-v1", args.data_dir, ["train"])["train"])
    tokenizer = bert.train_tokenizer(articles, args.vocab_size)
    corpus = bert.tokenize_corpus(articles, tokenizer)
    run = argparse.Namespace(seed=0, max_seq_len=args.seq_len, batch_size=args.batch_size, grad_accum_steps=1)
    pairs, batches, _ = bert.training_batches(corpus, run, epoch=0)
    dataset = bert.PretrainingBatches(corpus, pairs, batches, args.seq_len, 0.15,
                                      tokenizer.get_vocab_size(), seed=0, epoch=0)
    return [dataset[i] for i in range(n)], tokenizer.get_vocab_size()


def make_step(model, kind, device, dtype):
    """One full training step of `model` on a batch; `kind` says how to call it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            fused=True)  # the same optimizer on both sides

    def step(batch):
        with bert.autocast_for(device, dtype):
            if kind == "ours":
                no_padding = bool(batch["attention_mask"].all())
                out = model(**bert.model_inputs(bert.batch_to_device(batch, device), no_padding))
            else:
                b = bert.batch_to_device(batch, device)
                out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                            attention_mask=b["attention_mask"], labels=b["mlm_labels"],
                            next_sentence_label=b["nsp_labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, repeats=10):
    """Measured FLOP/s of a large square matmul: the practical ceiling for this machine."""
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
    T = batch["input_ids"].size(1)
    tokens = int(batch["attention_mask"].sum())
    # transformers projects every position onto the vocabulary; we only the masked ones.
    fraction = 1.0 if every_position else len(batch["mlm_positions"]) / tokens
    return model.flops_per_token(T, fraction) * tokens, tokens


def peak_memory_child(args, side, mode):
    """Peak resident memory of a process that only trains `side` (CPU), in GiB."""
    cmd = [sys.executable, __file__, "--_memory_of", side, "--modes", mode,
           "--model_size", args.model_size, "--vocab_size", str(args.vocab_size),
           "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--device", args.device]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def run_mode(args, mode, device, batches, vocab_size):
    dtype = torch.float32 if mode == "fp32" else bert.resolve_dtype("auto", device)
    torch.manual_seed(0)
    ours = bert.BertForPreTraining(bert.config_for(args.model_size, vocab_size)).to(device).train()
    hf = hf_model_like(ours).to(device).train()
    sides = {"ours": ours, "transformers": hf}
    compiled = {}
    if mode == "best" and args.compile:
        for name in sides:
            compiled[name] = torch.compile(sides[name])
    steps = {name: make_step(compiled.get(name, m), name, device, dtype) for name, m in sides.items()}
    print(f"\n[{mode}] dtype {str(dtype)[6:]}{', torch.compile' if compiled else ''}; "
          f"warm-up {args.warmup} steps per side ...", flush=True)
    for name, step in steps.items():
        for b in batches[:args.warmup]:
            step(b)
    sync(device)
    times = {name: [] for name in sides}
    totals = {name: {"flops": 0.0, "tokens": 0, "seconds": 0.0} for name in sides}
    peak_mem = {name: 0.0 for name in sides}  # CUDA: peak allocated while that side trains
    k = args.warmup
    for r in range(args.rounds):
        for name in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
            round_batches = [batches[(k + i) % len(batches)] for i in range(args.steps)]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t = time.perf_counter()
            for b in round_batches:
                steps[name](b)
            sync(device)
            dt = time.perf_counter() - t
            if device.type == "cuda":
                peak_mem[name] = max(peak_mem[name], torch.cuda.max_memory_allocated() / 2 ** 30)
            n_tok = 0
            for b in round_batches:
                f, n = step_flops(ours, b, every_position=name == "transformers")
                totals[name]["flops"] += f
                n_tok += n
            totals[name]["tokens"] += n_tok
            totals[name]["seconds"] += dt
            times[name].append(n_tok / dt)
        k += args.steps
    peak = matmul_peak(device, torch.float32 if mode == "fp32" else dtype)
    result = {"mode": mode, "dtype": str(dtype)[6:], "compile": bool(compiled), "peak_flops": peak}
    for name in sides:
        t = totals[name]
        achieved = t["flops"] / t["seconds"]
        result[name] = {"tokens_per_s": statistics.median(times[name]), "tokens_per_s_rounds": times[name],
                        "flops_per_token": t["flops"] / t["tokens"], "achieved_flops": achieved,
                        "mfu": achieved / peak}
        if device.type == "cuda":
            result[name]["peak_memory_gib"] = peak_mem[name]
    result["ratio"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    if args.profile:
        for name in sides:
            print_profile(name, steps[name], batches[:3], device)
    return result


def print_profile(name, step, batches, device, top=12):
    """Where a training step's time goes: the top operators by self time, per step."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    print(f"  profile of {name}, per step ({'GPU' if device.type == 'cuda' else 'CPU'} time):")
    for e in events[:top]:
        t = getattr(e, key)
        print(f"    {t / len(batches) / 1000:7.1f} ms  {t / total:5.1%}  {e.key[:70]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default="mini", choices=list(bert.PRESETS))
    p.add_argument("--vocab_size", type=int, default=30522)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--data_dir", default=None, help="real WikiText-2 batches instead of synthetic ones")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", nargs="+", default=["fp32", "best"], choices=["fp32", "best"])
    p.add_argument("--compile", action="store_true", help="torch.compile both sides in 'best' mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="steps per side per round")
    p.add_argument("--memory", action="store_true", help="also peak RSS per side (CPU, child processes)")
    p.add_argument("--profile", action="store_true", help="also the top operators of each side's step")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--_memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)

    if args.data_dir:
        batches, vocab_size = wikitext_batches(args.warmup + args.rounds * args.steps, args)
    else:
        vocab_size = args.vocab_size
        batches = synthetic_batches(args.warmup + args.rounds * args.steps, args.batch_size,
                                    args.seq_len, vocab_size, 0.15)

    if args._memory_of:  # child process: train one side a few steps, print peak RSS in GiB
        dtype = torch.float32 if args.modes[0] == "fp32" else bert.resolve_dtype("auto", device)
        torch.manual_seed(0)
        ours = bert.BertForPreTraining(bert.config_for(args.model_size, vocab_size)).train()
        model = ours if args._memory_of == "ours" else hf_model_like(ours).train()
        if args._memory_of != "ours":
            del ours
        step = make_step(model, args._memory_of, device, dtype)
        for b in batches[:5]:
            step(b)
        print(bert.peak_memory_gib())
        return

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    source = "WikiText-2 batches (length-grouped, dynamic padding)" if args.data_dir else "synthetic full-length batches"
    print(f"machine: {where}; torch {torch.__version__}")
    print(f"model: {args.model_size}, vocab {vocab_size:,}; batch {args.batch_size} x {args.seq_len}, {source}")
    print(f"{args.rounds} alternating rounds x {args.steps} steps per side after {args.warmup} warm-up steps")
    results = []
    for mode in args.modes:
        r = run_mode(args, mode, device, batches, vocab_size)
        if args.memory and device.type == "cpu":
            for side in ("ours", "transformers"):
                r[side]["peak_rss_gib"] = peak_memory_child(args, side, mode)
        results.append(r)
        for side in ("ours", "transformers"):
            s = r[side]
            mem = (f", peak RSS {s['peak_rss_gib']:.2f} GiB" if "peak_rss_gib" in s else
                   f", peak GPU memory {s['peak_memory_gib']:.2f} GiB (both models resident)"
                   if "peak_memory_gib" in s else "")
            print(f"  {side:13s} {s['tokens_per_s']:9,.0f} tokens/s  (rounds {min(s['tokens_per_s_rounds']):,.0f}"
                  f"-{max(s['tokens_per_s_rounds']):,.0f})  {s['flops_per_token'] / 1e6:5.1f} MFLOP/token  "
                  f"{s['achieved_flops'] / 1e9:6.1f} GFLOP/s = {s['mfu']:.0%} of peak{mem}")
        print(f"  ratio ours / transformers: {r['ratio']:.2f}x   "
              f"(matmul peak {r['peak_flops'] / 1e9:,.0f} GFLOP/s in {r['dtype']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
