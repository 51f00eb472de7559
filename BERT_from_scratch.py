"""
BERT pretraining from scratch on WikiText-2: masked language modelling (MLM) and next sentence
prediction (NSP), trained jointly, as in Devlin et al. 2018, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding" (https://arxiv.org/abs/1810.04805).

Everything BERT-specific is written here from standard PyTorch layers; the only outside pieces
are the WikiText-2 download (HF `datasets`) and the WordPiece trainer (HF `tokenizers`).

    python BERT_from_scratch.py --device cuda --epochs 2 --batch_size 16    # --device cpu without a GPU
    python BERT_from_scratch.py --data_dir DIR                              # WikiText's files, offline
    torchrun --nproc_per_node=2 BERT_from_scratch.py --batch_size 16        # data parallel
    python test_mini_bert.py                                                # predictions from the checkpoint

The file reads top to bottom; where each idea of the paper lives:
    config     BertConfig, PRESETS (Google's miniatures)
    model      BertForPreTraining: BertEmbeddings, EncoderLayer (SelfAttention + feed-forward), MLMHead,
               the NSP head, and forward() with the two losses summed
    data       iter_articles (sentences), train_tokenizer (WordPiece), build_pairs (NSP pairs),
               mask_tokens (MLM's 15% and 80/10/10), PretrainingBatches ([CLS] A [SEP] B [SEP], segments)
    training   lr_at (warmup, decay), TrainStep (one optimizer step), evaluate, Run (logs, checkpoints), train()
    command    build_parser, parse_args, main
"""

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config


@dataclass
class BertConfig:
    vocab_size: int = 16384  # WordPiece vocabulary, special tokens included
    hidden_size: int = 256  # H: width of every token vector
    num_hidden_layers: int = 4  # L: encoder layers
    num_attention_heads: int = 4  # A: heads per self-attention; head size is H / A
    intermediate_size: int = 1024  # feed-forward inner width, 4H as in the paper
    max_position_embeddings: int = 512  # rows of the learned position table, as in BERT
    type_vocab_size: int = 2  # segments: 0 for "[CLS] A [SEP]", 1 for "B [SEP]"
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and on each residual branch
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention weights
    layer_norm_eps: float = 1e-12  # the value of Google's BERT and of transformers
    initializer_range: float = 0.02  # std of the normal init of every weight matrix
    pad_token_id: int = 0  # [PAD]; its embedding row starts at zero (only the tied decoder updates it)


# Google's official BERT miniatures (github.com/google-research/bert, "smaller BERT models"):
# name -> (layers L, hidden size H, attention heads A); the feed-forward width is always 4H.
PRESETS = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
}


def config_for(model_size, vocab_size, dropout=0.1):
    L, H, A = PRESETS[model_size]
    return BertConfig(vocab_size=vocab_size, hidden_size=H, num_hidden_layers=L,
                      num_attention_heads=A, intermediate_size=4 * H,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


# -----------------------------------------------------------------------------
# Model


class BertEmbeddings(nn.Module):
    """Token + learned position + segment embeddings, summed, then LayerNorm and dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))  # (B, T, H)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention; query, key and value come from one fused (H, 3H) projection."""

    def __init__(self, config):
        super().__init__()
        assert config.hidden_size % config.num_attention_heads == 0
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        B, T, H = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, H // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs) + mask) v, by PyTorch's fused attention where it applies; attn_mask
        # is (B, 1, 1, T), True where the key is a real token, or None when no attention_mask is given.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, nh * hs)
        return self.out(y)


class EncoderLayer(nn.Module):
    """One Transformer encoder layer, post-LN as in the paper: x = LayerNorm(x + Dropout(f(x)))."""

    def __init__(self, config):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),  # the exact, erf-based GELU of BERT
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, attn_mask):
        x = self.attn_norm(x + self.dropout(self.attn(x, attn_mask)))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x


class MLMHead(nn.Module):
    """Dense -> GELU -> LayerNorm, then a decoder to the vocabulary that shares the token
    embedding matrix (tied in BertForPreTraining) and has its own output bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h):
        return self.decoder(self.norm(F.gelu(self.dense(h))))


@dataclass
class PreTrainingOutput:
    loss: torch.Tensor | None  # mlm_loss + nsp_loss (whichever labels were given)
    mlm_loss: torch.Tensor | None  # mean cross-entropy over the masked positions
    nsp_loss: torch.Tensor | None  # mean cross-entropy over the pairs
    mlm_logits: torch.Tensor  # (B, T, V) without mlm_labels; with them (len(mlm_positions), V)
    nsp_logits: torch.Tensor  # (B, 2): class 0 = "B follows A", class 1 = "B is random"


class BertForPreTraining(nn.Module):
    """The BERT encoder with its two pretraining heads.

    NSP labels follow Google's and transformers' convention: 0 = "B is the sentence that follows
    A", 1 = "B is a random sentence". MLM labels hold the original token id at the positions
    chosen for prediction and -100 everywhere else.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)  # tanh(W h_[CLS] + b)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self.mlm_head = MLMHead(config)
        self.apply(self._init_weights)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight  # weight tying

    def _init_weights(self, module):
        # BERT's init: N(0, 0.02) weights, zero biases, LayerNorm at identity (PyTorch's default).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])

    def encode(self, input_ids, token_type_ids, attention_mask=None):
        """The encoder: one contextual vector per token, (B, T, H). attention_mask is 1 at real
        tokens and 0 at padding (None: no padding)."""
        attn_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        h = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for layer in self.layers:
            h = layer(h, attn_mask)
        return h

    def pool(self, h):
        """BERT's pooler: tanh(W h_[CLS] + b), the sequence summary the NSP head (and fine-tuned
        classifiers) read."""
        return torch.tanh(self.pooler(h[:, 0]))  # (B, H)

    def forward(self, input_ids, token_type_ids, attention_mask=None, mlm_labels=None,
                nsp_labels=None, mlm_positions=None):
        """input_ids, token_type_ids, attention_mask, mlm_labels: (B, T); nsp_labels: (B,).

        attention_mask is 1 at real tokens and 0 at padding (None: no padding). mlm_positions
        optionally gives the flat indices of the masked positions, computed by the data loader on
        the host so that training never waits on the device to count them; it may be padded to a
        fixed length with positions whose label is -100, which carry no loss.
        """
        h = self.encode(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        nsp_logits = self.nsp_head(self.pool(h))  # (B, 2) from [CLS]

        mlm_loss = nsp_loss = None
        if mlm_labels is None:
            mlm_logits = self.mlm_head(h)  # (B, T, V): every position, for inference
        else:
            # "Sparse prediction": the vocabulary projection, the largest matmul of the model,
            # runs only at the ~15% of positions that carry a label.
            if mlm_positions is None:
                mlm_positions = (mlm_labels.view(-1) != -100).nonzero().squeeze(1)
            # gather, whose backward is a scatter-add: torch.compile turns the backward of plain
            # indexing into a dense (B*T x n_masked) comparison that costs more than the model.
            h_masked = h.flatten(0, 1).gather(0, mlm_positions[:, None].expand(-1, h.size(-1)))  # (n_masked, H)
            mlm_logits = self.mlm_head(h_masked)  # (n_masked, V)
            targets = mlm_labels.view(-1).index_select(0, mlm_positions)
            # The mean over targets != -100; 0, not 0/0, for a batch without any (a pair of only
            # [UNK] and specials has no token to mask).
            n_targets = (targets != -100).sum().clamp(min=1)
            mlm_loss = F.cross_entropy(mlm_logits.float(), targets, reduction="sum") / n_targets
        if nsp_labels is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(losses) if losses else None  # the paper's objective: the two losses summed
        return PreTrainingOutput(loss, mlm_loss, nsp_loss, mlm_logits, nsp_logits)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # the tied matrix counts once

    def optimizer_groups(self, weight_decay):
        # Decay every matrix (linear weights, embeddings); no decay on biases and LayerNorm.
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def flops_per_token(self, seq_len, mask_prob):
        """Matmul FLOPs of one training step (forward + backward = 3x forward) per token."""
        c = self.config
        H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        encoder = L * (2 * H * 3 * H + 2 * H * H + 2 * 2 * H * I)  # qkv, out, two FFN matmuls
        attention = L * 2 * 2 * seq_len * H  # q k^T and (attention weights) v
        mlm = mask_prob * (2 * H * H + 2 * H * V)  # transform + decoder, masked positions only
        return 3 * (encoder + attention + mlm)


# -----------------------------------------------------------------------------
# Data

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
N_SPECIAL = len(SPECIAL_TOKENS)  # every id >= N_SPECIAL is an ordinary WordPiece token
SPLITS = ("train", "validation", "test")
# A split's file in --data_dir, by any of its names: ours (the hub's split names), those in
# Salesforce's WikiText zips, and pytorch/examples' valid.txt.
SPLIT_FILES = {"train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
               "validation": ("validation.txt", "valid.txt", "wiki.valid.tokens", "wiki.valid.raw"),
               "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw")}
DATASET_CONFIGS = ["wikitext-2-v1", "wikitext-2-raw-v1", "wikitext-103-v1", "wikitext-103-raw-v1"]  # on the hub
EVAL_SEED = 1234  # evaluation pairs and masks never change, so runs compare
TOKENIZER_SAMPLE = 250_000  # the vocabulary is learned from at most this many sentences (benchmarks/README.md)


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file): printed as one line, no traceback."""


def error_line(e):
    """An exception as one line for a UserError: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_from_hub(name, config):
    """datasets.load_dataset, quietly: no progress bars, and no line per retry when offline."""
    import datasets  # imported here: only the hub path needs it
    import huggingface_hub
    datasets.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()
    return datasets.load_dataset(name, config)


def load_wikitext(dataset_config, data_dir, splits=SPLITS):
    """The raw lines of each split, from a local copy (data_dir) or from the HuggingFace hub, as
    iterables read afresh on every pass: a split is never held in memory whole."""
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise UserError(f"--data_dir {data_dir} is not a folder (it should hold WikiText's train.txt, "
                            "validation.txt and test.txt, or wiki.train.tokens, wiki.valid.tokens and "
                            "wiki.test.tokens)")
        files = {}
        for split in splits:
            found = [Path(data_dir) / name for name in SPLIT_FILES[split] if (Path(data_dir) / name).is_file()]
            if not found:
                raise UserError(f"--data_dir {data_dir} has no {split} split (no {' or '.join(SPLIT_FILES[split])})")
            if len(found) > 1:
                raise UserError(f"--data_dir {data_dir} has {' and '.join(p.name for p in found)}: "
                                f"which is the {split} split? Keep one")
            files[split] = TextFile(found[0])
        return files
    try:
        ds = load_from_hub("Salesforce/wikitext", dataset_config)
        return {split: ds[split]["text"] for split in splits}  # (datasets 4+ reads columns lazily)
    except Exception as e:
        raise UserError(
            f"could not load Salesforce/wikitext '{dataset_config}' from the HuggingFace hub or its "
            f"cache ({error_line(e)}). Without network, pass --data_dir DIR with train.txt/validation.txt/"
            "test.txt (or wiki.*.tokens), or set HF_HUB_OFFLINE=1 with a prepared datasets cache in HF_HOME.") from None


@dataclass
class TextFile:
    """A text file's lines, read line by line on every pass over them."""
    path: Path

    def __iter__(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                yield from f
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {self.path} as UTF-8 text: {e}") from None


_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = " starts an article
_HEADING = re.compile(r"^ = = .* = = $")  # " = = Section = = " (any depth) is no sentence
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")  # WikiText splits sentence-final punctuation off


def normalize_wikitext(line):
    """Undo WikiText's tokenization marks: "1 @,@ 000" -> "1,000", "<unk>" -> "[UNK]"."""
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    return line.replace("<unk>", "[UNK]")


def iter_articles(lines):
    """WikiText lines -> articles, one at a time, each a list of sentences (headings and blank
    lines dropped). Reads the lines as it goes: one line of look-ahead, one article held."""
    article, previous = None, ""
    for line, following in itertools.pairwise(itertools.chain((l.rstrip("\n") for l in lines), [""])):
        title = _TITLE.match(line)
        if title or _HEADING.match(line):  # (headings are no sentences)
            # A title stands between blank lines; " = Played , W = " inside a table does not.
            if title and not previous.strip() and not following.strip():
                if article is not None:
                    yield article
                article = []
        elif line.strip():
            if article is None:  # text before the first title: an article of its own
                article = []
            text = " " + normalize_wikitext(line.strip())
            article.extend(s.strip() for s in _SENTENCE_END.split(text) if s.strip())
        previous = line
    if article is not None:
        yield article


def split_articles(lines):
    return list(iter_articles(lines))


def sentence_chunks(articles, size):
    """(sentences, the index of each one's article), about `size` sentences at a time."""
    sentences, article = [], []
    for a, sentences_of_a in enumerate(articles):
        sentences += sentences_of_a
        article += [a] * len(sentences_of_a)
        if len(sentences) >= size:
            yield sentences, article
            sentences, article = [], []
    if sentences:
        yield sentences, article


def sample_sentences(articles, n, seed=0):
    """n sentences drawn at random without replacement, in the order of the text (all of them
    when there are no more than n). One pass that holds n sentences and a chunk: sentence i gets a
    random key that depends only on (seed, i), and the sample is the n sentences of smallest key."""
    kept, keys, count = [], np.zeros(0, np.uint64), 0
    for sentences, _ in sentence_chunks(articles, n):
        kept += sentences
        index, count = np.arange(count, count + len(sentences)), count + len(sentences)
        keys = np.concatenate([keys, random_bits((seed, 0, SAMPLE_STREAM), index)])
        if len(kept) > n:
            best = np.sort(np.argpartition(keys, n)[:n])  # in text order
            kept, keys = [kept[i] for i in best], keys[best]
    return kept


def train_tokenizer(articles, vocab_size):
    """A lowercase WordPiece vocabulary learned from the given (training) articles."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    def bert_tokenizer(model):
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer

    # The trainer does not treat "[UNK]" in its input as special and would learn "unk" from it,
    # so it sees the text without the placeholders.
    text = [s.replace("[UNK]", " ") for article in articles for s in article]
    # The trainer numbers the "##x" continuation pieces in hash-map order and breaks ties between
    # equally frequent merges by number, so the same text can give another vocabulary on every
    # run (huggingface/tokenizers#1794). Declared up front, in sorted order, they get fixed
    # numbers and training becomes deterministic.
    tokenizer = bert_tokenizer(models.WordPiece(unk_token="[UNK]"))
    chunks = set()
    for i in range(0, len(text), 10_000):  # (all the words of a large text at once would take gigabytes)
        chunks.update(tokenizer.normalizer.normalize_str("\n".join(text[i:i + 10_000])).split())
    pieces = set()
    for chunk in chunks:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(chunk):
            pieces.update("##" + c for c in word[1:])
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=SPECIAL_TOKENS + sorted(pieces))
    tokenizer.train_from_iterator(text, trainer)

    # A fresh tokenizer over the learned vocabulary, numbered in sorted order after the special
    # tokens, and with only the five real special tokens.
    learned = sorted(set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS))
    tokenizer = bert_tokenizer(models.WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS + learned)},
                                                unk_token="[UNK]"))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
    return tokenizer


def learn_tokenizer(lines, args):
    """WordPiece learned from a sample of args.tokenizer_sample sentences of the train split (its
    every sentence, in order, when it has no more): memory and time stay bounded on a large split.
    The sample's seed is fixed: the vocabulary is part of the data, the same for every --seed."""
    return train_tokenizer([sample_sentences(iter_articles(lines), args.tokenizer_sample)], args.vocab_size)


def tokenizer_from_json(text):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(text)


@dataclass
class Corpus:
    """One split, tokenized: all sentences' ids end to end, and the article of each sentence."""
    ids: np.ndarray  # (n_tokens,) int32
    offsets: np.ndarray  # (n_sentences + 1,) int64: sentence i is ids[offsets[i]:offsets[i + 1]]
    article: np.ndarray  # (n_sentences,) int64

    def __len__(self):
        return len(self.article)

    def sentence(self, i):
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self):
        return np.diff(self.offsets)


def tokenize_corpus(articles, tokenizer, chunk=10_000):
    """A split's articles (a list, or read as it goes) -> Corpus, a chunk of sentences at a time:
    what it holds grows with the token ids, not with the text."""
    ids, lengths, article = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    pieces = {}  # every word's WordPiece ids, shared by the chunks
    for sentences, article_of in sentence_chunks(articles, chunk):
        chunk_ids, chunk_lengths = encode_sentences(sentences, tokenizer, pieces)
        keep = chunk_lengths > 0  # a sentence of characters the normalizer removes entirely
        ids.append(chunk_ids)
        lengths.append(chunk_lengths[keep])
        article.append(np.array(article_of)[keep])
    lengths = np.concatenate(lengths)
    return Corpus(np.concatenate(ids), np.concatenate([[0], np.cumsum(lengths)]), np.concatenate(article))


def encode_sentences(sentences, tokenizer, pieces):
    """The sentences' token ids end to end, and each one's length. The tokenizer splits at every
    space and splits a word the same way wherever it occurs, so it sees each distinct word once
    (WikiText repeats its words, and a Python dict look-up is faster than WordPiece)."""
    words = " ".join(sentences).split(" ")
    new = list(set(words).difference(pieces))
    pieces.update(zip(new, (e.ids for e in tokenizer.encode_batch_fast(new, add_special_tokens=False))))
    ids_of_words = list(map(pieces.__getitem__, words))
    word_lengths = np.fromiter(map(len, ids_of_words), np.int64, len(words))
    ids = np.fromiter(itertools.chain.from_iterable(ids_of_words), np.int32, word_lengths.sum())
    n_words = np.fromiter((s.count(" ") + 1 for s in sentences), np.int64, len(sentences))
    return ids, np.add.reduceat(word_lengths, np.cumsum(n_words) - n_words)


def rng_for(seed, epoch, stream):
    # One independent random stream per (seed, epoch, purpose).
    return np.random.default_rng([seed, epoch, stream])


PAIR_STREAM, ORDER_STREAM, MASK_STREAM, SAMPLE_STREAM = 1, 2, 3, 4


def splitmix64(x):
    """splitmix64's output function: a bijective mix of 64-bit integers (uint64 arrays wrap)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=64)
def stream_seed(*key):
    """A 64-bit seed for each tuple of integers: (seed, epoch, purpose, ...)."""
    seed = np.zeros(1, np.uint64)
    for k in key:
        seed = splitmix64(seed ^ np.uint64(k))
    return seed


def random_bits(key, counter):
    """Random 64-bit integers, one per entry of `counter`: item `counter` of the splitmix64
    sequence seeded by the tuple `key`. A counter-based generator, so the random numbers of any
    item can be drawn on their own, in any order, vectorised over a whole batch."""
    return splitmix64(stream_seed(*key) + np.asarray(counter, np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def build_pairs(corpus, rng):
    """NSP pairs (sentence_a, sentence_b, nsp_label), as (n_pairs, 3) int64.

    Every two consecutive sentences of an article are a positive (label 0). For each positive, a
    negative (label 1) pairs the same first sentence with a random sentence from a different
    article, so the random B can never be the true next sentence.
    """
    article = corpus.article
    first = np.flatnonzero(article[:-1] == article[1:])
    if len(first) == 0:
        raise UserError("the corpus has no article with two sentences: no next-sentence pairs")
    if article[0] == article[-1]:
        raise UserError("the corpus has a single article: NSP negatives need a second one")
    random_b = rng.integers(0, len(article), len(first))
    same = article[random_b] == article[first]
    while same.any():  # redraw the few that landed in A's own article
        random_b[same] = rng.integers(0, len(article), same.sum())
        same = article[random_b] == article[first]
    positives = np.stack([first, first + 1, np.zeros_like(first)], axis=1)
    negatives = np.stack([first, random_b, np.ones_like(first)], axis=1)
    return np.concatenate([positives, negatives])


def truncated_lengths(len_a, len_b, max_seq_len):
    """Lengths of A and B after "longest first" truncation to fit [CLS] A [SEP] B [SEP] in
    max_seq_len: tokens come off the end of the longer side, one at a time (B first on ties),
    so no pair is ever dropped. Works on ints and on numpy arrays alike."""
    budget = max_seq_len - 3
    new_b = np.minimum(len_b, np.maximum(budget - len_a, budget // 2))
    new_a = np.minimum(len_a, budget - new_b)
    return new_a, new_b


def mask_tokens(input_ids, pair_index, seed, epoch, mask_prob, vocab_size):
    """BERT's masking of a batch of sequences (B, T), in place. Returns the labels (-100 where
    not selected).

    "We mask 15% of all WordPiece tokens in each sequence at random": mask_prob of the ordinary
    tokens of each sequence are selected, at least one; [CLS], [SEP], [PAD] and [UNK] never are
    (predicting "unknown" teaches nothing). Then, as in the paper, of the selected tokens
    "80% of the time: replace the word with the [MASK] token",
    "10% of the time: replace the word with a random word",
    "10% of the time: keep the word unchanged".
    Row b's random numbers depend only on (seed, epoch, pair_index[b]) and the position, so a
    pair's mask does not depend on the batch, process or accumulation step it lands in.
    """
    B, T = input_ids.shape
    counter = (pair_index.astype(np.uint64)[:, None] << np.uint64(16)) | np.arange(T, dtype=np.uint64)
    choose, action, token = (random_bits((seed, epoch, MASK_STREAM, k), counter) for k in range(3))
    candidate = input_ids >= N_SPECIAL
    n_candidates = candidate.sum(1)
    n = np.maximum(1, (n_candidates * mask_prob + 0.5).astype(np.int64))
    # The n candidates with the smallest random keys: a uniformly random subset of size n.
    keys = np.where(candidate, choose, np.uint64(2 ** 64 - 1))
    nth_key = np.sort(keys, axis=1)[np.arange(B), n - 1]
    selected = candidate & (keys <= nth_key[:, None])
    labels = np.where(selected, input_ids, -100)
    u = (action >> np.uint64(11)) * 2.0 ** -53  # uniform in [0, 1)
    input_ids[selected & (u < 0.8)] = MASK_ID
    replace = selected & (u >= 0.8) & (u < 0.9)
    input_ids[replace] = N_SPECIAL + (token[replace] % np.uint64(vocab_size - N_SPECIAL)).astype(np.int64)
    return labels


# Static shapes: a batch is padded to the next multiple of pad_multiple (at most max_seq_len), and
# its masked positions to a capacity fixed by that length. So training meets a few shapes, not
# hundreds: oneDNN and torch.compile build kernels for each shape once, and a CUDA graph
# captured for a shape can be replayed for every later batch of that shape.

def padded_length(length, pad_multiple, max_seq_len):
    return np.minimum(-(-length // pad_multiple) * pad_multiple, max_seq_len)


def masked_capacity(seq_len, batch_size, mask_prob):
    """The most masked positions a batch of this shape can have: mask_tokens selects
    max(1, round(mask_prob * n)) of a pair's n <= seq_len - 3 ordinary tokens."""
    return batch_size * max(1, int((seq_len - 3) * mask_prob + 0.5))


class PretrainingBatches(torch.utils.data.Dataset):
    """Item i is batch i of an epoch: its pairs laid out as [CLS] A [SEP] B [SEP], masked afresh,
    padded to a static shape. Built with array operations, a batch at a time, in the training
    process (or in DataLoader workers, with --num_workers).

    mlm_positions holds the flat indices of the masked tokens, then index 0 (row 0's [CLS], whose
    label is -100) up to the shape's capacity: padding slots carry no loss.
    """

    def __init__(self, corpus, pairs, batches, max_seq_len, mask_prob, vocab_size, seed, epoch,
                 pad_multiple=16):
        self.corpus, self.pairs, self.batches = corpus, pairs, batches
        self.max_seq_len, self.mask_prob, self.vocab_size = max_seq_len, mask_prob, vocab_size
        self.seed, self.epoch, self.pad_multiple = seed, epoch, pad_multiple
        self.lengths = corpus.lengths()

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        idx = self.batches[i]
        a, b = self.pairs[idx, 0], self.pairs[idx, 1]
        len_a, len_b = truncated_lengths(self.lengths[a], self.lengths[b], self.max_seq_len)
        end = (len_a + len_b + 3)[:, None]  # (B, 1): one past the final [SEP]
        start_b = len_a[:, None] + 2  # [CLS] A [SEP] comes first
        t = np.arange(padded_length(end.max(), self.pad_multiple, self.max_seq_len))  # (T,)
        in_a, in_b = (t >= 1) & (t < start_b - 1), (t >= start_b) & (t < end - 1)  # (B, T)
        source = np.where(in_a, self.corpus.offsets[a][:, None] + t - 1,
                          self.corpus.offsets[b][:, None] + t - start_b)
        text = in_a | in_b
        input_ids = np.where(text, self.corpus.ids[np.where(text, source, 0)], PAD_ID)
        input_ids = input_ids.astype(np.int64)
        input_ids[:, 0] = CLS_ID
        input_ids[(t == start_b - 1) | (t == end - 1)] = SEP_ID
        token_type_ids = (t >= start_b) & (t < end)  # segment 0: [CLS] A [SEP]; segment 1: B [SEP]
        mlm_labels = mask_tokens(input_ids, idx, self.seed, self.epoch, self.mask_prob, self.vocab_size)
        mlm_positions = np.zeros(masked_capacity(len(t), len(idx), self.mask_prob), np.int64)
        masked = np.flatnonzero(mlm_labels != -100)
        mlm_positions[:len(masked)] = masked
        return {"input_ids": torch.from_numpy(input_ids),
                "token_type_ids": torch.from_numpy(token_type_ids.astype(np.int64)),
                "attention_mask": torch.from_numpy((t < end).astype(np.int64)),
                "mlm_labels": torch.from_numpy(mlm_labels.astype(np.int64)),
                "nsp_labels": torch.from_numpy(self.pairs[idx, 2].astype(np.int64)),
                "mlm_positions": torch.from_numpy(mlm_positions)}


def pair_lengths(corpus, pairs, max_seq_len):
    lengths = corpus.lengths()
    len_a, len_b = truncated_lengths(lengths[pairs[:, 0]], lengths[pairs[:, 1]], max_seq_len)
    return len_a + len_b + 3


def length_grouped_batches(lengths, batch_size, rng, group=64):
    """Batches of pairs of similar length, in random order, so that little of each batch is
    padding: shuffle, sort each run of `group` batches' worth of pairs by length, cut it into
    batches, shuffle the batches. The last incomplete batch is dropped (a different few pairs
    every epoch), so every step, process and accumulation step sees a full batch.
    Returns (n_batches, batch_size) pair indices."""
    order = rng.permutation(len(lengths))
    run, longest = np.arange(len(order)) // (batch_size * group), lengths.max(initial=0)
    order = order[np.argsort(run * (longest + 1) + longest - lengths[order], kind="stable")]  # by run, longest first
    batches = order[:len(order) // batch_size * batch_size].reshape(-1, batch_size)
    return batches[rng.permutation(len(batches))]


def training_batches(corpus, args, epoch, rank=0, world_size=1):
    """(the epoch's pairs, this process's micro-batches in order, the epoch's padding fraction).

    An optimizer step consumes batch_size * grad_accum_steps * world_size pairs; micro-batch k of
    process r is slice (k * world_size + r) of it. So the pairs of a step (and their masks) are
    the same for any split of the same global batch over processes and accumulation steps.
    """
    pairs = build_pairs(corpus, rng_for(args.seed, epoch, PAIR_STREAM))  # fresh negatives
    lengths = pair_lengths(corpus, pairs, args.max_seq_len)
    micro, K = args.batch_size, args.grad_accum_steps
    steps = length_grouped_batches(lengths, micro * K * world_size, rng_for(args.seed, epoch, ORDER_STREAM))
    every = steps.reshape(-1, micro)  # (steps * K * world_size, micro): slice j of step s is row s * K * W + j
    mine = steps.reshape(len(steps), K, world_size, micro)[:, :, rank].reshape(-1, micro)
    padded = padded_length(lengths[every].max(1), args.pad_multiple, args.max_seq_len).sum() * micro
    padding = float(1.0 - lengths[every].sum() / max(padded, 1))
    return pairs, mine, padding


def eval_batches(corpus, max_seq_len, mask_prob, vocab_size, pad_multiple=16, batch_size=32):
    """A split's evaluation set: fixed-seed negatives and masks, batches sorted by length.
    (Batches of 32 evaluate faster on CPU than larger ones, and fragment the heap far less:
    measured 21 s and +0.8 GB peak at 32 against 31 s and +1.4 GB at 128, mini on validation.)"""
    pairs = build_pairs(corpus, rng_for(EVAL_SEED, 0, PAIR_STREAM))
    order = np.argsort(pair_lengths(corpus, pairs, max_seq_len), kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return PretrainingBatches(corpus, pairs, batches, max_seq_len, mask_prob, vocab_size,
                              EVAL_SEED, 0, pad_multiple)


def _ignore_signals(_worker_id):
    # Ctrl-C (and a scheduler's SIGTERM) reach the whole process group; the main process decides
    # how to stop, and the workers keep serving batches until it shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, num_workers, start=0, pin_memory=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=_ignore_signals,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator())  # its own: starting a loader must not move the global RNG


# The cache: the tokenizer and the tokenized splits are computed once for each text and setting.
# An entry is a folder of files and a manifest of their checksums, written under a temporary name
# and renamed into place, so a reader sees a whole entry or none, and checks it before use.

DATA_VERSION = 1  # part of every cache key: bump it when the data code changes what it computes


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bert-from-scratch"


def text_source(args, split):
    """What identifies a split's text: the hub's dataset name, or the file's path, size and mtime."""
    if args.data_dir is None:
        return ["Salesforce/wikitext", args.dataset_config, split]
    path = load_wikitext(args.dataset_config, args.data_dir, [split])[split].path.resolve()  # (or its error)
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


def cache_key(*parts):
    return hashlib.sha256(json.dumps([DATA_VERSION, *parts]).encode()).hexdigest()[:16]


def cached(cache_dir, name, log, build, save, load):
    """load() the cache entry `name` if it is intact; else build() the object, save() it as a new
    entry and return it as loaded back. Without a cache_dir: build() it."""
    folder = cache_dir and Path(cache_dir) / name
    if folder and folder.is_dir():
        try:
            check_entry(folder)
            return load(folder)
        except Exception as e:  # whatever is wrong with it, the entry is rebuilt, never used
            log(f"cache: {folder} is damaged ({type(e).__name__}: {e}); rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
    obj = build()
    return load(folder) if folder and write_entry(folder, lambda tmp: save(obj, tmp), log) else obj


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_entry(folder):
    """Raise ValueError unless the folder's files are exactly those of its manifest, intact."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if set(manifest) != {p.name for p in folder.iterdir()} - {"manifest.json"}:
        raise ValueError("its files are not those of its manifest")
    for name, digest in manifest.items():
        if file_sha256(folder / name) != digest:
            raise ValueError(f"{name} does not match its checksum")


def write_entry(folder, write, log):
    """Write a cache entry atomically: write() fills a temporary folder, which gets its manifest
    and is renamed into place. Returns whether the entry is there."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        manifest = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        tmp.rename(folder)
    except OSError as e:
        if not folder.is_dir():  # (if it is, another process wrote the same entry first)
            log(f"cache: could not write {folder} ({e}); going on without it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder.is_dir()


def save_corpus(corpus, folder):
    for f in fields(Corpus):
        np.save(folder / f"{f.name}.npy", getattr(corpus, f.name))


def load_corpus(folder):
    """A saved Corpus, memory-mapped: pages are read as batches need them, shared by processes."""
    corpus = Corpus(*(np.load(folder / f"{f.name}.npy", mmap_mode="r") for f in fields(Corpus)))
    if len(corpus.offsets) != len(corpus) + 1 or corpus.offsets[-1] != len(corpus.ids):
        raise ValueError("its arrays disagree in length")
    return corpus


# The data, end to end: WikiText's text -> the tokenizer -> the tokenized splits.

def prepare_data(args, tokenizer=None, splits=SPLITS, log=print, cache_dir=None):
    """Read WikiText, learn the tokenizer from the train split (unless one is given) and tokenize
    every split; with a cache_dir, each is computed once and read back from there after.
    Returns (tokenizer, {split: Corpus})."""
    t0 = time.time()
    text = functools.cache(lambda: load_wikitext(args.dataset_config, args.data_dir, splits))  # read on a cache miss
    if tokenizer is None:
        key = cache_key(text_source(args, "train"), args.vocab_size, args.tokenizer_sample)
        tokenizer = cached(cache_dir, f"tokenizer-{key}", log, build=lambda: learn_tokenizer(text()["train"], args),
                           save=lambda tok, folder: (folder / "tokenizer.json").write_text(tok.to_str()),
                           load=lambda folder: tokenizer_from_json((folder / "tokenizer.json").read_text()))
    t1 = time.time()
    tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    corpora = {split: cached(cache_dir, f"{split}-{cache_key(text_source(args, split), tokenizer_hash)}", log,
                             build=lambda: tokenize_corpus(iter_articles(text()[split]), tokenizer),
                             save=save_corpus, load=load_corpus) for split in splits}
    for split in splits:
        c = corpora[split]
        if len(c) == 0:
            raise UserError(f"the {split} split has no sentences")
        if c.article[0] == c.article[-1]:
            raise UserError(f"the {split} split is one article, and NSP draws its negatives from other "
                            "articles (WikiText starts each with a ' = Title = ' line between blank lines)")
        log(f"data: {split:10s} {c.article.max() + 1:6,} articles {len(c):8,} sentences "
            f"{len(c.ids):10,} tokens ({(c.ids == UNK_ID).mean():.2%} [UNK])")
    log(f"data: tokenizer ({tokenizer.get_vocab_size():,} tokens) {t1 - t0:.1f}s, tokenized splits "
        f"{time.time() - t1:.1f}s" + (f" (cache: {cache_dir})" if cache_dir else ""))
    return tokenizer, corpora


# -----------------------------------------------------------------------------
# Training
#
# train(), at the end of this section, is the loop. Above it, what it calls: the learning-rate
# schedule, evaluation, checkpoints, the training step, and Run, which holds where a run stands.


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup to peak_lr, then linear decay to zero at total_steps (as in BERT)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def resolve_device(name):
    """--device: auto is cuda where there is one, else cpu."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs --device cuda (use bf16 on CPUs)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cpu_has_bf16():
    try:  # oneDNN reports whether the CPU has native bf16 arithmetic (AVX512-BF16, AMX)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def autocast_for(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    # No cache of cast weights: a CUDA graph must not keep casts made while it was captured (and
    # each weight is cast once per forward anyway).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def batch_to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_counts(batch):
    """(masked tokens, pairs, real tokens) of a batch still on the host: no device sync."""
    return (int((batch["mlm_labels"] != -100).sum()), len(batch["nsp_labels"]),
            int(batch["attention_mask"].sum()))


@torch.no_grad()
def evaluate(model, dataset, device, dtype, num_workers=0, bar=None):
    """MLM loss, accuracy and perplexity over all masked positions, and NSP accuracy. bar: a
    progress bar's settings (tqdm's), if one is wanted."""
    was_training = model.training
    model.eval()
    sums = []  # per batch, kept on the device and read once at the end
    loader = make_loader(dataset, num_workers, pin_memory=device.type == "cuda")
    for batch in loader if bar is None else tqdm_bar(iterable=loader, total=len(dataset), leave=False, **bar):
        batch = batch_to_device(batch, device)
        with autocast_for(device, dtype):
            out = model(**batch)
        targets = batch["mlm_labels"].view(-1)[batch["mlm_positions"]]  # -100 at padding slots
        n_masked, right = (targets != -100).sum(), out.nsp_logits.argmax(-1) == batch["nsp_labels"]
        positive = batch["nsp_labels"] == 0
        sums.append(torch.stack([x.double() for x in (
            out.mlm_loss * n_masked, (out.mlm_logits.argmax(-1) == targets).sum(), n_masked,
            right.sum(), positive.sum(), (right & positive).sum(), torch.ones_like(positive).sum())]))
    model.train(was_training)
    loss_sum, mlm_right, n_masked, nsp_right, n_pos, pos_right, n_pairs = torch.stack(sums).sum(0).tolist()
    mlm_loss = loss_sum / max(n_masked, 1)
    return {"mlm_loss": mlm_loss, "mlm_accuracy": mlm_right / max(n_masked, 1),
            "perplexity": math.exp(min(mlm_loss, 50.0)), "nsp_accuracy": nsp_right / max(n_pairs, 1),
            "nsp_accuracy_positives": pos_right / max(n_pos, 1),  # true next sentences
            "nsp_accuracy_negatives": (nsp_right - pos_right) / max(n_pairs - n_pos, 1),
            "masked_tokens": int(n_masked), "pairs": int(n_pairs)}


def format_metrics(m):
    return (f"MLM loss {m['mlm_loss']:.3f}  MLM acc {m['mlm_accuracy']:.2%}  "
            f"ppl {m['perplexity']:.1f}  NSP acc {m['nsp_accuracy']:.2%}")


# Checkpoints ------------------------------------------------------------------

CHECKPOINT_FORMAT = "bert-from-scratch/1"


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename it over `path`: a crash or a full
    disk can never leave a half-written checkpoint where the previous one was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, model, tokenizer, **extra):
    """One file with everything needed to use the model: weights, config and tokenizer, plus what
    the caller adds (metrics, history, the command; for resuming, optimizer state and position).
    It loads with torch.load(..., weights_only=True): tensors, numbers and strings only."""
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": asdict(model.config),
                 "tokenizer": tokenizer.to_str(), **extra}, path)


def read_checkpoint(path):
    """The checkpoint dict, checked; UserError for a missing, truncated or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give the path of a checkpoint file in it")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (train one with `python BERT_from_scratch.py`, "
                        "or give the path of one)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated, or not a PyTorch file: "
                        f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of BERT_from_scratch.py")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer) from a checkpoint file, the model in eval mode on `device`."""
    ckpt = read_checkpoint(path)
    with parts_of_checkpoint(path):
        model = BertForPreTraining(BertConfig(**ckpt["config"]))
        # Released checkpoints may store half-precision weights: copying them into the fp32
        # parameters restores fp32.
        model.load_state_dict(ckpt["model"])
        tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    return model.to(device).eval(), tokenizer


@contextmanager
def parts_of_checkpoint(path):
    """A checkpoint's config, weights and tokenizer that do not fit together: one UserError."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # (a KeyError, a size mismatch, a tokenizer that does not parse...)
        raise UserError(f"{path} is damaged: its config, weights and tokenizer do not fit together "
                        f"({error_line(e)})") from None


def git_commit():
    """The commit of this code, for the record; GIT_COMMIT names it in a copy without .git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    return commit or os.environ.get("GIT_COMMIT")


def rng_states():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# Learning curves ------------------------------------------------------------------


def plot_curves(history, png_path):
    """Training loss, MLM accuracy and NSP accuracy against step, training and validation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib (pip install matplotlib)") from None
    train = [r for r in history if r["kind"] == "train"]
    valid = [r for r in history if r["kind"] == "eval" and r["split"] == "validation"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("loss", [("loss", "train loss (MLM + NSP)"), ("mlm_loss", "train MLM loss"),
                        ("nsp_loss", "train NSP loss")], [("mlm_loss", "validation MLM loss")]),
              ("MLM accuracy", [("mlm_accuracy", "train")], [("mlm_accuracy", "validation")]),
              ("NSP accuracy", [("nsp_accuracy", "train")], [("nsp_accuracy", "validation")])]
    for ax, (title, train_keys, valid_keys) in zip(axes, panels):
        for key, label in train_keys:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=label, lw=1)
        for key, label in valid_keys:
            ax.plot([r["step"] for r in valid], [r[key] for r in valid], "o-", label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].axhline(0.5, color="gray", ls=":", lw=1)  # NSP chance level
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# The training step ----------------------------------------------------------------------


class TrainStep:
    """One optimizer step, eagerly: forward and backward over the step's micro-batches, gradient
    clipping at 1.0, AdamW. The logged sums (MLM loss, MLM hits, NSP loss, NSP hits) accumulate in
    self.stats on the device, so a step never waits for the device."""

    def __init__(self, model, optimizer, scaler, device, dtype, world_size=1):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.dtype, self.world_size = device, dtype, world_size
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.stats = torch.zeros(4, device=device)

    def __call__(self, micro_batches, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The step's loss is the mean over all its masked tokens and all its pairs, across
        # accumulation steps and processes, whatever their share of each.
        n_mlm = [batch_counts(b)[0] for b in micro_batches]
        n_nsp = [len(b["nsp_labels"]) for b in micro_batches]
        mlm_total, nsp_total = self.sum_over_processes(sum(n_mlm)), sum(n_nsp) * self.world_size
        for k, batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1  # DDP averages the gradients after the last one only
            with nullcontext() if last or self.world_size == 1 else self.model.no_sync():
                # (DDP divides the summed gradients by world_size: the weights undo that.)
                self.forward_backward(batch_to_device(batch, self.device),
                                      self.world_size * n_mlm[k] / mlm_total if n_mlm[k] else 0.0,
                                      self.world_size * n_nsp[k] / nsp_total)
        self.update()

    def sum_over_processes(self, n):
        if self.world_size == 1:
            return n
        n = torch.tensor(float(n))
        if self.device.type == "cuda":  # a pageable host->GPU copy would wait for the GPU
            n = n.pin_memory()
        n = n.to(self.device, non_blocking=True)
        dist.all_reduce(n)
        return n

    def forward_backward(self, batch, mlm_weight, nsp_weight):
        with autocast_for(self.device, self.dtype):
            out = self.model(**batch)
            loss = out.mlm_loss * mlm_weight + out.nsp_loss * nsp_weight  # the paper's sum
        self.scaler.scale(loss).backward()
        with torch.no_grad():
            targets = batch["mlm_labels"].view(-1)[batch["mlm_positions"]]
            self.stats += torch.stack([
                out.mlm_loss.float() * (targets != -100).sum(), (out.mlm_logits.argmax(-1) == targets).sum(),
                out.nsp_loss.float() * len(batch["nsp_labels"]),
                (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()]).float()

    def update(self):
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class CudaGraphStep(TrainStep):
    """The same step, for one micro-batch on one GPU, replayed from a CUDA graph.

    A small BERT on a large GPU is bound by kernel launches: a step is about a thousand small
    kernels, launched one by one from Python. A CUDA graph records them once and replays them all
    with one call. Each batch shape (a few: see padded_length) gets its own graph: its first batch
    runs eagerly as a warm-up, its second is captured, and every later one replays. The graphs
    share one memory pool and never run at once. The learning rate is a device tensor that the
    captured AdamW reads at each replay, and dropout stays random: each replay advances PyTorch's
    CUDA generator, as the eager step does.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr = torch.zeros((), device=self.device)
        for group in self.optimizer.param_groups:  # (the optimizer was made capturable for this)
            group["lr"] = self.lr
        self.inputs, self.graphs = {}, {}  # per batch shape: static input tensors, the graph
        self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        self.eager = False  # set if a capture fails: the run goes on without graphs

    def __call__(self, micro_batches, lr):
        if self.eager:
            return super().__call__(micro_batches, lr)
        (batch,) = micro_batches
        shape = (*batch["input_ids"].shape, len(batch["mlm_positions"]))
        self.lr.fill_(lr)
        if shape not in self.inputs:  # warm-up, on the stream that will capture
            self.inputs[shape] = batch_to_device(batch, self.device)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.forward_backward(self.inputs[shape], 1.0, 1.0)
                self.update()
            torch.cuda.current_stream().wait_stream(self.stream)
            return
        for k, v in batch.items():
            self.inputs[shape][k].copy_(v, non_blocking=True)
        if shape not in self.graphs:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                      capture_error_mode="thread_local"):  # DataLoader threads pin memory
                    self.forward_backward(self.inputs[shape], 1.0, 1.0)
                    self.update()  # sets the gradients to None: each replay allocates them anew
            except RuntimeError as e:
                tqdm.write(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); "
                           "training on without CUDA graphs")
                self.eager = True
                self.optimizer.zero_grad(set_to_none=True)
                return super().__call__(micro_batches, lr)
            self.graphs[shape] = graph
        self.graphs[shape].replay()


# The run: processes, model, position, logs, checkpoints ---------------------------------


@dataclass
class Processes:
    """This process's place in a torchrun job (or a job of one)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    ddp: bool = False

    def print(self, msg):  # only the first process prints
        if self.rank == 0:
            tqdm.write(msg)

    def agree(self, flag):
        """Whether any process says so: all must take the same decision, or collectives deadlock."""
        if not self.ddp:
            return flag
        flag = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def start_processes(args):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # launched by torchrun
    device = resolve_device(args.device)
    if device.type == "cuda":
        if ddp:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Processes(device, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), ddp)


def load_data(args, procs, ckpt):
    """The tokenizer (a resumed run's own) and the tokenized splits. Under torchrun the first
    process prepares them (and caches them) and sends the tokenizer to the others, which then
    read the cache, or without one tokenize the splits themselves."""
    tokenizer = tokenizer_from_json(ckpt["tokenizer"]) if ckpt else None
    cache_dir = None if args.no_cache else Path(args.cache_dir or default_cache_dir())
    if procs.rank == 0:
        tokenizer, corpora = prepare_data(args, tokenizer, log=procs.print, cache_dir=cache_dir)
    if procs.ddp:
        shared = [tokenizer.to_str() if procs.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        if procs.rank > 0:
            tokenizer, corpora = prepare_data(args, tokenizer_from_json(shared[0]), log=procs.print,
                                              cache_dir=cache_dir)
    return tokenizer, corpora


def build_model(args, procs, dtype, vocab_size, ckpt):
    """The model, its AdamW and loss scaler (restored when resuming), wrapped for DDP and
    torch.compile as asked, and the step that trains it. Returns (model, step)."""
    torch.manual_seed(args.seed)
    config = BertConfig(**ckpt["config"]) if ckpt else config_for(args.model_size, vocab_size, args.dropout)
    model = BertForPreTraining(config).to(procs.device)
    # CUDA graphs replay a step of one micro-batch on one process, without fp16's loss scaler
    # (which checks for overflow on the host); every other step runs eagerly.
    graphs = (procs.device.type == "cuda" and not args.no_cuda_graphs and not procs.ddp
              and args.grad_accum_steps == 1 and dtype != torch.float16)
    optimizer = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.01), lr=args.lr, betas=(0.9, 0.999),
                                  eps=1e-6, fused=True, capturable=graphs)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=dtype == torch.float16)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        scaler.load_state_dict(ckpt["train_state"]["scaler"])
        for group in optimizer.param_groups:  # as this run steps, not as the saved one did
            group["capturable"] = graphs
    wrapped = model
    if procs.ddp:
        wrapped = DDP(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    if args.compile:  # one graph per batch shape, and room for every shape
        torch._dynamo.config.recompile_limit = max(8, -(-args.max_seq_len // args.pad_multiple))
        wrapped = torch.compile(wrapped, dynamic=False)
    step = (CudaGraphStep if graphs else TrainStep)(wrapped, optimizer, scaler, procs.device, dtype,
                                                    procs.world_size)
    return model, step


class StopRequest:
    """SIGINT / SIGTERM: the first asks the training loop to save a resumable checkpoint and exit
    (it does after the current step); a second one exits at once. The handler only sets a flag:
    printing from it could collide with a progress-bar write in progress."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self)

    def __call__(self, signum, frame):
        if self.signum is not None:
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum


class Run:
    """Where a training run stands (step, epoch, position in the epoch), its schedule, what it
    has logged, and how it evaluates and saves itself: the state that the training loop, the
    logs and the checkpoints share."""

    def __init__(self, args, procs, dtype, model, step_fn, tokenizer, train_corpus, ckpt):
        self.args, self.procs, self.dtype = args, procs, dtype
        self.model, self.step_fn, self.tokenizer = model, step_fn, tokenizer
        self.path = Path(args.checkpoint)
        self.metrics_path = self.path.with_suffix(".metrics.jsonl")
        # Every epoch has as many pairs (each positive and one negative), hence as many full steps.
        global_batch = args.batch_size * args.grad_accum_steps * procs.world_size
        n_pairs = len(build_pairs(train_corpus, np.random.default_rng(0)))
        self.steps_per_epoch = n_pairs // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"a step takes {global_batch:,} pairs but an epoch has only {n_pairs:,}; "
                            "use a smaller --batch_size")
        self.total_steps = self.steps_per_epoch * args.epochs  # the schedule; --max_steps stops early
        self.warmup_steps = int(args.warmup * self.total_steps)
        self.max_steps = min(args.max_steps or self.total_steps, self.total_steps)

        self.step = self.epoch = self.step_in_epoch = 0
        self.history, self.metrics, self.saved_step = [], {}, None
        self.info = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "command": " ".join(["python"] + sys.argv), "git_commit": git_commit()}
        if ckpt:
            self.resume_from(ckpt)
        elif procs.rank > 0:
            torch.manual_seed(args.seed + 1000 * procs.rank)  # each process its own dropout masks
        if procs.rank == 0:  # the log restarts from what the checkpoint knows (nothing, for a new run)
            self.metrics_path.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))
        self.stop, self.stopping = StopRequest(), False
        self.counts = np.zeros(3)  # masked tokens, pairs, real tokens since the last log line
        self.t_start = time.time()
        c = model.config
        procs.print(f"model: {args.model_size} (L={c.num_hidden_layers}, H={c.hidden_size}, "
                    f"A={c.num_attention_heads}), {model.num_parameters():,} parameters, vocab {c.vocab_size:,}")
        procs.print(f"training: {args.epochs} epochs x {self.steps_per_epoch:,} steps, batch {global_batch} = "
                    f"{args.batch_size} x {args.grad_accum_steps} accumulation x {procs.world_size} processes, "
                    f"peak lr {args.lr:g}, {self.warmup_steps:,} warmup steps, {procs.device.type}, "
                    f"{str(dtype)[6:]}" + (", CUDA graphs" if isinstance(step_fn, CudaGraphStep) else "")
                    + (f", resuming at step {self.step:,}" if ckpt else "")
                    + (f"; stopping at step {self.max_steps:,} (--max_steps)"
                       if self.max_steps < self.total_steps else ""))
        if ckpt and self.step >= self.max_steps:
            procs.print(f"notice: the run is already at step {self.step:,}: pass a larger --max_steps "
                        "to train on (this only evaluates and saves)")

    def resume_from(self, ckpt):
        state, procs = ckpt["train_state"], self.procs
        if state.get("world_size", 1) != procs.world_size:  # the position in the epoch depends on it
            raise UserError(f"{self.args.resume} was trained by {state.get('world_size', 1)} process(es); "
                            f"resume it with the same number, not {procs.world_size}")
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.history, self.metrics = ckpt.get("history", []), ckpt.get("metrics", {})
        self.info["command"] = ckpt.get("command", "") + "  (resumed: " + self.info["command"] + ")"
        rngs = state["rng"]
        set_rng_states(rngs[procs.rank] if len(rngs) == procs.world_size else rngs[0])
        if procs.rank > 0 and len(rngs) != procs.world_size:
            torch.manual_seed(self.args.seed + 1000 * procs.rank + self.step)

    def lr(self):
        return lr_at(self.step, self.total_steps, self.warmup_steps, self.args.lr)

    def start_epoch(self, corpus):
        """This process's micro-batches for the rest of the epoch, as an iterator."""
        args, procs, t0 = self.args, self.procs, time.time()
        pairs, batches, self.padding = training_batches(corpus, args, self.epoch, procs.rank, procs.world_size)
        dataset = PretrainingBatches(corpus, pairs, batches, args.max_seq_len, args.mask_prob,
                                     self.model.config.vocab_size, args.seed, self.epoch, args.pad_multiple)
        procs.print(f"epoch {self.epoch + 1}/{args.epochs}: {len(pairs):,} pairs (drawn and grouped in "
                    f"{time.time() - t0:.2f}s), padding {self.padding:.1%} of tokens")
        self.record({"kind": "epoch", "epoch": self.epoch, "step": self.step, "pairs": len(pairs),
                     "padding": self.padding})
        self.bar = tqdm_bar(total=min(self.steps_per_epoch, self.step_in_epoch + self.max_steps - self.step),
                            initial=self.step_in_epoch,
                            disable=procs.rank > 0, desc=f"epoch {self.epoch + 1}")
        self.t_epoch = self.t_log = time.time()
        self.epoch_tokens = 0
        return iter(make_loader(dataset, args.num_workers, start=self.step_in_epoch * args.grad_accum_steps,
                                pin_memory=procs.device.type == "cuda"))

    def save_due(self):
        return self.args.save_every and self.step % self.args.save_every == 0

    def after_step(self, micro_batches, lr):
        """Count the step; a log line every --log_every steps, before a save and at the end."""
        self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
        for batch in micro_batches:
            counts = batch_counts(batch)
            self.counts += counts
            self.epoch_tokens += counts[2]
        self.bar.update()
        if (self.step_in_epoch % self.args.log_every == 0 or self.save_due() or self.step == self.max_steps
                or self.step_in_epoch == self.steps_per_epoch):
            self.log_train(lr)
        elif not self.procs.ddp:  # one process decides alone, at every step; several at log steps
            self.stopping = self.stop.signum is not None

    def log_train(self, lr):
        """One log entry from the sums since the last one, over every process: the loop's only
        host-device sync, and where the processes agree on stopping."""
        stats = self.step_fn.stats
        totals = torch.cat([stats, torch.tensor([*self.counts, self.stop.signum is not None], device=stats.device)])
        if self.procs.ddp:
            dist.all_reduce(totals)
        mlm_loss, mlm_hits, nsp_loss, nsp_hits, n_masked, n_pairs, n_tokens, stop = totals.tolist()
        n_masked = max(n_masked, 1)  # (steps of pairs with nothing to mask: rare, but possible)
        entry = {"kind": "train", "step": self.step, "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                 "loss": mlm_loss / n_masked + nsp_loss / n_pairs, "mlm_loss": mlm_loss / n_masked,
                 "nsp_loss": nsp_loss / n_pairs, "mlm_accuracy": mlm_hits / n_masked,
                 "nsp_accuracy": nsp_hits / n_pairs, "lr": lr,
                 "tokens_per_s": n_tokens / (time.time() - self.t_log), "padding": self.padding}
        if not math.isfinite(entry["loss"]):
            raise UserError(f"the loss became {entry['loss']} at step {self.step}; lower --lr "
                            f"(the last good checkpoint, if any, is {self.path})")
        self.record(entry)
        self.bar.set_postfix(loss=f"{entry['loss']:.3f}", mlm=f"{entry['mlm_loss']:.3f}",
                             nsp=f"{entry['nsp_loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:,.0f}")
        stats.zero_()
        self.counts[:] = 0
        self.t_log, self.stopping = time.time(), stop > 0

    def end_epoch(self, valid_set):
        """Close the epoch's progress; unless stopping: validation, then a checkpoint."""
        self.bar.close()
        elapsed = time.time() - self.t_epoch
        self.procs.print(f"epoch {self.epoch + 1}: {elapsed:,.0f}s of training, "
                         f"{self.epoch_tokens / elapsed:,.0f} tokens/s (this process)")
        self.stopping = self.stopping or self.procs.agree(self.stop.signum is not None)
        if self.stopping:
            return
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.metrics = {"validation": self.evaluate("validation", valid_set)}
        self.save()
        self.stopping = self.procs.agree(self.stop.signum is not None)  # a signal during the evaluation

    def finish(self, test_set):
        """Stopped by a signal: save where the run stands and say how to resume (exit status
        128 + signal). Done: evaluate on the test split, save, check that replicas agree."""
        procs = self.procs
        if self.stopping:
            signum = self.stop.signum or signal.SIGTERM  # a process the signal missed follows the others
            procs.print(f"{signal.Signals(signum).name}: stopping at step {self.step:,}")
            if self.saved_step != self.step:
                self.save()
            launcher = f"torchrun --nproc_per_node={procs.world_size}" if procs.ddp else "python"
            procs.print(f"checkpoint saved to {self.path}. Resume with: "
                        f"{launcher} BERT_from_scratch.py --resume {self.path}")
            if procs.ddp:
                dist.destroy_process_group()
            return 128 + signum
        self.metrics["test"] = self.evaluate("test", test_set)
        self.save()
        if procs.ddp:
            check_replicas(self.model, procs)
        gpu = f", GPU {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if procs.device.type == "cuda" else ""
        procs.print(f"done: {self.step:,} steps in {time.time() - self.t_start:,.0f}s (evaluation included), "
                    f"peak memory {peak_memory_gib():.2f} GiB{gpu}; checkpoint {self.path}, "
                    f"metrics log {self.metrics_path}"
                    + (f", learning curves {self.path.with_suffix('.png')}" if self.args.plot else ""))
        return 0

    def record(self, entry):
        self.history.append(entry)
        if self.procs.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def evaluate(self, split, dataset):
        """The first process evaluates; the others wait for it."""
        metrics = None
        if self.procs.rank == 0:
            metrics = evaluate(self.model, dataset, self.procs.device, self.dtype, self.args.num_workers,
                               bar={"desc": split})
            self.record({"kind": "eval", "split": split, "step": self.step, "epoch": self.epoch, **metrics})
            self.procs.print(f"{split} @ step {self.step:,}: {format_metrics(metrics)}")
        if self.procs.ddp:
            dist.barrier()
        return metrics

    def save(self):
        """A resumable checkpoint: weights, optimizer, position, every process's random state and
        the history; with --plot, the learning curves beside it."""
        self.saved_step = self.step
        rngs = [rng_states()]
        if self.procs.ddp:
            rngs = [None] * self.procs.world_size
            dist.all_gather_object(rngs, rng_states())
        if self.procs.rank > 0:
            return
        train_state = {"optimizer": self.step_fn.optimizer.state_dict(), "scaler": self.step_fn.scaler.state_dict(),
                       "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                       "rng": rngs, "world_size": self.procs.world_size}
        try:
            save_checkpoint(self.path, self.model, self.tokenizer, step=self.step, metrics=self.metrics,
                            history=self.history, train_state=train_state, **self.info)
        except OSError as e:
            raise UserError(f"could not write {self.path} ({e}); the previous checkpoint there, "
                            "if any, is intact") from None
        if self.args.plot:
            plot_curves(self.history, self.path.with_suffix(".png"))


def check_replicas(model, procs):
    """Data parallelism must keep every replica identical: compare parameter digests."""
    digest = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()])
                          for p in model.parameters()]).flatten().cpu()
    digests = [None] * procs.world_size
    dist.all_gather_object(digests, digest)
    same = all(torch.equal(d, digests[0]) for d in digests)
    procs.print(f"replicas identical across {procs.world_size} processes: {'yes' if same else 'NO'}")
    dist.destroy_process_group()
    if not same:
        raise UserError("the model replicas diverged across processes")


def peak_memory_gib():
    """Peak resident memory of this process in GiB (VmHWM: unlike ru_maxrss, it does not carry
    over the high-water mark of the process that started us)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2 ** 20
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def check_output_path(path, resuming_from, overwrite):
    """Fail before training, not after an hour: the checkpoint path must be writable, and a run
    never replaces a model file it did not create (unless --overwrite, or resuming that file)."""
    if path.is_dir():
        raise UserError(f"--checkpoint {path} is a folder; give a file name such as {path / 'bert.pt'}")
    if path.exists() and not overwrite and not (resuming_from and Path(resuming_from).resolve() == path.resolve()):
        raise UserError(f"{path} already exists; choose another --checkpoint, pass --overwrite to "
                        f"replace it, or --resume {path} to continue it")
    blocker = next((p for p in path.parents if p.is_file()), None)
    if blocker is not None:
        raise UserError(f"cannot write the checkpoint {path}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the checkpoint {path}: {e}") from None
    probe = path.with_name(f".{path.name}.probe{os.getpid()}")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:  # (the reason only: the probe's name would puzzle)
        raise UserError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None


def tqdm_bar(**kwargs):
    return tqdm(dynamic_ncols=True, mininterval=1.0, **kwargs)


# The training loop ----------------------------------------------------------------------


def train(args):
    procs = start_processes(args)
    dtype = resolve_dtype(args.dtype, procs.device)
    ckpt = read_checkpoint(args.resume) if args.resume else None  # resume: weights and position
    if procs.rank == 0:
        check_output_path(Path(args.checkpoint), resuming_from=args.resume, overwrite=args.overwrite)
    tokenizer, corpora = load_data(args, procs, ckpt)
    vocab_size = tokenizer.get_vocab_size()
    valid_set, test_set = (eval_batches(corpora[split], args.max_seq_len, args.mask_prob, vocab_size,
                                        args.pad_multiple) for split in ("validation", "test"))
    model, step_fn = build_model(args, procs, dtype, vocab_size, ckpt)
    run = Run(args, procs, dtype, model, step_fn, tokenizer, corpora["train"], ckpt)

    while run.epoch < args.epochs and run.step < run.max_steps:
        loader = run.start_epoch(corpora["train"])
        while run.step_in_epoch < run.steps_per_epoch and run.step < run.max_steps:
            micro_batches = [next(loader) for _ in range(args.grad_accum_steps)]
            lr = run.lr()
            step_fn(micro_batches, lr)  # forward, backward, clipping, AdamW
            run.after_step(micro_batches, lr)  # a log line every --log_every steps
            if run.stopping:  # a signal: save and exit after this step
                break
            if run.save_due():  # (after the log step's check that the loss is finite)
                run.save()
        run.end_epoch(valid_set)  # unless stopping: validation and a checkpoint
        if run.stopping:
            break
    return run.finish(test_set)  # the test split and the last checkpoint, or the resume command


# -----------------------------------------------------------------------------
# Command line


# Padding lengths to a multiple of 8 on CPU: 15 batch shapes, 6.9% padding on WikiText-2 (16: 8 shapes,
# 12.4%), and the faster whole run (benchmarks/README.md, "Static shapes"). On CUDA, 16: fewer graphs.
CPU_PAD_MULTIPLE = 8


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every flag's default, except None and False (a flag left out)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one line, not the usage block above it: error() for what argparse finds
    (an unknown flag, a bad choice), fail() for the checks made after parsing."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.fail(f"{message} (--help lists the flags)")

    def fail(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def check_device(self, args):
        if args.device == "cuda" and not torch.cuda.is_available():
            self.fail("--device cuda: CUDA is not available here (use --device cpu)")


def build_parser():
    p = ArgumentParser("Pretrain a mini BERT (MLM + NSP) on WikiText-2.")
    # hardware
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast precision; auto = bf16 where the CPU/GPU has it, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (once per batch shape)")
    p.add_argument("--no_cuda_graphs", action="store_true",
                   help="on CUDA, launch every step's kernels from Python instead of replaying a CUDA graph")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader worker processes that build and mask batches (0: the training process "
                        "builds each in well under a millisecond, faster than a worker hands it over)")
    # model
    p.add_argument("--model_size", choices=list(PRESETS), default="mini", help="one of Google's BERT miniatures: "
                   + ", ".join(f"{name} L={L} H={H} A={A}" for name, (L, H, A) in PRESETS.items()))
    p.add_argument("--vocab_size", type=int, default=BertConfig.vocab_size,
                   help="WordPiece vocabulary, specials included")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="on embeddings, residual branches and attention weights")
    # data
    p.add_argument("--dataset_config", default="wikitext-2-v1", choices=DATASET_CONFIGS, help="the WikiText variant")
    p.add_argument("--data_dir", default=None,
                   help="local folder with train.txt, validation.txt, test.txt (or WikiText's wiki.*.tokens) "
                   "instead of the hub")
    p.add_argument("--tokenizer_sample", type=int, default=TOKENIZER_SAMPLE,
                   help="learn the vocabulary from a random sample of this many train sentences (all if fewer)")
    p.add_argument("--cache_dir", default=None,
                   help="where the tokenizer and tokenized splits are cached (if not given: "
                        "$XDG_CACHE_HOME/bert-from-scratch or ~/.cache/bert-from-scratch)")
    p.add_argument("--no_cache", action="store_true",
                   help="prepare the data afresh, without reading or writing the cache")
    p.add_argument("--max_seq_len", type=int, default=128, help="tokens per pair, [CLS] and both [SEP] included")
    p.add_argument("--pad_multiple", type=int, default=None,
                   help=f"pad batches to a multiple of this length (if not given: 16 on CUDA, "
                        f"{CPU_PAD_MULTIPLE} on CPU)")
    p.add_argument("--mask_prob", type=float, default=0.15, help="fraction of each pair's tokens chosen for MLM")
    # optimization
    p.add_argument("--epochs", type=int, default=2, help="passes over the training pairs (negatives drawn afresh)")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per process per micro-batch")
    p.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (measured best for batch 16)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps, counted from the start of training (the "
                        "learning-rate schedule stays that of --epochs)")
    p.add_argument("--seed", type=int, default=42, help="the model's init, the pairs, masks and dropout")
    # output
    p.add_argument("--checkpoint", default=None, help="where to save (if not given: checkpoints/bert_<size>.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --checkpoint file")
    p.add_argument("--resume", default=None, help="continue training from this checkpoint")
    p.add_argument("--save_every", type=int, default=0, help="also save every N steps (0: epoch ends)")
    p.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    p.add_argument("--plot", action="store_true", help="draw the learning curves to <checkpoint>.png")
    return p


# A resumed run continues the saved run with the saved settings; flags typed again override them,
# except these, which define the data, the model or the learning-rate schedule and cannot change.
RESUME_FIXED = ["model_size", "vocab_size", "dropout", "dataset_config", "max_seq_len", "mask_prob",
                "batch_size", "grad_accum_steps", "lr", "warmup", "epochs", "seed"]


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        # Which flags did the user type? Parse again with a marker as every default.
        bare, unset = build_parser(), object()
        bare.set_defaults(**{k: unset for k in vars(args)})
        given = {k: v for k, v in vars(bare.parse_args(argv)).items() if v is not unset}
        ckpt = read_checkpoint(args.resume)
        if "train_state" not in ckpt:
            raise UserError(f"{args.resume} holds weights only (no optimizer state): it cannot be resumed")
        saved = ckpt.get("args", {})
        for k in RESUME_FIXED:
            if k in given and k in saved and given[k] != saved[k]:
                parser.fail(f"--{k} {given[k]} differs from the resumed run's {saved[k]}; "
                            "it cannot change when resuming")
        for k, v in saved.items():
            if k in vars(args) and k not in given and k not in ("resume", "overwrite"):
                setattr(args, k, v)
    if args.checkpoint is None:
        args.checkpoint = f"checkpoints/bert_{args.model_size}.pt"
    if args.pad_multiple is None:  # measured: see CPU_PAD_MULTIPLE
        args.pad_multiple = 16 if resolve_device(args.device).type == "cuda" else CPU_PAD_MULTIPLE
    max_positions = BertConfig.max_position_embeddings
    checks = [("seed", args.seed >= 0, "must be non-negative"),
              ("max_steps", args.max_steps is None or args.max_steps > 0, "must be positive"),
              ("save_every", args.save_every >= 0, "cannot be negative"),
              ("num_workers", args.num_workers >= 0, "cannot be negative"),
              ("mask_prob", 0.0 < args.mask_prob < 1.0, "must be in (0, 1)"),
              ("lr", args.lr > 0, "must be positive"),
              ("warmup", 0.0 <= args.warmup < 1.0, "must be in [0, 1)"),
              ("dropout", 0.0 <= args.dropout < 1.0, "must be in [0, 1)"),
              ("vocab_size", args.vocab_size >= 100, "must be at least 100"),
              ("tokenizer_sample", args.tokenizer_sample > 0, "must be positive"),
              ("max_seq_len", 8 <= args.max_seq_len <= max_positions,
               f"must be between 8 and {max_positions} (the position table)")]
    checks += [(k, getattr(args, k) > 0, "must be positive") for k in
               ("epochs", "batch_size", "grad_accum_steps", "log_every", "pad_multiple")]
    for flag, ok, requirement in checks:
        if not ok:
            parser.fail(f"--{flag} {requirement}, got {getattr(args, flag)}")
    parser.check_device(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail now, not after the first epoch)
        except ImportError:
            parser.fail("--plot needs matplotlib: pip install matplotlib")
    return args


def main(argv=None):
    try:
        code = train(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # Ctrl-C before training started (inside it, a checkpoint is saved)
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
