"""Tests for mol.losses against an independent float64 dense-vocabulary computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mol.losses import (
    MolLossOutput,
    chunked_mol_loss,
    dense_reference_loss,
    mol_weights,
    truncated_reverse_kl,
)

B, T, H, V, K = 4, 9, 16, 97, 31


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _teacher_topk(teacher_logits: torch.Tensor, k: int):
    """Top-k ids/probs and residual of a float64 teacher, the way the cache stores them."""
    q = torch.softmax(teacher_logits.double(), dim=-1)
    q_sorted, order = q.sort(dim=-1, descending=True)
    # Summing the tail, not 1 - sum(top-k): for sharp teachers the latter cancels to 0 (or
    # -2e-16) when the true residual is ~1e-20, which is not the distribution we mean to test.
    return order[..., :k], q_sorted[..., :k], q_sorted[..., k:].sum(dim=-1)


def _problem(seed: int, b: int = B, t: int = T, h: int = H, v: int = V, k: int = K):
    g = _gen(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.4
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) < 0.75
    mask[0, :] = True
    if b > 2:
        mask[2, :] = False  # one sequence with n_s = 0
    targets = targets.masked_fill(~mask, -100)  # masked targets must never be read
    # A teacher that is correlated with the student but not equal to it.
    teacher_logits = (hidden.double() @ weight.double().t()) * 0.8 + torch.randn(
        b, t, v, generator=g, dtype=torch.float64
    )
    ids, probs, resid = _teacher_topk(teacher_logits, k)
    w_ce = torch.rand(b, generator=g)
    w_kl = torch.rand(b, generator=g)
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        teacher_logits=teacher_logits,
        ids=ids,
        probs=probs,
        resid=resid,
        w_ce=w_ce,
        w_kl=w_kl,
    )


def _reference(hidden64, weight64, targets, mask, teacher_logits, k, w_ce, w_kl):
    """Float64 loss written straight from the formulas over the full vocabulary."""
    logits = hidden64 @ weight64.t()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    q = torch.softmax(teacher_logits.double(), dim=-1)
    q_sorted, order = q.sort(dim=-1, descending=True)
    q_top, ids = q_sorted[..., :k], order[..., :k]
    r_teacher = q_sorted[..., k:].sum(dim=-1)
    p_top = p.gather(-1, ids)
    r_student = 1.0 - p_top.sum(dim=-1)
    kl_t = (p_top * (p_top.log() - q_top.log())).sum(dim=-1) + r_student * (
        r_student.log() - r_teacher.log()
    )
    ce_t = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    m = mask.double()
    n = m.sum(dim=1)
    ce = torch.where(n > 0, (ce_t * m).sum(dim=1) / n.clamp_min(1), torch.zeros_like(n))
    kl = torch.where(n > 0, (kl_t * m).sum(dim=1) / n.clamp_min(1), torch.zeros_like(n))
    loss = (w_ce.double() * ce + w_kl.double() * kl).sum()
    return loss, ce, kl


def _chunked(pb, hidden, weight, chunk_size=5, probs_dtype=torch.float32):
    return chunked_mol_loss(
        hidden,
        weight,
        pb["targets"],
        pb["mask"],
        pb["ids"],
        pb["probs"].to(probs_dtype),
        pb["resid"].to(probs_dtype),
        pb["w_ce"],
        pb["w_kl"],
        chunk_size=chunk_size,
    )


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _dense_kl(student_logits64, teacher_logits64):
    logp = torch.log_softmax(student_logits64, dim=-1)
    logq = torch.log_softmax(teacher_logits64, dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_matches_float64_reference_values_and_grads(chunk_size):
    pb = _problem(0)
    h, w = _leaves(pb["hidden"], pb["weight"])
    out = _chunked(pb, h, w, chunk_size=chunk_size)
    assert isinstance(out, MolLossOutput)
    out.loss_sum.backward()

    h64, w64 = _leaves(pb["hidden"].double(), pb["weight"].double())
    ref_loss, ref_ce, ref_kl = _reference(
        h64, w64, pb["targets"], pb["mask"], pb["teacher_logits"], K, pb["w_ce"], pb["w_kl"]
    )
    ref_loss.backward()

    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce.double(), ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl.double(), ref_kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert out.n_tokens.dtype == torch.int64
    assert out.n_tokens.tolist() == pb["mask"].sum(dim=1).tolist()
    assert out.ce[2] == 0 and out.kl[2] == 0  # the fully masked sequence
    assert not out.ce.requires_grad and not out.kl.requires_grad


def test_dense_reference_loss_matches_float64_reference():
    pb = _problem(1)
    h, w = _leaves(pb["hidden"], pb["weight"])
    logits = h @ w.t()
    out = dense_reference_loss(
        logits, pb["targets"], pb["mask"], pb["ids"], pb["probs"].float(), pb["resid"].float(),
        pb["w_ce"], pb["w_kl"],
    )
    out.loss_sum.backward()
    h64, w64 = _leaves(pb["hidden"].double(), pb["weight"].double())
    ref_loss, ref_ce, ref_kl = _reference(
        h64, w64, pb["targets"], pb["mask"], pb["teacher_logits"], K, pb["w_ce"], pb["w_kl"]
    )
    ref_loss.backward()
    torch.testing.assert_close(out.loss_sum.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce.double(), ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl.double(), ref_kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_float64_inputs_are_computed_in_float64():
    pb = _problem(2)
    h, w = _leaves(pb["hidden"].double(), pb["weight"].double())
    out = _chunked(pb, h, w, probs_dtype=torch.float64)
    out.loss_sum.backward()
    h64, w64 = _leaves(pb["hidden"].double(), pb["weight"].double())
    ref_loss, _, ref_kl = _reference(
        h64, w64, pb["targets"], pb["mask"], pb["teacher_logits"], K, pb["w_ce"], pb["w_kl"]
    )
    ref_loss.backward()
    assert out.loss_sum.dtype == torch.float64
    torch.testing.assert_close(out.loss_sum, ref_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.kl, ref_kl.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, h64.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w64.grad, rtol=1e-10, atol=1e-12)


def test_truncated_kl_matches_formula_per_position():
    g = _gen(3)
    student = torch.randn(50, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(50, V, generator=g, dtype=torch.float64) * 2
    ids, probs, resid = _teacher_topk(teacher, K)
    p = torch.softmax(student, dim=-1)
    p_top = p.gather(-1, ids)
    r_s = 1 - p_top.sum(-1)
    expected = (p_top * (p_top / probs).log()).sum(-1) + r_s * (r_s / resid).log()
    got64 = truncated_reverse_kl(student, ids, probs, resid)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-12)
    got32 = truncated_reverse_kl(student.float(), ids, probs.half(), resid.half())
    assert got32.dtype == torch.float32
    # fp16 teacher probs carry ~5e-4 relative error into log q.
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=2e-3)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_is_zero_when_student_equals_teacher(dtype):
    g = _gen(4)
    logits = torch.randn(64, V, generator=g, dtype=torch.float64) * 3
    ids, probs, resid = _teacher_topk(logits, K)
    kl = truncated_reverse_kl(logits.to(dtype), ids, probs.to(dtype), resid.to(dtype))
    assert kl.abs().max().item() < 1e-6

    # Same through the chunked loss: the teacher is the student's own projection.
    pb = _problem(5)
    ids, probs, resid = _teacher_topk(pb["hidden"].double() @ pb["weight"].double().t(), K)
    out = chunked_mol_loss(
        pb["hidden"].to(dtype), pb["weight"].to(dtype), pb["targets"], pb["mask"],
        ids, probs.to(dtype), resid.to(dtype), pb["w_ce"], pb["w_kl"], chunk_size=7,
    )
    assert out.kl.abs().max().item() < 1e-6


def test_full_topk_equals_dense_kl_with_finite_grad():
    g = _gen(6)
    student = torch.randn(40, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(40, V, generator=g, dtype=torch.float64) * 3
    ids, probs, resid = _teacher_topk(teacher, V)
    resid = torch.zeros_like(resid)  # k = V: nothing outside the top-k
    s = student.clone().requires_grad_(True)
    kl = truncated_reverse_kl(s, ids, probs, resid)
    torch.testing.assert_close(kl.detach(), _dense_kl(student, teacher), rtol=1e-10, atol=1e-12)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()
    # The residual bucket is empty, so the gradient is the dense reverse-KL gradient too.
    s_ref = student.clone().requires_grad_(True)
    _dense_kl(s_ref, teacher).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-8, atol=1e-10)

    # fp32 path with k = V, through the chunked loss as well.
    s32 = student.float().requires_grad_(True)
    kl32 = truncated_reverse_kl(s32, ids, probs.float(), resid.float())
    kl32.sum().backward()
    assert torch.isfinite(kl32).all() and torch.isfinite(s32.grad).all()
    torch.testing.assert_close(kl32.double(), _dense_kl(student, teacher), rtol=1e-4, atol=1e-5)

    pb = _problem(7, k=V)
    h, w = _leaves(pb["hidden"], pb["weight"])
    out = _chunked(pb, h, w, probs_dtype=torch.float32)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(h.grad).all()
    assert torch.isfinite(w.grad).all()


def _random_pairs(seed: int, n: int, v: int, dtype=torch.float64):
    """Student/teacher logits with per-row temperatures from very flat to very sharp."""
    g = _gen(seed)
    scale = torch.logspace(-1, 2.5, n, dtype=torch.float64).unsqueeze(-1)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale.flip(0)
    # Half the rows: a teacher close to the student (small KL, where rounding matters most).
    close = student + 0.01 * torch.randn(n, v, generator=g, dtype=torch.float64)
    teacher[::2] = close[::2]
    return student.to(dtype), teacher


@pytest.mark.parametrize("k", [1, 5, 31, 63, 64])
def test_never_negative(k):
    student, teacher = _random_pairs(8 + k, 600, 64)
    ids, probs, resid = _teacher_topk(teacher, k)
    kl64 = truncated_reverse_kl(student, ids, probs, resid)
    assert torch.isfinite(kl64).all()
    assert kl64.min().item() >= -1e-6

    # fp16-rounded teacher (buckets no longer sum to 1) and a teacher that lost 10% of its mass.
    kl16 = truncated_reverse_kl(student, ids, probs.half(), resid.half())
    assert torch.isfinite(kl16).all() and kl16.min().item() >= -1e-6
    kl_short = truncated_reverse_kl(student, ids, probs * 0.9, resid * 0.9)
    assert kl_short.min().item() >= -1e-6
    kl32 = truncated_reverse_kl(student.float(), ids, probs.half(), resid.half())
    assert torch.isfinite(kl32).all() and kl32.min().item() >= -1e-5


@pytest.mark.parametrize("k", [1, 7, 31, 63])
def test_truncated_kl_not_above_dense_kl(k):
    student, teacher = _random_pairs(20 + k, 600, 64)
    ids, probs, resid = _teacher_topk(teacher, k)
    truncated = truncated_reverse_kl(student, ids, probs, resid)
    dense = _dense_kl(student, teacher)
    assert (truncated <= dense + 1e-9 * (1 + dense)).all()


# --------------------------------------------------------------------------- edge cases


def _assert_finite_with_grads(pb, hidden, weight, **kw):
    h, w = _leaves(hidden, weight)
    out = chunked_mol_loss(
        h, w, pb["targets"], pb["mask"], kw.get("ids", pb["ids"]), kw["probs"], kw["resid"],
        pb["w_ce"], pb["w_kl"], chunk_size=4,
    )
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum)
    assert torch.isfinite(out.ce).all() and torch.isfinite(out.kl).all()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert (out.kl >= -1e-5).all()
    return out


def test_no_nan_when_teacher_residual_is_zero():
    pb = _problem(30)
    probs = pb["probs"] / pb["probs"].sum(-1, keepdim=True)  # all mass in the top-k
    _assert_finite_with_grads(
        pb, pb["hidden"], pb["weight"], probs=probs.half(),
        resid=torch.zeros_like(pb["resid"]).half(),
    )


def test_no_nan_when_teacher_probs_contain_zeros():
    pb = _problem(31)
    probs = pb["probs"].clone()
    probs[..., -10:] = 0.0  # fp16 underflow of the tail of the top-k
    probs[0, 0, :] = 0.0  # a position whose whole top-k underflowed
    _assert_finite_with_grads(
        pb, pb["hidden"], pb["weight"], probs=probs.half(), resid=pb["resid"].half()
    )
    # All k+1 buckets zero: degenerate teacher, must still be finite.
    _assert_finite_with_grads(
        pb, pb["hidden"], pb["weight"], probs=torch.zeros_like(probs),
        resid=torch.zeros_like(pb["resid"]),
    )


def test_no_nan_when_student_is_extremely_peaked():
    pb = _problem(32)
    # Hidden states scaled up so the logit gaps are in the thousands to tens of thousands.
    out = _assert_finite_with_grads(
        pb, pb["hidden"] * 3e3, pb["weight"], probs=pb["probs"].half(), resid=pb["resid"].half()
    )
    assert out.loss_sum.item() > 0

    g = _gen(33)
    n = 32
    ids, probs, resid = _teacher_topk(torch.randn(n, V, generator=g, dtype=torch.float64), K)
    for dtype in (torch.float32, torch.float64):
        for peak_in_topk in (True, False):
            logits = torch.zeros(n, V, dtype=dtype)
            if peak_in_topk:
                peak = ids[:, 0]
            else:
                outside = torch.ones(n, V, dtype=torch.bool).scatter(1, ids, False)
                peak = outside.to(torch.int64).argmax(dim=1)
            logits[torch.arange(n), peak] = 1e4
            logits.requires_grad_(True)
            kl = truncated_reverse_kl(logits, ids, probs.half(), resid.half())
            kl.sum().backward()
            assert torch.isfinite(kl).all() and torch.isfinite(logits.grad).all()
            assert (kl >= -1e-6).all()


@pytest.mark.parametrize(
    "dtype,gap", [(torch.float64, 50.0), (torch.float32, 30.0), (torch.float32, 60.0)]
)
def test_tiny_student_residual_has_finite_grad(dtype, gap):
    # Student residual ~(V-K)e^-gap, far below the resolution of log(top-k mass), which then
    # rounds to 0 or to a few ulps either side of it: the clamp must keep value and grad sane.
    g = _gen(35)
    n = 16
    ids, probs, resid = _teacher_topk(torch.randn(n, V, generator=g, dtype=torch.float64), K)
    logits = torch.full((n, V), -gap, dtype=torch.float64)
    logits.scatter_(1, ids, torch.randn(n, K, generator=g, dtype=torch.float64))
    s = logits.to(dtype).requires_grad_(True)
    kl = truncated_reverse_kl(s, ids, probs, resid)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all()

    p = torch.softmax(logits, dim=-1)
    p_top = p.gather(-1, ids)
    r_s = p.scatter(1, ids, 0.0).sum(-1)
    expected = (p_top * (p_top / probs).log()).sum(-1) + r_s * (r_s / resid).log()
    torch.testing.assert_close(kl.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_is_accurate_with_finite_grads(dtype):
    # Points just below 0 make 1 - exp(x) round to 0 in the far branch; torch.where would turn
    # that branch's inf gradient into NaN unless each branch only ever sees its own range.
    from mol.losses import _log1mexp

    x64 = torch.tensor([-1e-30, -1e-20, -1e-10, -1e-3, -0.5, -0.69, -0.7, -5.0, -40.0, -800.0],
                       dtype=torch.float64)
    x = x64.to(dtype).requires_grad_(True)
    y = _log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    x_ref = x64.to(dtype).double()
    expected = torch.where(x_ref > -30, torch.log(-torch.expm1(x_ref)), -torch.exp(x_ref))
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("with_kl", [True, False])
def test_all_positions_masked_gives_finite_zero(with_kl):
    pb = _problem(34)
    mask = torch.zeros_like(pb["mask"])
    h, w = _leaves(pb["hidden"], pb["weight"])
    w_kl = pb["w_kl"] if with_kl else torch.zeros_like(pb["w_kl"])
    out = chunked_mol_loss(
        h, w, pb["targets"], mask, pb["ids"], pb["probs"].half(), pb["resid"].half(),
        pb["w_ce"], w_kl, chunk_size=8,
    )
    assert out.loss_sum.item() == 0.0
    assert out.loss_sum.requires_grad
    out.loss_sum.backward()
    for grad in (h.grad, w.grad):
        assert grad is None or (grad == 0).all()
    assert (out.ce == 0).all() and (out.kl == 0).all() and (out.n_tokens == 0).all()

    dense = dense_reference_loss(
        pb["hidden"] @ pb["weight"].t(), pb["targets"], mask, pb["ids"], pb["probs"],
        pb["resid"], pb["w_ce"], w_kl,
    )
    assert dense.loss_sum.item() == 0.0


# --------------------------------------------------------------------------- training mechanics


def test_gradient_accumulation_matches_full_batch():
    b = 6
    pb = _problem(40, b=b)
    h, w = _leaves(pb["hidden"], pb["weight"])
    (_chunked(pb, h, w).loss_sum / b).backward()
    full_h, full_w = h.grad.clone(), w.grad.clone()

    h, w = _leaves(pb["hidden"], pb["weight"])
    total = 0.0
    for lo, hi in ((0, 2), (2, 3), (3, 6)):
        out = chunked_mol_loss(
            h[lo:hi], w, pb["targets"][lo:hi], pb["mask"][lo:hi], pb["ids"][lo:hi],
            pb["probs"][lo:hi].float(), pb["resid"][lo:hi].float(), pb["w_ce"][lo:hi],
            pb["w_kl"][lo:hi], chunk_size=5,
        )
        total = total + out.loss_sum
    (total / b).backward()
    torch.testing.assert_close(h.grad, full_h, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad, full_w, rtol=0, atol=1e-6)


def test_chunk_size_invariance():
    pb = _problem(41)
    results = []
    for chunk_size in (1, 7, 10_000):
        h, w = _leaves(pb["hidden"], pb["weight"])
        out = _chunked(pb, h, w, chunk_size=chunk_size)
        out.loss_sum.backward()
        results.append((out, h.grad, w.grad))
    base_out, base_h, base_w = results[0]
    for out, gh, gw in results[1:]:
        torch.testing.assert_close(out.loss_sum, base_out.loss_sum, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.ce, base_out.ce, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.kl, base_out.kl, rtol=0, atol=1e-6)
        torch.testing.assert_close(gh, base_h, rtol=0, atol=1e-6)
        torch.testing.assert_close(gw, base_w, rtol=0, atol=1e-6)


def test_ce_only_path_equals_cross_entropy():
    pb = _problem(42)
    w_ce, w_kl = mol_weights(torch.tensor([True, False, True, False]), 0.3, "ce")
    h, w = _leaves(pb["hidden"], pb["weight"])
    out = chunked_mol_loss(
        h, w, pb["targets"], pb["mask"], None, None, None, w_ce, w_kl, chunk_size=6
    )
    out.loss_sum.backward()
    assert (out.kl == 0).all()

    h_ref, w_ref = _leaves(pb["hidden"], pb["weight"])
    logits = h_ref @ w_ref.t()
    expected = []
    for s in range(B):
        m = pb["mask"][s]
        if m.any():
            expected.append(F.cross_entropy(logits[s][m], pb["targets"][s][m], reduction="mean"))
        else:
            expected.append(logits.sum() * 0)
    expected = torch.stack(expected)
    expected.sum().backward()
    torch.testing.assert_close(out.ce, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss_sum, expected.sum().detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)

    # Passing the teacher anyway changes nothing, and the dense version agrees.
    with_teacher = _chunked({**pb, "w_ce": w_ce, "w_kl": w_kl}, pb["hidden"], pb["weight"])
    torch.testing.assert_close(with_teacher.loss_sum, out.loss_sum.detach(), rtol=1e-6, atol=1e-6)
    dense = dense_reference_loss(
        logits.detach(), pb["targets"], pb["mask"], None, None, None, w_ce, w_kl
    )
    torch.testing.assert_close(dense.ce, out.ce, rtol=1e-6, atol=1e-6)


def test_missing_teacher_with_nonzero_kl_weight_raises():
    pb = _problem(43)
    with pytest.raises(ValueError):
        chunked_mol_loss(
            pb["hidden"], pb["weight"], pb["targets"], pb["mask"], None, None, None,
            pb["w_ce"], pb["w_kl"],
        )


def test_chunked_loss_does_not_keep_full_logits_for_backward():
    # One chunk holds every valid position, so [chunk, V] == [B*T, V] in size: if the chunk's
    # logits were saved for backward outside the checkpoint, the hook below would see them.
    pb = _problem(44, b=2, t=50, v=300)
    full = 2 * 50 * 300
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    h, w = _leaves(pb["hidden"], pb["weight"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _chunked(pb, h, w, chunk_size=10_000)
    out.loss_sum.backward()
    assert torch.isfinite(h.grad).all()
    assert max(sizes) < full // 2

    # Sanity check of the probe: the dense loss does save full-size tensors.
    sizes.clear()
    h, w = _leaves(pb["hidden"], pb["weight"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_reference_loss(
            h @ w.t(), pb["targets"], pb["mask"], pb["ids"], pb["probs"], pb["resid"],
            pb["w_ce"], pb["w_kl"],
        )
    assert max(sizes) >= pb["mask"].sum().item() * 300


def test_bf16_inputs_are_upcast():
    pb = _problem(45)
    h16, w16 = _leaves(pb["hidden"].bfloat16(), pb["weight"].bfloat16())
    out16 = _chunked(pb, h16, w16, probs_dtype=torch.float16)
    out16.loss_sum.backward()
    assert out16.loss_sum.dtype == torch.float32
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    h32, w32 = _leaves(pb["hidden"].bfloat16().float(), pb["weight"].bfloat16().float())
    out32 = _chunked(pb, h32, w32, probs_dtype=torch.float16)
    out32.loss_sum.backward()
    torch.testing.assert_close(out16.loss_sum, out32.loss_sum.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h16.grad.float(), h32.grad, rtol=1e-2, atol=1e-3)


def test_no_grad_mode_runs_without_checkpoint():
    pb = _problem(46)
    with torch.no_grad():
        out = _chunked(pb, pb["hidden"], pb["weight"])
    assert not out.loss_sum.requires_grad and torch.isfinite(out.loss_sum)


# --------------------------------------------------------------------------- weights


def test_mol_weights():
    is_domain = torch.tensor([True, False, True])
    w_ce, w_kl = mol_weights(is_domain, 0.2, "mol")
    torch.testing.assert_close(w_ce, torch.tensor([0.8, 0.2, 0.8]))
    torch.testing.assert_close(w_kl, torch.tensor([0.2, 0.8, 0.2]))
    w_ce, w_kl = mol_weights(is_domain, 0.2, "ce")
    assert w_ce.tolist() == [1.0, 1.0, 1.0] and w_kl.tolist() == [0.0, 0.0, 0.0]
    w_ce, w_kl = mol_weights(is_domain, 0.0, "mol")
    assert w_ce.tolist() == [1.0, 0.0, 1.0] and w_kl.tolist() == [0.0, 1.0, 0.0]
    w_ce, w_kl = mol_weights(torch.zeros(0, dtype=torch.bool), 1.0, "mol")
    assert w_ce.shape == (0,) and w_kl.shape == (0,)

    for bad_mode in ("kl", "MOL", ""):
        with pytest.raises(ValueError):
            mol_weights(is_domain, 0.2, bad_mode)
    for bad_alpha in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError):
            mol_weights(is_domain, bad_alpha, "mol")
        with pytest.raises(ValueError):
            mol_weights(is_domain, bad_alpha, "ce")
    with pytest.raises(TypeError):
        mol_weights(torch.tensor([1, 0]), 0.2, "mol")
