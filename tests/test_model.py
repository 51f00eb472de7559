"""The model: shapes, weight tying, init, padding invariance, loss at init, masked-only prediction,
overfitting, and parity with transformers' BertForPreTraining on the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F

import BERT_from_scratch as bert
from conftest import tiny_config
from test_mini_bert import hf_state_dict


def random_batch(config, B=3, T=12, lengths=(12, 7, 4), seed=0):
    """Inputs with padding: row i has lengths[i] real tokens, 15%-ish labelled positions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(bert.N_SPECIAL, config.vocab_size, (B, T), generator=g)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        attention_mask[i, :n] = 1
        token_type_ids[i, n // 2:n] = 1
        input_ids[i, 0] = bert.CLS_ID
        input_ids[i, n - 1] = bert.SEP_ID
        input_ids[i, n:] = bert.PAD_ID
    mlm_labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        mlm_labels[i, 1] = input_ids[i, 1]
        input_ids[i, 1] = bert.MASK_ID
        if n > 5:
            mlm_labels[i, 3] = input_ids[i, 3]
    nsp_labels = torch.tensor([0, 1, 0])[:B]
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                mlm_labels=mlm_labels, nsp_labels=nsp_labels)


def test_output_shapes_and_losses():
    config = tiny_config()
    model = bert.BertForPreTraining(config).eval()
    b = random_batch(config)
    out = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert out.mlm_logits.shape == (3, 12, config.vocab_size) and out.nsp_logits.shape == (3, 2)
    assert out.loss is None and out.mlm_loss is None and out.nsp_loss is None
    out = model(**b)
    n_masked = (b["mlm_labels"] != -100).sum().item()
    assert out.mlm_logits.shape == (n_masked, config.vocab_size)
    assert torch.allclose(out.loss, out.mlm_loss + out.nsp_loss)
    assert torch.allclose(out.nsp_loss, F.cross_entropy(out.nsp_logits, b["nsp_labels"]))


def test_masked_only_logits_equal_full_logits_at_masked_positions():
    config = tiny_config()
    model = bert.BertForPreTraining(config).eval()
    b = random_batch(config)
    full = model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).mlm_logits
    sparse = model(**b)
    where = b["mlm_labels"] != -100
    assert torch.allclose(sparse.mlm_logits, full[where], atol=1e-6)
    expected = F.cross_entropy(full[where], b["mlm_labels"][where])
    assert torch.allclose(sparse.mlm_loss, expected, atol=1e-6)
    # Precomputed positions (as the data loader provides them) give the same result.
    positions = where.view(-1).nonzero().squeeze(1)
    assert torch.allclose(model(**b, mlm_positions=positions).mlm_loss, sparse.mlm_loss)


def test_decoder_weight_is_the_token_embedding_matrix():
    model = bert.BertForPreTraining(tiny_config())
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.bias is not None  # its own output bias
    names = [n for n, _ in model.named_parameters()]
    assert "mlm_head.decoder.weight" not in names  # one parameter, counted and decayed once


def test_init_follows_bert():
    config = tiny_config(vocab_size=2000)
    config.hidden_size, config.intermediate_size = 128, 512
    torch.manual_seed(0)
    model = bert.BertForPreTraining(config)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.all(p == (1 if name.endswith("weight") else 0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() - 0.02) < 0.002, name
    assert torch.all(model.embeddings.word_embeddings.weight[config.pad_token_id] == 0)


def test_weight_decay_groups():
    model = bert.BertForPreTraining(tiny_config())
    decay, no_decay = model.optimizer_groups(0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decay["params"])
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_padding_does_not_change_outputs_at_real_positions():
    config = tiny_config()
    model = bert.BertForPreTraining(config).eval()
    b = random_batch(config)
    out = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    for i, n in enumerate([12, 7, 4]):
        alone = model(b["input_ids"][i:i + 1, :n], b["token_type_ids"][i:i + 1, :n],
                      b["attention_mask"][i:i + 1, :n])
        assert torch.allclose(alone.mlm_logits[0], out.mlm_logits[i, :n], atol=1e-5)
        assert torch.allclose(alone.nsp_logits[0], out.nsp_logits[i], atol=1e-5)
        # Whatever sits in the padding is never looked at.
        garbage = b["input_ids"][i:i + 1].clone()
        garbage[0, n:] = 17
        again = model(garbage, b["token_type_ids"][i:i + 1], b["attention_mask"][i:i + 1])
        assert torch.allclose(again.mlm_logits[0, :n], out.mlm_logits[i, :n], atol=1e-5)
    # No mask at all is the same as a mask of ones.
    ones = model(b["input_ids"], b["token_type_ids"], torch.ones_like(b["attention_mask"]))
    none = model(b["input_ids"], b["token_type_ids"], None)
    assert torch.allclose(ones.mlm_logits, none.mlm_logits, atol=1e-6)


def test_loss_at_init_is_log_vocab_plus_log_two():
    config = tiny_config(vocab_size=5000)
    config.hidden_size, config.intermediate_size = 64, 256
    torch.manual_seed(0)
    model = bert.BertForPreTraining(config).eval()
    b = random_batch(config, B=3)
    out = model(**b)
    assert abs(out.mlm_loss.item() - math.log(5000)) < 0.1
    assert abs(out.nsp_loss.item() - math.log(2)) < 0.1
    assert abs(out.loss.item() - (math.log(5000) + math.log(2))) < 0.15


def test_overfits_one_batch():
    torch.manual_seed(0)
    config = tiny_config(dropout=0.0)
    model = bert.BertForPreTraining(config)
    b = random_batch(config)
    opt = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    first = model(**b).loss.item()
    for _ in range(150):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5 and loss.item() < 0.05


def test_parity_with_transformers_bert_for_pretraining():
    transformers = pytest.importorskip("transformers")
    config = tiny_config(vocab_size=300)
    torch.manual_seed(0)
    ours = bert.BertForPreTraining(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so they are tested too
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu", pad_token_id=config.pad_token_id)
    theirs = transformers.BertForPreTraining(hf_config).eval()
    theirs.load_state_dict(hf_state_dict(ours), strict=True)
    assert theirs.cls.predictions.decoder.weight.data_ptr() == theirs.bert.embeddings.word_embeddings.weight.data_ptr()
    b = random_batch(config)
    with torch.no_grad():
        mine = ours(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        ref = theirs(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                     attention_mask=b["attention_mask"])
    real = b["attention_mask"].bool()
    assert torch.allclose(mine.mlm_logits[real], ref.prediction_logits[real], atol=1e-5)
    assert torch.allclose(mine.nsp_logits, ref.seq_relationship_logits, atol=1e-5)
    # The losses agree too (transformers computes MLM at every position, ignoring -100).
    with torch.no_grad():
        mine = ours(**b)
        ref = theirs(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                     attention_mask=b["attention_mask"], labels=b["mlm_labels"],
                     next_sentence_label=b["nsp_labels"])
    assert torch.allclose(mine.loss, ref.loss, atol=1e-5)


def test_flops_per_token_matches_the_issue_accounting():
    model = bert.BertForPreTraining(bert.config_for("mini", 30522))
    assert abs(model.flops_per_token(128, 0.15) / 1e6 - 27.6) < 0.5
    assert abs(model.flops_per_token(128, 1.0) / 1e6 - 68) < 1.0  # every position, as transformers
