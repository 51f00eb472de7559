"""
What limits next-sentence prediction? For a trained checkpoint this prints NSP accuracy under the
evaluation protocol of test_mini_bert.py --eval (fixed-seed negatives from other articles and
fixed-seed MLM masks), broken down

- by class: true next sentences (label 0) and random ones (label 1),
- by pair length (the real tokens of A and B, in quartiles of the test split),
- on the test split and on a sample of training pairs drawn the same way: positives are the same
  pairs every epoch, so a model that memorises them scores higher on training pairs than on
  unseen text.

    python benchmarks/nsp_study.py --checkpoint checkpoints/bert-mini-wikitext2.pt \
        --data_dir DATA
"""

import argparse
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import BERT_from_scratch as bert  # noqa: E402


@torch.no_grad()
def nsp_outcomes(model, corpus, pairs, max_seq_len, mask_prob, vocab_size):
    """(correct, label, length) per pair, in the order of `pairs`."""
    order = np.argsort(bert.pair_lengths(corpus, pairs, max_seq_len), kind="stable")
    batches = [order[i:i + 32] for i in range(0, len(order), 32)]
    dataset = bert.PretrainingBatches(corpus, pairs, batches, max_seq_len, mask_prob, vocab_size,
                                      bert.EVAL_SEED, 0)
    correct, length = np.zeros(len(pairs), bool), np.zeros(len(pairs), int)
    for i in range(len(dataset)):
        batch = dataset[i]
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        correct[batches[i]] = (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).numpy()
        length[batches[i]] = batch["attention_mask"].sum(1).numpy() - 3  # A and B, no specials
    return correct, pairs[:, 2], length


def report(name, correct, label, length, edges):
    pos, neg = correct[label == 0].mean(), correct[label == 1].mean()
    print(f"{name:<22} {len(correct):>7,} pairs  NSP acc {correct.mean():.2%}  "
          f"(true next {pos:.2%}, random {neg:.2%})")
    bins = np.digitize(length, edges)
    for q in range(len(edges) + 1):
        lo = 1 if q == 0 else edges[q - 1]
        hi = f"{edges[q] - 1}" if q < len(edges) else "max"
        sel = bins == q
        print(f"    A+B {lo:>3}-{hi:<4} tokens: {sel.sum():>7,} pairs  NSP acc {correct[sel].mean():.2%}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--train_pairs", type=int, default=20000, help="training pairs to sample")
    args = p.parse_args()
    model, tokenizer = bert.load_checkpoint(args.checkpoint)
    saved = bert.read_checkpoint(args.checkpoint).get("args", {})
    max_seq_len, mask_prob = saved.get("max_seq_len", 128), saved.get("mask_prob", 0.15)
    data_args = Namespace(dataset_config="wikitext-2-v1", data_dir=args.data_dir, vocab_size=None)
    _, corpora = bert.prepare_data(data_args, tokenizer, splits=("train", "test"), log=lambda *a: None)
    V = tokenizer.get_vocab_size()

    test = corpora["test"]
    test_pairs = bert.build_pairs(test, bert.rng_for(bert.EVAL_SEED, 0, bert.PAIR_STREAM))
    test_result = nsp_outcomes(model, test, test_pairs, max_seq_len, mask_prob, V)
    edges = np.quantile(test_result[2], [0.25, 0.5, 0.75]).astype(int) + 1

    train = corpora["train"]
    train_pairs = bert.build_pairs(train, bert.rng_for(bert.EVAL_SEED, 0, bert.PAIR_STREAM))
    sample = np.random.default_rng(0).choice(len(train_pairs), args.train_pairs, replace=False)
    train_result = nsp_outcomes(model, train, train_pairs[sample], max_seq_len, mask_prob, V)

    print(f"{args.checkpoint}: NSP accuracy by class and by pair length (quartiles of the test split)")
    report("test split", *test_result, edges)
    report("training pairs (sample)", *train_result, edges)


if __name__ == "__main__":
    main()
