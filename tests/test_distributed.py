"""Two ranks (torchrun, gloo on CPU) train exactly what one rank trains with the same global batch.

Each test reads its scenario of ``tests/two_ranks.py`` (every 2-rank scenario runs in one launch of
``tests/rank_worker.py``): a run of 4 optimizer steps that checkpoints at step 2, then a resume of
that checkpoint. It is compared with the same run on one
process (micro-batch 4 x accumulation 2 instead of 2 ranks x micro-batch 4: the same rows per
step, see ``bipost.data.stream``). Checked for every engine:

* per-step losses equal the one-rank run's (each objective is normalized by its global unit count);
* the schedule's decision (objective run at each step) is the same on both ranks and as on one rank;
* the two ranks read disjoint micro-batches;
* the resumed run reproduces steps 3-4 of the uninterrupted one.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bipost.configio import load_config
from bipost.run import train

from two_ranks import DDP_ALRIGHT, FSDP2_MAXRIGHT, launch_one, overrides


def losses(records: list[dict]) -> list[float]:
    return [r[n] for r in records for n in r["ran"]]


def check_equivalent(ranks: list[dict], single, backend: str, wrapper_prefix: str) -> None:
    assert [r["backend"] for r in ranks] == [backend, backend]
    assert all(r["wrapper"].startswith(wrapper_prefix) for r in ranks), [r["wrapper"] for r in ranks]
    # the same decisions on both ranks, and as on one rank
    decisions = [[s["ran"] for s in r["train"]] for r in ranks]
    assert decisions[0] == decisions[1] == [s["ran"] for s in single.train_losses]
    # the same losses
    expected = torch.tensor(losses(single.train_losses))
    for r in ranks:
        torch.testing.assert_close(torch.tensor(losses(r["train"])), expected, rtol=1e-5, atol=1e-6)
    # disjoint shards of every objective's stream
    for name, first in ranks[0]["first_indices"].items():
        assert not set(first) & set(ranks[1]["first_indices"][name]), name
    # resume from the step-2 checkpoint reproduces steps 3-4 (on both ranks)
    for r in ranks:
        assert r["resumed_from"] == "step-00000002"
        assert [s["ran"] for s in r["resumed"]] == decisions[0][2:]
        torch.testing.assert_close(torch.tensor(losses(r["resumed"])), torch.tensor(losses(r["train"][2:])),
                                   rtol=1e-6, atol=1e-7)


def test_ddp_two_ranks_equal_one_rank_alright_lora(tmp_path, two_ranks):
    """DDP, ALRIGHT over SFT + DPO + KTO, LoRA with the adapter-disabled policy as DPO and KTO
    reference. KTO runs in steps 1 and 4: its reference point z0 (over both ranks' mismatched
    pairs, one all-reduce) equals one rank's, so do its losses, before and after the resume."""
    args = overrides(*DDP_ALRIGHT, kinds=("sft", "dpo", "kto"))
    ranks = two_ranks("ddp_alright_lora")
    single = train(load_config(overrides=args + [f"train.output_dir={tmp_path / 'one'}"]))
    check_equivalent(ranks, single, "ddp", "DistributedDataParallel")
    assert [s["ran"] for s in single.train_losses] == [["kto"], ["dpo"], ["sft"], ["kto"]]


def test_fsdp2_two_ranks_equal_one_rank_maxright_sharded_reference(tmp_path, two_ranks):
    """FSDP2 (torch fully_shard through accelerate), MAXRIGHT over SFT + DPO + KD, full fine-tuning
    with a sharded frozen reference and teacher (KD on the chunked head path). Evaluation is uneven (5 held-out rows, eval batches of 2: rank 0 runs
    2 batches, rank 1 one plus an uncounted filler) and equals the one-rank evaluation. The
    checkpoint's optimizer is in per-rank DCP files; the final HF export is gathered."""
    args = overrides(*FSDP2_MAXRIGHT, kinds=("sft", "dpo", "kd"))
    ranks = two_ranks("fsdp2_maxright")
    single = train(load_config(overrides=args + [f"train.output_dir={tmp_path / 'one'}"]))
    check_equivalent(ranks, single, "fsdp2", "FSDP")
    for r in ranks:
        assert r["eval"][0]["sft"] == pytest.approx(single.eval_history[0]["sft"], rel=1e-6)
    sharded = two_ranks.root / "fsdp2_maxright" / "full" / "checkpoints" / "step-00000002" / "sharded"
    assert len(list(sharded.glob("*.distcp"))) == 2 and not (sharded.parent / "optimizer.pt").exists()
    from safetensors.torch import load_file

    mine = load_file(two_ranks.root / "fsdp2_maxright" / "full" / "final" / "model.safetensors")
    ref = load_file(single.final_dir / "model.safetensors")
    assert mine.keys() == ref.keys()
    for k in ref:  # Adam: up to ~lr per step where a gradient is ~0 (see test_train)
        torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=2e-4)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is an optional extra (pip install -e '.[deepspeed]')")
def test_deepspeed_zero3_two_ranks_equal_one_rank(tmp_path):
    """DeepSpeed ZeRO-3 as the seeds launch it (``dist.zero_stage=3``, no accelerate config), LoRA,
    ALRIGHT over SFT + DPO. Its checkpoint is DeepSpeed's per-rank one; the final adapter and the
    merged model (rebuilt from the base on rank 0) equal the one-rank ones. The first run on a
    machine compiles DeepSpeed's CPU communication op (a few minutes, then cached)."""
    args = overrides("schedule.name=alright", "model.lora.rank=4", "model.lora.save_merged=true")
    ranks = launch_one(tmp_path / "zero3", "train_and_resume", [args + ["dist.zero_stage=3"]],
                       env={"DS_ACCELERATOR": "cpu"})
    single = train(load_config(overrides=args + [f"train.output_dir={tmp_path / 'one'}"]))
    check_equivalent(ranks, single, "deepspeed", "DeepSpeedEngine")
    state = tmp_path / "zero3" / "full" / "checkpoints" / "step-00000002" / "sharded" / "state"
    assert len(list(state.glob("*optim_states.pt"))) == 2
    from safetensors.torch import load_file

    for name in ("final/adapter_model.safetensors", "final-merged/model.safetensors"):
        mine = load_file(tmp_path / "zero3" / "full" / name)
        ref = load_file(single.output_dir / name)
        assert mine.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=2e-4)
