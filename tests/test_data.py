"""The data pipeline: WikiText parsing, tokenizer, NSP pairs, truncation, masking, batching."""

from argparse import Namespace

import numpy as np
import pytest
import torch

import BERT_from_scratch as bert
from conftest import WIKITEXT_DIR, needs_wikitext


# WikiText parsing ------------------------------------------------------------------

def test_split_articles_titles_headings_and_sentences():
    lines = [" ", " = First Article = ", " ", " = = Early life = = ", " ",
             " It was built in 1 @,@ 200 . It cost 3 @.@ 5 million ! Was it north @-@ west ? ",
             " = = = Later = = = ", " A <unk> came . ", " ", " = Second = ", " ", " One more sentence . "]
    articles = bert.split_articles(lines)
    assert articles == [
        ["It was built in 1,200 .", "It cost 3.5 million !", "Was it north-west ?", "A [UNK] came ."],
        ["One more sentence ."],
    ]


def test_table_markup_that_looks_like_a_title_does_not_start_an_article():
    # WikiText-2 has table keys such as " = Played , W = " on lines of their own, without the
    # blank lines around real titles.
    lines = [" ", " = Somerset = ", " ", " The season began . ", " Key : Pld ", " = Played , W = ",
             " Wins , L ", " It ended well . ", " ", " = Next = ", " ", " Another text . "]
    articles = bert.split_articles(lines)
    assert len(articles) == 2
    assert articles[0] == ["The season began .", "Key : Pld", "Wins , L", "It ended well ."]


def test_unk_is_one_token_and_never_split(tiny_data):
    tokenizer, _ = tiny_data
    ids = tokenizer.encode("the [UNK] castle", add_special_tokens=False).ids
    assert ids.count(bert.UNK_ID) == 1 and len(ids) == 3
    assert tokenizer.token_to_id("unk") is None  # "[UNK]" placeholders never leak into the vocabulary


def test_tokenizer_special_ids_and_lowercase(tiny_data):
    tokenizer, _ = tiny_data
    assert [tokenizer.token_to_id(t) for t in bert.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tokenizer.encode("CASTLE", add_special_tokens=False).ids == \
        tokenizer.encode("castle", add_special_tokens=False).ids


def test_tokenizer_training_is_deterministic(tiny_data_dir):
    # tokenizers' own trainer gives a different vocabulary on most runs on this corpus
    # (huggingface/tokenizers#1794); ours must give the same ids every time.
    articles = bert.split_articles((tiny_data_dir / "train.txt").read_text().split("\n"))
    vocabularies = {tuple(sorted(bert.train_tokenizer(articles, 300).get_vocab().items()))
                    for _ in range(8)}
    assert len(vocabularies) == 1


def test_tokenizer_is_trained_on_train_only(tmp_path):
    from conftest import write_tiny_wikitext
    folder = write_tiny_wikitext(tmp_path / "d")
    (folder / "validation.txt").write_text(" = V = \n \n zyzzyva quixotic zyzzyva . quixotic zyzzyva .\n"
                                           " \n = W = \n \n quixotic zyzzyva .\n")
    args = Namespace(dataset_config="wikitext-2-v1", data_dir=str(folder), vocab_size=2000,
                     tokenizer_sample=bert.TOKENIZER_SAMPLE)
    tokenizer, corpora = bert.prepare_data(args, log=lambda *a: None)
    assert tokenizer.token_to_id("zyzzyva") is None and tokenizer.token_to_id("castle") is not None


def test_data_dir_takes_the_file_names_of_wikitext_downloads(tmp_path, tiny_data_dir):
    """Salesforce's zips name the splits wiki.{train,valid,test}.tokens (.raw), pytorch/examples
    valid.txt: each is read as the split; two candidates for one split are an error."""
    ours = bert.load_wikitext("wikitext-2-v1", tiny_data_dir)
    zip_layout, examples_layout = tmp_path / "wikitext-2", tmp_path / "examples"
    for folder, names in ((zip_layout, ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")),
                          (examples_layout, ("train.txt", "valid.txt", "test.txt"))):
        folder.mkdir()
        for split, name in zip(bert.SPLITS, names):
            (folder / name).write_bytes((tiny_data_dir / f"{split}.txt").read_bytes())
        theirs = bert.load_wikitext("wikitext-2-v1", folder)
        assert all(list(theirs[split]) == list(ours[split]) for split in bert.SPLITS)
    (examples_layout / "validation.txt").write_text(" = A = \n")
    with pytest.raises(bert.UserError, match="has validation.txt and valid.txt: which is the validation split"):
        bert.load_wikitext("wikitext-2-v1", examples_layout)


# NSP pairs ----------------------------------------------------------------------------

def test_pairs_half_negatives_from_other_articles(tiny_data):
    _, corpora = tiny_data
    c = corpora["train"]
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    a, b, label = pairs.T
    assert (label == 1).sum() == (label == 0).sum() == len(pairs) // 2
    pos, neg = pairs[label == 0], pairs[label == 1]
    # Positives: B is the very next sentence of the same article.
    assert (pos[:, 1] == pos[:, 0] + 1).all() and (c.article[pos[:, 0]] == c.article[pos[:, 1]]).all()
    # Every consecutive pair within an article is a positive, none across articles.
    expected = [i for i in range(len(c) - 1) if c.article[i] == c.article[i + 1]]
    assert sorted(pos[:, 0].tolist()) == expected
    # Each positive has one negative with the same first sentence, B from another article.
    assert sorted(neg[:, 0].tolist()) == expected
    assert (c.article[neg[:, 0]] != c.article[neg[:, 1]]).all()
    assert (neg[:, 1] != neg[:, 0] + 1).all()


def test_negatives_are_fresh_each_epoch_and_reproducible(tiny_data):
    _, corpora = tiny_data
    c = corpora["train"]
    p0 = bert.build_pairs(c, bert.rng_for(42, 0, bert.PAIR_STREAM))
    p0_again = bert.build_pairs(c, bert.rng_for(42, 0, bert.PAIR_STREAM))
    p1 = bert.build_pairs(c, bert.rng_for(42, 1, bert.PAIR_STREAM))
    assert np.array_equal(p0, p0_again)
    assert not np.array_equal(p0[p0[:, 2] == 1], p1[p1[:, 2] == 1])


def test_corpus_without_pairs_is_a_clear_error():
    one_sentence_articles = bert.Corpus(np.arange(10, 16, dtype=np.int32), np.array([0, 2, 4, 6]),
                                        np.array([0, 1, 2]))
    with pytest.raises(bert.UserError, match="no article with two sentences"):
        bert.build_pairs(one_sentence_articles, np.random.default_rng(0))
    single_article = bert.Corpus(np.arange(10, 16, dtype=np.int32), np.array([0, 2, 4, 6]),
                                 np.array([0, 0, 0]))
    with pytest.raises(bert.UserError, match="single article"):
        bert.build_pairs(single_article, np.random.default_rng(0))


# Layout, segments, truncation --------------------------------------------------------

def test_layout_and_segment_ids_match_the_tokenizer(tiny_data):
    tokenizer, corpora = tiny_data
    c = corpora["train"]
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    ds = bert.PretrainingBatches(c, pairs, [np.array([j]) for j in range(8)], 64, 0.15,
                                 tokenizer.get_vocab_size(), 0, 0)
    for j in range(8):
        batch = ds[j]
        n = int(batch["attention_mask"].sum())
        ids, types, labels = (batch[k][0, :n].numpy() for k in ("input_ids", "token_type_ids", "mlm_labels"))
        original = np.where(labels != -100, labels, ids)  # undo the masking
        a, b = c.sentence(pairs[j, 0]), c.sentence(pairs[j, 1])
        expected = tokenizer.post_process(_encoding(tokenizer, a), _encoding(tokenizer, b))
        assert original.tolist() == [bert.CLS_ID, *a, bert.SEP_ID, *b, bert.SEP_ID]
        assert original.tolist() == expected.ids  # the same layout as the tokenizer's template
        assert types.tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) == expected.type_ids


def _encoding(tokenizer, ids):
    tokens = [tokenizer.id_to_token(int(i)) for i in ids]
    enc = tokenizer.encode(tokens, is_pretokenized=True, add_special_tokens=False)
    assert enc.ids == list(ids)
    return enc


def test_truncation_is_longest_first_and_matches_the_reference_loop():
    def reference(la, lb, max_len):  # BERT's truncate_seq_pair, trimming the end
        while la + lb > max_len - 3:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb
    rng = np.random.default_rng(0)
    for la, lb, m in zip(rng.integers(1, 300, 2000), rng.integers(1, 300, 2000), rng.integers(8, 200, 2000)):
        got = bert.truncated_lengths(int(la), int(lb), int(m))
        assert tuple(map(int, got)) == reference(int(la), int(lb), int(m))
    la, lb = rng.integers(1, 300, 500), rng.integers(1, 300, 500)
    na, nb = bert.truncated_lengths(la, lb, 128)
    assert (na + nb + 3 <= 128).all() and (na >= 1).all() and (nb >= 1).all()


def test_long_pairs_are_truncated_never_dropped(tiny_data):
    tokenizer, corpora = tiny_data
    c = corpora["train"]
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    ds = bert.PretrainingBatches(c, pairs, [np.arange(len(pairs))], 12, 0.15, tokenizer.get_vocab_size(), 0, 0)
    batch = ds[0]
    assert batch["input_ids"].shape == (len(pairs), 12)  # every pair kept, none over the limit
    assert (batch["input_ids"][:, 0] == bert.CLS_ID).all()
    assert ((batch["input_ids"] == bert.SEP_ID).sum(1) == 2).all()
    assert ((batch["token_type_ids"] == 1).sum(1) >= 2).all()  # some of B and its [SEP] survive


# Masking --------------------------------------------------------------------------------

def test_masking_statistics():
    rng = np.random.default_rng(0)
    V = 1000
    n_candidates = n_selected = n_mask = n_random = n_same = 0
    ids = rng.integers(bert.N_SPECIAL, V, (400, 120))
    ids[rng.random((400, 120)) < 0.05] = bert.UNK_ID
    sep = np.full((400, 1), bert.SEP_ID)
    batch = np.concatenate([np.full((400, 1), bert.CLS_ID), ids[:, :60], sep, ids[:, 60:], sep], axis=1)
    original_batch = batch.copy()
    labels_batch = bert.mask_tokens(batch, np.arange(400), 0, 0, 0.15, V)
    for ids, original, labels in zip(batch, original_batch, labels_batch):
        selected = labels != -100
        assert (labels[selected] == original[selected]).all()
        assert not selected[original < bert.N_SPECIAL].any()  # never [CLS], [SEP], [UNK], [PAD]
        assert (ids[~selected] == original[~selected]).all()  # nothing changes elsewhere
        n_candidates += (original >= bert.N_SPECIAL).sum()
        n_selected += selected.sum()
        n_mask += (ids[selected] == bert.MASK_ID).sum()
        changed = selected & (ids != original) & (ids != bert.MASK_ID)
        assert (ids[changed] >= bert.N_SPECIAL).all()  # random replacements are ordinary tokens
        n_random += changed.sum()
        n_same += (selected & (ids == original)).sum()
    assert abs(n_selected / n_candidates - 0.15) < 0.005
    assert abs(n_mask / n_selected - 0.8) < 0.02
    # "random" may draw the original token (1 in V); count those with "unchanged".
    assert abs(n_random / n_selected - 0.1) < 0.015
    assert abs(n_same / n_selected - 0.1) < 0.015


def test_at_least_one_position_per_sequence_and_none_without_candidates():
    ids = np.array([[bert.CLS_ID, 7, bert.SEP_ID, 9, bert.SEP_ID],
                    [bert.CLS_ID, bert.UNK_ID, bert.SEP_ID, bert.UNK_ID, bert.SEP_ID]])  # only special
    labels = bert.mask_tokens(ids, np.arange(2), 0, 0, 0.15, 100)
    assert (labels[0] != -100).sum() == 1 and (labels[1] == -100).all()


def test_masks_are_dynamic_and_independent_of_batching(tiny_data):
    tokenizer, corpora = tiny_data
    c, V = corpora["train"], tokenizer.get_vocab_size()
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    idx = np.arange(16)
    def labels(batches, epoch):
        ds = bert.PretrainingBatches(c, pairs, batches, 64, 0.15, V, seed=1, epoch=epoch)
        return torch.cat([ds[i]["mlm_labels"][:, :].flatten()[ds[i]["attention_mask"].flatten() == 1]
                          for i in range(len(batches))])
    whole = labels([idx], 0)
    assert torch.equal(whole, labels([idx[:8], idx[8:]], 0))  # same pairs, other batching: same masks
    assert not torch.equal(whole, labels([idx], 1))  # a new epoch draws new masks


# Batching --------------------------------------------------------------------------------

@pytest.mark.parametrize("pad_multiple", [1, 16])
def test_batches_are_padded_to_a_static_shape(tiny_data, pad_multiple):
    tokenizer, corpora = tiny_data
    c = corpora["train"]
    pairs = bert.build_pairs(c, np.random.default_rng(0))
    lengths = bert.pair_lengths(c, pairs, 64)
    ds = bert.PretrainingBatches(c, pairs, [np.arange(5)], 64, 0.15, tokenizer.get_vocab_size(), 0, 0,
                                 pad_multiple)
    batch = ds[0]
    T = batch["input_ids"].shape[1]
    assert T == min(-(-lengths[:5].max() // pad_multiple) * pad_multiple, 64) and T % pad_multiple == 0
    assert batch["attention_mask"].sum(1).tolist() == lengths[:5].tolist()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == bert.PAD_ID).all()
    assert (batch["mlm_labels"][batch["attention_mask"] == 0] == -100).all()
    # The masked positions, then index 0 ([CLS], never a target) up to the shape's fixed capacity.
    masked = (batch["mlm_labels"].view(-1) != -100).nonzero().squeeze(1).tolist()
    assert len(batch["mlm_positions"]) == bert.masked_capacity(T, 5, 0.15) >= len(masked)
    assert batch["mlm_positions"].tolist() == masked + [0] * (len(batch["mlm_positions"]) - len(masked))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels", "mlm_positions"}


def test_length_grouping_cuts_padding_and_covers_every_pair_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 129, 10_000)
    batches = bert.length_grouped_batches(lengths, 16, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert len(flat) == len(set(flat.tolist())) == 10_000 // 16 * 16  # only the last partial batch dropped
    def padding(bs):
        return 1 - sum(lengths[b].sum() for b in bs) / sum(len(b) * lengths[b].max() for b in bs)
    shuffled = np.array_split(rng.permutation(10_000)[:len(flat)], len(flat) // 16)
    assert padding(batches) < 0.05 < 0.3 < padding(shuffled)
    # The order of batches is random, not sorted by length.
    maxima = [lengths[b].max() for b in batches]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_a_step_holds_the_same_pairs_for_any_split_over_processes_and_accumulation(tiny_data):
    _, corpora = tiny_data
    c = corpora["train"]
    def steps(batch_size, accum, world):
        args = Namespace(seed=3, max_seq_len=64, batch_size=batch_size, grad_accum_steps=accum, pad_multiple=16)
        per_rank = [bert.training_batches(c, args, 0, r, world)[1] for r in range(world)]
        n = accum  # micro-batches per step and process
        return [sorted(np.concatenate([b for rank in per_rank for b in rank[s * n:(s + 1) * n]]).tolist())
                for s in range(len(per_rank[0]) // n)]
    reference = steps(8, 1, 1)
    assert steps(4, 2, 1) == reference
    assert steps(4, 1, 2) == reference
    assert steps(2, 2, 2) == reference


@needs_wikitext
def test_wikitext2_preparation():
    args = Namespace(dataset_config="wikitext-2-v1", data_dir=str(WIKITEXT_DIR), vocab_size=16384,
                     tokenizer_sample=bert.TOKENIZER_SAMPLE)
    tokenizer, corpora = bert.prepare_data(args, log=lambda *a: None)
    assert tokenizer.get_vocab_size() == 16384
    for split, articles in [("train", 600), ("validation", 60), ("test", 60)]:
        assert corpora[split].article.max() + 1 == articles  # WikiText-2's published counts
    pairs = bert.build_pairs(corpora["train"], np.random.default_rng(0))
    assert len(pairs) > 140_000
    unk = tokenizer.encode("[UNK]", add_special_tokens=False).ids
    assert unk == [bert.UNK_ID] and (corpora["test"].ids == bert.UNK_ID).mean() > 0.03


# Large splits: a sampled vocabulary, streamed reading and tokenization, vectorised batches ----------

def test_sentence_sample_is_seeded_bounded_and_in_text_order(tiny_data_dir):
    articles = bert.split_articles((tiny_data_dir / "train.txt").read_text().split("\n"))
    sentences = [s for article in articles for s in article]
    sample = bert.sample_sentences(iter(articles), 50, seed=0)  # a one-pass iterator will do
    assert len(sample) == 50 < len(sentences)
    positions = [sentences.index(s) for s in sample]
    assert positions == sorted(positions)
    assert bert.sample_sentences(articles, 50, seed=0) == sample != bert.sample_sentences(articles, 50, seed=1)
    assert bert.sample_sentences(articles, len(sentences), seed=0) == sentences  # small split: all of it
    # Uniform: over many seeds, every sentence is drawn about equally often.
    numbered = [[f"sentence {a} {i}" for i in range(7)] for a in range(30)]
    counts = np.zeros(210)
    for seed in range(400):
        for s in bert.sample_sentences(numbered, 50, seed):
            counts[int(s.split()[1]) * 7 + int(s.split()[2])] += 1
    assert counts.sum() == 400 * 50 and 0.6 < counts.min() / counts.mean() < counts.max() / counts.mean() < 1.4


def test_the_vocabulary_comes_from_the_whole_split_when_small_and_a_sample_when_large(tiny_data_dir, monkeypatch):
    articles = bert.split_articles((tiny_data_dir / "train.txt").read_text().split("\n"))
    lines = bert.load_wikitext("wikitext-2-v1", tiny_data_dir, ["train"])["train"]
    small = bert.learn_tokenizer(lines, Namespace(vocab_size=300, tokenizer_sample=bert.TOKENIZER_SAMPLE))
    assert small.to_str() == bert.train_tokenizer(articles, 300).to_str()  # exactly as before sampling
    seen = []
    train = bert.train_tokenizer
    monkeypatch.setattr(bert, "train_tokenizer", lambda a, v: seen.append(a) or train(a, v))
    large = [bert.learn_tokenizer(lines, Namespace(vocab_size=300, tokenizer_sample=60)) for _ in range(3)]
    assert [len([s for a in text for s in a]) for text in seen] == [60] * 3
    assert len({t.to_str() for t in large}) == 1 and large[0].to_str() != small.to_str()


@needs_wikitext
def test_wikitext2_is_small_enough_to_learn_its_vocabulary_from_all_of_it():
    lines = bert.load_wikitext("wikitext-2-v1", WIKITEXT_DIR, ["train"])["train"]
    assert sum(len(a) for a in bert.iter_articles(lines)) == 77_394 < bert.TOKENIZER_SAMPLE


def test_articles_are_read_as_the_lines_come(tiny_data_dir):
    lines = (tiny_data_dir / "train.txt").read_text().split("\n")
    assert list(bert.iter_articles(iter(lines))) == bert.split_articles(lines)
    with open(tiny_data_dir / "train.txt") as f:  # lines with their "\n", as a file gives them
        assert list(bert.iter_articles(f)) == bert.split_articles(lines)


def tokenize_at_once(articles, tokenizer):
    """The reference: every sentence of the split encoded in one call."""
    sentences = [s for article in articles for s in article]
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    keep = lengths > 0
    ids = np.array([i for e in encodings for i in e.ids], dtype=np.int32)
    article = np.repeat(np.arange(len(articles)), [len(a) for a in articles])[keep]
    return bert.Corpus(ids, np.concatenate([[0], np.cumsum(lengths[keep])]), article)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_streamed_tokenization_equals_tokenizing_all_at_once(tiny_data, tiny_data_dir, chunk):
    tokenizer, _ = tiny_data
    articles = bert.split_articles((tiny_data_dir / "validation.txt").read_text().split("\n"))
    # What the word cache must get right: odd spacing, accents, punctuation, characters the
    # normalizer removes, a sentence of nothing else, and a word longer than WordPiece's limit.
    articles[1:1] = [["Ünïcode  café , naïve\u00a0tab\there", "\x00\x01", "zz" * 60 + " the castle ."], []]
    expected = tokenize_at_once(articles, tokenizer)
    got = bert.tokenize_corpus(iter(articles), tokenizer, chunk=chunk)
    for f in ("ids", "offsets", "article"):
        assert getattr(got, f).dtype == getattr(expected, f).dtype
        assert np.array_equal(getattr(got, f), getattr(expected, f))


def batches_reference(corpus, args, epoch, rank, world_size):
    """training_batches as a plain loop over pairs and steps: what the vectorised one must equal."""
    pairs = bert.build_pairs(corpus, bert.rng_for(args.seed, epoch, bert.PAIR_STREAM))
    lengths = bert.pair_lengths(corpus, pairs, args.max_seq_len)
    rng, step_size = bert.rng_for(args.seed, epoch, bert.ORDER_STREAM), args.batch_size * args.grad_accum_steps * world_size
    order, batches = rng.permutation(len(lengths)), []
    for start in range(0, len(order), step_size * 64):
        part = order[start:start + step_size * 64]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + step_size] for i in range(0, len(part) - step_size + 1, step_size)]
    steps = [batches[i] for i in rng.permutation(len(batches))]
    micro, mine, real, padded = args.batch_size, [], 0, 0
    for step in steps:
        for j in range(args.grad_accum_steps * world_size):
            b = step[j * micro:(j + 1) * micro]
            if j % world_size == rank:
                mine.append(b)
            real += lengths[b].sum()
            padded += bert.padded_length(lengths[b].max(), args.pad_multiple, args.max_seq_len) * micro
    return pairs, mine, float(1.0 - real / max(padded, 1))


@pytest.mark.parametrize("batch_size, accum, world", [(4, 1, 1), (3, 2, 1), (2, 1, 3), (2, 2, 2)])
def test_vectorised_batches_equal_a_plain_loop(tiny_data, batch_size, accum, world):
    _, corpora = tiny_data
    args = Namespace(seed=5, max_seq_len=32, batch_size=batch_size, grad_accum_steps=accum, pad_multiple=8)
    for rank in range(world):
        pairs, mine, padding = bert.training_batches(corpora["train"], args, 1, rank, world)
        ref_pairs, ref_mine, ref_padding = batches_reference(corpora["train"], args, 1, rank, world)
        assert np.array_equal(pairs, ref_pairs) and padding == ref_padding
        assert mine.shape == (len(ref_mine), batch_size) and np.array_equal(mine, np.array(ref_mine))
