"""The two scripts as users run them: train -> checkpoint -> predictions -> transformers export,
and one clear message with a non-zero exit (never a traceback) for every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import BERT_from_scratch as bert
from conftest import REPO, TINY_TRAIN, WIKITEXT_DIR, needs_wikitext, run_script

import test_mini_bert


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
    """A tiny model trained for a few steps by the command line, as a user would."""
    path = tmp_path_factory.mktemp("run") / "tiny.pt"
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", tiny_data_dir,
                        "--max_steps", "8", "--checkpoint", path)
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def json_of(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_training_output(trained):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["step"] == 8 and set(ckpt["metrics"]) == {"validation", "test"}
    for split in ("validation", "test"):
        m = ckpt["metrics"][split]
        assert 0 <= m["mlm_accuracy"] <= 1 and 0 <= m["nsp_accuracy"] <= 1
        assert m["perplexity"] == pytest.approx(torch.tensor(m["mlm_loss"]).exp().item(), rel=1e-6)
    assert ckpt["command"].startswith("python ") and "--max_steps 8" in ckpt["command"]
    assert ckpt["args"]["model_size"] == "tiny" and ckpt["config"]["hidden_size"] == 128


def test_max_steps_is_announced_and_a_finished_run_says_how_to_go_on(trained, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(trained, copy)
    result = run_script("BERT_from_scratch.py", "--resume", copy, "--checkpoint", copy)  # its --max_steps 8 comes along
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "stopping at step 8 (--max_steps)" in output
    assert "notice: the run is already at step 8: pass a larger --max_steps" in output


def test_ctrl_c_before_training_is_one_line(monkeypatch, capsys, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bert, "train", interrupted)
    with pytest.raises(SystemExit) as info:
        bert.main(["--device", "cpu", "--checkpoint", str(tmp_path / "x.pt")])
    assert info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_fill_mask_json(trained):
    result = run_script("test_mini_bert.py", "--checkpoint", trained, "--json", "--top_k", "4",
                        "--text", "the castle was [MASK] near the [mask] .")
    assert result.stderr == ""  # nothing but the JSON
    out = json_of(result)
    assert out["checkpoint"] == str(trained) and out["trained_steps"] == 8
    (entry,) = out["fill_mask"]
    assert len(entry["predictions"]) == 2  # one list per [MASK], "[mask]" accepted too
    for predictions in entry["predictions"]:
        assert len(predictions) == 4
        probs = [p["probability"] for p in predictions]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
        assert not {p["token"] for p in predictions} & set(bert.SPECIAL_TOKENS)


def test_json_into_a_pipe_that_closes_early_exits_quietly(trained):
    cmd = f"{sys.executable} test_mini_bert.py --checkpoint {trained} --json --top_k 50 | head -n 2"
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.count("\n") == 2
    assert "Traceback" not in result.stderr and "Broken" not in result.stderr


def test_next_sentence_and_demo(trained):
    out = json_of(run_script("test_mini_bert.py", "--checkpoint", trained, "--json",
                             "--sentence_a", "the castle was built .", "--sentence_b", "the river is long ."))
    (entry,) = out["next_sentence"]
    assert 0 <= entry["is_next_probability"] <= 1
    demo = run_script("test_mini_bert.py", "--checkpoint", trained)
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.count("P(IsNext)") == 2 and demo.stdout.count("[MASK]") >= 4
    assert f"loaded {trained}" in demo.stdout


def test_eval_reproduces_the_training_scores(trained, tiny_data_dir):
    out = json_of(run_script("test_mini_bert.py", "--checkpoint", trained, "--eval", "--json",
                             "--data_dir", tiny_data_dir))
    # Same fixed-seed pairs and masks: the same numbers, up to fp32 rounding (on CPUs with bf16 the
    # training process may pick other fp32 kernels than a fresh one, a difference of about 1e-8).
    expected = torch.load(trained, weights_only=True)["metrics"]["test"]
    assert out["test"].keys() == expected.keys()
    for name, value in expected.items():
        assert out["test"][name] == pytest.approx(value, rel=1e-6), name


def test_predictions_survive_long_input_with_a_notice(trained):
    text = "the castle " * 200 + "[MASK] ."
    result = run_script("test_mini_bert.py", "--checkpoint", trained, "--text", "[MASK] " + text)
    assert result.returncode == 0 and "notice: the text has" in result.stderr and "truncated" in result.stderr
    result = run_script("test_mini_bert.py", "--checkpoint", trained, "--sentence_a", text,
                        "--sentence_b", "the river .")
    assert result.returncode == 0 and "truncated" in result.stderr and "P(IsNext)" in result.stdout


def test_export_to_transformers_round_trip(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out_dir = tmp_path / "hf"
    result = run_script("test_mini_bert.py", "--checkpoint", trained, "--export_hf", out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Writing model shards" not in result.stderr  # (transformers' progress bar, for one file)
    ours, tokenizer = bert.load_checkpoint(trained)
    hf = transformers.BertForPreTraining.from_pretrained(out_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    texts = [("the castle was [MASK] near the river .", "many people came ."), ("a [MASK] song", "the end .")]
    enc = hf_tokenizer([a for a, _ in texts], [b for _, b in texts], padding=True, return_tensors="pt")
    for i, (a, b) in enumerate(texts):
        n = int(enc["attention_mask"][i].sum())
        assert enc["input_ids"][i, :n].tolist() == tokenizer.encode(a, b).ids
    with torch.no_grad():
        mine = ours(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        theirs = hf(**enc)
    real = enc["attention_mask"].bool()
    assert torch.allclose(mine.mlm_logits[real], theirs.prediction_logits[real], atol=1e-5)
    assert torch.allclose(mine.nsp_logits, theirs.seq_relationship_logits, atol=1e-5)
    # The other BERT classes load the same folder without missing weights.
    for cls in (transformers.BertForMaskedLM, transformers.BertModel):
        _, info = cls.from_pretrained(out_dir, output_loading_info=True)
        assert info["missing_keys"] == [] or set(info["missing_keys"]) <= {"cls.predictions.decoder.weight"}
    # Fine-tuning for classification, as the README shows: the encoder loads, the new head trains.
    classifier = transformers.BertForSequenceClassification.from_pretrained(out_dir, num_labels=2)
    for name, p in hf.bert.named_parameters():  # the pretrained encoder, not a fresh one
        assert torch.equal(classifier.bert.get_parameter(name), p), name
    batch = hf_tokenizer(["a castle near the river .", "the album was a song ."], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = classifier(**batch, labels=torch.tensor([0, 1])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # fill-mask through transformers' pipeline gives test_mini_bert.py's predictions.
    text = "the castle was [MASK] near the river ."
    pipe = transformers.pipeline("fill-mask", model=str(out_dir), device="cpu")
    ranked = [r for r in pipe(text, top_k=50) if r["token_str"] not in bert.SPECIAL_TOKENS][:5]
    ours_json = json_of(run_script("test_mini_bert.py", "--checkpoint", trained, "--json", "--text", text))
    mine = ours_json["fill_mask"][0]["predictions"][0]
    assert [hf_tokenizer.convert_ids_to_tokens(r["token"]) for r in ranked] == [p["token"] for p in mine]
    assert [r["score"] for r in ranked] == pytest.approx([p["probability"] for p in mine], abs=1e-5)
    # A second export into the same folder refuses and leaves the first untouched.
    before = {f.name: f.stat().st_mtime_ns for f in out_dir.iterdir()}
    again = run_script("test_mini_bert.py", "--checkpoint", trained, "--export_hf", out_dir)
    assert again.returncode == 1 and "already has files" in again.stderr and "Traceback" not in again.stderr
    assert {f.name: f.stat().st_mtime_ns for f in out_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    # An existing empty folder is fine: it gets the same files, and nothing else.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_script("test_mini_bert.py", "--checkpoint", trained, "--export_hf", empty).returncode == 0
    assert sorted(f.name for f in empty.iterdir()) == sorted(before)


def test_release_export_is_small_and_predicts_the_same(trained, tmp_path):
    release = tmp_path / "release.pt"
    result = run_script("test_mini_bert.py", "--checkpoint", trained, "--export_release", release)
    assert result.returncode == 0, result.stderr
    raw = torch.load(release, weights_only=True)
    assert "train_state" not in raw and raw["step"] == 8 and raw["metrics"]
    assert all(v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point())
    n_params = bert.load_checkpoint(trained)[0].num_parameters()
    assert release.stat().st_size < 2 * n_params * 1.1  # two bytes a parameter: the tied matrix once
    again = run_script("test_mini_bert.py", "--checkpoint", trained, "--export_release", release)
    assert again.returncode == 1 and "already exists" in again.stderr  # never replaced
    text = "the castle was [MASK] near the river ."
    full = json_of(run_script("test_mini_bert.py", "--checkpoint", trained, "--json", "--text", text))
    half = json_of(run_script("test_mini_bert.py", "--checkpoint", release, "--json", "--text", text))
    p_full = [p["probability"] for p in full["fill_mask"][0]["predictions"][0]]
    p_half = [p["probability"] for p in half["fill_mask"][0]["predictions"][0]]
    assert p_half == pytest.approx(p_full, abs=2e-3)


# Where the checkpoint comes from ------------------------------------------------------------

def test_default_checkpoint_prefers_the_users_newest_training_output(tmp_path, trained):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(trained, tmp_path / "checkpoints" / "bert_tiny.pt")
    result = run_script("test_mini_bert.py", "--text", "the [MASK] .", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded checkpoints/bert_tiny.pt" in result.stdout


def test_default_checkpoint_falls_back_to_the_shipped_model(tmp_path):
    result = run_script("test_mini_bert.py", "--text", "the [MASK] .", cwd=tmp_path)
    if test_mini_bert.SHIPPED_CHECKPOINT.exists():
        assert result.returncode == 0 and f"loaded {test_mini_bert.SHIPPED_CHECKPOINT}" in result.stdout
    else:
        assert result.returncode == 1 and str(test_mini_bert.SHIPPED_CHECKPOINT) in result.stderr


def test_training_never_replaces_a_file_it_did_not_create(tmp_path, tiny_data_dir, trained):
    target = tmp_path / "precious.pt"
    shutil.copy(trained, target)
    before = target.read_bytes()
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", tiny_data_dir,
                        "--max_steps", "2", "--checkpoint", target)
    assert result.returncode == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert target.read_bytes() == before
    assert "Traceback" not in result.stderr


# Bad input: one clear message, a non-zero exit, no traceback -------------------------------------

def corpus_without_pairs(folder):
    folder.mkdir()
    for split in bert.SPLITS:
        (folder / f"{split}.txt").write_text(" \n = A = \n \n Only one sentence here . \n \n = B = \n \n Another one . \n")
    return folder


def empty_validation_split(folder):
    folder.mkdir()
    for split in bert.SPLITS:
        (folder / f"{split}.txt").write_text(" \n = A = \n \n One . Two . \n \n = B = \n \n Three . Four . \n")
    (folder / "validation.txt").write_text(" \n = = Only a heading = = \n")
    return folder


def latin1_split(folder):
    empty_validation_split(folder)
    (folder / "test.txt").write_bytes(" = Caf\xe9 = \n".encode("latin-1"))
    return folder


def plain_text_without_titles(folder):  # no " = Title = " lines: each split is one article
    folder.mkdir()
    for split in bert.SPLITS:
        (folder / f"{split}.txt").write_text("One sentence . Two sentences .\n\nA paragraph . Another .\n")
    return folder


def missing_test_split(folder):
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.txt").write_text(" \n = A = \n \n One . Two . \n")
    return folder


TRAIN_ERRORS = [  # (flags, exit code, words of the message)
    (["--batch_size", "0"], 2, "--batch_size must be positive"),
    (["--epochs", "-1"], 2, "--epochs must be positive"),
    (["--mask_prob", "0"], 2, "--mask_prob must be in (0, 1)"),
    (["--mask_prob", "1.5"], 2, "--mask_prob must be in (0, 1)"),
    (["--max_seq_len", "4"], 2, "--max_seq_len must be between"),
    (["--max_seq_len", "1024"], 2, "--max_seq_len must be between"),
    (["--lr", "0"], 2, "--lr must be positive"),
    (["--model_size", "huge"], 2, "invalid choice"),
    (["--seed", "-1"], 2, "--seed must be non-negative"),
    (["--batch_size", "100000"], 1, "use a smaller --batch_size"),
    (["--dtype", "fp16", "--device", "cpu"], 1, "--dtype fp16 needs --device cuda"),
]


@pytest.mark.parametrize("flags, code, message", TRAIN_ERRORS)
def test_bad_training_flags(flags, code, message, tiny_data_dir, tmp_path):
    result = run_script("BERT_from_scratch.py", "--data_dir", tiny_data_dir, "--checkpoint",
                        tmp_path / "x.pt", "--num_workers", "0", *flags)
    assert result.returncode == code and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.pt").exists()
    if code == 2:  # a bad flag: one line, not argparse's usage block
        assert result.stderr.count("\n") == 1
        assert ("--help lists the flags" in result.stderr) == (message == "invalid choice")  # argparse's own


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_help_explains_every_flag_and_shows_its_default():
    parser = bert.build_parser()
    for action in parser._actions[1:]:  # (after --help)
        assert action.help, f"--{action.dest} has no help"
        shown = parser.formatter_class("prog")._get_help_string(action)
        has_default = action.default is not None and action.default is not False  # (0 is a default)
        assert ("(default: %(default)s)" in shown) == has_default, action.dest
    assert "passes over the training pairs (negatives drawn afresh) (default: 2)" in " ".join(parser.format_help().split())


def test_cuda_requested_without_cuda(tiny_data_dir):
    for script in ("BERT_from_scratch.py", "test_mini_bert.py"):
        result = run_script(script, "--device", "cuda")
        assert result.returncode == 2 and "CUDA is not available" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("make_data, message", [
    (corpus_without_pairs, "no article with two sentences"),
    (missing_test_split, "has no test split (no test.txt or wiki.test.tokens or wiki.test.raw)"),
    (plain_text_without_titles, "the train split is one article"),
    (empty_validation_split, "the validation split has no sentences"),
    (latin1_split, "as UTF-8 text"),
])
def test_bad_training_data(make_data, message, tmp_path):
    data = make_data(tmp_path / "data")
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", data, "--checkpoint", tmp_path / "x.pt")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_is_caught_before_training(tmp_path, tiny_data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", tiny_data_dir,
                        "--checkpoint", blocker / "model.pt")
    assert result.returncode == 1 and f"{blocker} is a file, not a folder" in result.stderr
    assert "data:" not in result.stdout  # it failed before loading any data
    assert "Traceback" not in result.stderr


def test_an_unwritable_folder_gives_the_reason(tmp_path, monkeypatch):
    """The reason, not the name of the file that tried to write."""
    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(bert.Path, "write_bytes", refuse)
    with pytest.raises(bert.UserError) as info:
        bert.check_output_path(tmp_path / "model.pt", resuming_from=None, overwrite=False)
    assert str(info.value) == f"cannot write the checkpoint {tmp_path / 'model.pt'}: Permission denied"


def test_bad_output_paths(tmp_path, tiny_data_dir, trained):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", tiny_data_dir,
                        "--checkpoint", folder, "--overwrite")
    assert result.returncode == 1 and "is a folder; give a file name" in result.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for flag, target, message in [("--export_release", blocker / "x.pt", "cannot write"),
                                  ("--export_hf", blocker, "is a file")]:
        result = run_script("test_mini_bert.py", "--checkpoint", trained, flag, target)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_plot_without_matplotlib_fails_before_training(tmp_path, tiny_data_dir):
    fake = tmp_path / "no_matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    result = run_script("BERT_from_scratch.py", *TINY_TRAIN, "--data_dir", tiny_data_dir, "--plot",
                        "--checkpoint", tmp_path / "x.pt", env={"PYTHONPATH": str(fake.parent)})
    assert result.returncode == 2 and "--plot needs matplotlib" in result.stderr
    assert "data:" not in result.stdout


def test_hub_unreachable_names_the_offline_options(tmp_path):
    result = run_script("BERT_from_scratch.py", "--checkpoint", tmp_path / "x.pt",
                        env={"HF_HOME": str(tmp_path / "empty_hf_home"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "--data_dir" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_checkpoints_for_predictions(tmp_path, trained):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    mismatched, garbled = tmp_path / "mismatched.pt", tmp_path / "garbled.pt"
    ckpt = torch.load(trained, weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "hidden_size": 2 * ckpt["config"]["hidden_size"]}}, mismatched)
    torch.save({**ckpt, "tokenizer": "{not json"}, garbled)
    for path, message in [(tmp_path / "missing.pt", "does not exist"), (truncated, "not a readable checkpoint"),
                          (foreign, "not a checkpoint of BERT_from_scratch.py"),
                          (mismatched, "do not fit together"), (garbled, "do not fit together")]:
        result = run_script("test_mini_bert.py", "--checkpoint", path)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, code, message", [
    (["--text", "no mask here"], 1, "no [MASK] in the text"),
    (["--text", "   "], 1, "the text is empty"),
    (["--sentence_a", "", "--sentence_b", "the river ."], 1, "must both be non-empty"),
    (["--sentence_a", "only one"], 2, "go together"),
    (["--top_k", "0", "--text", "a [MASK]"], 2, "--top_k must be positive"),
    (["--data_dir", "somewhere"], 2, "go with --eval"),
])
def test_bad_prediction_input(flags, code, message, trained):
    result = run_script("test_mini_bert.py", "--checkpoint", trained, *flags)
    assert result.returncode == code and message in result.stderr and "Traceback" not in result.stderr
    assert code != 2 or result.stderr.count("\n") == 1


# The real data --------------------------------------------------------------------------------

HF_CACHE = WIKITEXT_DIR.parent / "hf-cache" / "datasets" / "Salesforce___wikitext"


@pytest.mark.skipif(not HF_CACHE.is_dir(), reason="no prepared datasets cache beside the data")
def test_default_source_is_the_datasets_wikitext_and_matches_the_text_files(tmp_path):
    # The seed command's path: load_dataset("Salesforce/wikitext", "wikitext-2-v1"), offline.
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "Salesforce___wikitext").symlink_to(HF_CACHE.resolve())
    code = ("import BERT_from_scratch as b\n"
            "hub = b.load_wikitext('wikitext-2-v1', None)\n"
            f"local = b.load_wikitext('wikitext-2-v1', {str(WIKITEXT_DIR)!r})\n"
            "assert all(b.split_articles(hub[s]) == b.split_articles(local[s]) for s in b.SPLITS)\n"
            "print('same articles', [len(hub[s]) for s in b.SPLITS])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same articles [36718, 3760, 4358]" in result.stdout


@needs_wikitext
def test_real_wikitext2_smoke_run(tmp_path):
    path = tmp_path / "real.pt"
    result = run_script("BERT_from_scratch.py", "--device", "cpu", "--data_dir", WIKITEXT_DIR,
                        "--model_size", "tiny", "--max_steps", "20", "--log_every", "10",
                        "--checkpoint", path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "600 articles" in result.stdout and "16,384 tokens" in result.stdout
    out = json_of(run_script("test_mini_bert.py", "--checkpoint", path, "--eval", "--json",
                             "--data_dir", WIKITEXT_DIR, timeout=900))
    assert out["test"]["pairs"] > 18_000 and out["test"]["masked_tokens"] > 30_000
