"""``simpo``: SimPO (Meng et al. 2024), a reference-free preference loss on length-normalized log-probs."""

from __future__ import annotations

from dataclasses import dataclass

from bipost.config import ConfigError, ObjectiveConfig
from bipost.kinds.base import PairObjective
from bipost.objectives import simpo_loss
from bipost.objectives.simpo import check_simpo_args


@dataclass
class SimPOConfig(ObjectiveConfig):
    """A preference objective without a reference model: the margin of the token-mean log-probs."""

    beta: float = 2.0
    """Reward scale of the token-mean log-probs (the paper tunes it in 2 to 10)."""
    gamma: float = 1.0
    """Target reward margin, the paper's gamma (= TRL's simpo_gamma; the SimPO authors' gamma_beta_ratio is gamma / beta)."""
    label_smoothing: float = 0.0
    """Label noise epsilon in [0, 0.5) of a cDPO-style smoothed loss (0: the paper's loss)."""

    def check(self, where: str) -> None:
        try:
            check_simpo_args(beta=self.beta, gamma=self.gamma, label_smoothing=self.label_smoothing)
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None


class SimPO(PairObjective):
    """SimPO on the pairs' token-mean log-probs (``objectives.simpo``): chosen and rejected in one
    forward, no reference model or cache. Unit: a preference pair."""

    kind = "simpo"
    config_class = SimPOConfig
    cli_name = "SIMPO"
    cfg: SimPOConfig

    def loss(self, model, batch):
        c = self.cfg
        return simpo_loss(*self.pair_logps(model, batch), beta=c.beta, gamma=c.gamma,
                          label_smoothing=c.label_smoothing)

    # ---------------------------------------------------------------- seed command line
    @classmethod
    def add_seed_args(cls, parser):
        g = parser.add_argument_group("SimPO (the _2 forms: obj_2's, when both objectives are SimPO)")
        for sfx in ("", "_2"):
            g.add_argument(f"--simpo_beta{sfx}", type=float, default=None, help="reward scale beta (default 2)")
            g.add_argument(f"--simpo_gamma{sfx}", type=float, default=None, help="target reward margin gamma (default 1)")
            g.add_argument(f"--simpo_label_smoothing{sfx}", type=float, default=None, help="label smoothing (default 0)")

    @classmethod
    def seed_fields(cls, args, pick):
        return {"beta": pick("simpo_beta", 2.0), "gamma": pick("simpo_gamma", 1.0),
                "label_smoothing": pick("simpo_label_smoothing", 0.0)}
