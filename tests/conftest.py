"""Shared fixtures: a tiny WikiText-format corpus written by the tests, a tiny model config, and
helpers to run the two scripts as a user would. Nothing here needs network or ../shared."""

import os
import random
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import BERT_from_scratch as bert  # noqa: E402

# The real WikiText-2 (../shared/data beside the repository); tests that need it skip without it.
WIKITEXT_DIR = Path(os.environ.get("WIKITEXT_DIR", REPO.parent / "shared" / "data" / "wikitext-2-v1"))
needs_wikitext = pytest.mark.skipif(not (WIKITEXT_DIR / "train.txt").is_file(),
                                    reason=f"WikiText-2 not found at {WIKITEXT_DIR}")

TOPICS = ["river", "castle", "battle", "album", "storm", "church", "railway", "galaxy", "poet",
          "football", "island", "opera", "bridge", "army", "forest", "temple"]
WORDS = ["the", "a", "was", "is", "built", "near", "large", "old", "famous", "in", "during", "and",
         "with", "many", "people", "city", "north", "south", "years", "first", "second", "song",
         "king", "war", "water", "music", "team", "season", "ship", "stone", "road", "tower"]


def tiny_article(rng, topic, n_sentences):
    """One article in WikiText's format: title, a section heading, paragraphs of sentences."""
    lines = [f" = The {topic.title()} of {rng.choice(WORDS).title()} = ", " "]
    sentences = []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randint(0, len(words)), topic)  # every sentence names its article's topic
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), "<unk>")
        if rng.random() < 0.2:
            words += [str(rng.randint(1, 9)), "@,@", "000"]
        if rng.random() < 0.2:
            words += ["north", "@-@", "west"]
        sentences.append(" ".join(words) + " .")
    half = n_sentences // 2
    lines += [" " + " ".join(sentences[:half]) + " ", " ", " = = History = = ", " ",
              " " + " ".join(sentences[half:]) + " ", " "]
    return lines


def write_tiny_wikitext(folder, articles=(24, 6, 6), sentences=(6, 10), seed=0):
    """train/validation/test .txt files of a small synthetic corpus in WikiText's format."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(bert.SPLITS, articles):
        lines = [" "]
        for a in range(n):
            lines += tiny_article(rng, TOPICS[a % len(TOPICS)], rng.randint(*sentences))
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """Training runs cache their data under $XDG_CACHE_HOME: a temporary folder, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    return write_tiny_wikitext(tmp_path_factory.mktemp("tiny_wikitext"))


@pytest.fixture(scope="session")
def tiny_data(tiny_data_dir):
    """(tokenizer, {split: Corpus}) of the tiny corpus."""
    args = Namespace(dataset_config="wikitext-2-v1", data_dir=str(tiny_data_dir), vocab_size=300,
                     tokenizer_sample=bert.TOKENIZER_SAMPLE)
    return bert.prepare_data(args, log=lambda *a: None)


def tiny_config(vocab_size=300, dropout=0.1):
    return bert.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def run_script(script, *args, timeout=300, env=None, cwd=None):
    """Run BERT_from_scratch.py or test_mini_bert.py in a fresh process, as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


TINY_TRAIN = ["--device", "cpu", "--model_size", "tiny", "--vocab_size", "300", "--batch_size", "4",
              "--num_workers", "0", "--log_every", "1", "--dtype", "fp32"]
