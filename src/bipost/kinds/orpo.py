"""``orpo``: ORPO (Hong et al. 2024), the chosen response's NLL plus an odds-ratio term; no reference model."""

from __future__ import annotations

from dataclasses import dataclass

from bipost.config import ConfigError, ObjectiveConfig
from bipost.kinds.base import PairObjective
from bipost.objectives import orpo_loss
from bipost.objectives.orpo import check_orpo_args


@dataclass
class ORPOConfig(ObjectiveConfig):
    """A preference objective without a reference model: NLL(chosen) + lambda x the odds-ratio loss."""

    odds_ratio_weight: float = 0.1
    """lambda, the weight of the odds-ratio term (= TRL's ORPOConfig.beta); the paper uses 0.1 to 0.25."""

    def check(self, where: str) -> None:
        try:
            check_orpo_args(lambda_=self.odds_ratio_weight)
        except ValueError as e:
            raise ConfigError(f"{where}.odds_ratio_weight: {e}") from None


class ORPO(PairObjective):
    """ORPO (``objectives.orpo``): chosen and rejected in one forward, no reference model or cache;
    the NLL is each pair's mean over its chosen response tokens. Unit: a preference pair."""

    kind = "orpo"
    config_class = ORPOConfig
    cli_name = "ORPO"
    cfg: ORPOConfig

    def loss(self, model, batch):
        return orpo_loss(*self.pair_logps(model, batch), lambda_=self.cfg.odds_ratio_weight)

    # ---------------------------------------------------------------- seed command line
    @classmethod
    def add_seed_args(cls, parser):
        g = parser.add_argument_group("ORPO (the _2 forms: obj_2's, when both objectives are ORPO)")
        for sfx in ("", "_2"):
            g.add_argument(f"--orpo_lambda{sfx}", type=float, default=None,
                           help="weight of the odds-ratio term (default 0.1)")

    @classmethod
    def seed_fields(cls, args, pick):
        return {"odds_ratio_weight": pick("orpo_lambda", 0.1)}
