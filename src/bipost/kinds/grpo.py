"""``grpo``: Group Relative Policy Optimization, online, with reward functions.

The objective's data are prompts (``data.prompts``: strings or conversations, the row's other
columns kept for the reward functions). ``batch_size`` / ``micro_batch_size`` count *prompts*.
When a schedule runs it, a step (:meth:`GRPO.prepare`, on every rank for its own prompts) does:

1. **generate** ``num_generations`` completions per prompt with the current policy
   (``bipost.generation``: HF ``generate`` with the KV cache, batched, ``temperature`` / ``top_p`` /
   ``top_k``, stopping at EOS or after ``max_new_tokens``). A prompt's group is generated, scored
   and trained on the rank that drew the prompt. Sampling draws from the objective's own
   generator (checkpointed, the same on every rank): per step it draws one seed per micro-batch of
   every rank, and micro-batch ``j`` of rank ``r`` (of ``W``) samples with seed number ``j * W + r``,
   the position of that micro-batch in the step's contiguous slice of the prompt stream
   (``data.stream``). So 2 ranks sample what 1 rank samples with the same micro-batches, and a
   resumed run samples what the uninterrupted one did;
2. **score** every completion with the reward functions (``bipost.rewards``: TRL's signature,
   weights, built-ins, a reward model), summed with their weights;
3. **advantages**, group-relative (``objectives.grpo.group_advantages``; no std scaling for
   ``dr_grpo`` unless ``scale_rewards`` says otherwise);
4. **training rows**: prompt + completion, padded, or packed with each prompt laid out once for
   its whole group (``train.packing``); with ``num_iterations > 1`` the policy's log-probs of the
   completions now ("old" log-probs), with ``beta > 0`` the reference's.

The loss of a training micro-batch is ``objectives.grpo.grpo_loss`` on the completion tokens'
log-probs from the chunked path (``Forward.token_logprobs`` at the sampling temperature). With
``num_iterations = k > 1`` the step's completions are kept and trained on again by the objective's
next ``k - 1`` steps (the clipped ratio against the kept old log-probs); those steps draw no
prompts (:meth:`GRPO.batches_to_draw`), so the prompt stream does not skip any.

**Values, lower is better.** The *value* a grpo objective reports for a training step (its logged
``loss/<name>``, what MAXRIGHT observes) is the negative mean reward of the step's sampled
completions; its gradient is the GRPO gradient (the loss is ``surrogate - surrogate.detach() +
value``, exactly). Its :meth:`~GRPO.measure` (held-out evaluation, MAXRIGHT's refreshes, ``bipost
compare``'s loss space, early stopping) is the negative mean reward of *greedy* completions of the
batch's prompts. Note for MAXRIGHT: its refreshes see greedy rewards, its steps sampled ones
(usually lower at ``temperature`` 1), which reads as a little forgetting of the grpo objective.

Metrics per step (``<name>/<metric>`` in metrics.jsonl, means over the step's completions):
``reward`` and, per reward function, ``rewards/<f>/mean`` (over the completions it applies to);
``reward_std`` / ``rewards/<f>/std``: the mean within-group std (TRL's ``reward_std``: a group with
std 0 carries no signal), ``frac_reward_zero_std``; ``completion_length``, ``truncated`` (cut at
``max_new_tokens``), ``gen_tokens_per_s``; ``advantage``, ``ratio``, ``clip_low`` / ``clip_high``
/ ``clip_region`` and, with ``beta > 0``, ``kl`` (``objectives.grpo``).

Not here: a vLLM engine. Generation goes through ``bipost.generation.generate`` (one call per
micro-batch, in :meth:`GRPO._generate`), the seam where a colocated vLLM engine would plug in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from bipost.config import ConfigError, ObjectiveConfig
from bipost.data.collate import collate_sft
from bipost.data.packing import PackedLayout
from bipost.data.prompts import PROMPTS, pack_groups
from bipost.data.types import SFTExample
from bipost.generation import Generations, generate
from bipost.kinds.base import BuildContext, Objective, StepContext
from bipost.modeling.forward import positions
from bipost.models import as_reference, is_peft
from bipost.objectives.base import ObjectiveOutput
from bipost.objectives.grpo import AdvantageScale, GRPOLoss, group_advantages, grpo_loss, grpo_units
from bipost.rewards import RewardError, RewardFunctions, RewardScores, RewardSpec


@dataclass
class GRPOConfig(ObjectiveConfig):
    """An online objective: ``batch_size`` and ``micro_batch_size`` count prompts, each answered by
    ``num_generations`` sampled completions; ``data.max_len`` is the longest prompt kept (tokens)."""

    rewards: list[RewardSpec] = field(default_factory=list)
    """Reward functions, summed with their weights: a built-in (exact_match, regex, math, reward_model) or an import path module:function with TRL's signature f(prompts, completions, **columns) -> list[float | None]; e.g. [{function: exact_match, args: {column: answer}}]."""
    num_generations: int = 8
    """Completions sampled per prompt (a group; its rewards' mean is the baseline), >= 2."""
    max_new_tokens: int = 64
    """Longest completion in tokens (generation stops at EOS or here)."""
    temperature: float = 1.0
    """Sampling temperature, > 0; log-probs in the loss are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1] (1: off)."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: off)."""
    loss: str = "grpo"
    """The loss variant: grpo (each completion's token mean, averaged over completions) | dapo (token mean over all the step's completion tokens) | dr_grpo (token sum over num_generations x max_new_tokens slots, no std scaling)."""
    scale_rewards: str = "auto"
    """Divide advantages by the group's reward std: group | none | auto (none for dr_grpo, else group)."""
    epsilon_low: float = 0.2
    """The importance ratio is clipped to [1 - epsilon_low, 1 + epsilon_high] (matters when num_iterations > 1)."""
    epsilon_high: Optional[float] = None
    """Upper clip (DAPO's clip-higher, e.g. 0.28); unset: epsilon_low."""
    num_iterations: int = 1
    """Optimizer steps of this objective on each generation (> 1: the clipped ratio against the kept log-probs of the policy that sampled)."""
    beta: float = 0.0
    """Coefficient of the k3 KL estimate to the reference (0: no reference at all)."""
    reference: Optional[str] = None
    """Reference model path (beta > 0). Unset: the policy's initial weights (with LoRA: the adapter disabled, no second copy)."""
    generation_batch_size: int = 0
    """Sequences (prompt x completion rows) per generate call; 0: one call per micro-batch (micro_batch_size x num_generations)."""
    completions_per_micro_batch: int = 0
    """Completions per training forward, a multiple of num_generations (a group trains together); 0: all of a micro-batch's."""
    seed: Optional[int] = None
    """Seed of the sampling generator (checkpointed); unset: train.seed."""

    def check(self, where: str) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{where}.{name} {why}")

        if not self.rewards:
            raise ConfigError(f"{where}.rewards: give at least one reward function, e.g. "
                              f"{where}.rewards.0.function=exact_match {where}.rewards.0.args.column=answer")
        if self.num_generations < 2:
            raise bad("num_generations", f"must be >= 2 (a group of one has no baseline), got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise bad("temperature", f"must be > 0 (greedy groups would all be the same), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0: off), got {self.top_k}")
        if self.loss not in {k.value for k in GRPOLoss}:
            raise bad("loss", f"must be one of {', '.join(k.value for k in GRPOLoss)}, not {self.loss!r}")
        if self.scale_rewards not in ("auto", *(k.value for k in AdvantageScale)):
            raise bad("scale_rewards", f"must be auto, group or none, not {self.scale_rewards!r}")
        if not 0 <= self.epsilon_low < 1:
            raise bad("epsilon_low", f"must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high is not None and not (self.epsilon_high >= 0 and math.isfinite(self.epsilon_high)):
            raise bad("epsilon_high", f"must be a finite number >= 0, got {self.epsilon_high}")
        if self.num_iterations < 1:
            raise bad("num_iterations", f"must be >= 1, got {self.num_iterations}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise bad("beta", f"must be a finite number >= 0, got {self.beta}")
        if self.reference and self.beta == 0:
            raise bad("reference", "is only used with beta > 0 (the KL term); set beta or drop the reference")
        if self.generation_batch_size < 0:
            raise bad("generation_batch_size", f"must be >= 0, got {self.generation_batch_size}")
        if self.completions_per_micro_batch < 0 or self.completions_per_micro_batch % self.num_generations:
            raise bad("completions_per_micro_batch", f"must be 0 or a multiple of num_generations "
                      f"({self.num_generations}), got {self.completions_per_micro_batch}")

    @property
    def advantage_scale(self) -> str:
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "none" if self.loss == GRPOLoss.DR_GRPO.value else "group"


@dataclass
class _Kept:
    """A generation trained on again by the next steps (``num_iterations > 1``), on this rank."""

    batches: list[dict]
    remaining: int
    """Steps that will still train on it."""


class GRPO(Objective):
    """Online RL on prompts (batch sizes count prompts): completions sampled from the current
    policy, scored by the reward functions, trained with group-relative advantages (GRPO, DAPO,
    Dr. GRPO; ``bipost.kinds.grpo``). Held-out value: -mean reward of greedy completions. Unit: a
    completion (grpo), a completion token (dapo) or a token slot (dr_grpo)."""

    kind = "grpo"
    config_class = GRPOConfig
    examples = PROMPTS
    cli_name = "GRPO"
    seed_model = "reference"
    measure_name = "-reward"
    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig, forward=None, packing: bool = False, *,
                 reference: torch.nn.Module | None = None, tokenizer: Any = None,
                 rewards: RewardFunctions | None = None, comm: Any = None):
        super().__init__(cfg, forward, packing)
        self.reference = reference
        """A frozen reference model (beta > 0); None: the LoRA policy with its adapter disabled."""
        self.tokenizer = tokenizer
        self.rewards = rewards if rewards is not None else RewardFunctions(cfg.rewards)
        self.comm = comm
        """The run's engine (collectives, for synced generation and the kept generation's checkpoint)."""
        self.generator = torch.Generator().manual_seed(cfg.seed or 0)
        self.kept: _Kept | None = None

    @classmethod
    def build(cls, cfg: GRPOConfig, ctx: BuildContext) -> "GRPO":
        run = ctx.run
        if run.selector.enabled and run.selector.objective == cfg.name:
            raise ConfigError(f"selector.objective: the data selector weights rows of an offline objective; "
                              f"{cfg.name} is an online grpo objective")
        if cfg.num_iterations > 1 and run.schedule.per_micro_step:
            raise ConfigError(f"objective {cfg.name}: num_iterations > 1 reuses a whole step's generation, which "
                              f"schedule.per_micro_step splits across objectives; use one of them")
        if cfg.seed is None:
            cfg = dataclasses.replace(cfg, seed=run.train.seed)
        reference = None
        if cfg.beta > 0 and (cfg.reference or not is_peft(ctx.policy)):
            reference = ctx.frozen_model(cfg.reference or run.model.path)
        specs = [dataclasses.replace(s, args={**s.args, "device": str(ctx.engine.device)})
                 if s.function == "reward_model" and "device" not in s.args else s for s in cfg.rewards]
        return cls(cfg, ctx.forward, ctx.packing, reference=reference, tokenizer=ctx.tokenizer,
                   rewards=RewardFunctions(specs), comm=ctx.engine)

    # ---------------------------------------------------------------- data
    def collate(self, pad_id: int):
        return lambda examples: PROMPTS.collate(examples, pad_id)  # prompts are never packed

    def row_units(self, batch: dict) -> torch.Tensor:
        """A training micro-batch's completion units (known once the completions exist, in ``prepare``)."""
        return batch["units"]

    # ---------------------------------------------------------------- the step
    def batches_to_draw(self, count: int) -> int:
        return 0 if self.kept is not None and self.kept.remaining > 0 else count

    def prepare(self, model, batches: list[dict], step: StepContext) -> list[dict]:
        if not batches:
            if self.kept is None or self.kept.remaining <= 0:
                raise RuntimeError(f"objective {self.name}: no prompts were drawn and no generation is kept")
            self.kept.remaining -= 1
            return self.kept.batches
        out = self._rollouts(model, batches, step)
        self.kept = _Kept(out, self.cfg.num_iterations - 1) if self.cfg.num_iterations > 1 else None
        return out

    def _rollouts(self, model, batches: list[dict], step: StepContext) -> list[dict]:
        """Generate, score and lay out this rank's completions as training micro-batches."""
        comm = step.comm
        world, rank = comm.world_size, comm.rank
        seeds = torch.randint(0, 2**62, (len(batches) * world,), generator=self.generator).tolist()
        generations = [self._generate(model, b, torch.Generator().manual_seed(seeds[j * world + rank]), comm)
                       for j, b in enumerate(batches)]
        error: RewardError | None = None
        out: list[dict] = []
        try:
            for b, gen in zip(batches, generations):
                out += self._training_batches(b, gen, self._score(b, gen, f"at step {step.step + 1}"))
        except RewardError as e:
            error = e
        # One all-reduce: a reward function that failed on one rank stops every rank (none waits for
        # it in a later collective), and the step's (weighted) completions and units give the value's
        # scale: sum_s w_s * value_s / sum_s w_s * units_s is then the weighted mean of -r.
        weights = [b.get("weights", torch.ones_like(b["units"])) for b in out]
        local = torch.tensor([sum(float(w.sum()) for w in weights),
                              sum(float((w * b["units"]).sum()) for w, b in zip(weights, out)), float(error is not None)],
                             dtype=torch.float64)
        total = comm.all_reduce_sum(local).cpu()
        if total[2] > 0:
            raise error or RewardError(f"objective {self.name!r} at step {step.step + 1}: a reward function failed "
                                       f"on another rank (see its error)")
        scale = torch.tensor(float(total[1] / total[0]), dtype=torch.float64)
        for b in out:
            b["value_scale"] = scale
            self._frozen_logps(model, b, step)
        return out

    def _generate(self, model, batch: dict, generator: torch.Generator | None, comm) -> Generations:
        """Completions of a micro-batch's prompts: sampled (``generator``) or greedy (None)."""
        if self.tokenizer is None:
            raise ValueError(f"objective {self.name}: generation needs the tokenizer (GRPO.build gives it)")
        from bipost.evaluation.generations import eos_ids

        c = self.cfg
        sampled = generator is not None
        synced = bool(getattr(comm, "lockstep_forwards", False)) and getattr(comm, "world_size", 1) > 1
        return generate(model, batch["prompt_ids"], pad_id=self.tokenizer.pad_token_id,
                        eos_id=eos_ids(self.tokenizer, model), max_new_tokens=c.max_new_tokens,
                        temperature=c.temperature if sampled else 0.0, top_p=c.top_p if sampled else 1.0,
                        top_k=c.top_k if sampled else 0, num_generations=c.num_generations if sampled else 1,
                        batch_size=c.generation_batch_size, generator=generator, synced=synced)

    def _score(self, batch: dict, gen: Generations, when: str) -> RewardScores:
        """Rewards of the completions of ``gen`` (each with its prompt and its row's columns)."""
        rows = gen.prompt_index
        keys = sorted({k for cols in batch["columns"] for k in cols})
        columns = {k: [batch["columns"][i].get(k) for i in rows] for k in keys}
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in gen.completion_ids]
        try:
            return self.rewards([batch["prompts"][i] for i in rows], texts, columns, completion_ids=gen.completion_ids)
        except RewardError as e:
            raise RewardError(f"objective {self.name!r} {when}: {e}") from e

    def _training_batches(self, batch: dict, gen: Generations, scores: RewardScores) -> list[dict]:
        """One drawn micro-batch's completions as training micro-batches (CPU tensors), with their
        advantages, units and reward statistics (per completion)."""
        c, n = self.cfg, self.cfg.num_generations
        adv = group_advantages(scores.total, n, scale=c.advantage_scale)
        table = scores.per_function
        stats = {
            "advantages": adv.advantages,
            "rewards": scores.total,
            "reward_table": table,
            "reward_group_std": adv.group_std.repeat_interleave(n),
            "reward_table_std": _group_nanstd(table, n).repeat_interleave(n, dim=0),
            "zero_std": adv.degenerate.float().repeat_interleave(n),
            "truncated": torch.tensor(gen.truncated, dtype=torch.float32),
            "gen_tokens_per_s": torch.full((len(gen.completion_ids),), gen.tokens_per_second),
        }
        if "weights" in batch:  # per-row weights (data.weight_key / weights_file): each completion its prompt's
            stats["weights"] = batch["weights"].double()[torch.tensor(gen.prompt_index)]
        examples = [SFTExample(int(batch["row_ids"][i]), tuple(batch["prompt_ids"][i]), tuple(ids))
                    for i, ids in zip(gen.prompt_index, gen.completion_ids)]
        lengths = torch.tensor([len(ids) for ids in gen.completion_ids], dtype=torch.float64)
        units = grpo_units(c.loss, lengths, c.max_new_tokens).double()
        size = c.completions_per_micro_batch or len(examples)
        pad_id = self.tokenizer.pad_token_id
        out = []
        for s in range(0, len(examples), size):
            part = examples[s:s + size]
            b = pack_groups(part, n) if self.packing else collate_sft(part, pad_id)
            b.update({k: v[s:s + size] for k, v in stats.items()})
            b["units"] = units[s:s + size]
            out.append(b)
        return out

    @torch.no_grad()
    def _frozen_logps(self, model, batch: dict, step: StepContext) -> None:
        """The completions' log-probs under the sampling policy (``num_iterations > 1``) and the
        reference (``beta > 0``), added to ``batch`` (CPU)."""
        c = self.cfg
        if c.num_iterations == 1 and c.beta == 0:
            return
        dev = step.to_device(batch)
        pos = positions(dev, self.num_seqs(dev))
        # No DDP wrapper around no-grad forwards (every rank runs the same number of them anyway).
        fwd = step.comm.forward_module(model) if hasattr(step.comm, "forward_module") else model
        if c.num_iterations > 1:
            batch["old_logps"] = self.forward.token_logprobs(fwd, dev, pos, c.temperature).cpu()
        if c.beta > 0:
            batch["ref_logps"] = self._reference_logps(fwd, dev, pos).cpu()

    def _reference_logps(self, model, batch: dict, pos) -> torch.Tensor:
        if self.reference is not None:
            return self.forward.token_logprobs(self.reference, batch, pos, self.cfg.temperature)
        policy = self.forward.access.outer_module(model)
        if not is_peft(policy):
            raise ValueError(f"objective {self.name}: beta > 0 needs a reference model (objectives.N.reference) "
                             f"or a LoRA policy (whose adapter disabled is the reference)")
        with as_reference(policy):
            return self.forward.token_logprobs(model, batch, pos, self.cfg.temperature)

    def loss(self, model, batch: dict) -> ObjectiveOutput:
        c = self.cfg
        n = self.num_seqs(batch)
        pos = positions(batch, n)
        logps = self.forward.token_logprobs(model, batch, pos, c.temperature)
        out = grpo_loss(logps, pos.seq, n, batch["advantages"], old_logps=batch.get("old_logps"),
                        ref_logps=batch.get("ref_logps"), beta=c.beta, epsilon_low=c.epsilon_low,
                        epsilon_high=c.epsilon_high, loss_type=c.loss, max_completion_length=c.max_new_tokens)
        # The value is the negative mean reward (scaled so the step's sum / units is exactly that
        # mean); the gradient is the surrogate's.
        value = -batch["rewards"].to(out.losses) * batch["value_scale"].to(out.losses)
        losses = out.losses - out.losses.detach() + value
        return ObjectiveOutput(losses, out.units, {**out.metrics, **self._reward_metrics(batch)})

    def _reward_metrics(self, batch: dict) -> dict[str, torch.Tensor]:
        m = {"reward": batch["rewards"], "reward_std": batch["reward_group_std"],
             "frac_reward_zero_std": batch["zero_std"], "truncated": batch["truncated"],
             "gen_tokens_per_s": batch["gen_tokens_per_s"]}
        for j, name in enumerate(self.rewards.names):
            m[f"rewards/{name}/mean"] = batch["reward_table"][:, j]
            m[f"rewards/{name}/std"] = batch["reward_table_std"][:, j]
        return m

    def measure(self, model, batch: dict) -> ObjectiveOutput:
        """Negative reward of each prompt's greedy completion (unit: a prompt): lower is better."""
        gen = self._generate(model, batch, None, self.comm)
        scores = self._score(batch, gen, "while measuring (greedy completions)")
        losses = -scores.total.double()
        return ObjectiveOutput(losses, torch.ones_like(losses), {"reward": scores.total})

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The sampling generator (the same on every rank) and, with ``num_iterations > 1``, every
        rank's kept generation (gathered: the checkpoint's trainer state is written by rank 0)."""
        state: dict = {"generator": self.generator.get_state()}
        if self.cfg.num_iterations > 1:
            kept = None if self.kept is None else {"batches": [_portable(b) for b in self.kept.batches],
                                                   "remaining": self.kept.remaining}
            world = getattr(self.comm, "world_size", 1)
            state["kept"] = self.comm.gather_objects(kept) if world > 1 else [kept]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        kept = state.get("kept") or []
        world, rank = getattr(self.comm, "world_size", 1), getattr(self.comm, "rank", 0)
        if any(k is not None for k in kept) and len(kept) != world:
            raise ValueError(f"objective {self.name}: the checkpoint keeps generations of {len(kept)} ranks for "
                             f"num_iterations > 1; resume it on {len(kept)} ranks")
        entry = kept[rank] if kept else None
        self.kept = None if entry is None else _Kept(entry["batches"], entry["remaining"])

    # ---------------------------------------------------------------- the seed command line
    @classmethod
    def add_seed_args(cls, parser) -> None:
        g = parser.add_argument_group("GRPO (the _2 forms: obj_2's, when both objectives are GRPO)")
        for sfx in ("", "_2"):
            g.add_argument(f"--grpo_rewards{sfx}", default=None,
                           help="comma-separated reward functions: built-ins (exact_match, regex, math) or "
                                "module:function (default exact_match)")
            g.add_argument(f"--grpo_reward_column{sfx}", default=None,
                           help="the data column exact_match / math compare with (default: output)")
            g.add_argument(f"--grpo_num_generations{sfx}", type=int, default=None, help="completions per prompt (8)")
            g.add_argument(f"--grpo_max_new_tokens{sfx}", type=int, default=None, help="completion length (64)")
            g.add_argument(f"--grpo_temperature{sfx}", type=float, default=None, help="sampling temperature (1.0)")
            g.add_argument(f"--grpo_beta{sfx}", type=float, default=None, help="KL coefficient (0)")
            g.add_argument(f"--grpo_loss{sfx}", default=None, help="grpo | dapo | dr_grpo (grpo)")

    @classmethod
    def seed_fields(cls, args, pick) -> dict:
        column = pick("grpo_reward_column", "output")
        rewards = []
        for f in str(pick("grpo_rewards", "exact_match")).split(","):
            f = f.strip()
            if f:
                rewards.append({"function": f, "args": {"column": column} if f in ("exact_match", "math") else {}})
        return {"rewards": rewards, "num_generations": pick("grpo_num_generations", 8),
                "max_new_tokens": pick("grpo_max_new_tokens", 64), "temperature": pick("grpo_temperature", 1.0),
                "beta": pick("grpo_beta", 0.0), "loss": pick("grpo_loss", "grpo")}


def _group_nanstd(table: torch.Tensor, n: int) -> torch.Tensor:
    """``[G, F]`` unbiased std of each group's values per column, over the values that are not NaN
    (NaN where fewer than two are)."""
    grouped = table.view(-1, n, table.shape[1])
    present = ~torch.isnan(grouped)
    count = present.sum(1).float()
    values = torch.where(present, grouped, torch.zeros_like(grouped))
    mean = values.sum(1) / count.clamp(min=1)
    sq = torch.where(present, (grouped - mean[:, None]) ** 2, torch.zeros_like(grouped)).sum(1)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return torch.where(count >= 2, std, torch.full_like(std, math.nan))


def _portable(batch: dict) -> dict:
    """A training batch as it can be pickled into a checkpoint (CPU tensors, no device caches)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, PackedLayout):
            v = PackedLayout(list(v.segments))
        elif torch.is_tensor(v):
            v = v.cpu()
        out[k] = v
    return out
