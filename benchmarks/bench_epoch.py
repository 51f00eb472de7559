"""
One WikiText-2 epoch of the user's workload: this project's training script against
transformers' BertForPreTraining fed by the usual recipe.

- ours: `BERT_from_scratch.py --epochs 1` run for real (length-grouped batches, dynamic padding,
  masked-only prediction, bf16 autocast where the CPU has it); its own log gives the epoch's
  training time and tokens/s.
- transformers: the same epoch's pairs (same tokenizer and model config), each padded to 128
  tokens, in random order, masked by DataCollatorForLanguageModeling, fp32 (the Trainer's
  default on CPU; --hf_bf16 adds a bf16-autocast run), AdamW and gradient clipping as the
  Trainer does. A full epoch of it takes hours on a CPU, so it is timed over --hf_steps steps
  after warm-up and extrapolated to the epoch's number of steps.

    python benchmarks/bench_epoch.py --data_dir DATA --batch_size 16
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import BERT_from_scratch as bert  # noqa: E402
from bench_train import hf_model_like  # noqa: E402


def run_ours(args):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "BERT_from_scratch.py"), "--device", "cpu", "--epochs", "1",
               "--batch_size", str(args.batch_size), "--data_dir", args.data_dir,
               "--vocab_size", str(args.vocab_size), "--checkpoint", f"{tmp}/epoch.pt"]
        print("ours:", " ".join(cmd[1:]), flush=True)
        t = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t
    log = out.stdout + out.stderr
    if out.returncode != 0:
        sys.exit(log[-3000:])
    m = re.search(r"epoch 1: ([\d,]+)s of training, ([\d,]+) tokens/s", log)
    padding = re.search(r"padding ([\d.]+)% of tokens", log)
    seconds, tps = float(m.group(1).replace(",", "")), float(m.group(2).replace(",", ""))
    print(f"ours: epoch trained in {seconds:,.0f}s at {tps:,.0f} tokens/s, padding {padding.group(1)}%; "
          f"{wall:,.0f}s with data preparation and evaluation")
    return seconds, tps


def run_transformers(args, tokenizer, corpus, dtype):
    import transformers

    pairs = bert.build_pairs(corpus, bert.rng_for(0, 0, bert.PAIR_STREAM))
    n_steps_epoch = len(pairs) // args.batch_size
    hf_tokenizer = transformers.BertTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")
    collator = transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.15)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pairs))  # the usual random order, no grouping by length

    def batch(i):
        examples = []
        for j in order[i * args.batch_size:(i + 1) * args.batch_size]:
            a, b = corpus.sentence(pairs[j, 0]).tolist(), corpus.sentence(pairs[j, 1]).tolist()
            la, lb = bert.truncated_lengths(len(a), len(b), 128)
            ids = [bert.CLS_ID, *a[:la], bert.SEP_ID, *b[:lb], bert.SEP_ID]
            types = [0] * (la + 2) + [1] * (lb + 1)
            pad = 128 - len(ids)  # every pair padded to 128, as with padding="max_length"
            examples.append({"input_ids": ids + [bert.PAD_ID] * pad, "token_type_ids": types + [0] * pad,
                             "attention_mask": [1] * len(ids) + [0] * pad})
        out = collator(examples)
        out["next_sentence_label"] = torch.from_numpy(pairs[order[i * args.batch_size:(i + 1) * args.batch_size], 2])
        return out

    torch.manual_seed(0)
    model = hf_model_like(bert.BertForPreTraining(bert.config_for("mini", tokenizer.get_vocab_size()))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    n_warm, n = 3, args.hf_steps
    real = padded = 0
    for i in range(n_warm + n):
        b = batch(i)
        if i == n_warm:
            t = time.perf_counter()
        if i >= n_warm:
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
        with bert.autocast_for(torch.device("cpu"), dtype):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds_per_step = (time.perf_counter() - t) / n
    epoch = seconds_per_step * n_steps_epoch
    print(f"transformers ({str(dtype)[6:]}): {real / (seconds_per_step * n):,.0f} tokens/s "
          f"({padded / (seconds_per_step * n):,.0f} positions/s with padding, {1 - real / padded:.0%} padding); "
          f"{n_steps_epoch:,} steps of {args.batch_size} -> epoch ~{epoch:,.0f}s (timed over {n} steps)")
    return epoch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=bert.BertConfig.vocab_size)
    p.add_argument("--hf_steps", type=int, default=40)
    p.add_argument("--hf_bf16", action="store_true", help="also time transformers with bf16 autocast")
    p.add_argument("--skip_ours", action="store_true")
    args = p.parse_args()
    print(f"machine: {torch.get_num_threads()} threads; torch {torch.__version__}; mini, batch {args.batch_size}")
    ours = None if args.skip_ours else run_ours(args)
    articles = bert.split_articles(bert.load_wikitext("wikitext-2-v1", args.data_dir, ["train"])["train"])
    tokenizer = bert.train_tokenizer(articles, args.vocab_size)
    corpus = bert.tokenize_corpus(articles, tokenizer)
    dtypes = [torch.float32] + ([bert.resolve_dtype("auto", torch.device("cpu"))] if args.hf_bf16 else [])
    for dtype in dtypes:
        epoch = run_transformers(args, tokenizer, corpus, dtype)
        if ours:
            print(f"  epoch wall time, transformers / ours: {epoch / ours[0]:.1f}x")


if __name__ == "__main__":
    main()
