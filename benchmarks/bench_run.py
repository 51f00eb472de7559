"""
Whole training runs, measured from outside: wall time, training throughput from the run's own
metrics log, and resident memory sampled every second (its peak, and how it moves after warm-up).
Several configurations alternate round by round, so that they share the machine's state.

    # the release recipe's first 600 steps, validation and test, at two padding multiples
    python benchmarks/bench_run.py --data_dir DATA --rounds 2 \\
        --run pad16="--pad_multiple 16" --run pad8="--pad_multiple 8" \\
        -- --epochs 8 --batch_size 32 --lr 7e-4 --max_steps 600

    # another copy of the script (an older commit, say) against this one
    python benchmarks/bench_run.py --data_dir ... --run old="--script /tmp/old/BERT_from_scratch.py" --run new="" -- ...

Each --run is NAME="FLAGS": extra flags for the training script (--script PATH picks the file).
The flags after -- are common to every run. Nothing is written outside a temporary folder.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_gib(pid):
    """Resident memory of a process and its children (DataLoader workers), in GiB."""
    total = 0
    for p in [pid] + children(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 2 ** 20


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]


def run_once(name, flags, common, data_dir, folder):
    script = REPO / "BERT_from_scratch.py"
    if "--script" in flags:
        i = flags.index("--script")
        script, flags = Path(flags[i + 1]), flags[:i] + flags[i + 2:]
    checkpoint = folder / f"{name}.pt"
    cmd = [sys.executable, str(script), "--device", "cpu", "--data_dir", data_dir, "--checkpoint",
           str(checkpoint), "--overwrite", *common, *flags]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = []  # (seconds, the training process's RSS, with its DataLoader workers)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        samples.append((time.time() - t0, main_rss(proc.pid), rss_gib(proc.pid)))
        time.sleep(1.0)
    reader.join()
    wall = time.time() - t0
    log = "".join(out)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{log[-3000:]}")
    records = [json.loads(line) for line in open(checkpoint.with_suffix(".metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train"][1:]  # the first window holds the warm-up
    done = next(line for line in log.splitlines() if line.startswith("done:"))
    peak = float(done.split("peak memory ")[1].split(" GiB")[0])
    main = [m for _, m, _ in samples]
    quarter = [main[min(len(main) - 1, int(len(main) * q))] for q in (0.25, 0.5, 0.75)]
    return {"name": name, "wall_s": wall, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "peak_gib": peak, "sampled_max_gib": max(main), "rss_at_quarters_gib": quarter,
            "with_workers_max_gib": max(w for _, _, w in samples),
            "padding": train[-1]["padding"] if train else float("nan"),
            "test": next((r for r in records if r["kind"] == "eval" and r["split"] == "test"), {})}


def main_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2 ** 20
    except (OSError, StopIteration):
        return 0.0


def main():
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--run", action="append", required=True, help='NAME="FLAGS", repeatable')
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs = [(spec.split("=", 1)[0], shlex.split(spec.split("=", 1)[1] if "=" in spec else "")) for spec in args.run]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, flags in (runs if r % 2 == 0 else runs[::-1]):
                res = run_once(name, flags, common, args.data_dir, Path(tmp))
                res["round"] = r
                results.append(res)
                q = ", ".join(f"{x:.2f}" for x in res["rss_at_quarters_gib"])
                test = res["test"]
                print(f"{name:10s} round {r}: {res['tokens_per_s']:8,.0f} tokens/s (median log window), "
                      f"wall {res['wall_s']:6.0f}s, peak {res['peak_gib']:.2f} GiB (RSS at 1/4, 1/2, 3/4 of the "
                      f"run: {q}; with workers {res['with_workers_max_gib']:.2f}), padding {res['padding']:.1%}"
                      + (f", test MLM {test['mlm_accuracy']:.2%} NSP {test['nsp_accuracy']:.2%}" if test else ""),
                      flush=True)
    for name, _ in runs:
        mine = [x for x in results if x["name"] == name]
        print(f"{name:10s} median over rounds: {statistics.median(x['tokens_per_s'] for x in mine):8,.0f} tokens/s, "
              f"peak {max(x['peak_gib'] for x in mine):.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
