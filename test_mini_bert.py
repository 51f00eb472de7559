"""
Predictions from a BERT checkpoint trained by BERT_from_scratch.py: masked-token predictions
(MLM) and next-sentence probabilities (NSP), test-split scores, and export to transformers.

    python test_mini_bert.py                                   # a short demo
    python test_mini_bert.py --text "the [MASK] of the city"   # top-k for every [MASK]
    python test_mini_bert.py --sentence_a "..." --sentence_b "..."
    python test_mini_bert.py --eval --data_dir DIR             # test-split scores (DIR: WikiText's files)
    python test_mini_bert.py --export_hf bert-mini-hf          # a folder transformers loads

Without --checkpoint it loads your newest training output under checkpoints/, or else the
pretrained model shipped with the repository.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import BERT_from_scratch as bert

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "bert-mini-wikitext2.pt"

# Sentences adapted from the WikiText-2 *test* split, which the model never trained on.
DEMO_MASKED = [
    "He played college [MASK] for the University of Michigan .",
    "Robert is an English film , television and theatre [MASK] .",
    "The tropical storm moved rapidly , steadily intensifying to a [MASK] .",
    "It was released as the record 's second [MASK] in Germany .",
]
DEMO_PAIRS = [  # (A, B): B follows A in the article; then the same A with a random B
    ("He played college football for the University of Michigan Wolverines in 1944 and from "
     "1946 to 1948 .", "He was a consensus selection at end on the 1948 College Football "
     "All-America Team ."),
    ("He played college football for the University of Michigan Wolverines in 1944 and from "
     "1946 to 1948 .", "The tropical storm moved rapidly west-northwestward , steadily "
     "intensifying to a hurricane ."),
]


def default_checkpoint():
    """Your newest training output in ./checkpoints, else the shipped pretrained model."""
    shipped = SHIPPED_CHECKPOINT.resolve()
    own = [p for p in Path("checkpoints").glob("*.pt") if p.resolve() != shipped]
    return max(own, key=lambda p: p.stat().st_mtime) if own else SHIPPED_CHECKPOINT


class Predictor:
    def __init__(self, model, tokenizer, max_seq_len, device):
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.device = max_seq_len, device
        self.notices = []

    def _run(self, encoding):
        ids = torch.tensor([encoding.ids], device=self.device)
        token_type_ids = torch.tensor([encoding.type_ids], device=self.device)
        with torch.no_grad():
            return self.model(ids, token_type_ids, torch.ones_like(ids))

    def fill_mask(self, text, top_k):
        """Top-k (token, probability) for every [MASK] in text, left to right."""
        text = re.sub(r"\[mask\]", "[MASK]", text, flags=re.IGNORECASE)
        if not text.strip():
            raise bert.UserError("the text is empty")
        if "[MASK]" not in text:
            raise bert.UserError(f"no [MASK] in the text {text!r}: write [MASK] where a word should be predicted")
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) + 2 > self.max_seq_len:
            self.notices.append(f"the text has {len(encoding.ids) + 2} tokens; truncated to {self.max_seq_len}")
            encoding.truncate(self.max_seq_len - 2)
        encoding = self.tokenizer.post_process(encoding)  # [CLS] text [SEP]
        positions = [i for i, t in enumerate(encoding.ids) if t == bert.MASK_ID]
        if not positions:
            raise bert.UserError("every [MASK] fell beyond the truncation point")
        probs = F.softmax(self._run(encoding).mlm_logits[0, positions].float(), dim=-1)  # (n_masks, V)
        probs[:, :bert.N_SPECIAL] = -1.0  # never offer [PAD], [UNK], [CLS], [SEP], [MASK]
        probs, ids = probs.topk(min(top_k, probs.size(-1) - bert.N_SPECIAL), dim=-1)
        return [[(self.tokenizer.id_to_token(i), p) for i, p in zip(row_ids.tolist(), row_p.tolist())]
                for row_ids, row_p in zip(ids, probs)]

    def is_next(self, sentence_a, sentence_b):
        """P(sentence_b follows sentence_a) from the NSP head (class 0 = "is next")."""
        if not sentence_a.strip() or not sentence_b.strip():
            raise bert.UserError("--sentence_a and --sentence_b must both be non-empty")
        a = self.tokenizer.encode(sentence_a, add_special_tokens=False)
        b = self.tokenizer.encode(sentence_b, add_special_tokens=False)
        len_a, len_b = bert.truncated_lengths(len(a.ids), len(b.ids), self.max_seq_len)
        if (len_a, len_b) != (len(a.ids), len(b.ids)):
            self.notices.append(f"the pair has {len(a.ids) + len(b.ids) + 3} tokens; truncated "
                                f"to {self.max_seq_len}, longest sentence first")
            a.truncate(int(len_a))
            b.truncate(int(len_b))
        encoding = self.tokenizer.post_process(a, b)
        return F.softmax(self._run(encoding).nsp_logits[0].float(), dim=-1)[0].item()


def baselines(train_corpus, dataset, tokenizer):
    """What needs no model, on the same test pairs and masks: chance, and the unigram model of
    the training split (always predict its most frequent ordinary token; its perplexity)."""
    counts = np.bincount(train_corpus.ids, minlength=dataset.vocab_size).astype(np.float64)
    counts[:bert.N_SPECIAL] = 0  # special tokens are never targets
    probs = (counts + 1) / (counts + 1)[bert.N_SPECIAL:].sum()  # add-one smoothing
    batches = (dataset[i] for i in range(len(dataset)))  # each built once
    targets = np.concatenate([b["mlm_labels"].view(-1)[b["mlm_positions"]].numpy() for b in batches])
    targets = targets[targets != -100]  # not the padding slots of mlm_positions
    top = int(counts.argmax())
    return {"chance_mlm_accuracy": 1 / (dataset.vocab_size - bert.N_SPECIAL), "chance_nsp_accuracy": 0.5,
            "unigram_token": tokenizer.id_to_token(top),
            "unigram_mlm_accuracy": float((targets == top).mean()),
            "unigram_perplexity": float(np.exp(-np.log(probs[targets]).mean()))}


def hf_state_dict(model):
    """The model's weights under transformers' names: BertForPreTraining's (for export and tests),
    or, for finetune_glue.py's classifier, BertForSequenceClassification's."""
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
    }
    if "classifier.weight" in sd:
        out.update({"classifier.weight": sd["classifier.weight"], "classifier.bias": sd["classifier.bias"]})
    else:
        out.update({
            "cls.predictions.transform.dense.weight": sd["mlm_head.dense.weight"],
            "cls.predictions.transform.dense.bias": sd["mlm_head.dense.bias"],
            "cls.predictions.transform.LayerNorm.weight": sd["mlm_head.norm.weight"],
            "cls.predictions.transform.LayerNorm.bias": sd["mlm_head.norm.bias"],
            "cls.predictions.decoder.weight": sd["mlm_head.decoder.weight"],
            "cls.predictions.decoder.bias": sd["mlm_head.decoder.bias"],
            "cls.predictions.bias": sd["mlm_head.decoder.bias"],
            "cls.seq_relationship.weight": sd["nsp_head.weight"],
            "cls.seq_relationship.bias": sd["nsp_head.bias"],
        })
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


def to_transformers(model, architecture="BertForPreTraining", **config):
    """transformers' BertForPreTraining (or the given architecture, with these extra config fields)
    with this model's config and weights."""
    import transformers

    c = model.config
    hf_config = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        layer_norm_eps=c.layer_norm_eps, initializer_range=c.initializer_range,
        pad_token_id=c.pad_token_id, hidden_act="gelu", architectures=[architecture], **config)
    hf_model = getattr(transformers, architecture)(hf_config)
    hf_model.load_state_dict(hf_state_dict(model), strict=True)
    return hf_model


def check_export_folder(out_dir, flag="--export_hf"):
    """Fail before any work: transformers must be installed, and out_dir new or empty."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise bert.UserError(f"{flag} needs transformers: pip install transformers") from None
    target = Path(os.path.abspath(out_dir))
    try:
        if target.exists() and not target.is_dir():
            raise bert.UserError(f"{flag} {out_dir} is a file; give a folder")
        if target.is_dir() and any(target.iterdir()):
            raise bert.UserError(f"{flag} {out_dir} already has files; remove them or choose another folder")
    except OSError as e:
        raise bert.UserError(f"cannot write {out_dir}: {e}") from None
    return target


def export_hf(model, tokenizer, out_dir, flag="--export_hf", architecture="BertForPreTraining", **config):
    """A folder that transformers loads as BertForPreTraining / BertForMaskedLM / BertModel (or
    the given architecture), with a fast tokenizer: config.json, model.safetensors, tokenizer
    files. Written into a staging folder first and moved into place when complete; never into a
    folder that has files."""
    import transformers
    transformers.utils.logging.disable_progress_bar()  # one file: no "Writing model shards" bar

    target, staging = check_export_folder(out_dir, flag), None
    try:
        # A new folder is staged beside it and renamed; an existing empty one gets its files moved in.
        staging = (target / f".partial-{os.getpid()}" if target.is_dir()
                   else target.parent / f".{target.name}.partial-{os.getpid()}")
        staging.mkdir(parents=True)
        to_transformers(model, architecture, **config).save_pretrained(staging)
        hf_tokenizer = transformers.BertTokenizerFast(
            tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=model.config.max_position_embeddings)
        hf_tokenizer.save_pretrained(staging)
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])  # for slow BertTokenizer
        (staging / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
        if staging.parent == target:
            for f in list(staging.iterdir()):
                f.rename(target / f.name)
            staging.rmdir()
        else:
            staging.rename(target)
    except OSError as e:
        raise bert.UserError(f"cannot write {out_dir}: {e}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def export_release(ckpt, path):
    """A small file to share: half-precision weights (load_checkpoint restores fp32), config,
    tokenizer, metrics and how it was trained; no optimizer state, so it cannot be resumed."""
    path = Path(path)
    if path.exists():
        raise bert.UserError(f"{path} already exists; remove it first or choose another path")
    release = {k: v for k, v in ckpt.items() if k != "train_state"}
    halves = {}  # by storage, so that the tied embedding/decoder matrix stays one tensor
    release["model"] = {k: halves.setdefault(v.data_ptr(), v.half()) if v.is_floating_point() else v
                        for k, v in ckpt["model"].items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        bert.atomic_save(release, path)
    except OSError as e:
        raise bert.UserError(f"cannot write {path}: {e}") from None


def parse_args(argv=None):
    p = bert.ArgumentParser("Predictions from a BERT_from_scratch.py checkpoint.")
    p.add_argument("--checkpoint", default=None,
                   help="default: your newest checkpoints/*.pt, else the shipped pretrained model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    p.add_argument("--text", help='a sentence with one or more [MASK], e.g. "the [MASK] of the city"')
    p.add_argument("--top_k", type=int, default=5, help="predictions shown per [MASK]")
    p.add_argument("--sentence_a", help="first sentence of an NSP query")
    p.add_argument("--sentence_b", help="second sentence of an NSP query")
    p.add_argument("--eval", action="store_true", help="MLM and NSP scores on the test split")
    p.add_argument("--dataset_config", default=None, choices=bert.DATASET_CONFIGS,
                   help="for --eval (if not given: as in training)")
    p.add_argument("--data_dir", default=None, help="for --eval: a local WikiText copy")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--export_hf", metavar="DIR", help="write a transformers model folder")
    p.add_argument("--export_release", metavar="PATH", help="write a small release file (fp16 weights)")
    args = p.parse_args(argv)
    if args.top_k <= 0:
        p.fail(f"--top_k must be positive, got {args.top_k}")
    if not args.eval and (args.data_dir or args.dataset_config):
        p.fail("--data_dir and --dataset_config go with --eval")
    if (args.sentence_a is None) != (args.sentence_b is None):
        p.fail("--sentence_a and --sentence_b go together")
    p.check_device(args)
    return args


def run(args):
    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    device = bert.resolve_device(args.device)
    ckpt = bert.read_checkpoint(path)
    model, tokenizer = bert.load_checkpoint(path, device)
    train_args = ckpt.get("args", {})
    max_seq_len = train_args.get("max_seq_len", 128)
    say = (lambda *a: None) if args.json else print  # --json: the JSON only (notices and errors on stderr)
    say(f"loaded {path} ({model.num_parameters():,} parameters, trained {ckpt.get('step', 0):,} steps)"
        + ("" if args.checkpoint or path == SHIPPED_CHECKPOINT else
           f"; the shipped model: --checkpoint {os.path.relpath(SHIPPED_CHECKPOINT)}"))
    predictor = Predictor(model, tokenizer, max_seq_len, device)
    result = {"checkpoint": str(path), "trained_steps": ckpt.get("step", 0)}  # (few: a smoke run's)

    if args.export_hf:
        export_hf(model, tokenizer, args.export_hf)
        result["export_hf"] = args.export_hf
        folder = str(Path(args.export_hf))
        say(f"wrote a transformers model to {folder}/ (BertForPreTraining.from_pretrained"
            f"('{folder}'), pipeline('fill-mask', model='{folder}'))")

    if args.export_release:
        export_release(ckpt, args.export_release)
        result["export_release"] = args.export_release
        say(f"wrote {args.export_release} ({Path(args.export_release).stat().st_size / 2 ** 20:.1f} MiB)")

    asked = (args.text is not None or args.sentence_a is not None or args.eval or args.export_hf
             or args.export_release)
    texts = [args.text] if args.text is not None else ([] if asked else DEMO_MASKED)
    pairs = [(args.sentence_a, args.sentence_b)] if args.sentence_a is not None else ([] if asked else DEMO_PAIRS)
    if texts:
        result["fill_mask"] = []
        for text in texts:
            predictions = predictor.fill_mask(text, args.top_k)
            result["fill_mask"].append({"text": text, "predictions": [
                [{"token": t, "probability": p} for t, p in mask] for mask in predictions]})
            say(f"\n{text}")
            for i, mask in enumerate(predictions):
                label = f"  [MASK] {i + 1}: " if len(predictions) > 1 else "  "
                say(label + "  ".join(f"{t} {p:.3f}" for t, p in mask))
    if pairs:
        result["next_sentence"] = []
        say("")
        for a, b in pairs:
            p = predictor.is_next(a, b)
            result["next_sentence"].append({"sentence_a": a, "sentence_b": b, "is_next_probability": p})
            say(f"P(IsNext) = {p:.3f}\n  A: {a}\n  B: {b}")
    if args.eval:
        data_args = argparse.Namespace(
            dataset_config=args.dataset_config or train_args.get("dataset_config", "wikitext-2-v1"),
            data_dir=args.data_dir, vocab_size=None)
        _, corpora = bert.prepare_data(data_args, tokenizer, splits=("train", "test"), log=say,
                                       cache_dir=bert.default_cache_dir())  # training's tokenized splits
        dataset = bert.eval_batches(corpora["test"], max_seq_len, train_args.get("mask_prob", 0.15),
                                    tokenizer.get_vocab_size())
        dtype = bert.resolve_dtype("auto", device) if device.type == "cuda" else torch.float32
        metrics = bert.evaluate(model, dataset, device, dtype, bar={"desc": "test", "disable": None})  # (terminals only)
        base = baselines(corpora["train"], dataset, tokenizer)
        result["test"], result["baselines"] = metrics, base
        say(f"\ntest split: {bert.format_metrics(metrics)} "
            f"({metrics['masked_tokens']:,} masked tokens, {metrics['pairs']:,} pairs; NSP acc "
            f"{metrics['nsp_accuracy_positives']:.2%} on true next sentences, "
            f"{metrics['nsp_accuracy_negatives']:.2%} on random ones)")
        say(f"baselines on the same pairs and masks: chance MLM acc {base['chance_mlm_accuracy']:.3%}, "
            f"NSP acc 50%; unigram (always '{base['unigram_token']}') MLM acc "
            f"{base['unigram_mlm_accuracy']:.2%}, unigram ppl {base['unigram_perplexity']:,.0f}")
    for notice in predictor.notices:
        print(f"notice: {notice}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except bert.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        sys.exit(1)


if __name__ == "__main__":
    main()
