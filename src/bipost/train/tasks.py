"""Objectives bound to models: a batch in, the pure loss function's ``ObjectiveOutput`` out.

This is the seam between the model world and the tensor functions in ``bipost.objectives``:
a task runs the forward passes its objective needs (policy, and reference or teacher) and
hands log-probs / logits to the pure loss. Adding an objective = adding a task class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bipost.config import ObjectiveConfig
from bipost.data.collate import collate_pref, collate_sft
from bipost.models import as_reference
from bipost.objectives import (
    ObjectiveOutput,
    dpo_loss,
    kd_loss,
    next_token_mask,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
)


def forward_logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@dataclass
class Task:
    """One objective of a run: its config and the frozen models it needs."""

    cfg: ObjectiveConfig

    @property
    def name(self) -> str:
        return self.cfg.name  # type: ignore[return-value]

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def collate(self, pad_id: int) -> Callable[[list], dict]:
        return lambda examples: collate_sft(examples, pad_id)

    def units(self, batch: dict) -> int:
        """Loss units in a batch (see the reduction contract): response tokens."""
        return int(next_token_mask(batch["labels"]).sum())

    def loss(self, model, batch: dict) -> ObjectiveOutput:
        raise NotImplementedError


class SFTTask(Task):
    def loss(self, model, batch):
        logps, mask = token_logprobs(forward_logits(model, batch), batch["labels"])
        return sft_loss(logps, mask)


class DPOTask(Task):
    """DPO on chosen+rejected in one forward; the reference is a frozen model or, with LoRA and no
    separate reference, the policy with its adapter disabled."""

    reference: torch.nn.Module | None = None

    def collate(self, pad_id):
        return lambda examples: collate_pref(examples, pad_id)

    def units(self, batch):
        return int(batch["row_ids"].shape[0])

    def reference_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is not None:
            with torch.no_grad():
                sums, _ = sequence_logprobs(forward_logits(self.reference, batch), batch["labels"])
        else:
            with as_reference(model):
                sums, _ = sequence_logprobs(forward_logits(model, batch), batch["labels"])
        return sums

    def loss(self, model, batch):
        n = batch["row_ids"].shape[0]
        if "ref_logps" in batch:  # precomputed (cached) reference log-probs
            ref = batch["ref_logps"]
        else:
            ref = self.reference_logps(model, batch)
        sums, counts = sequence_logprobs(forward_logits(model, batch), batch["labels"])
        c = self.cfg
        chosen_nll = -sums[:n] / counts[:n].clamp(min=1) if c.nll_coef > 0 else None
        return dpo_loss(
            sums[:n], sums[n:], ref[:n], ref[n:],
            beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing,
            chosen_nll=chosen_nll, nll_coef=c.nll_coef,
        )


class KDTask(Task):
    """Distillation from a frozen teacher sharing the tokenizer. Logits at position t predict token
    t+1, so the mask comes from the *shifted* labels (``next_token_mask``)."""

    teacher: torch.nn.Module | None = None

    def loss(self, model, batch):
        assert self.teacher is not None, "kd needs a teacher"
        with torch.no_grad():
            teacher_logits = forward_logits(self.teacher, batch)[:, :-1]
        student_logits = forward_logits(model, batch)[:, :-1]
        c = self.cfg
        return kd_loss(
            student_logits, teacher_logits, next_token_mask(batch["labels"]),
            kind=c.kd_loss, temperature=c.temperature, jsd_beta=c.jsd_beta,
        )


TASKS: dict[str, type[Task]] = {"sft": SFTTask, "dpo": DPOTask, "kd": KDTask}


def make_task(cfg: ObjectiveConfig) -> Task:
    return TASKS[cfg.kind](cfg)
