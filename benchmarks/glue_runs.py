"""
GLUE dev scores of the shipped model against the same architecture from a random init: runs
finetune_glue.py over a grid, one subprocess per run, appends each result as a JSON line to
benchmarks/glue_results.jsonl (a run already there is skipped, so an interrupted grid resumes),
then prints a markdown table.

    python benchmarks/glue_runs.py --data_dir GLUE          # the whole grid (GLUE: the task folders)
    python benchmarks/glue_runs.py --data_dir GLUE --tasks rte --seeds 0
    python benchmarks/glue_runs.py --table_only             # the table only
    python benchmarks/glue_runs.py --data_dir GLUE --checkpoint checkpoints/bert_mini.pt \
        --inits shipped --label "seed command" --results benchmarks/glue_results_seed_command.jsonl
    python benchmarks/glue_runs.py --data_dir GLUE --inits shipped --lrs 1e-4 --seeds 0 \
        --jobs 2 --threads 1 --results /tmp/timing.jsonl       # the five tasks' wall time on 2 cores

The grid, per task and init: every --lrs at seed 0; then the other --seeds at the lr with the best
seed-0 dev score (the same lr grid for both inits). The table shows, per task and init, the mean
and standard deviation over the seeds run at that lr. A results file holds one setting (checkpoint,
epochs, batch size, sequence length, warmup, dropout, data source, device): a grid with other settings needs its
own --results, and is refused on a file with runs of other settings.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "glue_results.jsonl"
TASKS = ["cola", "sst2", "mrpc", "stsb", "rte"]
LONGEST_FIRST = ["sst2", "mrpc", "stsb", "rte", "cola"]  # CPU time per run, so that --jobs balances the cores
NAMES = {"cola": "CoLA (MCC)", "sst2": "SST-2 (acc)", "mrpc": "MRPC (F1/acc)", "stsb": "STS-B (P/S)", "rte": "RTE (acc)"}
# Google's BERT-Mini (L=4, H=256), GLUE *test* set, from the model card of Turc et al. 2019,
# "Well-Read Students Learn Better" (github.com/google-research/bert): not the dev sets used here.
GOOGLE_MINI = {"cola": "0.0", "sst2": "85.9", "mrpc": "81.1/71.8", "stsb": "75.4/73.3", "rte": "57.9"}
GOOGLE_MINI_AVERAGE = np.mean([0.0, 85.9, (81.1 + 71.8) / 2, (75.4 + 73.3) / 2, 57.9])


def read_results(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(r):
    s = r["settings"]
    return r["task"], "random" if s["random_init"] else "shipped", float(s["lr"]), int(s["seed"])


def run_one(args, task, init, lr, seed):
    cmd = [sys.executable, str(REPO / "finetune_glue.py"), "--task", task, "--lr", str(lr), "--seed", str(seed),
           "--json", "--checkpoint", args.checkpoint]
    cmd += ["--data_dir", args.data_dir] if args.data_dir else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--random_init"] if init == "random" else []
    cmd += args.finetune_args
    print(f"running {task} {init} lr {lr:g} seed {seed}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)  # progress bar: our stderr
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}")
    result = json.loads(out.stdout)
    with WRITING, open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"  {task} {init} lr {lr:g} seed {seed}: {result['score']:.4f} ({result['seconds']:.0f}s)",
          file=sys.stderr, flush=True)


def best_lr(results, task, init, lrs):
    """The lr of the grid with the best mean seed-0 dev score (None until the grid has run)."""
    scores = {lr: [r["score"] for r in results if key(r) == (task, init, lr, 0)] for lr in lrs}
    if not all(scores.values()):
        return None
    return max(lrs, key=lambda lr: np.mean(scores[lr]))


WRITING = threading.Lock()


def setting(s, by_hash=True):
    """What a results file must hold fixed for its runs to compare: all but the task, lr, seed and
    init. The checkpoint by its sha256 (runs from before it was recorded: by file name); runs from
    before --dropout and --device used the checkpoint's rate (0.1 in the files here) on the CPU."""
    return {"checkpoint": s["checkpoint_sha256"] if by_hash else Path(s["checkpoint"]).name,
            "epochs": s["epochs"], "batch_size": s["batch_size"], "max_seq_len": s["max_seq_len"],
            "warmup": s["warmup"], "dropout": s.get("dropout", 0.1),
            "data": "hub" if s["data_dir"] is None else "files", "device": s.get("device", "cpu")}


def check_settings(args, results):
    """Exit if the results file holds runs with other settings than this grid's: the grid would
    take them for its own and skip those runs."""
    sys.path.insert(0, str(REPO))
    import finetune_glue  # (here, not at the top: --table_only needs no torch)
    sha256 = finetune_glue.checkpoint_sha256(args.checkpoint)
    for task in args.tasks:
        run = vars(finetune_glue.parse_args(
            ["--task", task, "--checkpoint", args.checkpoint, *(["--data_dir", args.data_dir] if args.data_dir else []),
             *args.finetune_args]))
        run.update(device=finetune_glue.bert.resolve_device(run["device"]).type, checkpoint_sha256=sha256)
        for r in (r for r in results if r["task"] == task):
            by_hash = "checkpoint_sha256" in r["settings"]
            theirs, ours = setting(r["settings"], by_hash), setting(run, by_hash)
            if theirs != ours:
                differ = ", ".join(f"{k} {theirs[k]} (here {ours[k]})" for k in theirs if theirs[k] != ours[k])
                sys.exit(f"{args.results} holds {task} runs of other settings: {differ}; "
                         "give this grid its own --results")


def run_all(args, runs):
    """The runs (task, init, lr, seed), --jobs of them at a time, the longest first."""
    runs = sorted(runs, key=lambda r: LONGEST_FIRST.index(r[0]))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: run_one(args, *r), runs))  # (list: a failed run's exit reaches us)


def run_grid(args):
    """First every seed-0 run (the lr grid), then the other seeds at each task's and init's best lr."""
    t0 = time.time()
    check_settings(args, read_results(args.results))
    done = {key(r) for r in read_results(args.results)}
    run_all(args, [(task, init, lr, 0) for task in args.tasks for init in args.inits for lr in args.lrs
                   if (task, init, lr, 0) not in done])
    results = read_results(args.results)
    best = {(task, init): best_lr(results, task, init, args.lrs) for task in args.tasks for init in args.inits}
    run_all(args, [(task, init, lr, seed) for seed in args.seeds if seed != 0 for (task, init), lr in best.items()
                   if lr is not None and (task, init, lr, seed) not in done])
    print(f"grid: {time.time() - t0:,.0f}s wall, {args.jobs} run(s) at a time", file=sys.stderr)


def cell(task, runs):
    """'mean ± std' over the seeds, in points; MRPC and STS-B as their two metrics."""
    names = {"mrpc": ("f1", "accuracy"), "stsb": ("pearson", "spearman"), "cola": ("matthews",)}.get(task, ("accuracy",))
    parts = []
    for name in names:
        values = 100 * np.array([r["metrics"][name] for r in runs])
        parts.append(f"{values.mean():.1f}" + (f" ± {values.std(ddof=1):.1f}" if len(values) > 1 else ""))
    return "/".join(parts)


def table(results, tasks, all_lrs, label="shipped"):
    inits = [i for i in ("shipped", "random") if any(key(r)[1] == i for r in results)]
    all_lrs = {lr for lr in all_lrs if any(key(r)[2] == lr for r in results)}  # the grid that ran
    lines = ["| init | " + " | ".join(NAMES[t] for t in tasks) + " | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    seconds, cpu_seconds = {}, {}
    for init in inits:
        row, scores, complete = [], [], True
        for task in tasks:
            lrs = sorted({key(r)[2] for r in results if key(r)[:2] == (task, init) and key(r)[2] in all_lrs})
            lr = best_lr(results, task, init, lrs) if lrs else None
            runs = [r for r in results if key(r)[:3] == (task, init, lr)]
            if not runs:
                row.append("")
                complete = False
                continue
            scores.append(100 * np.mean([r["score"] for r in runs]))
            seconds.setdefault(task, []).extend(r["seconds"] for r in runs)
            cpu_seconds.setdefault(task, []).extend(r["cpu_seconds"] for r in runs if "cpu_seconds" in r)
            row.append(f"{cell(task, runs)} <sub>lr {lr:g}, {len(runs)} seed{'s' * (len(runs) > 1)}</sub>")
        average = f"{np.mean(scores):.1f}" if complete else ""
        lines.append(f"| {label if init == 'shipped' else init} | " + " | ".join(row) + f" | {average} |")
    if set(tasks) == set(TASKS):
        lines.append("| Google BERT-Mini, test set | " + " | ".join(GOOGLE_MINI[t] for t in tasks)
                     + f" | {GOOGLE_MINI_AVERAGE:.1f} |")
    for name, values in (("seconds per run (wall, mean)", seconds), ("CPU seconds per run (mean)", cpu_seconds)):
        lines.append(f"| {name} | " + " | ".join(
            f"{np.mean(values[t]):,.0f}" if values.get(t) else "" for t in tasks) + " | |")
    caption = ("GLUE dev sets, scores ×100, mean ± standard deviation over seeds. The lr of each task and "
               f"init is the one of the grid {{{', '.join(f'{lr:g}' for lr in sorted(all_lrs))}}} with the "
               "best seed-0 dev score (the same grid for both inits); other seeds run at that lr. MRPC and "
               "STS-B count as the mean of their two metrics in the average. Google's row is the test set.")
    return caption + "\n\n" + "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description="GLUE fine-tuning grid: shipped model against random init.")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS)
    p.add_argument("--inits", nargs="+", choices=["shipped", "random"], default=["shipped", "random"])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data_dir", default=None, help="GLUE's task folders (default: the hub)")
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "bert-mini-wikitext2.pt"),
                   help="the pretrained init ('shipped' in --inits)")
    p.add_argument("--label", default="shipped", help="the table's name for the --checkpoint rows")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. 2 runs of 1 thread on 2 cores)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--table_only", action="store_true", help="print the table of the results file")
    p.add_argument("finetune_args", nargs="*", help="after --: more flags for every finetune_glue.py run")
    args = p.parse_args()
    if not args.table_only:
        run_grid(args)
    results = read_results(args.results)
    if not results:
        sys.exit(f"no results in {args.results}")
    print(table(results, [t for t in TASKS if any(r["task"] == t for r in results)], set(args.lrs), args.label))


if __name__ == "__main__":
    main()
