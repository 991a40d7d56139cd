"""Token-level knowledge distillation between a student and a (frozen) teacher.

Alignment: the logits passed in are **already aligned** to the positions that predict
response tokens. The caller slices ``logits[:, :-1]`` for both models and builds the mask
with ``next_token_mask(labels)`` (labels unshifted): position ``t`` predicts token ``t + 1``,
so the mask includes the position predicting the *first* response token (the last prompt
position) and excludes the position after EOS. (The original seed code built its mask from
the unshifted labels, which is off by one: it skipped the first response token and
distilled the step after EOS. We don't.)

Per position, with ``p_T = softmax(z_T / tau)`` (detached) and ``p_S = softmax(z_S / tau)``:

* ``forward`` (default): soft-label cross-entropy ``-sum_v p_T log p_S``. It differs from
  ``KL(p_T || p_S)`` by the teacher entropy, a constant for the student, so the gradients
  are forward KL's. Metric ``kl`` reports the KL itself (CE minus teacher entropy).
* ``reverse``: ``KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)`` (mode-seeking).
* ``jsd``: generalized Jensen-Shannon with ``beta = jsd_beta`` in (0, 1):
  ``M = beta p_T + (1 - beta) p_S``, loss ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)``;
  ``log M`` is a logsumexp of log-probs plus log-weights (no underflowing probabilities).
  At ``beta = 0.5`` this is the symmetric JS divergence, bounded by ``ln 2``.

Temperature (Hinton et al. 2015): both logits are divided by ``tau`` and the per-token loss
is multiplied by ``tau**2`` so gradient magnitudes stay comparable across temperatures.

Reduction (see base.py): ``losses[b]`` = sum over masked positions, ``units[b]`` = mask
count, metrics ``kd`` (= ``losses / units``) and, for ``forward``, ``kl`` (per-example mean,
same ``tau**2`` scaling). Masked-out positions contribute exactly 0, and ``0 * log 0`` terms
(``-inf`` logits, e.g. padded vocab rows) are 0, never NaN — in values and gradients.
"""

from __future__ import annotations

import math

import torch

from bipost.objectives.base import ObjectiveOutput

KD_KINDS = ("forward", "reverse", "jsd")


def _plogq(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``sum_v p * log q`` with ``0 * log q := 0`` (also for ``log q = -inf``), over the last dim.

    The inner ``where`` keeps the unselected branch finite, so its gradient is 0, not NaN.
    """
    p = logp.exp()
    present = p > 0
    logq = torch.where(present, logq, torch.zeros_like(logq))
    return (p * logq).sum(dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p (log p - log q)`` over the last dim, ``0 log 0 := 0``."""
    p = logp.exp()
    present = p > 0
    diff = torch.where(present, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(dim=-1)


def _masked_log_softmax(
    logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """fp32 ``log_softmax(logits / tau)`` with masked-out positions' logits replaced by 0.

    Neutralising the masked rows up front (rather than only zeroing their loss) matters for
    gradients: a masked row where one model puts -inf where the other has mass has an infinite
    divergence, and ``0 * inf`` in its backward would be NaN even though the row's loss is
    zeroed. ``where`` discards whatever gradient reaches the replaced entries.
    """
    logits = torch.where(mask.unsqueeze(-1), logits, logits.new_zeros(())).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def check_kd_args(*, kind: str, temperature: float, jsd_beta: float) -> None:
    """The one check of the KD settings (the loss and the ``kd`` kind's config use it): a
    ``ValueError`` whose message starts with the offending field's name."""
    if kind not in KD_KINDS:
        raise ValueError(f"kd_loss must be one of {', '.join(KD_KINDS)}, not {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> ObjectiveOutput:
    """Per-example summed distillation loss (see the module docstring for the math).

    Args:
        student_logits: ``[B, T, V]`` student logits at positions predicting response tokens.
        teacher_logits: ``[B, T, V]`` teacher logits, same positions and vocabulary (detached).
        mask: ``[B, T]`` bool, True where the position predicts a response token.
        kind: ``"forward"``, ``"reverse"`` or ``"jsd"``.
        temperature: ``tau > 0``; loss is ``tau**2 * divergence(softmax(z / tau))``.
        jsd_beta: teacher weight of the JSD mixture, in (0, 1); ``jsd`` only.

    Returns:
        ``ObjectiveOutput`` with ``losses`` ``[B]``, ``units`` ``[B]`` (mask counts, float),
        metrics ``kd`` ``[B]`` and, for ``forward``, ``kl`` ``[B]``.
    """
    check_kd_args(kind=kind, temperature=temperature, jsd_beta=jsd_beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (same positions and vocabulary required)"
        )
    if student_logits.dim() != 3 or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and mask [B, T], got {tuple(student_logits.shape)} "
            f"and {tuple(mask.shape)}"
        )

    mask = mask.bool()
    log_s = _masked_log_softmax(student_logits, mask, temperature)
    log_t = _masked_log_softmax(teacher_logits.detach(), mask, temperature)
    scale = temperature**2

    kl_tok: torch.Tensor | None = None
    if kind == "forward":
        tok = -_plogq(log_t, log_s)
        with torch.no_grad():
            kl_tok = tok.detach() + _plogq(log_t, log_t)  # CE - H(p_T)
    elif kind == "reverse":
        tok = _kl(log_s, log_t)
    else:
        # log M = logsumexp(log beta + log p_T, log(1 - beta) + log p_S). Clamp -inf to the
        # most negative float first: logsumexp's backward is NaN when all its inputs are -inf.
        floor = torch.finfo(log_s.dtype).min
        log_m = torch.logaddexp(
            log_t.clamp(min=floor) + math.log(jsd_beta),
            log_s.clamp(min=floor) + math.log(1.0 - jsd_beta),
        )
        tok = jsd_beta * _kl(log_t, log_m) + (1.0 - jsd_beta) * _kl(log_s, log_m)

    # Still needed after neutralising masked rows: their forward CE is ln V, not 0.
    zero = torch.zeros((), dtype=tok.dtype, device=tok.device)
    losses = (scale * torch.where(mask, tok, zero)).sum(dim=-1)
    units = mask.sum(dim=-1).float()
    denom = units.clamp(min=1.0)
    metrics = {"kd": losses.detach() / denom}
    if kl_tok is not None:
        metrics["kl"] = (scale * torch.where(mask, kl_tok, zero)).sum(dim=-1) / denom
    return ObjectiveOutput(losses=losses, units=units, metrics=metrics)


def topk_kd_loss(student_logps: torch.Tensor, teacher_logps: torch.Tensor,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KD against the teacher's top-k tokens, per position.

    ``student_logps`` ``[M, k]``: the student's log-softmax (at ``temperature``, over the whole
    vocabulary) at the teacher's top-k token ids; ``teacher_logps`` ``[M, k]``: the teacher's
    log-softmax at those ids (same temperature). The teacher's k probabilities are renormalized
    to sum to 1 (``p~``); the loss is ``-tau^2 sum_j p~_j log p_S(j)`` and the second output,
    for the ``kl`` metric, ``tau^2 sum_j p~_j (log p~_j - log p_S(j))`` (detached). With k = V
    nothing is renormalized and this is ``kd_loss(kind="forward")`` position by position.
    """
    log_pt = teacher_logps.detach().float()
    log_pt = log_pt - torch.logsumexp(log_pt, dim=-1, keepdim=True)
    scale = temperature**2
    ce = -_plogq(log_pt, student_logps) * scale
    with torch.no_grad():
        kl = ce.detach() + _plogq(log_pt, log_pt) * scale
    return ce, kl
