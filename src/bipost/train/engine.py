"""The one place that owns devices and distribution (Accelerate; DeepSpeed/FSDP behind it).

The training loop talks to ``Engine`` only: it never calls ``torch.distributed`` itself, so the
same loop runs on one CPU, one GPU, or many ranks under ``accelerate launch`` / ``torchrun`` /
``deepspeed``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


class Engine:
    def __init__(self, mixed_precision: str = "no", cpu: bool | None = None):
        from accelerate import Accelerator

        if cpu is None:
            cpu = not torch.cuda.is_available()
        self.acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision)

    # ------------------------------------------------------------ topology
    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world_size(self) -> int:
        return self.acc.num_processes

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def distributed_type(self) -> str:
        return str(self.acc.distributed_type).split(".")[-1]

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    # ------------------------------------------------------------ model / optimizer
    def prepare(self, *objs):
        return self.acc.prepare(*objs)

    def place(self, model):
        """Frozen helper models (reference, teacher): on the device, not wrapped for training."""
        return model.to(self.device)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def no_sync(self, model, enabled: bool):
        """Skip the gradient all-reduce on accumulation micro-steps (all but the last one)."""
        return self.acc.no_sync(model) if enabled and self.world_size > 1 else contextlib.nullcontext()

    def clip_grad_norm(self, model, max_norm: float) -> float:
        if max_norm and max_norm > 0:
            return float(self.acc.clip_grad_norm_(model.parameters(), max_norm))
        total = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        return float(torch.norm(torch.stack(total))) if total else 0.0

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------ collectives
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over ranks (identity on one rank)."""
        values = values.to(self.device, torch.float64)
        if self.world_size == 1:
            return values
        return self.acc.reduce(values, reduction="sum")

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=src)
        return box[0]

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def model_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Full (gathered) state dict of a prepared model, on every rank that needs it."""
        return self.acc.get_state_dict(model)

    def end(self) -> None:
        self.acc.end_training()
