"""
BERT pretraining from scratch on WikiText-2: masked language modelling (MLM) and next sentence
prediction (NSP), trained jointly, as in Devlin et al. 2018, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding" (https://arxiv.org/abs/1810.04805).

Everything BERT-specific is written here from standard PyTorch layers; the only outside pieces
are the WikiText-2 download (HF `datasets`) and the WordPiece trainer (HF `tokenizers`).

    python BERT_from_scratch.py --device cuda --epochs 2 --batch_size 16    # --device cpu without a GPU
    python BERT_from_scratch.py --data_dir ../shared/data/wikitext-2-v1     # a local copy, no hub
    torchrun --nproc_per_node=2 BERT_from_scratch.py --batch_size 16        # data parallel
    python test_mini_bert.py                                                # predictions from the checkpoint

The file reads top to bottom: config, model, data, training, command line.
"""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

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
        # softmax(q k^T / sqrt(hs) + mask) v in one fused kernel; attn_mask is (B, 1, 1, T), True
        # where the key is a real token, or None when the batch has no padding at all.
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
    mlm_logits: torch.Tensor  # (B, T, V) without mlm_labels; (n_masked, V) with them
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
        optionally gives the flat indices of the masked positions (the data loader computes them
        on the host so that training never waits on the device to count them).
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
            mlm_loss = F.cross_entropy(mlm_logits.float(), targets)
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


def hf_state_dict(model):
    """The model's weights under transformers' BertForPreTraining names (for export and tests)."""
    sd, c = model.state_dict(), model.config
    H = c.hidden_size
    out = {
        "bert.embeddings.word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": sd["embeddings.token_type_embeddings.weight"],
        "bert.embeddings.LayerNorm.weight": sd["embeddings.norm.weight"],
        "bert.embeddings.LayerNorm.bias": sd["embeddings.norm.bias"],
        "bert.pooler.dense.weight": sd["pooler.weight"],
        "bert.pooler.dense.bias": sd["pooler.bias"],
        "cls.predictions.transform.dense.weight": sd["mlm_head.dense.weight"],
        "cls.predictions.transform.dense.bias": sd["mlm_head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": sd["mlm_head.norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": sd["mlm_head.norm.bias"],
        "cls.predictions.decoder.weight": sd["mlm_head.decoder.weight"],
        "cls.predictions.decoder.bias": sd["mlm_head.decoder.bias"],
        "cls.predictions.bias": sd["mlm_head.decoder.bias"],
        "cls.seq_relationship.weight": sd["nsp_head.weight"],
        "cls.seq_relationship.bias": sd["nsp_head.bias"],
    }
    for i in range(c.num_hidden_layers):
        ours, hf = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for name, w in zip(("query", "key", "value"), sd[ours + "attn.qkv.weight"].split(H)):
            out[f"{hf}attention.self.{name}.weight"] = w
        for name, b in zip(("query", "key", "value"), sd[ours + "attn.qkv.bias"].split(H)):
            out[f"{hf}attention.self.{name}.bias"] = b
        for hf_name, our_name in [("attention.output.dense", "attn.out"),
                                  ("attention.output.LayerNorm", "attn_norm"),
                                  ("intermediate.dense", "ffn.0"), ("output.dense", "ffn.2"),
                                  ("output.LayerNorm", "ffn_norm")]:
            out[f"{hf}{hf_name}.weight"] = sd[f"{ours}{our_name}.weight"]
            out[f"{hf}{hf_name}.bias"] = sd[f"{ours}{our_name}.bias"]
    return out


# -----------------------------------------------------------------------------
# Data

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
N_SPECIAL = len(SPECIAL_TOKENS)  # every id >= N_SPECIAL is an ordinary WordPiece token
SPLITS = ("train", "validation", "test")
EVAL_SEED = 1234  # evaluation pairs and masks never change, so runs compare


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file): printed as one line, no traceback."""


def load_wikitext(dataset_config, data_dir, splits=SPLITS):
    """The raw lines of each split, from a local copy (data_dir) or from the HuggingFace hub."""
    if data_dir is not None:
        lines = {}
        for split in splits:
            path = Path(data_dir) / f"{split}.txt"
            if not path.is_file():
                raise UserError(f"--data_dir {data_dir} has no {split}.txt (expected train.txt, "
                                "validation.txt and test.txt, as in ../shared/data/wikitext-2-v1)")
            try:
                lines[split] = path.read_text(encoding="utf-8").split("\n")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {path} as UTF-8 text: {e}") from None
        return lines
    try:
        import datasets  # imported here: only the hub path needs it
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("Salesforce/wikitext", dataset_config)
        return {split: ds[split]["text"] for split in splits}
    except Exception as e:
        raise UserError(
            f"could not load Salesforce/wikitext '{dataset_config}' from the HuggingFace hub or its "
            f"cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Without "
            "network, pass --data_dir DIR with train.txt/validation.txt/test.txt, or set "
            "HF_HUB_OFFLINE=1 with a prepared datasets cache in HF_HOME.") from None


_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = " starts an article
_HEADING = re.compile(r"^ = = .* = = $")  # " = = Section = = " (any depth) is no sentence
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")  # WikiText splits sentence-final punctuation off


def normalize_wikitext(line):
    """Undo WikiText's tokenization marks: "1 @,@ 000" -> "1,000", "<unk>" -> "[UNK]"."""
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    return line.replace("<unk>", "[UNK]")


def split_articles(lines):
    """WikiText lines -> articles, each a list of sentences (headings and blank lines dropped)."""
    lines = [line.rstrip("\n") for line in lines]
    articles = []
    for i, line in enumerate(lines):
        if _TITLE.match(line) or _HEADING.match(line):
            # A title stands between blank lines; " = Played , W = " inside a table does not.
            between_blanks = ((i == 0 or not lines[i - 1].strip())
                              and (i + 1 == len(lines) or not lines[i + 1].strip()))
            if _TITLE.match(line) and between_blanks:
                articles.append([])
            continue  # headings and table markup are no sentences
        if not line.strip():
            continue
        if not articles:  # text before the first title: an article of its own
            articles.append([])
        text = " " + normalize_wikitext(line.strip())
        articles[-1].extend(s.strip() for s in _SENTENCE_END.split(text) if s.strip())
    return articles


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
    pieces = set()
    for chunk in set(tokenizer.normalizer.normalize_str("\n".join(text)).split()):
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


def tokenize_corpus(articles, tokenizer):
    sentences = [s for article in articles for s in article]
    encodings = tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32, count=lengths.sum())
    keep = lengths > 0  # a sentence of characters the normalizer removes entirely
    article = np.repeat(np.arange(len(articles)), [len(a) for a in articles])[keep]
    offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
    return Corpus(ids, offsets, article)


def rng_for(seed, epoch, stream, index=0):
    # One independent random stream per (seed, epoch, purpose, item). SeedSequence pads short keys
    # with zeros, so keys always have four entries to keep distinct keys distinct.
    return np.random.default_rng([seed, epoch, stream, index])


PAIR_STREAM, ORDER_STREAM, MASK_STREAM = 1, 2, 3


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


def mask_tokens(input_ids, rng, mask_prob, vocab_size):
    """BERT's masking of one sequence, in place. Returns the labels (-100 where not selected).

    "We mask 15% of all WordPiece tokens in each sequence at random": mask_prob of the ordinary
    tokens are selected, at least one; [CLS], [SEP], [PAD] and [UNK] never are (predicting
    "unknown" teaches nothing). Then, as in the paper, of the selected tokens
    "80% of the time: replace the word with the [MASK] token",
    "10% of the time: replace the word with a random word",
    "10% of the time: keep the word unchanged".
    """
    labels = np.full_like(input_ids, -100)
    candidates = np.flatnonzero(input_ids >= N_SPECIAL)
    if len(candidates) == 0:
        return labels
    n = max(1, int(len(candidates) * mask_prob + 0.5))
    selected = rng.choice(candidates, n, replace=False)
    labels[selected] = input_ids[selected]
    u = rng.random(n)
    input_ids[selected[u < 0.8]] = MASK_ID
    random_positions = selected[(u >= 0.8) & (u < 0.9)]
    input_ids[random_positions] = rng.integers(N_SPECIAL, vocab_size, len(random_positions))
    return labels


class PretrainingBatches(torch.utils.data.Dataset):
    """Item i is batch i of an epoch: its pairs laid out as [CLS] A [SEP] B [SEP], masked afresh,
    and padded to the longest pair in the batch. Items are built in DataLoader workers.

    Each pair's mask comes from its own random stream (seed, epoch, pair index), so it does not
    depend on how pairs are grouped into batches, processes or accumulation steps.
    """

    def __init__(self, corpus, pairs, batches, max_seq_len, mask_prob, vocab_size, seed, epoch):
        self.corpus, self.pairs, self.batches = corpus, pairs, batches
        self.max_seq_len, self.mask_prob, self.vocab_size = max_seq_len, mask_prob, vocab_size
        self.seed, self.epoch = seed, epoch

    def __len__(self):
        return len(self.batches)

    def example(self, j):
        a_idx, b_idx, _ = self.pairs[j]
        a, b = self.corpus.sentence(a_idx), self.corpus.sentence(b_idx)
        len_a, len_b = truncated_lengths(len(a), len(b), self.max_seq_len)
        input_ids = np.concatenate([[CLS_ID], a[:len_a], [SEP_ID], b[:len_b], [SEP_ID]]).astype(np.int64)
        token_type_ids = np.zeros_like(input_ids)
        token_type_ids[len_a + 2:] = 1  # segment 0: [CLS] A [SEP]; segment 1: B [SEP]
        rng = rng_for(self.seed, self.epoch, MASK_STREAM, j)
        mlm_labels = mask_tokens(input_ids, rng, self.mask_prob, self.vocab_size)
        return input_ids, token_type_ids, mlm_labels

    def __getitem__(self, i):
        idx = self.batches[i]
        examples = [self.example(j) for j in idx]
        B, T = len(examples), max(len(e[0]) for e in examples)  # dynamic padding
        batch = {
            "input_ids": torch.full((B, T), PAD_ID, dtype=torch.long),
            "token_type_ids": torch.zeros((B, T), dtype=torch.long),
            "attention_mask": torch.zeros((B, T), dtype=torch.long),
            "mlm_labels": torch.full((B, T), -100, dtype=torch.long),
        }
        for row, (input_ids, token_type_ids, mlm_labels) in enumerate(examples):
            n = len(input_ids)
            batch["input_ids"][row, :n] = torch.from_numpy(input_ids)
            batch["token_type_ids"][row, :n] = torch.from_numpy(token_type_ids)
            batch["attention_mask"][row, :n] = 1
            batch["mlm_labels"][row, :n] = torch.from_numpy(mlm_labels)
        batch["nsp_labels"] = torch.from_numpy(self.pairs[idx, 2].astype(np.int64))
        batch["mlm_positions"] = (batch["mlm_labels"].view(-1) != -100).nonzero().squeeze(1)
        return batch


def pair_lengths(corpus, pairs, max_seq_len):
    len_a, len_b = truncated_lengths(corpus.lengths()[pairs[:, 0]], corpus.lengths()[pairs[:, 1]],
                                     max_seq_len)
    return len_a + len_b + 3


def length_grouped_batches(lengths, batch_size, rng, group=64):
    """Batches of pairs of similar length, in random order, so that little of each batch is
    padding: shuffle, sort each run of `group` batches' worth of pairs by length, cut it into
    batches, shuffle the batches. The last incomplete batch is dropped (a different few pairs
    every epoch), so every step, process and accumulation step sees a full batch."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def training_batches(corpus, args, epoch, rank=0, world_size=1):
    """This process's micro-batches for one epoch, in order, and the epoch's padding fraction.

    An optimizer step consumes batch_size * grad_accum_steps * world_size pairs; micro-batch k of
    process r is slice (k * world_size + r) of it. So the pairs of a step (and their masks) are
    the same for any split of the same global batch over processes and accumulation steps.
    """
    pairs = build_pairs(corpus, rng_for(args.seed, epoch, PAIR_STREAM))  # fresh negatives
    lengths = pair_lengths(corpus, pairs, args.max_seq_len)
    micro, K = args.batch_size, args.grad_accum_steps
    steps = length_grouped_batches(lengths, micro * K * world_size,
                                   rng_for(args.seed, epoch, ORDER_STREAM))
    mine = [step[(k * world_size + rank) * micro:(k * world_size + rank + 1) * micro]
            for step in steps for k in range(K)]
    padded = sum(len(b) * lengths[b].max() for step in steps for b in np.split(step, K * world_size))
    padding = float(1.0 - sum(lengths[step].sum() for step in steps) / max(padded, 1))
    return pairs, mine, padding


def eval_batches(corpus, max_seq_len, mask_prob, vocab_size, batch_size=32):
    """A split's evaluation set: fixed-seed negatives and masks, batches sorted by length.
    (Batches of 32 evaluate faster on CPU than larger ones, and fragment the heap far less:
    measured 21 s and +0.8 GB peak at 32 against 31 s and +1.4 GB at 128, mini on validation.)"""
    pairs = build_pairs(corpus, rng_for(EVAL_SEED, 0, PAIR_STREAM))
    order = np.argsort(pair_lengths(corpus, pairs, max_seq_len), kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return PretrainingBatches(corpus, pairs, batches, max_seq_len, mask_prob, vocab_size,
                              EVAL_SEED, 0)


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


def prepare_data(args, tokenizer=None, splits=SPLITS, log=print):
    """Load WikiText, split it into articles and sentences, train the tokenizer on the train
    split (unless one is given) and tokenize every split. Returns (tokenizer, {split: Corpus})."""
    t0 = time.time()
    lines = load_wikitext(args.dataset_config, args.data_dir, splits)
    articles = {split: split_articles(lines[split]) for split in splits}
    t1 = time.time()
    if tokenizer is None:
        tokenizer = train_tokenizer(articles["train"], args.vocab_size)
    t2 = time.time()
    corpora = {split: tokenize_corpus(articles[split], tokenizer) for split in splits}
    t3 = time.time()
    for split in splits:
        c = corpora[split]
        if len(c) == 0:
            raise UserError(f"the {split} split has no sentences")
        log(f"data: {split:10s} {c.article.max() + 1:6,} articles {len(c):8,} sentences "
            f"{len(c.ids):10,} tokens ({(c.ids == UNK_ID).mean():.2%} [UNK])")
    log(f"data: read {t1 - t0:.1f}s, tokenizer ({tokenizer.get_vocab_size():,} tokens) "
        f"{t2 - t1:.1f}s, tokenization {t3 - t2:.1f}s")
    return tokenizer, corpora


# -----------------------------------------------------------------------------
# Training


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup to peak_lr, then linear decay to zero at total_steps (as in BERT)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def autocast_for(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def batch_to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch, no_padding):
    """The batch as model arguments; no attention mask at all when nothing is padded."""
    inputs = dict(batch)
    if no_padding:
        inputs["attention_mask"] = None
    return inputs


@torch.no_grad()
def evaluate(model, dataset, device, dtype, num_workers=0):
    """MLM loss, accuracy and perplexity over all masked positions, and NSP accuracy."""
    was_training = model.training
    model.eval()
    mlm_loss_sum = mlm_correct = nsp_correct = positives_correct = 0.0
    n_masked = n_pairs = n_positives = 0
    for batch in make_loader(dataset, num_workers, pin_memory=device.type == "cuda"):
        no_padding = bool(batch["attention_mask"].all())
        batch = batch_to_device(batch, device)
        with autocast_for(device, dtype):
            out = model(**model_inputs(batch, no_padding))
        targets = batch["mlm_labels"].view(-1)[batch["mlm_positions"]]
        n = len(targets)
        mlm_loss_sum += out.mlm_loss.item() * n
        mlm_correct += (out.mlm_logits.argmax(-1) == targets).sum().item()
        nsp_right = out.nsp_logits.argmax(-1) == batch["nsp_labels"]
        nsp_correct += nsp_right.sum().item()
        positives_correct += nsp_right[batch["nsp_labels"] == 0].sum().item()
        n_masked += n
        n_pairs += len(batch["nsp_labels"])
        n_positives += (batch["nsp_labels"] == 0).sum().item()
    model.train(was_training)
    mlm_loss = mlm_loss_sum / max(n_masked, 1)
    return {"mlm_loss": mlm_loss, "mlm_accuracy": mlm_correct / max(n_masked, 1),
            "perplexity": math.exp(min(mlm_loss, 50.0)), "nsp_accuracy": nsp_correct / max(n_pairs, 1),
            "nsp_accuracy_positives": positives_correct / max(n_positives, 1),  # true next sentences
            "nsp_accuracy_negatives": (nsp_correct - positives_correct) / max(n_pairs - n_positives, 1),
            "masked_tokens": n_masked, "pairs": n_pairs}


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
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (train one with "
                        "`python BERT_from_scratch.py`, or pass --checkpoint PATH)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a PyTorch file?): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of BERT_from_scratch.py")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer) from a checkpoint file, the model in eval mode on `device`."""
    ckpt = read_checkpoint(path)
    model = BertForPreTraining(BertConfig(**ckpt["config"]))
    # Released checkpoints may store half-precision weights: copying them into the fp32
    # parameters restores fp32.
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer_from_json(ckpt["tokenizer"])


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


# The training loop -------------------------------------------------------------


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


def train(args):
    # Processes and devices ---------------------------------------------------
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # launched by torchrun
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    master = rank == 0

    def log(*a, **k):  # only the first process prints
        if master:
            tqdm_write(" ".join(str(x) for x in a), **k)

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if ddp:  # one GPU per process
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=30))
    dtype = resolve_dtype(args.dtype, device)

    # Resume: the run's settings, weights, tokenizer and position come from the checkpoint -------
    ckpt = read_checkpoint(args.resume) if args.resume else None
    checkpoint_path = Path(args.checkpoint)
    if master:
        check_output_path(checkpoint_path, resuming_from=args.resume, overwrite=args.overwrite)

    # Data ---------------------------------------------------------------------
    tokenizer = None
    if ckpt:
        tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    elif ddp:  # one process learns the vocabulary and sends it to the others
        shared = [None]
        if master:
            articles = split_articles(load_wikitext(args.dataset_config, args.data_dir, ["train"])["train"])
            shared[0] = train_tokenizer(articles, args.vocab_size).to_str()
        dist.broadcast_object_list(shared, src=0)
        tokenizer = tokenizer_from_json(shared[0])
    tokenizer, corpora = prepare_data(args, tokenizer, log=log)
    vocab_size = tokenizer.get_vocab_size()
    valid_set = eval_batches(corpora["validation"], args.max_seq_len, args.mask_prob, vocab_size)
    test_set = eval_batches(corpora["test"], args.max_seq_len, args.mask_prob, vocab_size)

    # Model and optimizer --------------------------------------------------------
    torch.manual_seed(args.seed)
    config = BertConfig(**ckpt["config"]) if ckpt else config_for(args.model_size, vocab_size, args.dropout)
    model = BertForPreTraining(config).to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.01), lr=args.lr,
                                  betas=(0.9, 0.999), eps=1e-6, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, epoch, step_in_epoch, history = 0, 0, 0, []
    if ckpt:
        model.load_state_dict(ckpt["model"])
        state = ckpt["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if state.get("world_size", 1) != world_size:  # the position in the epoch depends on it
            raise UserError(f"{args.resume} was trained by {state.get('world_size', 1)} process(es); "
                            f"resume it with the same number, not {world_size}")
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        history = ckpt.get("history", [])
        rngs = state["rng"]
        set_rng_states(rngs[rank] if len(rngs) == world_size else rngs[0])
    if rank > 0 and not (ckpt and len(ckpt["train_state"]["rng"]) == world_size):
        torch.manual_seed(args.seed + 1000 * rank + step)  # each process its own dropout masks
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    # Every epoch has as many pairs (each positive and one negative), hence as many full steps.
    global_batch = args.batch_size * args.grad_accum_steps * world_size
    n_pairs = len(build_pairs(corpora["train"], np.random.default_rng(0)))
    steps_per_epoch = n_pairs // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"a step takes {global_batch:,} pairs but an epoch has only {n_pairs:,}; "
                        "use a smaller --batch_size")
    total_steps = steps_per_epoch * args.epochs  # the LR schedule; --max_steps only stops early
    warmup_steps = int(args.warmup * total_steps)
    max_steps = min(args.max_steps or total_steps, total_steps)
    log(f"model: {args.model_size} (L={config.num_hidden_layers}, H={config.hidden_size}, "
        f"A={config.num_attention_heads}), {raw_model.num_parameters():,} parameters, vocab {vocab_size:,}")
    log(f"training: {args.epochs} epochs x {steps_per_epoch:,} steps, batch {global_batch} = "
        f"{args.batch_size} x {args.grad_accum_steps} accumulation x {world_size} processes, "
        f"peak lr {args.lr:g}, {warmup_steps:,} warmup steps, {device.type}, {str(dtype)[6:]}"
        + (f", resuming at step {step:,}" if ckpt else ""))

    metrics_path = checkpoint_path.with_suffix(".metrics.jsonl")
    run_info = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "command": " ".join(["python"] + sys.argv),
                "git_commit": git_commit()}
    if ckpt:
        run_info["command"] = ckpt.get("command", "") + "  (resumed: " + run_info["command"] + ")"

    if master:  # the log restarts from what the checkpoint knows (nothing, for a new run)
        metrics_path.write_text("".join(json.dumps(entry) + "\n" for entry in history))

    def record(entry):
        history.append(entry)
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save(metrics):
        nonlocal saved_step
        saved_step = step
        rngs = [rng_states()]
        if ddp:
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_states())
        if not master:
            return
        train_state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "rng": rngs,
                       "world_size": world_size}
        try:
            save_checkpoint(checkpoint_path, raw_model, tokenizer, step=step, metrics=metrics,
                            history=history, train_state=train_state, **run_info)
        except OSError as e:
            raise UserError(f"could not write {checkpoint_path} ({e}); the previous checkpoint "
                            "there, if any, is intact") from None

    def run_eval(split, dataset):
        metrics = evaluate(raw_model, dataset, device, dtype, args.num_workers) if master else None
        if master:
            record({"kind": "eval", "split": split, "step": step, "epoch": epoch, **metrics})
            log(f"{split} @ step {step:,}: {format_metrics(metrics)}")
        if ddp:
            dist.barrier()
        return metrics

    def agreed(flag):  # every process must take the same decision, or collectives deadlock
        if not ddp:
            return flag
        flag = torch.tensor(float(flag), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    stop, stopping, saved_step = StopRequest(), False, None
    latest_metrics = ckpt.get("metrics", {}) if ckpt else {}
    model.train()
    stats = torch.zeros(4, device=device)  # loss and accuracy sums since the last log line
    counts = np.zeros(3)  # masked tokens, pairs, real tokens since the last log line
    t_start, tokens_seen = time.time(), 0
    while epoch < args.epochs and step < max_steps and not stopping:
        t_epoch, tokens_at_epoch_start = time.time(), tokens_seen
        pairs, batches, padding = training_batches(corpora["train"], args, epoch, rank, world_size)
        t_pairs = time.time() - t_epoch
        dataset = PretrainingBatches(corpora["train"], pairs, batches, args.max_seq_len,
                                     args.mask_prob, vocab_size, args.seed, epoch)
        loader = iter(make_loader(dataset, args.num_workers, start=step_in_epoch * args.grad_accum_steps,
                                  pin_memory=device.type == "cuda"))
        log(f"epoch {epoch + 1}/{args.epochs}: {len(pairs):,} pairs (drawn and grouped in {t_pairs:.2f}s), "
            f"padding {padding:.1%} of tokens")
        record({"kind": "epoch", "epoch": epoch, "step": step, "pairs": len(pairs), "padding": padding})
        bar = tqdm_bar(total=steps_per_epoch, initial=step_in_epoch, disable=not master,
                       desc=f"epoch {epoch + 1}")
        t_log = time.time()
        while step_in_epoch < steps_per_epoch and step < max_steps:
            micro_batches = [next(loader) for _ in range(args.grad_accum_steps)]
            # The step's loss is the mean over all its masked tokens and all its pairs, across
            # accumulation steps and processes, whatever their share of each.
            n_mlm = [len(b["mlm_positions"]) for b in micro_batches]
            n_nsp = [len(b["nsp_labels"]) for b in micro_batches]
            mlm_total, nsp_total = sum(n_mlm), sum(n_nsp)
            if ddp:  # every batch is full, so only the masked tokens need counting across processes
                nsp_total *= world_size
                mlm_total = torch.tensor(float(mlm_total))
                if device.type == "cuda":  # a pageable host->GPU copy would wait for the GPU
                    mlm_total = mlm_total.pin_memory()
                mlm_total = mlm_total.to(device, non_blocking=True)
                dist.all_reduce(mlm_total)
            lr = lr_at(step, total_steps, warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for k, batch in enumerate(micro_batches):
                no_padding = bool(batch["attention_mask"].all())  # checked on the host
                n_tokens = int(batch["attention_mask"].sum())
                counts += (n_mlm[k], n_nsp[k], n_tokens)
                tokens_seen += n_tokens
                batch = batch_to_device(batch, device)
                last = k == len(micro_batches) - 1
                with (model.no_sync() if ddp and not last else nullcontext()), autocast_for(device, dtype):
                    out = model(**model_inputs(batch, no_padding))
                    loss = world_size * (out.mlm_loss * (n_mlm[k] / mlm_total)
                                         + out.nsp_loss * (n_nsp[k] / nsp_total))
                scaler.scale(loss).backward()
                with torch.no_grad():
                    targets = batch["mlm_labels"].view(-1)[batch["mlm_positions"]]
                    stats += torch.stack([
                        out.mlm_loss.detach().float() * n_mlm[k],
                        (out.mlm_logits.argmax(-1) == targets).sum().float(),
                        out.nsp_loss.detach().float() * n_nsp[k],
                        (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).sum().float()])
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_in_epoch += 1
            bar.update()

            saving = args.save_every and step % args.save_every == 0
            if (step_in_epoch % args.log_every == 0 or saving or step == max_steps
                    or step_in_epoch == steps_per_epoch):
                # The loop's only host-device sync: the sums since the last log line, and whether
                # any process was asked to stop.
                totals = torch.cat([stats, torch.tensor(list(counts) + [stop.signum is not None],
                                                        device=device)])
                if ddp:
                    dist.all_reduce(totals)
                s = totals.tolist()
                n_masked, n_pairs, n_tokens = s[4:7]
                elapsed = time.time() - t_log
                entry = {"kind": "train", "step": step, "epoch": epoch + step_in_epoch / steps_per_epoch,
                         "loss": (s[0] / n_masked) + (s[2] / n_pairs), "mlm_loss": s[0] / n_masked,
                         "nsp_loss": s[2] / n_pairs, "mlm_accuracy": s[1] / n_masked,
                         "nsp_accuracy": s[3] / n_pairs, "lr": lr, "tokens_per_s": n_tokens / elapsed,
                         "padding": padding}
                if not math.isfinite(entry["loss"]):
                    raise UserError(f"the loss became {entry['loss']} at step {step}; lower --lr "
                                    f"(the last good checkpoint, if any, is {checkpoint_path})")
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", mlm=f"{entry['mlm_loss']:.3f}",
                                nsp=f"{entry['nsp_loss']:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{entry['tokens_per_s']:,.0f}")
                stats.zero_()
                counts[:] = 0
                t_log = time.time()
                stopping = s[7] > 0
            elif not ddp:  # one process decides alone, at every step; several at log steps
                stopping = stop.signum is not None
            if stopping:
                break
            if saving:  # after the log step's check that the loss is finite
                save(latest_metrics)
        bar.close()
        elapsed = time.time() - t_epoch
        log(f"epoch {epoch + 1}: {elapsed:,.0f}s of training, "
            f"{(tokens_seen - tokens_at_epoch_start) / elapsed:,.0f} tokens/s (this process)")
        if stopping or agreed(stop.signum is not None):
            stopping = True
            break
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        latest_metrics = {"validation": run_eval("validation", valid_set)}
        save(latest_metrics)
        if master and args.plot:
            plot_curves(history, checkpoint_path.with_suffix(".png"))
        stopping = agreed(stop.signum is not None)  # a signal during the evaluation

    if stopping:
        signum = stop.signum or signal.SIGTERM  # a process the signal did not reach follows the others
        log(f"{signal.Signals(signum).name}: stopping at step {step:,}")
        if saved_step != step:
            save(latest_metrics)
        log(f"checkpoint saved to {checkpoint_path}. Resume with: "
            f"python BERT_from_scratch.py --resume {checkpoint_path}")
        if ddp:
            dist.destroy_process_group()
        return 128 + signum

    latest_metrics["test"] = run_eval("test", test_set)
    save(latest_metrics)
    if master and args.plot:
        plot_curves(history, checkpoint_path.with_suffix(".png"))
    if ddp:  # data parallelism must keep every replica identical: check it
        digest = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()])
                              for p in raw_model.parameters()]).flatten().cpu()
        digests = [None] * world_size
        dist.all_gather_object(digests, digest)
        same = all(torch.equal(d, digests[0]) for d in digests)
        log(f"replicas identical across {world_size} processes: {'yes' if same else 'NO'}")
        dist.destroy_process_group()
        if not same:
            raise UserError("the model replicas diverged across processes")
    log(f"done: {step:,} steps in {time.time() - t_start:,.0f}s (evaluation included), peak memory "
        f"{peak_memory_gib():.2f} GiB; checkpoint {checkpoint_path}, metrics log {metrics_path}")
    return 0


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
        raise UserError(f"--checkpoint {path} is a directory; give a file name such as {path / 'bert.pt'}")
    if path.exists() and not overwrite and not (resuming_from and Path(resuming_from).resolve() == path.resolve()):
        raise UserError(f"{path} already exists; choose another --checkpoint, pass --overwrite to "
                        f"replace it, or --resume {path} to continue it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the checkpoint {path}: {e}") from None


def tqdm_bar(**kwargs):
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, mininterval=1.0, **kwargs)


def tqdm_write(msg, **kwargs):
    from tqdm import tqdm
    tqdm.write(msg, **kwargs)


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a mini BERT (MLM + NSP) on WikiText-2.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # hardware
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast precision; auto = bf16 where the CPU/GPU has it, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num_workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) // 2)),
                   help="DataLoader worker processes that build and mask batches")
    # model
    p.add_argument("--model_size", choices=list(PRESETS), default="mini")
    p.add_argument("--vocab_size", type=int, default=BertConfig.vocab_size)
    p.add_argument("--dropout", type=float, default=0.1)
    # data
    p.add_argument("--dataset_config", default="wikitext-2-v1",
                   choices=["wikitext-2-v1", "wikitext-2-raw-v1", "wikitext-103-v1", "wikitext-103-raw-v1"])
    p.add_argument("--data_dir", default=None,
                   help="local folder with train.txt, validation.txt, test.txt instead of the hub")
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--mask_prob", type=float, default=0.15)
    # optimization
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=16, help="pairs per process per micro-batch")
    p.add_argument("--grad_accum_steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (measured best for batch 16)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (counted from the start of training)")
    p.add_argument("--seed", type=int, default=42)
    # output
    p.add_argument("--checkpoint", default=None, help="where to save (default checkpoints/bert_<size>.pt)")
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
                parser.error(f"--{k} {given[k]} differs from the resumed run's {saved[k]}; "
                             "it cannot change when resuming")
        for k, v in saved.items():
            if k in vars(args) and k not in given and k not in ("resume", "overwrite"):
                setattr(args, k, v)
    if args.checkpoint is None:
        args.checkpoint = f"checkpoints/bert_{args.model_size}.pt"
    positive = ["epochs", "batch_size", "grad_accum_steps", "vocab_size", "log_every"]
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    for k in positive:
        if getattr(args, k) <= 0:
            parser.error(f"--{k} must be positive, got {getattr(args, k)}")
    if args.max_steps is not None and args.max_steps <= 0:
        parser.error(f"--max_steps must be positive, got {args.max_steps}")
    if args.save_every < 0 or args.num_workers < 0:
        parser.error("--save_every and --num_workers cannot be negative")
    if not 0.0 < args.mask_prob < 1.0:
        parser.error(f"--mask_prob must be in (0, 1), got {args.mask_prob}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.warmup < 1.0:
        parser.error(f"--warmup must be in [0, 1), got {args.warmup}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.vocab_size < 100:
        parser.error(f"--vocab_size must be at least 100, got {args.vocab_size}")
    max_positions = BertConfig.max_position_embeddings
    if not 8 <= args.max_seq_len <= max_positions:
        parser.error(f"--max_seq_len must be between 8 and {max_positions} (the position table), "
                     f"got {args.max_seq_len}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu)")
    if args.compile and not hasattr(torch, "compile"):
        parser.error("--compile needs PyTorch 2")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail now, not after the first epoch)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")
    return args


def main(argv=None):
    try:
        code = train(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
