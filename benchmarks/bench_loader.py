"""
How fast the training batches come: one epoch's pairs drawn and grouped, then batches built,
masked and padded to their static shapes, in this process and through the DataLoader with worker
processes (what training uses). A step on a large GPU takes about a millisecond, so the loader
must deliver well over a thousand batches a second.

    python benchmarks/bench_loader.py --data_dir DATA
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import BERT_from_scratch as bert  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--pad_multiple", type=int, default=16)
    p.add_argument("--batches", type=int, default=3000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--pin_memory", action="store_true", help="as on CUDA (needs a GPU)")
    args = p.parse_args()
    args.seed, args.max_seq_len, args.grad_accum_steps, args.vocab_size = 0, 128, 1, 16384
    args.dataset_config, args.tokenizer_sample = "wikitext-2-v1", bert.TOKENIZER_SAMPLE
    tokenizer, corpora = bert.prepare_data(args, splits=("train",), log=lambda *a: None)
    t = time.perf_counter()
    pairs, batches, padding = bert.training_batches(corpora["train"], args, epoch=0)
    print(f"epoch's pairs drawn and grouped: {time.perf_counter() - t:.2f}s ({len(batches):,} batches of "
          f"{args.batch_size}, padding {padding:.1%} with multiples of {args.pad_multiple}); "
          f"{torch.get_num_threads()} threads")
    dataset = bert.PretrainingBatches(corpora["train"], pairs, batches, args.max_seq_len, 0.15,
                                      tokenizer.get_vocab_size(), 0, 0, args.pad_multiple)
    n = min(args.batches, len(dataset))
    t = time.perf_counter()
    for i in range(n):
        dataset[i]
    print(f"in this process: {n / (time.perf_counter() - t):8,.0f} batches/s")
    for workers in args.workers:
        loader = iter(bert.make_loader(dataset, workers, pin_memory=args.pin_memory))
        next(loader)  # workers started
        t = time.perf_counter()
        for _ in range(n - 1):
            next(loader)
        print(f"DataLoader, {workers} worker(s): {(n - 1) / (time.perf_counter() - t):8,.0f} batches/s")


if __name__ == "__main__":
    main()
