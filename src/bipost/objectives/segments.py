"""Per-position values grouped by sequence: the layout every objective's log-probs arrive in.

Objectives see the ``M`` positions of a micro-batch that predict a response token, as

* ``values`` ``[M]`` (e.g. token log-probs), and
* ``seq`` ``[M]``: which sequence of the micro-batch each position belongs to, in ``[0, S)``.

Padded batches give that layout through :func:`response_targets` (their shifted labels); packed
rows carry it explicitly (``bipost.data.packing``). Sums per sequence are ``index_add`` calls: no
padded copy and no host sync.
"""

from __future__ import annotations

import torch

from bipost.data.types import IGNORE_INDEX
from bipost.objectives.base import ObjectiveOutput


def response_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions of a padded ``[B, T]`` batch that predict a response token.

    Same convention as ``logprobs.token_logprobs``: position ``t`` of row ``b`` predicts
    ``labels[b, t + 1]``. Returns ``(index, targets, seq)``, each ``[M]`` long: ``index`` is the
    flat position ``b * T + t`` into ``hidden.view(B * T, H)``, ``targets`` the predicted token,
    ``seq`` the row ``b`` (sorted ascending, positions in order within a row).
    """
    b, t = torch.nonzero(labels[:, 1:] != ignore_index, as_tuple=True)
    return b * labels.shape[1] + t, labels[b, t + 1], b


def segment_sum(values: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = sum(values[seq == s])`` in fp32 (differentiable)."""
    return values.new_zeros(num_seqs, dtype=torch.float32).index_add(0, seq, values.float())


def segment_count(seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[s] = #(seq == s)`` as float32 (an index_add: no host sync, unlike bincount on CUDA)."""
    return torch.zeros(num_seqs, dtype=torch.float32, device=seq.device).index_add_(
        0, seq, torch.ones(seq.shape, dtype=torch.float32, device=seq.device))


def sequence_sft_loss(token_logps: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> ObjectiveOutput:
    """``sft_loss`` on per-position log-probs (:func:`pad_by_sequence` + ``sft_loss`` give the
    same): ``losses[s]`` = summed NLL of sequence ``s``, ``units[s]`` its token count, metric
    ``nll`` the per-sequence mean (0 with no tokens). No padded copy, no host sync."""
    losses = segment_sum(-token_logps, seq, num_seqs)
    units = segment_count(seq, num_seqs)
    return ObjectiveOutput(losses=losses, units=units, metrics={"nll": losses.detach() / units.clamp(min=1.0)})


def pad_by_sequence(values: torch.Tensor, seq: torch.Tensor, num_seqs: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay per-position ``values`` ``[M]`` out as ``[S, L]`` rows (``L`` = most positions of a
    sequence), in their original order within each sequence, plus the bool mask of filled cells.
    This lets the reference loss functions (e.g. ``sft_loss``) consume chunked log-probs."""
    counts = torch.bincount(seq, minlength=num_seqs)
    width = int(counts.max()) if seq.numel() else 0
    order = torch.argsort(seq, stable=True)
    sorted_seq = seq[order]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(seq.numel(), device=seq.device) - starts[sorted_seq]
    padded = values.new_zeros(num_seqs, width).index_put((sorted_seq, col), values[order])
    mask = torch.zeros(num_seqs, width, dtype=torch.bool, device=seq.device)
    mask[sorted_seq, col] = True
    return padded, mask
