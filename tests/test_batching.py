"""Cached rows -> padded tensors, the routing weights, one micro-batch's loss and the per-subset
validation loss (mol/batching.py), on hand-made rows and a tiny in-memory Llama (no cache on disk):
each against mol.losses' dense reference in float64."""

import numpy as np
import pytest
import torch

from mol import cache as C
from mol.batching import collate, loss_weights, micro_batch_loss, model_hidden, subset_losses
from mol.losses import dense_reference_loss

V, K = 64, 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.get_input_embeddings().weight.normal_(0, 1.0)  # spread the student so CE and KL are not trivial
    return m


def _labels(rng, n_pos: int):
    """Exact teacher labels for n_pos positions: K distinct ids, their probabilities, the residual."""
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(n_pos)])
    p = rng.dirichlet(np.ones(K + 1), size=n_pos)
    return ids, p[:, :K], p[:, K]


def _row(rng, n: int, corpus: str, subset: str, labelled: bool, seq_id: int = 0) -> dict:
    """A row as `Sequences.row` gives it: teacher arrays decoded from the stored codes, ids ascending."""
    r = {C.SEQ_ID: seq_id, C.CORPUS: corpus, C.SUBSET: subset, C.INPUT_IDS: rng.integers(1, V, n).astype(np.int64),
         C.TOPK_IDS: None, C.TOPK_PROBS: None, C.RESIDUAL: None}
    if labelled:
        gaps, codes, res = C.encode_labels(*_labels(rng, n - 1), vocab_size=V)
        r[C.TOPK_IDS] = C.decode_ids(gaps).astype(np.int64)
        r[C.TOPK_PROBS] = C.decode_probs(codes)
        r[C.RESIDUAL] = C.decode_residual(res)
    return r


def _sequences(rng, specs) -> C.Sequences:
    """(length, corpus, subset, labelled) per row -> Sequences holding the stored codes."""
    ids, probs, res, toks, has = [], [], [], [], []
    for n, _, _, labelled in specs:
        toks.append(rng.integers(1, V, n).astype(np.int64))
        has.append(labelled)
        if labelled:
            g, c, r = C.encode_labels(*_labels(rng, n - 1), vocab_size=V)
            ids.append(C.decode_ids(g))
            probs.append(c)
            res.append(r)
    lens = np.array([s[0] for s in specs])
    pos = np.where(has, lens - 1, 0)
    return C.Sequences(seq_id=np.arange(len(specs)), corpus=np.array([s[1] for s in specs], dtype=object),
                       subset=np.array([s[2] for s in specs], dtype=object), input_ids=np.concatenate(toks),
                       tok_off=np.concatenate([[0], np.cumsum(lens)]), teacher_topk_ids=np.concatenate(ids),
                       teacher_topk_probs=np.concatenate(probs), teacher_residual=np.concatenate(res),
                       has_teacher=np.array(has), pos_off=np.concatenate([[0], np.cumsum(pos)]))


def _dense64(model, b: dict, w_ce: torch.Tensor, w_kl: torch.Tensor):
    """mol.losses' dense reference in float64 on the model's full logits of a collated batch."""
    with torch.no_grad():
        logits = model(input_ids=b[C.INPUT_IDS], attention_mask=b["attention_mask"].long()).logits[:, :-1]
    return dense_reference_loss(logits.double(), b["target_ids"], b["mask"], b[C.TOPK_IDS], b[C.TOPK_PROBS].double(),
                                b[C.RESIDUAL].double(), w_ce.double(), w_kl.double())


def test_collate_pads_right_and_gives_unlabelled_rows_their_mass_in_the_residual():
    rng = np.random.default_rng(0)
    rows = [_row(rng, 5, "domain", "med", True), _row(rng, 3, "general", "gen", False)]
    b = collate(rows, K, CPU)
    assert b[C.INPUT_IDS].dtype == torch.int64 and b[C.INPUT_IDS].shape == (2, 5)
    assert b[C.INPUT_IDS][0].tolist() == rows[0][C.INPUT_IDS].tolist()
    assert b[C.INPUT_IDS][1].tolist() == rows[1][C.INPUT_IDS].tolist() + [0, 0]
    assert b["attention_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.equal(b["target_ids"], b[C.INPUT_IDS][:, 1:])
    assert b["mask"].tolist() == [[True] * 4, [True] * 2 + [False] * 2]
    assert b["is_domain"].tolist() == [True, False] and b["has_teacher"].tolist() == [True, False]
    assert b[C.TOPK_IDS].shape == (2, 4, K) and b[C.TOPK_PROBS].dtype == torch.float32
    assert np.array_equal(b[C.TOPK_IDS][0].numpy(), rows[0][C.TOPK_IDS])
    assert np.array_equal(b[C.TOPK_PROBS][0].numpy(), rows[0][C.TOPK_PROBS])
    assert np.array_equal(b[C.RESIDUAL][0].numpy(), rows[0][C.RESIDUAL])
    # the unlabelled row: no top-k mass, everything in the residual bucket (finite, never NaN)
    assert not b[C.TOPK_PROBS][1].any() and (b[C.RESIDUAL][1] == 1).all()
    assert set(collate(rows, K, CPU, with_teacher=False)) == set(b) - {C.TOPK_IDS, C.TOPK_PROBS, C.RESIDUAL}


def test_loss_weights_route_by_alpha_and_give_no_kl_weight_without_teacher_labels():
    """MoL: a domain sequence gets (1 - alpha, alpha), a general one (alpha, 1 - alpha); CE mode (1, 0);
    a sequence the cache holds no labels for gets no KL weight in either."""
    b = {"is_domain": torch.tensor([True, False, True, False]), "has_teacher": torch.tensor([True, True, False, False])}
    w_ce, w_kl = loss_weights(b, 0.2, "mol")
    torch.testing.assert_close(w_ce, torch.tensor([0.8, 0.2, 0.8, 0.2]))
    torch.testing.assert_close(w_kl, torch.tensor([0.2, 0.8, 0.0, 0.0]))
    w_ce, w_kl = loss_weights(b, 0.2, "ce")
    assert w_ce.tolist() == [1.0] * 4 and w_kl.tolist() == [0.0] * 4


def test_micro_batch_loss_equals_the_float64_dense_loss(model):
    """Padded rows of three lengths, one without teacher labels, over several chunks: the same loss,
    per-sequence CE, KL and token counts as the dense float64 reference on the model's full logits."""
    rng = np.random.default_rng(1)
    rows = [_row(rng, 9, "domain", "med", True), _row(rng, 6, "general", "gen", True),
            _row(rng, 4, "general", "gen", False)]
    b = collate(rows, K, CPU)
    w_ce, w_kl = loss_weights(b, 0.3, "mol")
    with torch.no_grad():
        out = micro_batch_loss(model, b, w_ce=w_ce, w_kl=w_kl, chunk_size=3)
        given = micro_batch_loss(model, b, w_ce=w_ce, w_kl=w_kl, chunk_size=100, hidden=model_hidden(model, b))
    ref = _dense64(model, b, w_ce, w_kl)
    assert out.n_tokens.tolist() == ref.n_tokens.tolist() == [8, 5, 3]
    assert float(ref.kl[0]) > 1e-3 and float(ref.kl[1]) > 1e-3
    for got in (out, given):
        assert torch.isfinite(got.kl).all()
        torch.testing.assert_close(got.ce.double(), ref.ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.kl[:2].double(), ref.kl[:2], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.loss_sum.double(), ref.loss_sum, rtol=1e-5, atol=1e-6)


def test_subset_losses_are_token_weighted_per_subset_and_per_corpus(model):
    """Two domain subsets of unequal lengths and an unlabelled general one, in batches of 2 (padding):
    CE is the token-weighted mean per subset and per corpus (not a mean of sequence means), KL-to-base
    only where the cache has labels, and the model's training flag is restored."""
    rng = np.random.default_rng(2)
    specs = [(9, "domain", "a", True), (3, "domain", "a", True), (5, "domain", "b", True),
             (7, "general", "g", False), (4, "general", "g", False)]
    seqs = _sequences(rng, specs)
    model.train()
    res = subset_losses(model, seqs, K, CPU, batch_size=2, chunk=4)
    assert model.training
    model.eval()
    ce, kl, n, row_ce = {}, {}, {}, []
    for i, (_, corpus, subset, labelled) in enumerate(specs):
        b = collate([seqs.row(i)], K, CPU)
        one = _dense64(model, b, torch.ones(1), torch.ones(1) * labelled)
        row_ce.append(float(one.ce[0]))
        for key in (subset, corpus):
            ce[key] = ce.get(key, 0.0) + float(one.ce[0]) * int(one.n_tokens[0])
            kl[key] = kl.get(key, 0.0) + float(one.kl[0]) * int(one.n_tokens[0]) * labelled
            n[key] = n.get(key, 0) + int(one.n_tokens[0])
    assert set(res) == {f"{m}/{key}" for key in ("a", "b", "domain") for m in ("ce", "kl_to_base", "tokens")} | {
        "ce/g", "tokens/g", "ce/general", "tokens/general"}
    for key in n:
        assert res[f"tokens/{key}"] == n[key]
        assert res[f"ce/{key}"] == pytest.approx(ce[key] / n[key], rel=1e-5)
    for key in ("a", "b", "domain"):
        assert res[f"kl_to_base/{key}"] == pytest.approx(kl[key] / n[key], rel=1e-4)
    # the lengths are unequal enough that a mean of sequence means would be told apart
    assert abs(np.mean(row_ce[:2]) - res["ce/a"]) > 1e-3
