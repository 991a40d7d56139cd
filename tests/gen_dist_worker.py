"""One rank of tests/test_generation.py's sharded-generation test (torchrun, gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/gen_dist_worker.py MODEL_DIR SPEC OUT``:
loads the tiny model, shards it with FSDP2 (every forward all-gathers parameters: a collective),
and generates greedily with ``synced=True`` for this rank's prompts from SPEC (JSON: ``prompts``
per rank, ``eos``, ``max_new_tokens``, ``pad``). The ranks' sequences end at different steps;
the result is written to ``OUT/rank-<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(model_dir: str, spec_path: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from bipost.generation import generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = json.loads(Path(spec_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    res = generate(model, spec["prompts"][rank], pad_id=spec["pad"], eos_id=spec["eos"],
                   max_new_tokens=spec["max_new_tokens"], synced=True)
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"completion_ids": res.completion_ids,
                                                          "truncated": res.truncated}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
