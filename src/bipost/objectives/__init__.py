"""Training objectives: pure functions of tensors returning :class:`ObjectiveOutput`.

See ``base.py`` for the reduction contract and ``logprobs.py`` for the label-shift convention.
"""

from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.dpo import DPOLoss, dpo_loss
from bipost.objectives.kd import kd_loss
from bipost.objectives.logprobs import next_token_mask, sequence_logprobs, token_logprobs
from bipost.objectives.sft import sft_loss

__all__ = [
    "DPOLoss",
    "ObjectiveOutput",
    "dpo_loss",
    "kd_loss",
    "next_token_mask",
    "sequence_logprobs",
    "sft_loss",
    "token_logprobs",
]
