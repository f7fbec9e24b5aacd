"""Mixture-of-Losses objective: per-sequence mix of cross-entropy and a truncated reverse KL.

For a sequence ``s`` with ``n_s`` unmasked positions (position ``t`` predicts ``x_{t+1}``)::

    CE(s)   = -(1/n_s) * sum_t log p_theta(x_{t+1} | x_<=t)
    KL(s)   =  (1/n_s) * sum_t KL_t
    KL_t    =  sum_{v in T_t} p_theta(v) (log p_theta(v) - log p_0(v))
               + r_theta (log r_theta - log r_0),        r = 1 - sum_{v in T_t} p(v)
    loss(s) =  w_ce(s) * CE(s) + w_kl(s) * KL(s)

``T_t`` is the teacher's top-k next-token ids (the teacher cache stores only those k probabilities
and the residual mass), so ``KL_t`` is the exact reverse KL between the two models' distributions
coarse-grained onto k+1 buckets: the k teacher ids plus "everything else".

Public functions:

* :func:`mol_weights` - per-sequence routing weights from the domain flag.
* :func:`truncated_reverse_kl` - ``KL_t`` from full student logits (small, reference-friendly).
* :func:`chunked_mol_loss` - the training loss; never holds ``[B, T, V]`` logits.
* :func:`dense_reference_loss` - the same outputs from full ``[B, T, V]`` logits ("naive loss").
* :func:`per_sequence` - per-position CE and KL terms -> the per-sequence loss (shared reduction).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "MolLossOutput",
    "mol_weights",
    "truncated_reverse_kl",
    "chunked_mol_loss",
    "dense_reference_loss",
    "per_sequence",
]

# Floor for every probability that goes through a log. It is far below anything a bf16/fp16
# model or the fp16 teacher cache can represent (fp16's smallest subnormal is ~6e-8), so it
# only ever replaces exact zeros, yet it is a normal fp32 number, so log() stays finite.
PROB_FLOOR = 1e-30
_LOG_PROB_FLOOR = math.log(PROB_FLOOR)
_LN2 = math.log(2.0)

_MODES = ("mol", "ce")


class MolLossOutput(NamedTuple):
    """Result of :func:`chunked_mol_loss` / :func:`dense_reference_loss`.

    Attributes:
        loss_sum: scalar, differentiable: ``sum_s w_ce(s) * CE(s) + w_kl(s) * KL(s)``. A sum over
            sequences, not a mean, so that the trainer can divide once by the number of sequences
            in the whole optimizer step and micro-batching leaves the gradient unchanged.
        ce: ``[B]`` detached per-sequence mean CE (0 for a sequence with no valid position).
        kl: ``[B]`` detached per-sequence mean KL (all zeros when the KL was skipped).
        n_tokens: ``[B]`` int64 number of valid (unmasked) positions per sequence.
    """

    loss_sum: Tensor
    ce: Tensor
    kl: Tensor
    n_tokens: Tensor


def mol_weights(is_domain: Tensor, alpha: float, mode: str) -> tuple[Tensor, Tensor]:
    """Per-sequence loss weights ``(w_ce, w_kl)``, each ``[B]`` float32 on ``is_domain``'s device.

    ``mode="mol"``: domain sequences get ``(1 - alpha, alpha)``, general ones
    ``(alpha, 1 - alpha)``.
    ``mode="ce"``: every sequence gets ``(1, 0)`` (plain fine-tuning; the KL is then skipped).

    Args:
        is_domain: ``[B]`` bool, True for a sequence from the domain corpus.
        alpha: mixing coefficient in ``[0, 1]`` (checked in both modes so a bad config fails early).
        mode: ``"mol"`` or ``"ce"``.

    Raises:
        ValueError: unknown mode, alpha outside ``[0, 1]`` (or NaN), or ``is_domain`` not 1-D.
        TypeError: ``is_domain`` is not a bool tensor.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if is_domain.dtype != torch.bool:
        raise TypeError(f"is_domain must be a bool tensor, got {is_domain.dtype}")
    if is_domain.dim() != 1:
        raise ValueError(f"is_domain must be 1-D [B], got shape {tuple(is_domain.shape)}")

    if mode == "ce":
        w_ce = torch.ones(is_domain.shape, dtype=torch.float32, device=is_domain.device)
        return w_ce, torch.zeros_like(w_ce)
    dom = is_domain.to(torch.float32)
    w_kl = dom * alpha + (1.0 - dom) * (1.0 - alpha)
    w_ce = dom * (1.0 - alpha) + (1.0 - dom) * alpha
    return w_ce, w_kl


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # fp32 at least: log-sum-exp over a 50k+ vocabulary in bf16 loses whole nats.
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler's split at ``-ln 2``).

    Each branch gets an input clamped into its own safe range: torch.where evaluates both
    branches everywhere, and an inf in the discarded branch's gradient would turn into NaN
    (0 * inf) even though its value is never selected.
    """
    near_zero = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near_zero, far)


def _truncated_kl_from_logprobs(
    student_logp_topk: Tensor, teacher_topk_probs: Tensor, teacher_residual: Tensor
) -> Tensor:
    """``KL_t`` over the k+1 buckets, given the student's log-probs of the teacher's top-k ids.

    Shapes: ``student_logp_topk [N, K]`` (already normalised over the full vocabulary, in the
    compute dtype), ``teacher_topk_probs [N, K]``, ``teacher_residual [N]``. Returns ``[N]``.
    The top-k ids are assumed distinct (they come from a top-k), otherwise the buckets overlap.
    """
    dt = student_logp_topk.dtype
    q = teacher_topk_probs.to(dt).clamp_min(0.0)
    r0 = teacher_residual.to(dt).clamp_min(0.0)
    # The cache quantises probs and residual (mol.cache), so its k+1 buckets sum to 1 +- ~1e-3. Gibbs'
    # inequality (KL >= 0) only holds between two *normalised* distributions; with a teacher
    # summing to c > 1 the "KL" can go as low as -log(c) < 0. Renormalising restores KL >= 0 and
    # does not change the student's gradient: it shifts every log q of a position by the same
    # constant, and the student's buckets sum to 1.
    total = (q.sum(dim=-1) + r0).clamp_min(PROB_FLOOR)
    q = q / total.unsqueeze(-1)
    r0 = r0 / total
    # Floored, not masked: a zero teacher bucket (an underflowed probability, or residual 0) must still give
    # a finite log. The floor adds at most (k+1)*1e-30 of mass, so KL >= 0 is kept to ~1e-28.
    log_q = q.clamp_min(PROB_FLOOR).log()
    log_r0 = r0.clamp_min(PROB_FLOOR).log()

    p = student_logp_topk.exp()
    topk_term = (p * (student_logp_topk - log_q)).sum(dim=-1)

    # Student residual in log space: 1 - sum(p) cancels catastrophically when the top-k holds
    # almost all the mass. The clamp keeps log r_theta >= ~log(1e-30) when the top-k covers the
    # whole vocabulary (log-mass rounds to >= 0); there the residual term is ~1e-30 * O(100)
    # in value and its gradient is cut by the clamp instead of being inf * 0 = NaN.
    log_mass_topk = torch.logsumexp(student_logp_topk, dim=-1)
    log_r = _log1mexp(log_mass_topk.clamp(max=-PROB_FLOOR))
    residual_term = log_r.exp() * (log_r - log_r0)
    # No clamp_min(0): both bucket distributions are normalised, so a negative value can only
    # be rounding (~1e-7 in fp32), and a clamp would hide real bugs while zeroing gradients.
    return topk_term + residual_term


def truncated_reverse_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_probs: Tensor,
    teacher_residual: Tensor,
) -> Tensor:
    """Per-position reverse KL ``KL(p_theta || p_0)`` on the teacher's top-k + residual buckets.

    ::

        KL_t = sum_{v in T_t} p_theta(v) (log p_theta(v) - log p_0(v))
               + r_theta (log r_theta - log r_0)

    with ``r = 1 - sum_{v in T_t} p(v)`` for both models and ``p_theta = softmax(student_logits)``.

    Args:
        student_logits: ``[N, V]`` any float dtype; computed in float64 if given float64, else
            float32.
        teacher_topk_ids: ``[N, K]`` int64, distinct ids per row (``K <= V``).
        teacher_topk_probs: ``[N, K]`` float (decoded cache probabilities).
        teacher_residual: ``[N]`` float, teacher mass outside the top-k.

    Returns:
        ``[N]`` KL per position, in the compute dtype. Non-negative up to rounding; finite with a
        finite gradient even for zero teacher buckets, ``K == V`` and extremely peaked students.
        The teacher's k+1 buckets are renormalised to sum to 1 and its zero buckets floored at
        ``PROB_FLOOR`` before the log.
    """
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(student_logits.to(dt), dim=-1)
    logp_topk = logp.gather(-1, teacher_topk_ids)
    return _truncated_kl_from_logprobs(logp_topk, teacher_topk_probs, teacher_residual)


def _chunk_terms(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    topk_ids: Tensor | None,
    topk_probs: Tensor | None,
    residual: Tensor | None,
    dt: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    # Runs under activation checkpointing: the upcast weight and the [C, V] logits built here are
    # freed right after the forward and rebuilt during backward.
    logits = h.to(dt) @ weight.to(dt).t()
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if topk_ids is None:
        return ce, None
    logp_topk = logits.gather(-1, topk_ids) - lse.unsqueeze(-1)
    return ce, _truncated_kl_from_logprobs(logp_topk, topk_probs, residual)


def per_sequence(
    ce_t: Tensor,
    kl_t: Tensor | None,
    seq_index: Tensor,
    n_tokens: Tensor,
    w_ce: Tensor,
    w_kl: Tensor,
) -> MolLossOutput:
    """Reduce per-position terms of the valid positions (``seq_index`` maps each to its row)."""
    batch = n_tokens.shape[0]
    dt = ce_t.dtype
    # index_add (not a dense [B, T] scatter + mean) so rows with n_s = 0 just stay 0; the
    # divisor is clamped to 1 for them, which keeps 0/0 out of both value and gradient.
    denom = n_tokens.clamp_min(1).to(dt)
    ce_seq = torch.zeros(batch, dtype=dt, device=ce_t.device).index_add(0, seq_index, ce_t) / denom
    loss = (w_ce.to(dt) * ce_seq).sum()
    if kl_t is None:
        kl_seq = torch.zeros_like(ce_seq)
    else:
        kl_sum = torch.zeros(batch, dtype=dt, device=kl_t.device).index_add(0, seq_index, kl_t)
        kl_seq = kl_sum / denom
        loss = loss + (w_kl.to(dt) * kl_seq).sum()
    return MolLossOutput(loss, ce_seq.detach(), kl_seq.detach(), n_tokens)


def _check_common(target_ids: Tensor, mask: Tensor, w_ce: Tensor, w_kl: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != target_ids.shape or mask.dim() != 2:
        raise ValueError(
            f"mask {tuple(mask.shape)} and target_ids {tuple(target_ids.shape)} must both be [B, T]"
        )
    batch = mask.shape[0]
    if w_ce.shape != (batch,) or w_kl.shape != (batch,):
        raise ValueError(
            f"w_ce/w_kl must be [{batch}], got {tuple(w_ce.shape)}/{tuple(w_kl.shape)}"
        )


def _kl_needed(w_kl: Tensor, teacher: tuple[Tensor | None, ...]) -> bool:
    # One host sync per call; it buys the CE-only path its "no teacher work at all" guarantee.
    if not bool((w_kl != 0).any()):
        return False
    if any(t is None for t in teacher):
        raise ValueError("teacher_topk_ids/probs/residual are required when any w_kl != 0")
    return True


def chunked_mol_loss(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    teacher_topk_ids: Tensor | None,
    teacher_topk_probs: Tensor | None,
    teacher_residual: Tensor | None,
    w_ce: Tensor,
    w_kl: Tensor,
    chunk_size: int = 1024,
) -> MolLossOutput:
    """Mixture-of-Losses training loss from final hidden states, without ``[B, T, V]`` logits.

    ``loss_sum = sum_s w_ce(s) * CE(s) + w_kl(s) * KL(s)``, with ``CE(s)``/``KL(s)`` the means of
    ``CE_t = logsumexp(z_t) - z_t[target_t]`` and ``KL_t`` (see :func:`truncated_reverse_kl`) over
    the ``n_s`` valid positions of sequence ``s``, ``z_t = W h_t`` (fp32 or wider). A sequence
    with ``n_s = 0`` contributes 0, also when the whole batch is masked.

    The valid positions are flattened and processed ``chunk_size`` at a time; each chunk's
    ``[chunk, V]`` logits are recomputed in backward (activation checkpointing), so loss-path
    memory is O(chunk_size * V) plus one upcast copy of ``weight`` when it is not fp32.

    When every ``w_kl`` is 0 the KL is skipped: no teacher tensor is read (they may be None) and
    the cost is that of plain CE. Otherwise teacher tensors must be valid at every unmasked
    position, including in sequences whose own ``w_kl`` is 0.

    Args:
        hidden: ``[B, T, H]`` final (post-norm) hidden states; position t predicts target_ids[:, t].
        weight: ``[V, H]`` output projection (no bias).
        target_ids: ``[B, T]`` int64 (any value at masked positions, e.g. -100).
        mask: ``[B, T]`` bool, False = padding, ignored everywhere.
        teacher_topk_ids: ``[B, T, K]`` int64 or None (only if all w_kl == 0).
        teacher_topk_probs: ``[B, T, K]`` float or None.
        teacher_residual: ``[B, T]`` float or None.
        w_ce: ``[B]`` float CE weight per sequence.
        w_kl: ``[B]`` float KL weight per sequence.
        chunk_size: positions per chunk (>= 1).

    Returns:
        :class:`MolLossOutput` (``loss_sum`` scalar with grad; ``ce``, ``kl`` ``[B]`` detached;
        ``n_tokens`` ``[B]`` int64).
    """
    _check_common(target_ids, mask, w_ce, w_kl)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, seq_len, width = hidden.shape
    if (batch, seq_len) != tuple(mask.shape) or weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, mask {tuple(mask.shape)}"
            " are not [B, T, H], [V, H], [B, T]"
        )
    with_kl = _kl_needed(w_kl, (teacher_topk_ids, teacher_topk_probs, teacher_residual))
    dt = _compute_dtype(hidden.dtype, weight.dtype)

    flat_valid = mask.reshape(-1).nonzero().squeeze(-1)
    seq_index = torch.div(flat_valid, seq_len, rounding_mode="floor")
    h = hidden.reshape(batch * seq_len, width).index_select(0, flat_valid)
    targets = target_ids.reshape(-1).index_select(0, flat_valid)
    if with_kl:
        k = teacher_topk_ids.shape[-1]
        ids = teacher_topk_ids.reshape(-1, k).index_select(0, flat_valid)
        probs = teacher_topk_probs.reshape(-1, k).index_select(0, flat_valid)
        resid = teacher_residual.reshape(-1).index_select(0, flat_valid)
    else:
        ids = probs = resid = None

    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    n_valid = h.shape[0]
    ce_parts: list[Tensor] = []
    kl_parts: list[Tensor] = []
    # max(n_valid, 1) runs one empty chunk for an all-masked batch, so loss_sum is still a graph
    # node over hidden/weight and backward() yields zero grads instead of failing.
    for start in range(0, max(n_valid, 1), chunk_size):
        sl = slice(start, start + chunk_size)
        args = (
            h[sl],
            weight,
            targets[sl],
            None if ids is None else ids[sl],
            None if probs is None else probs[sl],
            None if resid is None else resid[sl],
            dt,
        )
        if use_ckpt:
            ce_c, kl_c = checkpoint(
                _chunk_terms, *args, use_reentrant=False, preserve_rng_state=False
            )
        else:
            ce_c, kl_c = _chunk_terms(*args)
        ce_parts.append(ce_c)
        if kl_c is not None:
            kl_parts.append(kl_c)

    ce_t = torch.cat(ce_parts)
    kl_t = torch.cat(kl_parts) if with_kl else None
    return per_sequence(ce_t, kl_t, seq_index, mask.sum(dim=1), w_ce, w_kl)


def dense_reference_loss(
    logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    teacher_topk_ids: Tensor | None,
    teacher_topk_probs: Tensor | None,
    teacher_residual: Tensor | None,
    w_ce: Tensor,
    w_kl: Tensor,
) -> MolLossOutput:
    """The same loss and outputs as :func:`chunked_mol_loss`, from full ``[B, T, V]`` logits.

    ``CE_t = -log_softmax(logits_t)[target_t]``, ``KL_t = truncated_reverse_kl(logits_t, ...)``,
    per-sequence means over valid positions, ``loss_sum = sum_s w_ce(s) CE(s) + w_kl(s) KL(s)``.
    Holds [B, T, V] logits and their log-softmax: the naive baseline, for tests and benchmarks.

    Args:
        logits: ``[B, T, V]`` any float dtype (computed in fp32, or fp64 if given fp64).
        target_ids, mask, teacher_*, w_ce, w_kl: as in :func:`chunked_mol_loss`.

    Returns:
        :class:`MolLossOutput`.
    """
    _check_common(target_ids, mask, w_ce, w_kl)
    with_kl = _kl_needed(w_kl, (teacher_topk_ids, teacher_topk_probs, teacher_residual))
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32

    seq_index = mask.nonzero()[:, 0]
    valid_logits = logits[mask].to(dt)  # [N, V]
    logp = torch.log_softmax(valid_logits, dim=-1)
    ce_t = -logp.gather(-1, target_ids[mask].unsqueeze(-1)).squeeze(-1)
    kl_t = None
    if with_kl:
        kl_t = truncated_reverse_kl(
            valid_logits, teacher_topk_ids[mask], teacher_topk_probs[mask], teacher_residual[mask]
        )
    return per_sequence(ce_t, kl_t, seq_index, mask.sum(dim=1), w_ce, w_kl)
