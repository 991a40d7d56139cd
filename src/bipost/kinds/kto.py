"""``kto``: KTO (Ethayarajh et al. 2024), unpaired binary feedback against a KL reference point.

Everything the kind needs is here: its data (an example is one prompt, one completion and a
desirable / undesirable label; TRL's unpaired preference rows, or preference pairs split into two
examples), the mismatched completion of every example that the KL reference point ``z0`` is
estimated on, and the objective, which computes ``z0`` over the whole optimizer step.

**Mismatched completions.** The paper estimates ``z0`` from pairs ``(x, y')`` where ``y'`` is the
completion of another example. Here that other example is fixed by the data when the objective is
built: the rows of each loaded set (train, and eval separately) are put in one random cycle
(seeded with ``mismatch_seed``), and an example's mismatched completion is that of the next row in
the cycle (its example with the same label when it has one, as the two halves of a split pair do).
So every completion is the mismatched one of exactly one example, a prompt is never paired with a
completion of its own row, and which completion an example is paired with does not depend on the
micro-batch it is drawn into, on the batch size, the accumulation or the number of ranks: the
condition under which ``z0`` over the step is the same for every such layout (``objectives/kto.py``).
TRL instead pairs each prompt with the next example's completion *within a device batch*. The
mismatched completion is cut to fit ``max_len`` after the example's prompt, as a response is.

**z0 over the step.** :meth:`KTO.prepare` runs, before the step's first backward, a no-grad forward
of every micro-batch's mismatched pairs through the policy (and the reference, unless cached),
adds ``kto_kl_sums`` over the micro-batches, all-reduces the sum and count once across ranks, and
attaches the one ``z0`` (with the reference log-probs of the completions) to every micro-batch.
:meth:`KTO.measure` (evaluation, MAXRIGHT's probes, the selector) sees one batch at a time and
uses that batch's own mismatched pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from bipost.config import ConfigError, DataConfig, ObjectiveConfig
from bipost.data.collate import collate_sft
from bipost.data.examples import SFT, ExampleType
from bipost.data.formats import LabeledText, PrefText, format_row
from bipost.data.packing import pack_sft
from bipost.data.sources import Row
from bipost.data.store import Concat
from bipost.data.tokenize import EMPTY_RESPONSE, TOO_LONG, TokenPolicy
from bipost.data.types import SFTExample, TokenIds
from bipost.example_cache import ExampleCache, cache_meta, compute_rows, content_key, load_or_build
from bipost.kinds.base import BuildContext, Objective, StepContext
from bipost.models import as_reference, is_peft, resolve_dtype
from bipost.objectives import kto_kl_sums, kto_loss, kto_reference_point
from bipost.objectives.kto import check_kto_args

log = logging.getLogger("bipost")


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class KTOText:
    """A row's text parts: its prompt and its desirable and/or undesirable completion."""

    prompt: str
    desirable: Optional[str]
    undesirable: Optional[str]


@dataclass(frozen=True)
class KTOExample:
    """One prompt, one completion (ending with exactly one EOS) and its label. A preference pair
    gives two examples with the pair's row id: the chosen completion desirable, the rejected one
    not; ``(row_id, desirable)`` tells them apart."""

    row_id: int
    prompt_ids: TokenIds
    completion_ids: TokenIds
    desirable: bool

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def kto_format_row(row: Row, fmt: str, cfg: DataConfig, tokenizer: Any = None) -> KTOText | str:
    """A raw row's :class:`KTOText` (or its skip reason): an ``unpaired_preference`` row's one
    completion on its label's side, a ``preference`` row's chosen and rejected completions."""
    text = format_row(row, fmt, cfg, tokenizer)
    if isinstance(text, str):
        return text
    if isinstance(text, LabeledText):
        return KTOText(text.prompt, *((text.completion, None) if text.label else (None, text.completion)))
    assert isinstance(text, PrefText)
    return KTOText(text.prompt, text.chosen, text.rejected)


def _fit(content: Sequence[int], budget: int, eos: int) -> tuple[tuple[int, ...], bool]:
    """``content`` cut to ``budget - 1`` tokens, then EOS (the rule of ``data.tokenize``); and whether it was cut."""
    return (*content[: budget - 1], eos), len(content) > budget - 1


def encode_kto_rows(items: Sequence[tuple[int, str, Optional[str], Optional[str]]], tokenizer: Any,
                    max_len: int) -> list:
    """Encode ``(row_id, prompt, desirable, undesirable)`` items (either completion may be None):
    per item ``(example, truncated)``, ``((desirable example, undesirable example), (truncated,
    truncated))`` for a pair, or ``(skip reason, False)``. The tokenization policy is SFT's and
    DPO's (``data.tokenize``): the prompt kept whole, each completion cut to ``max_len - len(prompt)``
    tokens with its EOS last; a pair is skipped whole when either side cannot be kept."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one response token and EOS), got {max_len}")
    policy = TokenPolicy.of(tokenizer)
    prompts = policy.encode([it[1] for it in items])
    completions = iter(policy.encode([c for it in items for c in it[2:] if c is not None]))
    out: list = []
    for (row_id, _, good, bad), p in zip(items, prompts):
        prompt = policy.prompt(p)
        sides = [(label, policy.content(next(completions))) for label, c in ((True, good), (False, bad))
                 if c is not None]
        budget = max_len - len(prompt)
        if any(not content for _, content in sides):
            out.append((EMPTY_RESPONSE, False))
        elif budget < 2:
            out.append((TOO_LONG, False))
        else:
            fitted = [(KTOExample(row_id, prompt, ids, label), cut)
                      for label, content in sides for ids, cut in [_fit(content, budget, policy.eos_id)]]
            if len(fitted) == 1:
                out.append(fitted[0])
            else:
                out.append((tuple(e for e, _ in fitted), tuple(c for _, c in fitted)))
    return out


def _as_sft(examples: Sequence[KTOExample]) -> list[SFTExample]:
    return [SFTExample(e.row_id, e.prompt_ids, e.completion_ids) for e in examples]


def _labels(examples: Sequence[KTOExample]) -> torch.Tensor:
    return torch.tensor([bool(e.desirable) for e in examples], dtype=torch.bool)


def collate_kto(examples: Sequence[KTOExample], pad_id: int) -> dict:
    """SFT's padded batch of the prompt + completion sequences, with ``desirable`` ``[B]`` (bool)."""
    return {**collate_sft(_as_sft(examples), pad_id), "desirable": _labels(examples)}


def pack_kto(examples: Sequence[KTOExample]) -> dict:
    """SFT's packed row of the prompt + completion sequences, with ``desirable`` ``[B]`` (bool)."""
    return {**pack_sft(_as_sft(examples)), "desirable": _labels(examples)}


KTO_EXAMPLES = ExampleType(
    "kto", KTOExample, ("unpaired_preference", "preference"),
    "unpaired feedback (unpaired_preference: prompt, completion, label) or preference pairs (chosen/rejected, "
    "split into a desirable and an undesirable example)",
    encode_kto_rows, collate_kto, pack_kto, kto_format_row)


# ---------------------------------------------------------------------------------------- mismatched pairs
def mismatched_partners(row_ids: np.ndarray, desirable: np.ndarray, seed: int) -> np.ndarray:
    """For every example (position ``i``), the position of the example whose completion is its
    mismatched one: the rows form one random cycle (``torch.randperm`` seeded with ``seed``) and
    example ``i`` takes the example of the next row that has its label, else that row's first."""
    n = len(row_ids)
    rows, row_of = np.unique(np.asarray(row_ids, dtype=np.int64), return_inverse=True)
    if len(rows) < 2:
        raise ValueError(f"mismatched prompt-completion pairs need at least 2 rows, got {len(rows)}")
    cycle = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).numpy()
    next_row = np.empty(len(rows), dtype=np.int64)
    next_row[cycle] = np.roll(cycle, -1)
    first = np.full(len(rows), n, dtype=np.int64)
    np.minimum.at(first, row_of, np.arange(n))
    label = np.asarray(desirable, dtype=bool).astype(np.int64)
    by_label = np.full(2 * len(rows), n, dtype=np.int64)
    np.minimum.at(by_label, 2 * row_of + label, np.arange(n))
    target = next_row[row_of]
    same = by_label[2 * target + label]
    return np.where(same < n, same, first[target])


def _key(e: KTOExample) -> int:
    """A 64-bit digest of an example (its row id, label and token ids): the lookup key of its partner."""
    digest = content_key((e.prompt_ids, e.completion_ids, (int(e.row_id), int(bool(e.desirable)))))
    return int.from_bytes(digest[:8], "little")


class MismatchedCompletions:
    """Every loaded example's mismatched completion (see the module docstring), looked up by the
    example's content: the training and eval sets are paired separately (an eval split's row ids may
    repeat the training ones). An eval set of a single row takes the completion of the first
    training example with its label (it has no other row)."""

    def __init__(self, sets: Sequence[Sequence[KTOExample]], seed: int, max_len: int, name: str = "kto"):
        """``sets``: the training examples, then the eval examples (may be empty)."""
        self.sets = list(sets)
        self.max_len = max_len
        keys, partners, offset = [], [], 0
        labels_of = [np.array([bool(e.desirable) for e in examples], dtype=bool) for examples in self.sets]
        for i, (examples, desirable) in enumerate(zip(self.sets, labels_of)):
            row_ids = getattr(examples, "row_ids", None)
            row_ids = np.asarray([e.row_id for e in examples] if row_ids is None else row_ids)
            if i and len(examples) and len(np.unique(row_ids)) < 2:
                train = labels_of[0]
                same = [int(np.argmax(train == d)) if (train == d).any() else 0 for d in desirable]
                partners.append(np.asarray(same, dtype=np.int64))
            elif len(examples):
                try:
                    partners.append(offset + mismatched_partners(row_ids, desirable, seed))
                except ValueError as e:
                    raise ValueError(f"objective {name}: KTO's reference point pairs each prompt with another row's "
                                     f"completion; its {'eval' if i else 'training'} examples: {e}") from None
            keys.append(np.array([_key(e) for e in examples], dtype=np.uint64))
            offset += len(examples)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        # Identical examples (an eval split repeating training rows) share one key: the first keeps it.
        self.keys, first = np.unique(all_keys, return_index=True)
        self.partner = (np.concatenate(partners) if partners else np.zeros(0, np.int64))[first]
        self._all = Concat(*self.sets)  # partner indices count through the sets in order

    def partner_of(self, e: KTOExample) -> KTOExample:
        """The example whose completion is ``e``'s mismatched one."""
        key = np.uint64(_key(e))
        i = int(np.searchsorted(self.keys, key))
        if i >= len(self.keys) or self.keys[i] != key:
            raise KeyError(f"example of row {e.row_id} is not among the examples this objective was built with")
        return self._all[int(self.partner[i])]

    def completion(self, e: KTOExample) -> np.ndarray:
        """``e``'s mismatched completion, cut to fit ``max_len`` after ``e``'s prompt (its EOS kept last)."""
        other = np.asarray(self.partner_of(e).completion_ids)
        budget = self.max_len - len(e.prompt_ids)
        return other if len(other) <= budget else np.concatenate([other[:budget - 1], other[-1:]])

    def content(self, e: KTOExample) -> tuple:
        """What a reference cache row of ``e`` depends on: its prompt, completion and mismatched completion."""
        return (e.prompt_ids, e.completion_ids, self.completion(e))


# ---------------------------------------------------------------------------------------- the kind
@dataclass
class KTOConfig(ObjectiveConfig):
    """Unpaired binary feedback against a reference model."""

    beta: float = 0.1
    """Inverse temperature of the value function."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable examples (the paper suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples."""
    reference: Optional[str] = None
    """Reference model path. Unset: the policy's initial weights (with LoRA: the adapter disabled, no second copy)."""
    cache_reference: bool = False
    """Compute the reference log-probs of every completion and mismatched completion once before training and cache them on disk (keyed by the data, the pairing, the reference model, tokenizer and max_len; a stale cache is rebuilt). No reference model is kept in memory while training."""
    mismatch_seed: int = 0
    """Seed of the cycle over the rows that gives every example the completion its KL reference point pairs it with."""

    def check(self, where: str) -> None:
        try:
            check_kto_args(beta=self.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=self.undesirable_weight)
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None


_KL = "kl_"
"""Prefix of the mismatched pairs' batch entries (``kl_input_ids``, ...); ``prepare`` drops them."""


def kto_collate(pad_id: int, packing: bool, mismatched: MismatchedCompletions, cache: ExampleCache | None = None):
    """Examples -> a KTO micro-batch: the completions' batch (``collate_kto`` / ``pack_kto``), the
    mismatched pairs' batch under ``kl_`` keys, and with a reference cache ``ref_logps`` and
    ``ref_kl_logps`` ``[n]``."""
    main = KTO_EXAMPLES.collate_fn(pad_id, packing)
    if cache is not None:
        main = cache.attach(main, _put_reference)
    pairs = SFT.collate_fn(pad_id, packing)

    def kto_batch(examples):
        batch = main(examples)
        kl = pairs([SFTExample(e.row_id, e.prompt_ids, mismatched.completion(e)) for e in examples])
        batch.update({_KL + k: v for k, v in kl.items() if k != "row_ids"})
        return batch

    return kto_batch


def _put_reference(batch: dict, rows: dict) -> None:
    logps = rows["logps"]  # [n, 2]: completion, mismatched completion
    batch["ref_logps"], batch["ref_kl_logps"] = logps[:, 0], logps[:, 1]


def _pairs(batch: dict) -> dict:
    """The mismatched pairs' batch inside a KTO micro-batch."""
    return {k[len(_KL):]: v for k, v in batch.items() if k.startswith(_KL)}


class KTO(Objective):
    """KTO's loss on each example's summed completion log-probs (``objectives.kto``), with the
    reference point ``z0`` of the whole step (``prepare``); the reference is cached log-probs, a
    frozen model, or the LoRA policy with its adapter disabled. Unit: an example (a labeled completion)."""

    kind = "kto"
    config_class = KTOConfig
    examples = KTO_EXAMPLES
    cli_name = "KTO"
    seed_model = "reference"
    cfg: KTOConfig

    def __init__(self, cfg: KTOConfig, forward=None, packing: bool = False, *,
                 reference: torch.nn.Module | None = None, mismatched: MismatchedCompletions | None = None,
                 ref_cache: ExampleCache | None = None):
        super().__init__(cfg, forward, packing)
        self.reference = reference
        """A frozen reference model; None with a cache or an adapter-disabled LoRA policy."""
        self.mismatched = mismatched
        """Every example's mismatched completion (built from the objective's data)."""
        self.ref_cache = ref_cache

    @classmethod
    def build(cls, cfg, ctx: BuildContext):
        sel = ctx.run.selector
        if sel.enabled and sel.objective == cfg.name:
            raise ConfigError(f"selector.objective {cfg.name!r} is a kto objective: the selector weights rows of SFT, "
                              f"KD and preference-pair objectives (a KTO row may be two examples)")
        mismatched = MismatchedCompletions([ctx.data.train, ctx.data.eval], cfg.mismatch_seed, cfg.data.max_len,
                                           cfg.name)
        _log_balance(cfg, ctx.data.train)
        ref_path = cfg.reference or ctx.run.model.path
        if cfg.cache_reference:
            cache = _reference_cache(cfg, ctx, ref_path, mismatched)
            return cls(cfg, ctx.forward, ctx.packing, mismatched=mismatched, ref_cache=cache)
        reference = ctx.frozen_model(ref_path) if cfg.reference or not is_peft(ctx.policy) else None
        return cls(cfg, ctx.forward, ctx.packing, reference=reference, mismatched=mismatched)

    # ---------------------------------------------------------------- data
    def collate(self, pad_id):
        if self.mismatched is None:
            raise ValueError(f"objective {self.name}: kto batches need the examples' mismatched completions "
                             f"(build the objective with mismatched=MismatchedCompletions(...))")
        return kto_collate(pad_id, self.packing, self.mismatched, self.ref_cache)

    def row_units(self, batch):
        return torch.ones(int(batch["row_ids"].shape[0]), dtype=torch.float64)  # one per example

    # ---------------------------------------------------------------- the step
    def no_grad_logps(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Without grad, each ``[n]``: the policy's and the reference's summed log-probs of the
        mismatched pairs (``policy_kl``, ``ref_kl``) and the reference's of the completions (``ref``)."""
        n = self.num_seqs(batch)
        pairs = _pairs(batch)
        if not pairs:
            raise ValueError(f"objective {self.name}: the batch has no mismatched pairs (already prepared?)")
        with torch.no_grad():
            out = {"policy_kl": self.forward.sequence_logps(model, pairs, n)[0]}
            if "ref_logps" in batch:
                out["ref_kl"], out["ref"] = batch["ref_kl_logps"], batch["ref_logps"]
            elif self.reference is not None:
                out["ref_kl"] = self.forward.sequence_logps(self.reference, pairs, n)[0]
                out["ref"] = self.forward.sequence_logps(self.reference, batch, n)[0]
            else:
                with as_reference(self.forward.access.outer_module(model)):
                    out["ref_kl"] = self.forward.sequence_logps(model, pairs, n)[0]
                    out["ref"] = self.forward.sequence_logps(model, batch, n)[0]
        return out

    @staticmethod
    def _with_reference(batch: dict, logps: dict[str, torch.Tensor], z0: torch.Tensor) -> dict:
        """The batch as the loss takes it: no mismatched pairs; the completions' reference log-probs and ``z0``."""
        kept = {k: v for k, v in batch.items() if not k.startswith(_KL) and k != "ref_kl_logps"}
        return {**kept, "ref_logps": logps["ref"], "z0": z0}

    def prepare(self, model, batches: list[dict], step: StepContext) -> list[dict]:
        """z0 over every micro-batch of every rank (the module docstring), attached to each batch."""
        logps = step.comm.no_grad_forwards(model, self.no_grad_logps, batches,
                                           stage=f"{self.name}: KTO reference point")
        local = torch.zeros(2, dtype=torch.float64)
        for out in logps:
            kl_sum, kl_count = kto_kl_sums(out["policy_kl"], out["ref_kl"])
            local += torch.stack([kl_sum, kl_count]).double().cpu()
        total = step.comm.all_reduce_sum(local)  # one collective: the step's sum and count on every rank
        z0 = kto_reference_point(total[0], total[1])
        return [self._with_reference(b, out, z0) for b, out in zip(batches, logps)]

    def loss(self, model, batch):
        if "z0" not in batch:
            raise ValueError(f"objective {self.name}: a kto batch gets the step's reference point z0 in prepare()")
        sums, _ = self.forward.sequence_logps(model, batch, self.num_seqs(batch))
        c = self.cfg
        return kto_loss(sums, batch["ref_logps"], batch["desirable"], batch["z0"], beta=c.beta,
                        desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight)

    def measure(self, model, batch):
        """The loss with ``z0`` from this batch's own mismatched pairs (no collective: ranks may hold
        different numbers of evaluation batches)."""
        if "z0" in batch:
            return self.loss(model, batch)
        logps = self.no_grad_logps(model, batch)
        z0 = kto_reference_point(*kto_kl_sums(logps["policy_kl"], logps["ref_kl"]))
        return self.loss(model, self._with_reference(batch, logps, z0))

    # ---------------------------------------------------------------- seed command line
    @classmethod
    def add_seed_args(cls, parser):
        g = parser.add_argument_group("KTO (preference data, each pair split into a desirable and an undesirable "
                                      "example, or unpaired rows with prompt/completion/label; the _2 forms: obj_2's, "
                                      "when both objectives are KTO)")
        for sfx in ("", "_2"):
            g.add_argument(f"--kto_beta{sfx}", type=float, default=None, help="inverse temperature (default 0.1)")
            g.add_argument(f"--kto_desirable_weight{sfx}", type=float, default=None,
                           help="weight of desirable examples (default 1)")
            g.add_argument(f"--kto_undesirable_weight{sfx}", type=float, default=None,
                           help="weight of undesirable examples (default 1)")

    @classmethod
    def seed_fields(cls, args, pick):
        return {"beta": pick("kto_beta", 0.1), "desirable_weight": pick("kto_desirable_weight", 1.0),
                "undesirable_weight": pick("kto_undesirable_weight", 1.0)}


def _log_balance(cfg: KTOConfig, train: Sequence[KTOExample]) -> None:
    """Report lambda_D n_D / (lambda_U n_U), which the paper suggests keeping in [1, 4/3]."""
    store = getattr(train, "store", None)
    if store is not None and "desirable" in store.values:
        index = train.index if train.index is not None else slice(None)  # type: ignore[attr-defined]
        n_d = int(np.asarray(store.values["desirable"][index]).sum())
    else:
        n_d = sum(bool(e.desirable) for e in train)
    n_u = len(train) - n_d
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u) if cfg.undesirable_weight * n_u else float("inf")
    level = logging.INFO if 1.0 <= ratio <= 4 / 3 else logging.WARNING
    log.log(level, "objective %s: %d desirable and %d undesirable training examples; desirable_weight x n_D / "
            "(undesirable_weight x n_U) = %.3g (the KTO paper suggests 1 to 4/3)", cfg.name, n_d, n_u, ratio)


def _reference_cache(cfg: KTOConfig, ctx: BuildContext, ref_path: str, mismatched: MismatchedCompletions
                     ) -> ExampleCache:
    """The reference's summed log-probs of every train and eval example's completion and mismatched
    completion, ``[N, 2]``."""
    examples = Concat(ctx.data.train, ctx.data.eval)  # by position: no Python object per example
    meta = cache_meta(examples, mismatched.content, "reference", ref_path, ctx.tokenizer, cfg.data.max_len,
                      str(resolve_dtype(ctx.run.model.dtype)), mismatch_seed=cfg.mismatch_seed)
    collate = kto_collate(ctx.tokenizer.pad_token_id, ctx.packing, mismatched)

    def sums(model, batch):
        n = int(batch["row_ids"].shape[0])
        own = ctx.forward.sequence_logps(model, batch, n)[0]
        other = ctx.forward.sequence_logps(model, _pairs(batch), n)[0]
        return {"logps": torch.stack([own, other], 1)}, torch.arange(n)

    def build():
        return compute_rows(examples, ctx.frozen_model(ref_path), sums, collate,
                            ctx.eval_batch_size or cfg.micro_batch_size, ctx.engine)

    return load_or_build(ctx.cache_dir / f"ref-{cfg.name}.pt", examples, mismatched.content, meta, build, ctx.engine,
                         "reference log-probs")
