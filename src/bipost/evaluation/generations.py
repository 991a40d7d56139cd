"""Generation metrics of one objective on its held-out rows: generate, score, gather.

Each held-out example's prompt (its token ids, exactly as training conditions on them) is completed
by :func:`bipost.generation.generate` (batched, KV cache; greedy, or sampled from a generator
seeded with ``eval.seed + rank``). The completion is scored against the example's reference:

* prompt/response examples (``sft``, ``kd``): the response; exact match and token F1
  (:mod:`bipost.evaluation.scores`);
* preference examples (``dpo``, ...): the chosen response; exact match and token F1, and with a
  judge the win rate: the judge scores the policy's completion and the chosen response to the
  same prompt, the higher score wins (a tie counts half).

Under several ranks the prompts are split (rank ``r`` takes rows ``r, r + W, ...``, as held-out
losses do) and every rank's samples are gathered, so every rank ends with the same metrics. On a
sharded engine (FSDP2, ZeRO-3) every forward is a collective: ranks with fewer prompts pad with
copies of the first one (their completions are dropped) so every rank makes the same ``generate``
calls, and ``generate`` runs synced (a rank whose sequences ended keeps stepping until all have).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from bipost.config import EvalConfig, JudgeConfig
from bipost.data.examples import ExampleType
import bipost.evaluation.scores as S
from bipost.generation import generate

"""Example type -> the field holding the reference response its generations are scored against."""


class Judge:
    """The win-rate judge: one score per (prompt, response), from a reward model or a reward
    function (``bipost.rewards``), on this rank's device."""

    def __init__(self, cfg: JudgeConfig, device: torch.device | str):
        from bipost.rewards import RewardFunctions, RewardSpec

        if cfg.model:
            spec = RewardSpec("reward_model", name="judge",
                              args={"path": cfg.model, "batch_size": cfg.batch_size, "device": str(device),
                                    "dtype": cfg.dtype, "max_length": cfg.max_length})
        else:
            spec = RewardSpec(str(cfg.function), name="judge")
        self.functions = RewardFunctions([spec])

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.functions(list(prompts), list(responses)).total.tolist()


@dataclass
class ObjectiveGenerations:
    """What one evaluation of an objective's generations produced (the same on every rank)."""

    name: str
    metrics: dict[str, float]
    """``gen/<name>/<metric>``: exact_match, f1, truncated (fraction cut at max_new_tokens), length
    (mean generated tokens), prompts; with a judge win_rate, score (mean judge score of the
    generations) and reference_score (of the chosen responses)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Per prompt, in held-out order: index, row_id, prompt, generation, reference, exact_match, f1,
    truncated, tokens; with a judge score, reference_score and win."""


def eos_ids(tokenizer, model) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS (what training appends to every response)
    and any the model's generation config names (e.g. a chat model's end-of-turn token)."""
    from bipost.data.tokenize import TokenPolicy
    from bipost.generation import generation_model

    ids = [TokenPolicy.of(tokenizer).eos_id]
    extra = getattr(getattr(generation_model(model), "generation_config", None), "eos_token_id", None)
    for e in [extra] if isinstance(extra, int) else (extra or []):
        if int(e) not in ids:
            ids.append(int(e))
    return ids


def evaluate_generations(model, tokenizer, name: str, examples: Sequence, example_type: ExampleType, cfg: EvalConfig,
                         comm, judge: Judge | None = None) -> ObjectiveGenerations:
    """Generate for objective ``name``'s held-out ``examples`` (the first ``cfg.max_prompts``) on
    every rank's share, score, gather; see the module docstring. Every rank calls it."""
    from bipost.data.tokenize import TokenPolicy

    if example_type.reference is None:
        raise ValueError(f"objective {name!r}: generation metrics need examples with a reference response "
                         f"(prompt/response or preference), not {example_type.name!r} examples")
    ref_field = example_type.reference
    rows = list(examples[: cfg.max_prompts] if cfg.max_prompts else examples)
    if not rows:
        return ObjectiveGenerations(name, {})
    mine = list(range(comm.rank, len(rows), comm.world_size))
    prompts = [rows[i].prompt_ids for i in mine]
    lockstep = bool(getattr(comm, "lockstep_forwards", False)) and comm.world_size > 1
    if lockstep:  # the same number of prompts, hence of generate calls, on every rank
        prompts += [rows[0].prompt_ids] * (math.ceil(len(rows) / comm.world_size) - len(mine))
    generator = torch.Generator().manual_seed(cfg.seed + comm.rank) if cfg.temperature > 0 else None
    out = generate(model, prompts, pad_id=TokenPolicy.of(tokenizer).pad_id, eos_id=eos_ids(tokenizer, model),
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   top_k=cfg.top_k, batch_size=cfg.batch_size, generator=generator, synced=lockstep or None)

    def text(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    local = []
    for k, i in enumerate(mine):
        ex, ids = rows[i], out.completion_ids[k]
        generation, reference = text(ids), text(getattr(ex, ref_field))
        local.append({"index": i, "row_id": ex.row_id, "prompt": text(ex.prompt_ids), "generation": generation,
                      "reference": reference, "exact_match": S.exact_match(generation, reference),
                      "f1": S.token_f1(generation, reference), "truncated": out.truncated[k], "tokens": len(ids)})
    if judge is not None and local:
        prompts_text = [s["prompt"] for s in local]
        policy = judge(prompts_text, [s["generation"] for s in local])
        chosen = judge(prompts_text, [s["reference"] for s in local])
        for s, p, c, w in zip(local, policy, chosen, S.wins(policy, chosen)):
            s.update(score=p, reference_score=c, win=w)
    samples = sorted((s for part in comm.gather_objects(local) for s in part), key=lambda s: s["index"])
    return ObjectiveGenerations(name, summarize(name, samples), samples)


def summarize(name: str, samples: Sequence[dict]) -> dict[str, float]:
    """The metrics of ``samples`` (see :attr:`ObjectiveGenerations.metrics`)."""
    def col(key: str) -> list[float]:
        return [float(s[key]) for s in samples]

    out = {"exact_match": S.mean(col("exact_match")), "f1": S.mean(col("f1")),
           "truncated": S.mean(col("truncated")), "length": S.mean(col("tokens")), "prompts": float(len(samples))}
    if samples and "win" in samples[0]:
        out.update(win_rate=S.mean(col("win")), score=S.mean(col("score")),
                   reference_score=S.mean(col("reference_score")))
    return {f"gen/{name}/{k}": v for k, v in out.items()}
