"""
How large should the WordPiece vocabulary be for WikiText-2? For each candidate size this prints
what the choice costs and buys, all measured on the data:

- pieces per word (longer sequences cost compute and shorten the context of a 128-token pair),
- how many vocabulary entries the training split uses rarely (embeddings that barely train),
- the share of the mini model's parameters in the embedding matrix,
- unknown pieces ([UNK] other than WikiText's own <unk>) in the test split.

    python benchmarks/vocab_study.py --data_dir DATA
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import BERT_from_scratch as bert  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 30522])
    args = p.parse_args()
    lines = bert.load_wikitext("wikitext-2-v1", args.data_dir, ["train", "test"])
    articles = {split: bert.split_articles(lines[split]) for split in lines}
    words = {split: sum(len(s.split()) for a in articles[split] for s in a) for split in articles}
    word_types = len({w.lower() for a in articles["train"] for s in a for w in s.split()})
    print(f"train: {words['train']:,} words, {word_types:,} distinct (lowercased); test: {words['test']:,} words")
    print(f"{'vocab':>7} {'train s':>7} {'pieces/word':>11} {'test pieces/word':>16} "
          f"{'pairs >128':>10} {'used <10x':>9} {'unused':>7} {'test [UNK]':>10} {'emb. share (mini)':>17}")
    for size in args.sizes:
        t = time.time()
        tokenizer = bert.train_tokenizer(articles["train"], size)
        elapsed = time.time() - t
        corpora = {split: bert.tokenize_corpus(articles[split], tokenizer) for split in articles}
        V = tokenizer.get_vocab_size()
        counts = np.bincount(corpora["train"].ids, minlength=V)[bert.N_SPECIAL:]
        pairs = bert.build_pairs(corpora["train"], np.random.default_rng(0))
        raw = corpora["train"].lengths()[pairs[:, 0]] + corpora["train"].lengths()[pairs[:, 1]] + 3
        # [UNK] pieces beyond WikiText's own <unk> markers: words the vocabulary cannot spell.
        own_unk = sum(s.count("[UNK]") for a in articles["test"] for s in a)
        extra_unk = int((corpora["test"].ids == bert.UNK_ID).sum()) - own_unk
        model = bert.BertForPreTraining(bert.config_for("mini", V))
        share = V * model.config.hidden_size / model.num_parameters()
        print(f"{V:>7,} {elapsed:>6.1f}s {len(corpora['train'].ids) / words['train']:>11.3f} "
              f"{len(corpora['test'].ids) / words['test']:>16.3f} {(raw > 128).mean():>10.2%} "
              f"{(counts < 10).mean():>9.1%} {(counts == 0).mean():>7.1%} {extra_unk:>10,} "
              f"{share:>10.0%} of {model.num_parameters() / 1e6:.1f}M")


if __name__ == "__main__":
    main()
