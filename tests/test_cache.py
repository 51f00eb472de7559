"""The data cache: the tokenizer and the tokenized splits are computed once per text and setting,
read back memory-mapped, rebuilt (never used) when damaged, and written atomically."""

import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

import BERT_from_scratch as bert
from conftest import TINY_TRAIN, run_script, write_tiny_wikitext


def data_args(folder, **overrides):
    return Namespace(**{"dataset_config": "wikitext-2-v1", "data_dir": str(folder), "vocab_size": 300,
                        "tokenizer_sample": bert.TOKENIZER_SAMPLE, **overrides})


def same_data(a, b):
    (tok_a, corpora_a), (tok_b, corpora_b) = a, b
    return tok_a.to_str() == tok_b.to_str() and corpora_a.keys() == corpora_b.keys() and all(
        np.array_equal(getattr(corpora_a[s], f), getattr(corpora_b[s], f)) for s in corpora_a for f in ("ids", "offsets", "article"))


def no_building(monkeypatch):
    """From here on, any tokenizer training or tokenization fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("built although cached")
    monkeypatch.setattr(bert, "train_tokenizer", fail)
    monkeypatch.setattr(bert, "tokenize_corpus", fail)


@pytest.fixture
def data_dir(tmp_path):
    return write_tiny_wikitext(tmp_path / "data")


def test_a_cache_hit_returns_the_same_tokenizer_and_arrays_memory_mapped(tmp_path, data_dir, monkeypatch):
    fresh = bert.prepare_data(data_args(data_dir), log=lambda *a: None)  # no cache
    first = bert.prepare_data(data_args(data_dir), log=lambda *a: None, cache_dir=tmp_path / "cache")
    no_building(monkeypatch)
    second = bert.prepare_data(data_args(data_dir), log=lambda *a: None, cache_dir=tmp_path / "cache")
    assert same_data(fresh, first) and same_data(fresh, second)
    assert all(isinstance(c.ids, np.memmap) for c in second[1].values())
    # A resumed run brings its checkpoint's tokenizer: the splits it tokenized are found again.
    resumed = bert.prepare_data(data_args(data_dir, vocab_size=None), bert.tokenizer_from_json(fresh[0].to_str()),
                                log=lambda *a: None, cache_dir=tmp_path / "cache")
    assert same_data(fresh, resumed)


def test_every_setting_and_the_text_itself_are_in_the_key(tmp_path, data_dir, monkeypatch):
    cache = tmp_path / "cache"
    bert.prepare_data(data_args(data_dir), log=lambda *a: None, cache_dir=cache)
    entries = set(os.listdir(cache))
    assert len(entries) == 4  # the tokenizer and three splits

    def new_entries(args):
        before = set(os.listdir(cache))
        bert.prepare_data(args, log=lambda *a: None, cache_dir=cache)
        return {e.split("-")[0] for e in set(os.listdir(cache)) - before}
    # The tiny corpus has fewer words than either size: another tokenizer entry, but the same
    # vocabulary, so the tokenized splits (keyed by the tokenizer itself) are found again.
    assert new_entries(data_args(data_dir, vocab_size=250)) == {"tokenizer"}
    assert new_entries(data_args(data_dir, vocab_size=150)) == {"tokenizer", "train", "validation", "test"}
    assert new_entries(data_args(data_dir, tokenizer_sample=10)) == {"tokenizer", "train", "validation", "test"}
    assert new_entries(data_args(data_dir)) == set()  # unchanged: all hits
    train = data_dir / "train.txt"
    train.write_text(train.read_text() + " = Appended = \n \n One more sentence here . And another . \n")
    assert new_entries(data_args(data_dir)) == {"tokenizer", "train", "validation", "test"}  # new vocabulary
    monkeypatch.setattr(bert, "DATA_VERSION", bert.DATA_VERSION + 1)
    assert new_entries(data_args(data_dir)) == {"tokenizer", "train", "validation", "test"}


@pytest.mark.parametrize("damage", ["truncate ids", "flip a byte of offsets", "garbage manifest",
                                    "missing file", "truncate tokenizer"])
def test_a_damaged_entry_is_reported_in_one_line_and_rebuilt(tmp_path, data_dir, damage):
    cache = tmp_path / "cache"
    fresh = bert.prepare_data(data_args(data_dir), log=lambda *a: None)  # (not memory-mapped from the files damaged below)
    bert.prepare_data(data_args(data_dir), log=lambda *a: None, cache_dir=cache)
    train = next(cache.glob("train-*"))
    tokenizer = next(cache.glob("tokenizer-*"))
    if damage == "truncate ids":
        (train / "ids.npy").write_bytes((train / "ids.npy").read_bytes()[:-8])
    elif damage == "flip a byte of offsets":
        data = bytearray((train / "offsets.npy").read_bytes())
        data[-3] ^= 0x40
        (train / "offsets.npy").write_bytes(bytes(data))
    elif damage == "garbage manifest":
        (train / "manifest.json").write_text("{not json")
    elif damage == "missing file":
        (train / "article.npy").unlink()
    elif damage == "truncate tokenizer":
        text = (tokenizer / "tokenizer.json").read_text()
        (tokenizer / "tokenizer.json").write_text(text[:len(text) // 2])
    logged = []
    again = bert.prepare_data(data_args(data_dir), log=logged.append, cache_dir=cache)
    damaged = [line for line in logged if "is damaged" in line]
    assert len(damaged) == 1 and "\n" not in damaged[0] and "rebuilding it" in damaged[0]
    assert str(tokenizer if damage == "truncate tokenizer" else train) in damaged[0]
    assert same_data(fresh, again)
    logged.clear()
    bert.prepare_data(data_args(data_dir), log=logged.append, cache_dir=cache)
    assert not any("is damaged" in line for line in logged)  # rewritten whole


def test_writing_an_entry_is_atomic(tmp_path):
    folder = tmp_path / "cache" / "entry"

    def write_then_fail(error):
        def write(tmp):
            (tmp / "a.npy").write_bytes(b"half of an entry")
            raise error
        return write
    logged = []
    assert not bert.write_entry(folder, write_then_fail(OSError(28, "No space left on device")), logged.append)
    assert len(logged) == 1 and "going on without it" in logged[0]
    with pytest.raises(KeyboardInterrupt):
        bert.write_entry(folder, write_then_fail(KeyboardInterrupt()), logged.append)
    assert os.listdir(tmp_path / "cache") == []  # neither the entry nor its temporary folder
    assert bert.write_entry(folder, lambda tmp: (tmp / "a.npy").write_bytes(b"whole"), logged.append)
    assert sorted(os.listdir(folder)) == ["a.npy", "manifest.json"] and os.listdir(tmp_path / "cache") == ["entry"]
    bert.check_entry(folder)


def test_an_unwritable_cache_is_no_error(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    logged = []
    fresh = bert.prepare_data(data_args(data_dir), log=logged.append, cache_dir=blocker / "cache")
    assert same_data(fresh, bert.prepare_data(data_args(data_dir), log=lambda *a: None))
    assert sum("going on without it" in line for line in logged) == 4


def test_training_caches_under_xdg_cache_home_unless_told_not_to(tmp_path, data_dir):
    flags = [*TINY_TRAIN, "--data_dir", data_dir, "--max_steps", "1", "--overwrite"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = run_script("BERT_from_scratch.py", *flags, "--checkpoint", tmp_path / "a.pt", "--no_cache", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "xdg").exists()
    for name in ("b.pt", "c.pt"):  # the first writes the cache, the second reads it
        result = run_script("BERT_from_scratch.py", *flags, "--checkpoint", tmp_path / name, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"cache: {tmp_path / 'xdg' / 'bert-from-scratch'}" in result.stdout
    assert len(list((tmp_path / "xdg" / "bert-from-scratch").iterdir())) == 4
    result = run_script("BERT_from_scratch.py", *flags, "--checkpoint", tmp_path / "d.pt",
                        "--cache_dir", tmp_path / "elsewhere", env=env)
    assert result.returncode == 0 and len(list((tmp_path / "elsewhere").iterdir())) == 4


def test_the_default_cache_follows_xdg_cache_home(monkeypatch):
    assert not bert.default_cache_dir().is_relative_to(Path.home())  # the tests' temporary folder
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert bert.default_cache_dir() == Path.home() / ".cache" / "bert-from-scratch"
