"""Reward functions for online objectives (GRPO): TRL's signature, loaded by import path, weighted.

See ``base.py`` for the calling convention, ``None`` and error rules; ``builtin.py``,
``math_answer.py`` and ``model.py`` for the built-ins (``exact_match``, ``regex``, ``math``,
``reward_model``).
"""

from bipost.rewards.base import (
    BUILTINS,
    RewardError,
    RewardFunctions,
    RewardScores,
    RewardSpec,
    completion_text,
    is_conversational,
    load_reward,
)
from bipost.rewards.builtin import exact_match, normalize_whitespace, regex_match
from bipost.rewards.math_answer import math_answer
from bipost.rewards.model import RewardModel

__all__ = [
    "BUILTINS",
    "RewardError",
    "RewardFunctions",
    "RewardModel",
    "RewardScores",
    "RewardSpec",
    "completion_text",
    "exact_match",
    "is_conversational",
    "load_reward",
    "math_answer",
    "normalize_whitespace",
    "regex_match",
]
