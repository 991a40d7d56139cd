"""The objective seam: a kind defined in its own module, outside bipost, is found by name and runs
through config loading, `--help`, data loading, the loop and the seed command line — with no bipost
file touched. The plug-in is a package on ``sys.path`` that exposes its class in the
``bipost.objectives`` entry-point group (as a pip-installed package would)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from bipost.configio import describe, load_config
from bipost.kinds import kinds
from bipost.run import train

from helpers import config, workspace

PLUGIN = '''
"""``unlikelihood``: push down the probability of unwanted responses (Welleck et al. 2019):
-log(1 - p(token)) per response token, summed; the unit is a response token."""

from dataclasses import dataclass

import torch

from bipost.config import ConfigError, ObjectiveConfig
from bipost.kinds import Objective
from bipost.modeling.forward import positions
from bipost.objectives import ObjectiveOutput
from bipost.objectives.segments import segment_count, segment_sum


@dataclass
class UnlikelihoodConfig(ObjectiveConfig):
    floor: float = 1e-6
    """Smallest 1 - p kept inside the log."""

    def check(self, where):
        if not 0 < self.floor < 1:
            raise ConfigError(f"{where}.floor must be in (0, 1)")


class Unlikelihood(Objective):
    kind = "unlikelihood"
    config_class = UnlikelihoodConfig
    cli_name = "UL"

    def loss(self, model, batch):
        pos = positions(batch, self.num_seqs(batch))
        logps = self.forward.token_logprobs(model, batch, pos)
        per_token = -torch.log((1 - logps.exp()).clamp(min=self.cfg.floor))
        losses = segment_sum(per_token, pos.seq, pos.num_seqs)
        units = segment_count(pos.seq, pos.num_seqs)
        return ObjectiveOutput(losses, units, {"p": segment_sum(logps.exp().detach(), pos.seq, pos.num_seqs)
                                               / units.clamp(min=1)})
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "ul_kind").mkdir(parents=True)
    (pkg / "ul_kind" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = pkg / "ul_kind-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ul-kind\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[bipost.objectives]\nunlikelihood = ul_kind:Unlikelihood\n")
    monkeypatch.syspath_prepend(str(pkg))
    kinds.cache_clear()
    yield
    kinds.cache_clear()
    sys.modules.pop("ul_kind", None)


def test_a_kind_in_its_own_package_trains_with_every_seam(plugin, tmp_path):
    assert "unlikelihood" in kinds()
    help_text = "\n".join(describe())
    assert "objectives.N with kind=unlikelihood" in help_text and "objectives.N.floor" in help_text
    with pytest.raises(Exception, match="floor must be in"):
        config(tmp_path / "bad", "objectives.1.kind=unlikelihood", "objectives.1.floor=2",
               f"objectives.1.data.path={workspace() / 'copy.jsonl'}", kinds=("sft",))
    # paired with SFT under ALRIGHT, through the one loop
    cfg = config(tmp_path / "run", "schedule.name=alright", "objectives.1.kind=unlikelihood",
                 f"objectives.1.data.path={workspace() / 'copy.jsonl'}", "objectives.1.data.max_len=64",
                 "train.max_steps=6", kinds=("sft",))
    result = train(cfg)
    ran = [r["ran"][0] for r in result.train_losses]
    assert set(ran) == {"sft", "unlikelihood"}
    ul = [r["unlikelihood"] for r in result.train_losses if "unlikelihood" in r]
    assert all(torch.isfinite(torch.tensor(ul)))
    # the seed command line takes it by its CLI name
    from bipost.cli.train_bi_objective import config_from_argv

    ws = workspace()
    seed = config_from_argv(["--pretrain", str(ws / "model"), "--obj_1", "SFT", "--dataset_1", str(ws / "sft.jsonl"),
                             "--obj_2", "ul", "--dataset_2", str(ws / "copy.jsonl"), "--save_path", str(tmp_path / "s")])
    assert seed.objectives[1].kind == "unlikelihood" and type(seed.objectives[1]).__name__ == "UnlikelihoodConfig"


def test_saved_configs_with_other_kinds_fields_at_their_defaults_still_load(tmp_path):
    """config.yaml files of earlier versions list every kind's fields on every objective."""
    cfg = load_config(overrides=[f"model.path={workspace() / 'model'}", "objectives.0.kind=sft",
                                 f"objectives.0.data.path={workspace() / 'sft.jsonl'}", "objectives.0.beta=0.1",
                                 "objectives.0.teacher=null", "objectives.0.kd_topk=0"])
    assert type(cfg.objectives[0]).__name__ == "ObjectiveConfig"
    with pytest.raises(Exception, match=r"objectives.0.beta is a field of (\w+, )*dpo(, \w+)* objectives, not of sft"):
        load_config(overrides=[f"model.path={workspace() / 'model'}", "objectives.0.kind=sft",
                               f"objectives.0.data.path={workspace() / 'sft.jsonl'}", "objectives.0.beta=0.3"])
