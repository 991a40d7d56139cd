"""Training objectives: pure functions of tensors returning :class:`ObjectiveOutput`.

See ``base.py`` for the reduction contract and ``logprobs.py`` for the label-shift convention.
"""

from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.dpo import DPOLoss, dpo_loss
from bipost.objectives.grpo import AdvantageScale, GroupAdvantages, GRPOLoss, group_advantages, grpo_loss, grpo_units
from bipost.objectives.kd import kd_loss
from bipost.objectives.kto import kto_kl_sums, kto_loss, kto_reference_point
from bipost.objectives.logprobs import next_token_mask, sequence_logprobs, token_logprobs
from bipost.objectives.orpo import orpo_loss
from bipost.objectives.sft import sft_loss
from bipost.objectives.simpo import simpo_loss

__all__ = [
    "AdvantageScale",
    "DPOLoss",
    "GRPOLoss",
    "GroupAdvantages",
    "ObjectiveOutput",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "grpo_units",
    "kd_loss",
    "kto_kl_sums",
    "kto_loss",
    "kto_reference_point",
    "next_token_mask",
    "orpo_loss",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "token_logprobs",
]
