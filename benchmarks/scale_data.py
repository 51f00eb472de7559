"""
Data preparation at WikiText-103's scale, then a short training run on it: seconds and peak
resident memory (RSS) of each stage, and how soon a run with the data cached takes its first step.

    # ~WikiText-103's size: 50 copies of WikiText-2's train split (validation and test as they are)
    nice -n 19 python benchmarks/scale_data.py --copies 50
    nice -n 19 python benchmarks/scale_data.py --copies 5                 # a quick check
    nice -n 19 python benchmarks/scale_data.py --data_dir DIR             # real files: train/validation/test.txt
    # the vocabulary learned from samples of the train split, against the one from all of it
    nice -n 19 python benchmarks/scale_data.py --copies 1 --sample_study 10000 20000 40000 0

Every stage runs in a fresh process and reports its own peak RSS (VmHWM), so no stage inherits
another's. The stages: one pass that reads the train split into articles and sentences; the
training script's prepare_data() with an empty cache, timed by step (the tokenizer's pass over
the text and its sample, WordPiece training, tokenizing every split, writing the cache); the
same call again, now served by the cache; and the training script itself, --max_steps 50 with
the cache, then its validation and test evaluations. Nothing is written outside --work (a
temporary folder unless given).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2-v1"


def peak_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20


def reset_peak():
    """Start a new peak-RSS measurement in this process (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peaks are then cumulative from the start of the process


def data_args(opts, cache_dir):
    return Namespace(dataset_config="wikitext-2-v1", data_dir=str(opts.data), vocab_size=opts.vocab_size,
                     tokenizer_sample=opts.tokenizer_sample, cache_dir=cache_dir)


# The stages, each run in a child process (--stage NAME) that prints one JSON line --------------

def stage_read(opts):
    import BERT_from_scratch as bert
    t = time.perf_counter()
    articles = sentences = 0
    for article in bert.iter_articles(bert.load_wikitext("wikitext-2-v1", opts.data, ["train"])["train"]):
        articles, sentences = articles + 1, sentences + len(article)
    return {"read + split (one pass over train)": [time.perf_counter() - t, peak_gib()],
            "articles": articles, "sentences": sentences}


def stage_prepare(opts):
    """The training script's own prepare_data, its steps timed by wrapping the functions it calls."""
    import BERT_from_scratch as bert
    steps = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            reset_peak()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds, peak = steps.get(name, [0.0, 0.0])
                steps[name] = [seconds + time.perf_counter() - t, max(peak, peak_gib())]
        return run

    bert.sample_sentences = timed("tokenizer: read train + sample sentences", bert.sample_sentences)
    bert.train_tokenizer = timed("tokenizer: WordPiece training", bert.train_tokenizer)
    bert.tokenize_corpus = timed("tokenize every split (read + encode)", bert.tokenize_corpus)
    bert.write_entry = timed("cache write (with checksums)", bert.write_entry)
    t = time.perf_counter()
    tokenizer, corpora = bert.prepare_data(data_args(opts, opts.cache), log=lambda *a: None, cache_dir=opts.cache)
    total = time.perf_counter() - t
    steps["prepare_data, empty cache (total)"] = [total, max(peak for _, peak in steps.values())]
    return {**steps, "tokens": {split: len(c.ids) for split, c in corpora.items()},
            "vocab_size": tokenizer.get_vocab_size()}


def stage_cached(opts):
    import BERT_from_scratch as bert
    reset_peak()
    t = time.perf_counter()
    bert.prepare_data(data_args(opts, opts.cache), log=lambda *a: None, cache_dir=opts.cache)
    return {"prepare_data, from the cache": [time.perf_counter() - t, peak_gib()]}


def stage_sample(opts):
    """The vocabulary learned from a sample of opts.size sentences (0: all), and what it does to
    the validation split: tokens per word and [UNK]s."""
    import BERT_from_scratch as bert
    lines = bert.load_wikitext("wikitext-2-v1", opts.data, ["train", "validation"])
    args = data_args(opts, None)
    args.tokenizer_sample = opts.size or 2 ** 62
    t = time.perf_counter()
    tokenizer = bert.learn_tokenizer(lines["train"], args)
    seconds, peak = time.perf_counter() - t, peak_gib()
    validation = bert.tokenize_corpus(bert.iter_articles(lines["validation"]), tokenizer)
    words = sum(len(s.split(" ")) for a in bert.iter_articles(lines["validation"]) for s in a)
    return {"seconds": seconds, "peak_gib": peak, "vocab": sorted(tokenizer.get_vocab()),
            "tokens_per_word": len(validation.ids) / words, "unk": float((validation.ids == bert.UNK_ID).mean())}


STAGES = {"read": stage_read, "prepare": stage_prepare, "cached": stage_cached, "sample": stage_sample}


def run_stage(name, opts, **extra):
    cmd = [sys.executable, __file__, "--stage", name, "--data", str(opts.data), "--cache", str(opts.cache),
           "--vocab_size", str(opts.vocab_size), "--tokenizer_sample", str(opts.tokenizer_sample)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = 0.0  # the whole process's, sampled from outside: the stages inside reset their own
        while proc.poll() is None:
            peak = max(peak, rss_gib(proc.pid))
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"stage {name} failed:\n{err.read()[-3000:]}")
        return {**json.loads(out.read().splitlines()[-1]), "sampled_peak_gib": peak}


def rss_gib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2 ** 20
    except (OSError, StopIteration):
        return 0.0


# The training run --------------------------------------------------------------------------------

def run_training(opts, work):
    """The training script on the prepared data: seconds to its first step (from the metrics log,
    polled), its wall time and peak RSS (its own 'done:' line)."""
    checkpoint = work / "run.pt"
    cmd = [sys.executable, str(REPO / "BERT_from_scratch.py"), "--device", "cpu", "--data_dir", str(opts.data),
           "--cache_dir", str(opts.cache), "--vocab_size", str(opts.vocab_size), "--tokenizer_sample",
           str(opts.tokenizer_sample), "--checkpoint", str(checkpoint), "--overwrite", "--log_every", "1",
           *opts.train_flags.split()]
    print("$ " + " ".join(cmd[1:]), flush=True)
    metrics = checkpoint.with_suffix(".metrics.jsonl")
    metrics.unlink(missing_ok=True)
    log = open(work / "run.log", "w+")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    first_step = None
    while proc.poll() is None:
        if first_step is None and metrics.exists() and '"kind": "train"' in metrics.read_text():
            first_step = time.time() - t0
        time.sleep(0.1)
    wall = time.time() - t0
    log.seek(0)
    lines = [line.strip() for line in log.read().replace("\r", "\n").splitlines()]
    if proc.returncode != 0:
        sys.exit("training failed:\n" + "\n".join(lines[-30:]))
    done = next(line for line in lines if line.startswith("done:"))
    for line in lines:
        if line.startswith(("data: tokenizer", "epoch 1/", "validation @", "done:")):
            print("  " + line)
    return first_step, wall, float(done.split("peak memory ")[1].split(" GiB")[0])


# -------------------------------------------------------------------------------------------------

def make_copies(source, copies, folder):
    """train.txt: `copies` copies of source's train split, one after another; validation and test as they are."""
    import BERT_from_scratch as bert
    folder.mkdir(parents=True, exist_ok=True)
    files = {split: f.path for split, f in bert.load_wikitext(None, source).items()}  # (any of WikiText's names)
    text = files["train"].read_bytes()
    with open(folder / "train.txt", "wb") as f:
        for _ in range(copies):
            f.write(text)
    for split in ("validation", "test"):
        (folder / f"{split}.txt").write_bytes(files[split].read_bytes())
    return folder


def row(name, seconds, peak):
    print(f"{name:44s} {seconds:9.1f} {peak:12.2f}", flush=True)


def sample_study(opts):
    """The vocabulary from each sample size against the one from the largest (0: the whole split)."""
    sizes = sorted(opts.sample_study, key=lambda n: n or float("inf"))
    results = [run_stage("sample", opts, size=n) for n in sizes]
    reference = set(results[-1]["vocab"])
    print(f"{'sample (sentences)':>20s} {'seconds':>9s} {'peak GiB':>9s} {'shared with last':>17s} "
          f"{'validation tokens/word':>23s} {'[UNK]':>7s}")
    for n, r in zip(sizes, results):
        shared = len(reference & set(r["vocab"])) / len(reference)
        print(f"{(f'{n:,}' if n else 'all'):>20s} {r['seconds']:9.1f} {r['peak_gib']:9.2f} {shared:17.2%} "
              f"{r['tokens_per_word']:23.4f} {r['unk']:7.2%}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=50, help="copies of WikiText-2's train split")
    p.add_argument("--wikitext2", type=Path, default=WIKITEXT2, help="WikiText-2 folder the copies come from")
    p.add_argument("--data_dir", type=Path, default=None, help="real files instead of copies (WikiText-103)")
    p.add_argument("--work", type=Path, default=None, help="folder for the copies, the cache and the run (kept)")
    p.add_argument("--vocab_size", type=int, default=16384)
    p.add_argument("--tokenizer_sample", type=int, default=None, help="default: the training script's")
    p.add_argument("--train_flags", default="--max_steps 50 --model_size mini --batch_size 32",
                   help="flags of the training run")
    p.add_argument("--sample_study", type=int, nargs="+", default=None,
                   help="only compare vocabularies learned from samples of these sizes (0: all)")
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.stage:
        print(json.dumps(STAGES[opts.stage](opts)))
        return
    if opts.tokenizer_sample is None:
        import BERT_from_scratch as bert
        opts.tokenizer_sample = bert.TOKENIZER_SAMPLE
    with tempfile.TemporaryDirectory(prefix="scale_data_") as tmp:
        work = opts.work or Path(tmp)
        opts.cache = work / "cache"
        if opts.data_dir:
            opts.data = opts.data_dir
        else:
            opts.data = make_copies(opts.wikitext2, opts.copies, work / f"copies{opts.copies}")
        train_mb = (opts.data / "train.txt").stat().st_size / 1e6
        print(f"data: {opts.data} (train.txt {train_mb:,.0f} MB"
              + (f", {opts.copies} copies of WikiText-2's" if not opts.data_dir else "") + ")")
        if opts.sample_study:
            return sample_study(opts)
        print(f"vocab_size {opts.vocab_size:,}, tokenizer_sample {opts.tokenizer_sample:,}; a fresh process per "
              f"stage; {os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}\n")
        print(f"{'stage':44s} {'seconds':>9s} {'peak RSS GiB':>12s}")
        read = run_stage("read", opts)
        row("read + split (one pass over train)", *read["read + split (one pass over train)"])
        prepare = run_stage("prepare", opts)
        prepare["prepare_data, empty cache (total)"][1] = max(prepare["prepare_data, empty cache (total)"][1],
                                                              prepare["sampled_peak_gib"])
        for name in ("tokenizer: read train + sample sentences", "tokenizer: WordPiece training",
                     "tokenize every split (read + encode)", "cache write (with checksums)",
                     "prepare_data, empty cache (total)"):
            row(name, *prepare[name])
        cached = run_stage("cached", opts)
        row("prepare_data, from the cache", *cached["prepare_data, from the cache"])
        print(f"\ntrain: {read['articles']:,} articles, {read['sentences']:,} sentences; tokens: "
              + ", ".join(f"{s} {n:,}" for s, n in prepare["tokens"].items()) + f"; vocabulary {prepare['vocab_size']:,}")
        print("\ntraining run, data from the cache:")
        first_step, wall, peak = run_training(opts, work)
        print(f"\nfirst training step {first_step:.1f}s after the start (process start included), whole run "
              f"{wall:.0f}s (with validation and test), training process peak RSS {peak:.2f} GiB")
        print(f"load average after: {os.getloadavg()[0]:.2f} (other work on the machine slows every figure but the memory)")


if __name__ == "__main__":
    main()
