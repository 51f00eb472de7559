"""
Fine-tune a BERT checkpoint of this project on one GLUE task and report the dev-set score, as in
Devlin et al. 2018, section 4.1: the pooled [CLS] vector (tanh pooler), dropout, one linear layer;
every weight trained, cross-entropy loss (mean squared error for the STS-B regression).

    python finetune_glue.py --task rte                       # the shipped BERT-Mini, GLUE from the hub
    python finetune_glue.py --task rte --random_init         # the baseline: no pretraining
    python finetune_glue.py --task stsb --checkpoint checkpoints/bert_mini.pt --lr 3e-4 --json
    python finetune_glue.py --task sst2 --save sst2-mini     # then pipeline("text-classification", model="sst2-mini")
    python benchmarks/glue_runs.py --table_only              # the README's table (the grid: benchmarks/README.md)

It runs on the GPU where there is one (--device), else on the CPU, where a fine-tuning run of
BERT-Mini takes minutes.

The model is this project's own BertForPreTraining with its MLM and NSP heads dropped and a
classifier added: the fine-tuned encoder and pooler are exactly the pretrained modules, loaded
from the checkpoint without any conversion, and transformers is nowhere in the path. --random_init
trains the same architecture with the same tokenizer from a fresh, seeded init: the difference
between the two is what pretraining bought. --save writes the fine-tuned model as a transformers
folder (BertForSequenceClassification), the same export as test_mini_bert.py --export_hf.

--data_dir DIR reads GLUE's task folders (SST-2/, MRPC/, RTE/, CoLA/, STS-B/, each with train.tsv
and dev.tsv, as GLUE's download script writes them); without it the task comes from the
HuggingFace hub (nyu-mll/glue). The metrics are GLUE's, written with numpy (no scikit-learn or
SciPy needed): accuracy (SST-2, RTE), F1 of class 1 and accuracy (MRPC), Matthews correlation
(CoLA), Pearson and Spearman correlation (STS-B).
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import BERT_from_scratch as bert
import test_mini_bert  # its export to transformers, for --save
from BERT_from_scratch import UserError, error_line

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "bert-mini-wikitext2.pt"

# -----------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    folder: str  # the task's folder in GLUE's data layout
    text_columns: tuple  # TSV columns of sentence A (and B, for pair tasks)
    label_column: int  # TSV column of the label
    header: bool  # whether the TSV files start with a header line
    hub_fields: tuple  # the same sentences' field names in nyu-mll/glue
    num_labels: int  # classes; 1 = regression
    metric: str  # the main score's name
    labels: tuple  # the classes' names, in label order (STS-B: the score's)
    epochs: int = 3  # default fine-tuning epochs


TASKS = {
    # SST-2 is 8 to 27 times larger than the others: one epoch is 2,105 steps of 32.
    "sst2": Task("SST-2", (0,), 1, True, ("sentence",), 2, "accuracy", ("negative", "positive"), epochs=1),
    "mrpc": Task("MRPC", (3, 4), 0, True, ("sentence1", "sentence2"), 2, "mean(f1, accuracy)",
                 ("not_equivalent", "equivalent")),
    "rte": Task("RTE", (1, 2), 3, True, ("sentence1", "sentence2"), 2, "accuracy", ("entailment", "not_entailment")),
    "cola": Task("CoLA", (3,), 1, False, ("sentence",), 2, "matthews", ("unacceptable", "acceptable")),
    "stsb": Task("STS-B", (7, 8), 9, True, ("sentence1", "sentence2"), 1, "mean(pearson, spearman)", ("similarity",)),
}


def parse_label(task, text):
    if task.num_labels == 1:
        return float(text)
    if task.folder == "RTE":  # written out in the files; ids as in nyu-mll/glue
        return task.labels.index(text)
    label = int(text)
    if not 0 <= label < task.num_labels:
        raise ValueError(label)
    return label


def read_tsv(path, task):
    """([sentence A, (sentence B)], labels) of one GLUE file. Quotes are text, not CSV quoting (some
    are unbalanced), so lines are split on tabs; utf-8-sig drops the byte-order mark of MRPC."""
    if not path.is_file():
        raise UserError(f"{path} not found: --data_dir must hold GLUE's task folders (SST-2/, MRPC/, "
                        "RTE/, CoLA/, STS-B/), each with train.tsv and dev.tsv")
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text: {e}") from None
    texts, labels = [[] for _ in task.text_columns], []
    for number, line in enumerate(lines[1:] if task.header else lines, start=2 if task.header else 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        try:
            labels.append(parse_label(task, fields[task.label_column]))
            for column, text in zip(task.text_columns, texts):
                text.append(fields[column])
        except (IndexError, KeyError, ValueError):
            raise UserError(f"{path}, line {number}: not a {task.folder} row (expected the label in "
                            f"column {task.label_column + 1} of tab-separated fields)") from None
    if not labels:
        raise UserError(f"{path} has no examples")
    return texts, labels


def load_task(name, data_dir):
    """{"train": (texts, labels), "dev": (texts, labels)} from GLUE files or the hub."""
    task = TASKS[name]
    if data_dir is not None:
        return {split: read_tsv(Path(data_dir) / task.folder / f"{split}.tsv", task)
                for split in ("train", "dev")}
    try:
        ds = bert.load_from_hub("nyu-mll/glue", name)
        return {split: ([ds[hub_split][f] for f in task.hub_fields], list(ds[hub_split]["label"]))
                for split, hub_split in (("train", "train"), ("dev", "validation"))}
    except Exception as e:
        raise UserError(f"could not load nyu-mll/glue '{name}' from the HuggingFace hub ({error_line(e)}); "
                        "without network, pass --data_dir DIR with GLUE's task folders "
                        "(SST-2/, MRPC/, RTE/, CoLA/, STS-B/)") from None


@dataclass
class Examples:
    """One split, tokenized: [CLS] A [SEP] (B [SEP]) per example, unpadded."""
    input_ids: list  # of int64 arrays
    token_type_ids: list  # of int64 arrays: 0 for [CLS] A [SEP], 1 for B [SEP]
    labels: np.ndarray  # (n,) int64 classes or float32 scores
    lengths: np.ndarray  # (n,) tokens of each example

    def __len__(self):
        return len(self.labels)


def encode(texts, labels, tokenizer, max_seq_len, regression):
    """Tokenize and lay out the examples; pairs are truncated "longest first" (tokens come off the
    end of the longer sentence, as in Google's run_classifier.py), single sentences at the end."""
    ids = [[np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch_fast(t, add_special_tokens=False)]
           for t in texts]
    cls, sep = np.array([bert.CLS_ID]), np.array([bert.SEP_ID])
    input_ids, token_type_ids = [], []
    for i in range(len(labels)):
        if len(ids) == 1:
            a = ids[0][i][:max_seq_len - 2]
            input_ids.append(np.concatenate([cls, a, sep]))
            token_type_ids.append(np.zeros(len(a) + 2, np.int64))
        else:
            a, b = ids[0][i], ids[1][i]
            len_a, len_b = bert.truncated_lengths(len(a), len(b), max_seq_len)
            input_ids.append(np.concatenate([cls, a[:len_a], sep, b[:len_b], sep]))
            token_type_ids.append(np.repeat([0, 1], [len_a + 2, len_b + 1]))
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    labels = np.array(labels, dtype=np.float32 if regression else np.int64)
    return Examples(input_ids, token_type_ids, labels, lengths)


def collate(examples, idx):
    """A batch dict of the examples idx, padded to the longest one. (Fine-tuning runs eagerly, so
    the fixed shapes of pretraining would buy nothing: on SST-2, lengths rounded up to a multiple
    of 8 padded 28% of the tokens instead of 4.5%, and steps took 256-278 ms instead of 200-229 ms;
    benchmarks/README.md, "Batches".)"""
    T = int(examples.lengths[idx].max())
    input_ids, token_type_ids, attention_mask = (np.zeros((len(idx), T), np.int64) for _ in range(3))
    for row, i in enumerate(idx):
        n = examples.lengths[i]
        input_ids[row, :n], token_type_ids[row, :n], attention_mask[row, :n] = \
            examples.input_ids[i], examples.token_type_ids[i], 1
    return {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(examples.labels[idx])}


def length_grouped_batches(lengths, batch_size, rng, group=64):
    """As in BERT_from_scratch.py: shuffle, sort each run of `group` batches' worth of examples by
    length, cut it into batches, shuffle the batches; so batches carry little padding. Unlike
    pretraining, the last, smaller batch is kept: small data sets cannot spare examples."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * group):
        part = order[start:start + batch_size * group]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# -----------------------------------------------------------------------------
# Model


class BertForSequenceClassification(bert.BertForPreTraining):
    """The pretrained encoder and pooler, without the MLM and NSP heads, then dropout and a new
    Linear(H, num_labels), initialised N(0, 0.02) like every BERT weight."""

    def __init__(self, config, num_labels):
        super().__init__(config)
        del self.mlm_head, self.nsp_head  # pretraining only
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self._init_weights(self.classifier)

    def forward(self, input_ids, token_type_ids, attention_mask=None):
        h = self.encode(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        return self.classifier(self.dropout(self.pool(h)))  # (B, num_labels)


def loss_fn(logits, labels):
    if logits.size(1) == 1:  # regression (STS-B)
        return F.mse_loss(logits.squeeze(1), labels)
    return F.cross_entropy(logits, labels)


def build_model(ckpt, num_labels, random_init, seed, dropout=0.1):
    """The classifier, seeded; unless random_init, with the checkpoint's encoder and pooler. Dropout
    is the fine-tuning's own, whatever the pretraining used (Cramming, say, pretrains without)."""
    torch.manual_seed(seed)  # the same draws either way, so the classifier's init depends only on the seed
    config = bert.BertConfig(**{**ckpt["config"], "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout})
    model = BertForSequenceClassification(config, num_labels)
    if not random_init:
        pretrained = {k: v for k, v in ckpt["model"].items() if not k.startswith(("mlm_head.", "nsp_head."))}
        missing, unexpected = model.load_state_dict(pretrained, strict=False)  # fp16 weights become fp32
        if set(missing) != {"classifier.weight", "classifier.bias"} or unexpected:
            raise UserError(f"the checkpoint's weights do not fit its config (missing {missing}, "
                            f"unexpected {unexpected})")
    return model


# -----------------------------------------------------------------------------
# Metrics, as GLUE defines them (numpy only; an undefined correlation counts 0, as in scikit-learn)


def accuracy(pred, label):
    return float(np.mean(pred == label))


def f1(pred, label):
    """F1 of the positive class 1: 2 TP / (2 TP + FP + FN)."""
    tp = np.sum((pred == 1) & (label == 1))
    wrong = np.sum(pred != label)
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong > 0 else 0.0


def matthews(pred, label):
    """(TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)), for binary labels."""
    tp, tn = np.sum((pred == 1) & (label == 1)), np.sum((pred == 0) & (label == 0))
    fp, fn = np.sum((pred == 1) & (label == 0)), np.sum((pred == 0) & (label == 1))
    denominator = np.sqrt(float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn))
    return float((float(tp) * tn - float(fp) * fn) / denominator) if denominator > 0 else 0.0


def pearson(x, y):
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator > 0 else 0.0


def average_ranks(x):
    """Ranks 1..n; tied values share the mean of their ranks (SciPy's rankdata 'average')."""
    x = np.asarray(x)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, tie_group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / counts)[tie_group]


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


def glue_metrics(task, outputs, labels):
    """(main score, {metric: value}) from the model's outputs on the dev set."""
    if task.num_labels == 1:
        m = {"pearson": pearson(outputs[:, 0], labels), "spearman": spearman(outputs[:, 0], labels)}
        return (m["pearson"] + m["spearman"]) / 2, m
    pred = outputs.argmax(1)
    if task.folder == "MRPC":
        m = {"f1": f1(pred, labels), "accuracy": accuracy(pred, labels)}
        return (m["f1"] + m["accuracy"]) / 2, m
    if task.folder == "CoLA":
        m = {"matthews": matthews(pred, labels), "accuracy": accuracy(pred, labels)}
        return m["matthews"], m
    m = {"accuracy": accuracy(pred, labels)}
    return m["accuracy"], m


# -----------------------------------------------------------------------------
# Fine-tuning


@torch.no_grad()
def predict(model, examples, device, batch_size=128):
    """The model's outputs (n, num_labels) on every example, in order; batches sorted by length."""
    model.eval()
    order = np.argsort(examples.lengths, kind="stable")
    outputs = np.zeros((len(examples), model.classifier.out_features), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = bert.batch_to_device(collate(examples, idx), device)
        outputs[idx] = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).cpu().numpy()
    return outputs


def finetune(model, train_set, device, args):
    """AdamW (weight decay 0.01, none on biases and LayerNorm), linear warmup over args.warmup of
    the steps then linear decay to zero, gradients clipped at 1.0: BERT's fine-tuning recipe."""
    rng = np.random.default_rng(args.seed)
    epochs = [length_grouped_batches(train_set.lengths, args.batch_size, rng) for _ in range(args.epochs)]
    total_steps = sum(len(batches) for batches in epochs)
    warmup_steps = int(args.warmup * total_steps)
    optimizer = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.01), lr=args.lr,
                                  betas=(0.9, 0.999), eps=1e-6, fused=True)
    bar = bert.tqdm_bar(total=total_steps, desc=args.task, file=sys.stderr, disable=None)
    step, losses = 0, []  # the last steps' losses, on the device: reading each would wait for a GPU
    model.train()
    for batches in epochs:
        for idx in batches:
            for group in optimizer.param_groups:
                group["lr"] = bert.lr_at(step, total_steps, warmup_steps, args.lr)
            batch = bert.batch_to_device(collate(train_set, idx), device)
            logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            loss = loss_fn(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.detach())
            if step % 20 == 0:  # the mean training loss of the last 20 steps
                bar.set_postfix(loss=f"{torch.stack(losses).mean().item():.3f}")
                losses.clear()
            bar.update()
    bar.close()
    return total_steps


def checkpoint_sha256(path):
    """Which checkpoint a result came from, whatever its path (a short sha256 of the file)."""
    return bert.file_sha256(path)[:16]


def save(model, tokenizer, task, folder):
    """The fine-tuned classifier as a transformers folder: BertForSequenceClassification with the
    task's label names, and the tokenizer (pipeline("text-classification") runs it)."""
    names = dict(enumerate(task.labels))
    regression = {"problem_type": "regression"} if task.num_labels == 1 else {}  # (no sigmoid in pipelines)
    test_mini_bert.export_hf(model.cpu(), tokenizer, folder, "--save", "BertForSequenceClassification",
                             num_labels=task.num_labels, id2label=names, label2id={v: k for k, v in names.items()},
                             **regression)


def run(args):
    t0, cpu0 = time.time(), time.process_time()
    task = TASKS[args.task]
    if args.save:
        test_mini_bert.check_export_folder(args.save, "--save")  # before the work, not after
    device = bert.resolve_device(args.device)
    ckpt = bert.read_checkpoint(args.checkpoint)  # missing, truncated or foreign: a UserError
    with bert.parts_of_checkpoint(args.checkpoint):  # damaged: a UserError too
        max_positions = ckpt["config"]["max_position_embeddings"]
        if args.max_seq_len > max_positions:
            raise UserError(f"--max_seq_len {args.max_seq_len} exceeds the checkpoint's {max_positions} positions")
        pretrained_len = ckpt.get("args", {}).get("max_seq_len", max_positions)
        if args.max_seq_len > pretrained_len and not args.random_init:
            print(f"notice: the checkpoint was pretrained on pairs of at most {pretrained_len} tokens; "
                  f"positions beyond that are untrained", file=sys.stderr)
        tokenizer = bert.tokenizer_from_json(ckpt["tokenizer"])
        model = build_model(ckpt, task.num_labels, args.random_init, args.seed, args.dropout)
    model.to(device)  # (outside: a GPU's error is no damaged checkpoint)
    data = load_task(args.task, args.data_dir)
    train_set, dev_set = (encode(*data[split], tokenizer, args.max_seq_len, task.num_labels == 1)
                          for split in ("train", "dev"))
    steps = finetune(model, train_set, device, args)
    score, metrics = glue_metrics(task, predict(model, dev_set, device), dev_set.labels)
    if args.save:
        save(model, tokenizer, task, args.save)
    settings = {k: getattr(args, k) for k in ("lr", "batch_size", "epochs", "seed", "max_seq_len", "warmup",
                                              "dropout", "checkpoint", "random_init", "data_dir", "save")}
    settings.update(checkpoint_sha256=checkpoint_sha256(args.checkpoint), weight_decay=0.01, device=device.type,
                    threads=torch.get_num_threads(), steps=steps)
    return {"task": args.task, "metric": task.metric, "score": score, "metrics": metrics,
            "settings": settings, "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1),  # summed over threads
            "train_examples": len(train_set), "dev_examples": len(dev_set)}


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = bert.ArgumentParser("Fine-tune a BERT_from_scratch.py checkpoint on a GLUE task.")
    p.add_argument("--task", required=True, choices=list(TASKS), help="the GLUE task")
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="the pretrained model")
    p.add_argument("--data_dir", default=None,
                   help="GLUE's task folders (SST-2/, MRPC/, ... with train.tsv, dev.tsv) instead of the hub")
    p.add_argument("--random_init", action="store_true",
                   help="train from a fresh init (the checkpoint gives only the tokenizer and config)")
    p.add_argument("--seed", type=int, default=0,
                   help="classifier init (with --random_init: every weight), dropout, batch order")
    # batch 32 and 3 epochs as in Devlin et al. 4.1 (SST-2: 1, benchmarks/README.md); lr 1e-4 from the
    # grid Google searched for its BERT miniatures
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--batch_size", type=int, default=32, help="examples per step")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (if not given: 3; SST-2: 1)")
    p.add_argument("--max_seq_len", type=int, default=128, help="tokens per example, specials included")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="on embeddings, residual branches, attention weights and the pooled [CLS]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (if not given: torch's default)")
    p.add_argument("--save", metavar="DIR", help="write the fine-tuned model as a transformers folder "
                   "(BertForSequenceClassification, with the task's label names)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = TASKS[args.task].epochs
    checks = [("lr", args.lr > 0, "must be positive"), ("batch_size", args.batch_size > 0, "must be positive"),
              ("epochs", args.epochs > 0, "must be positive"), ("seed", args.seed >= 0, "must be non-negative"),
              ("max_seq_len", args.max_seq_len >= 8, "must be at least 8"),
              ("warmup", 0 <= args.warmup < 1, "must be in [0, 1)"),
              ("dropout", 0 <= args.dropout < 1, "must be in [0, 1)"),
              ("threads", args.threads is None or args.threads > 0, "must be positive")]
    for flag, ok, requirement in checks:
        if not ok:
            p.fail(f"--{flag} {requirement}, got {getattr(args, flag)}")
    p.check_device(args)
    return args


def main(argv=None):
    args = parse_args(argv)  # a bad flag: argparse prints one line and exits with status 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if args.json:
        print(json.dumps(result))
        return
    s = result["settings"]
    init = "random init" if s["random_init"] else Path(s["checkpoint"]).name
    epochs = f"{s['epochs']} epoch{'s' * (s['epochs'] != 1)}"
    print(f"{args.task} ({init}, lr {s['lr']:g}, batch {s['batch_size']}, {epochs}, seed {s['seed']}): "
          f"{result['metric']} {result['score']:.4f} on {result['dev_examples']:,} dev examples")
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
          + f"  ({result['train_examples']:,} training examples, {result['seconds']:.0f}s)")
    if args.save:
        print(f"  saved to {args.save}/: pipeline('text-classification', model='{args.save}')")


if __name__ == "__main__":
    main()
