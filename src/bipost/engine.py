"""The one place that owns devices and distribution: Accelerate, with torch FSDP2 or DeepSpeed behind it.

The training loop talks to ``Engine`` only: it never calls ``torch.distributed`` itself, so the
same loop runs on one CPU, one GPU, or many ranks under ``accelerate launch`` / ``torchrun`` /
``deepspeed``.

Which engine runs:

* ``accelerate launch`` with a DeepSpeed or FSDP config (``configs/accelerate/*.yaml``): that
  config decides; ``dist.*`` only fills what the config leaves ``auto`` (clipping) and a
  disagreeing ``dist.backend`` is reported.
* otherwise (``torchrun``, ``deepspeed --module``, a plain ``accelerate launch``, one process):
  ``dist`` decides. ``backend=auto`` is DeepSpeed when ``zero_stage > 0`` (the seeds'
  ``--zero_stage``), else DDP across ranks, or one device. ``fsdp2`` and ``deepspeed`` also run as
  a single process (a one-rank process group is set up).

Accelerate enables FSDP and DeepSpeed only on accelerators. On CPU (gloo) the engine switches
Accelerate's state to them after the process group exists, so the CPU tests run the very code
path GPUs run (DeepSpeed on CPU also needs ``DS_ACCELERATOR=cpu``).

Gradient accumulation is the loop's (objectives have their own micro-batch counts, which may vary
per step), so every engine is told "1" and the optimizer-step boundary is given per micro-batch
through :meth:`Engine.no_sync`.

Reliability (what keeps a many-rank run from hanging):

* Forwards outside the training step (evaluation, probes, the selector's measure, cache builds) go
  through :meth:`Engine.no_grad_forwards`, whatever the number of batches each rank holds: the one
  place that knows which engines run a collective inside a forward.
* Every collective has a timeout (``dist.timeout``); :meth:`Engine.stage` names what the run is
  doing, and a collective that fails or times out (a rank died, hung, or took another path)
  becomes a :class:`CollectiveError` naming that stage on the ranks that were waiting.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import faulthandler
import logging
import math
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from bipost.config import DistConfig
from bipost.models import is_peft

if TYPE_CHECKING:
    from bipost.config import RunConfig

log = logging.getLogger("bipost")

DS_STATE_TAG = "state"
"""Tag (sub-folder) of the DeepSpeed checkpoint inside a bipost checkpoint's ``sharded/``."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def accelerate_config_backend() -> str | None:
    """The engine an ``accelerate launch`` config chose ("deepspeed", "fsdp2"), or None."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp2"
    return None


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def resolve_backend(dist: DistConfig) -> str:
    """``dist.backend`` with ``auto`` resolved: deepspeed (zero_stage > 0) | fsdp2 | ddp.

    DeepSpeed is an optional extra. The seeds' command lines always pass ``--zero_stage``, so with
    ``auto`` a missing DeepSpeed means DDP (or one device) and a warning; asking for
    ``dist.backend=deepspeed`` explicitly without it is an error."""
    if dist.backend == "auto":
        if dist.zero_stage > 0 and not _deepspeed_installed():
            log.warning("dist.zero_stage=%d: DeepSpeed is not installed (pip install 'bipost[deepspeed]'); "
                        "running without ZeRO", dist.zero_stage)
            return "ddp"
        return "deepspeed" if dist.zero_stage > 0 else "ddp"
    if dist.backend == "deepspeed" and not _deepspeed_installed():
        raise ValueError("dist.backend=deepspeed needs DeepSpeed: pip install 'bipost[deepspeed]'")
    return dist.backend


def mixed_precision_for(dtype: torch.dtype) -> str:
    """Accelerate's mixed_precision for weights loaded in ``dtype`` under FSDP2 / DeepSpeed: both keep
    fp32 master copies of the trainable weights and compute in the load dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def deepspeed_config(dist: DistConfig, max_grad_norm: float, mixed_precision: str) -> dict:
    """The DeepSpeed config of a ``torchrun`` / ``deepspeed --module`` run (seed flags mapped):
    ``--zero_stage`` → stage, ``--adam_offload`` → optimizer states on the CPU, ``--zpg`` → ZeRO++
    hierarchical partitioning, ``--bf16`` (model.dtype) → bf16."""
    zero: dict[str, Any] = {
        "stage": dist.zero_stage,
        # the final model (and every checkpoint's model/) is exported gathered, in HF format
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist.zero_hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = dist.zero_hpz_partition_size
    return {
        "train_micro_batch_size_per_gpu": 1,  # informational only: the loop feeds micro-batches itself
        "gradient_accumulation_steps": 1,  # boundaries are set per micro-batch (Engine.no_sync)
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        # bipost's optimizer is torch AdamW; with optimizer offload DeepSpeed would insist on its own
        # DeepSpeedCPUAdam (a compiled extension). torch AdamW steps the CPU partitions instead.
        "zero_force_ds_cpu_optimizer": False,
    }


def frozen_deepspeed_config(train_cfg: dict, offload: bool) -> dict:
    """DeepSpeed config of a frozen model (reference, teacher): no optimizer, ZeRO-3 partitioned (its
    parameters offloaded to the CPU with ``offload``), same precision as the policy."""
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": copy.deepcopy(train_cfg.get("bf16", {"enabled": False})),
        "fp16": copy.deepcopy(train_cfg.get("fp16", {"enabled": False})),
    }


class CollectiveError(RuntimeError):
    """A collective operation failed or timed out on this rank: another rank died, hung, or ran a
    different sequence of collectives. The message names the stage this rank was in."""


# Messages of the errors gloo / NCCL raise when a peer is gone or a collective timed out (gloo raises
# plain RuntimeErrors; torch's DistError subclasses cover the rest).
_COLLECTIVE_MARKERS = ("third_party/gloo", "Timed out waiting", "Connection closed by peer",
                       "Connection reset by peer", "NCCL error", "NCCL communicator", "ncclRemoteError",
                       "ncclSystemError", "ncclInternalError", "Watchdog caught collective operation timeout")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed or timed-out collective (as opposed to a bug in this rank)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _COLLECTIVE_MARKERS)


def _ensure_process_group_env() -> None:
    """A one-rank process group for ``fsdp2`` / ``deepspeed`` started without a launcher."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


class LocalComm:
    """The engine's collectives in a single process (rank 0 of 1): for code that runs without a
    distributed engine (``bipost eval``, tests, tools) where an :class:`Engine` would be passed."""

    rank = 0
    world_size = 1
    is_main = True
    lockstep_forwards = False

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def any_rank(self, flag: bool) -> bool:
        return flag

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def stage(self, name: str):
        return contextlib.nullcontext()

    def no_grad_forwards(self, model, fn: Callable[[Any, dict], Any], batches: Sequence[dict], *,
                         filler: dict | None = None, stage: str) -> list:
        with torch.no_grad():
            return [fn(model, b) for b in batches]

    def print(self, *args: Any) -> None:
        print(*args, flush=True)


class ModelAccess:
    """Reaching through the wrappers a backend puts around a model (DDP and DeepSpeed's
    ``.module``, torch.compile's ``._orig_mod``, peft) and at its output head, whose weight FSDP2
    keeps as a DTensor and ZeRO-3 partitions. The objectives' forward code (``bipost.modeling``)
    asks this; it never inspects a backend itself. :class:`Engine` is one; code that runs without
    a distributed engine (tests, single-process tools) uses ``ModelAccess()``.
    """

    @staticmethod
    def outer_module(model):
        """The module inside DDP / DeepSpeed wrappers (peft and compile wrappers kept)."""
        while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        return model

    @classmethod
    def base_model(cls, model):
        """The transformers model inside DDP/DeepSpeed, torch.compile and peft wrappers."""
        while True:
            inner = cls.outer_module(model)
            if hasattr(inner, "_orig_mod"):
                inner = inner._orig_mod
            if inner is model:
                break
            model = inner
        return model.get_base_model() if is_peft(model) else model

    def output_head(self, model) -> tuple[torch.nn.Module, torch.Tensor]:
        """The output head module and its full weight (an FSDP2-sharded weight is gathered)."""
        head = self.base_model(model).get_output_embeddings()
        weight = head.weight
        if type(weight).__name__ == "DTensor":
            weight = weight.full_tensor()
        return head, weight

    def head_rows(self, model) -> int:
        """Rows of the output head (the vocabulary it scores); ZeRO-3 keeps the full shape aside."""
        weight = self.base_model(model).get_output_embeddings().weight
        return int(getattr(weight, "ds_shape", weight.shape)[0])

    def head_usable_outside_forward(self, model) -> bool:
        """False when the head's weight only exists during the model's own forward: DeepSpeed
        ZeRO-3 keeps it partitioned otherwise (``ds_id`` marks such a parameter)."""
        head = self.base_model(model).get_output_embeddings()
        return head is not None and not hasattr(head.weight, "ds_id")


class Engine(ModelAccess):
    """Topology, model wrapping, backward / accumulation, collectives and sharded state of one run.

    ``backend`` after construction: ``single`` | ``ddp`` | ``fsdp2`` | ``deepspeed``.
    """

    def __init__(self, dist: DistConfig | None = None, *, weights_dtype: torch.dtype = torch.float32,
                 max_grad_norm: float = 1.0, mixed_precision: str | None = None, cpu: bool | None = None):
        from accelerate import Accelerator

        from accelerate.utils import InitProcessGroupKwargs

        self.dist = dist or DistConfig()
        self.max_grad_norm = max_grad_norm
        self._switched_from: tuple | None = None
        """The accelerate state before :meth:`_switch_cpu_state` (restored by :meth:`reset`)."""
        self._stages: list[str] = []
        timeout = datetime.timedelta(seconds=self.dist.timeout)
        handlers = [InitProcessGroupKwargs(timeout=timeout)]  # the process group's (and DeepSpeed's) timeout
        if cpu is None:
            cpu = not torch.cuda.is_available()
        wanted = resolve_backend(self.dist)
        from_launcher = accelerate_config_backend()
        if from_launcher:
            if self.dist.backend != "auto" and wanted != from_launcher:
                log.warning("dist.backend=%s is ignored: the accelerate config chose %s", self.dist.backend,
                            from_launcher)
            self.acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers)
            if cpu:  # accelerate ignores FSDP / DeepSpeed configs on CPU; apply them as below
                plugin = self._launcher_plugin(from_launcher)
                self._switch_cpu_state(from_launcher, plugin, self.acc.mixed_precision)
        elif wanted in ("fsdp2", "deepspeed"):
            mp = mixed_precision or mixed_precision_for(weights_dtype)
            plugin = self._plugin(wanted, mp, offload=self.dist.offload_optimizer and not cpu)
            _ensure_process_group_env()
            if cpu:
                self.acc = Accelerator(cpu=True, mixed_precision=mp, kwargs_handlers=handlers)
                self._switch_cpu_state(wanted, plugin, mp)
            elif wanted == "fsdp2":
                self.acc = Accelerator(fsdp_plugin=plugin, mixed_precision=mp, kwargs_handlers=handlers)
            else:
                self.acc = Accelerator(deepspeed_plugin=plugin, mixed_precision=mp, kwargs_handlers=handlers)
        else:
            self.acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision or "no", kwargs_handlers=handlers)
        self._apply_timeout(timeout)
        self.backend = self._backend_of_state()
        self.offload_reference = self.dist.offload_reference and self.device.type != "cpu"
        """Frozen models' weights live in CPU memory (``dist.offload_reference``; moot on a CPU)."""
        if self.acc.gradient_accumulation_steps != 1:
            log.warning("the launcher's gradient_accumulation_steps=%d is ignored: bipost accumulates "
                        "batch_size / micro_batch_size micro-batches per objective itself",
                        self.acc.gradient_accumulation_steps)
            self.acc.gradient_accumulation_steps = 1
        if self.backend == "deepspeed":
            self._fill_deepspeed_auto(self.acc.state.deepspeed_plugin.deepspeed_config)

    @classmethod
    def for_run(cls, cfg: RunConfig) -> Engine:
        """The engine a run config asks for (``cfg.dist``, model dtype, clipping)."""
        from bipost.models import resolve_dtype

        return cls(cfg.dist, weights_dtype=resolve_dtype(cfg.model.dtype), max_grad_norm=cfg.optim.max_grad_norm)

    # ------------------------------------------------------------ construction helpers
    def _plugin(self, backend: str, mixed_precision: str, offload: bool):
        if backend == "fsdp2":
            from accelerate.utils import FullyShardedDataParallelPlugin

            return FullyShardedDataParallelPlugin(
                fsdp_version=2,
                auto_wrap_policy="transformer_based_wrap",  # one FSDP unit per decoder layer
                reshard_after_forward=True,  # ZeRO-3-like: parameters live sharded between uses
                cpu_offload=offload,  # FSDP2 offloads parameters, gradients and optimizer states together
                state_dict_type="SHARDED_STATE_DICT",
            )
        from accelerate.utils import DeepSpeedPlugin

        return DeepSpeedPlugin(hf_ds_config=deepspeed_config(self.dist, self.max_grad_norm, mixed_precision),
                               zero3_init_flag=self.dist.zero_stage == 3)

    @staticmethod
    def _launcher_plugin(backend: str):
        from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

        return DeepSpeedPlugin() if backend == "deepspeed" else FullyShardedDataParallelPlugin()

    def _switch_cpu_state(self, backend: str, plugin, mixed_precision: str) -> None:
        """What ``AcceleratorState`` does for FSDP / DeepSpeed on accelerators, done on CPU ranks
        whose gloo process group Accelerate has already created."""
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        state = self.acc.state
        self._switched_from = (state.distributed_type, state.__dict__.get("fsdp_plugin"),
                               state.__dict__.get("deepspeed_plugins"))
        if backend == "fsdp2":
            if mixed_precision != "no":
                plugin.set_mixed_precision(mixed_precision)
            state.fsdp_plugin = plugin
            state.distributed_type = DistributedType.FSDP
        else:
            plugin.set_mixed_precision(mixed_precision)
            plugin.select(_from_accelerator_state=True)
            state.deepspeed_plugins = plugin
            state.distributed_type = DistributedType.DEEPSPEED
            self.acc.deepspeed_engine_wrapped = None
        # every AcceleratorState() re-reads the process-level state (accelerate does the same)
        PartialState._shared_state["distributed_type"] = state.distributed_type

    def _apply_timeout(self, timeout: datetime.timedelta) -> None:
        """``dist.timeout`` on the default process group, also when it already existed (another engine
        in this process, or accelerate's ``to_kwargs`` dropping a value equal to its own default)."""
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()):
            return
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout  # torchtitan sets its timeouts so
        except ImportError:  # pragma: no cover - a torch without it keeps the timeout given at init
            pass
        else:
            _set_pg_timeout(timeout)
        if self.world_size > 1 and not faulthandler.is_enabled():
            # NCCL's watchdog ends a process whose collective timed out (the exception never reaches
            # Python): the Python stacks this prints then show the stage it was in.
            faulthandler.enable(all_threads=True)

    def _backend_of_state(self) -> str:
        kind = str(self.acc.distributed_type).split(".")[-1]
        if kind == "NO":
            return "single"
        if kind == "DEEPSPEED":
            return "deepspeed"
        if kind == "FSDP":
            if not self.acc.is_fsdp2:
                raise ValueError("bipost shards with FSDP2: set fsdp_version: 2 in the accelerate config "
                                 "(see configs/accelerate/fsdp2.yaml)")
            return "fsdp2"
        if kind.startswith("MULTI_"):
            return "ddp"
        raise ValueError(f"unsupported accelerate distributed type {kind}")

    def _fill_deepspeed_auto(self, ds: dict) -> None:
        """Values an accelerate DeepSpeed config leaves ``auto`` (accelerate would take them from
        dataloaders bipost does not hand it) and the settings bipost's loop relies on."""
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = 1
        if ds.get("train_batch_size") == "auto":
            del ds["train_batch_size"]
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = self.max_grad_norm
        if ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            log.warning("DeepSpeed gradient_accumulation_steps=%s is ignored: bipost accumulates itself",
                        ds["gradient_accumulation_steps"])
        ds["gradient_accumulation_steps"] = 1
        zero = ds.setdefault("zero_optimization", {})
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
        ds.setdefault("zero_allow_untested_optimizer", True)

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
    def zero_stage(self) -> int:
        """DeepSpeed ZeRO stage (0 for the other engines)."""
        if self.backend != "deepspeed":
            return 0
        return int(self.acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))

    @property
    def shards_parameters(self) -> bool:
        """Parameters are partitioned over ranks (FSDP2, ZeRO-3)."""
        return self.backend == "fsdp2" or self.zero_stage == 3

    @property
    def lockstep_forwards(self) -> bool:
        """Every forward is a collective (parameters are gathered on use), so every rank must run the
        same number of forwards of every model: FSDP2, ZeRO-3, or frozen models partitioned by ZeRO-3."""
        return self.shards_parameters or (self.backend == "deepspeed" and self.offload_reference)

    @property
    def shards_optimizer(self) -> bool:
        """Optimizer states are partitioned over ranks: checkpoints hold them per rank (``sharded/``)."""
        return self.backend in ("fsdp2", "deepspeed")

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    # ------------------------------------------------------------ model / optimizer
    def prepare(self, *objs):
        """Wrap the trained model and its optimizer (DDP, FSDP2 sharding, or a DeepSpeed engine)."""
        return self.acc.prepare(*objs)

    def reset(self) -> None:
        """Forget the prepared model and optimizer, so that this engine (or another, of any backend)
        can serve another training run in the same process (accelerate's ``free_memory``; DeepSpeed's
        engine is destroyed; a CPU process's accelerate state switched to FSDP / DeepSpeed is switched
        back, as accelerate keeps it per process)."""
        self.acc.free_memory()
        if self._switched_from is not None:
            from accelerate.state import PartialState

            state = self.acc.state
            state.distributed_type, state.fsdp_plugin, state.deepspeed_plugins = self._switched_from
            PartialState._shared_state["distributed_type"] = state.distributed_type
            self._switched_from = None

    def place(self, model):
        """A frozen helper model (reference, teacher), as the engine serves it best.

        * one device / DDP: a replica on the device; with ``dist.offload_reference`` its weights stay
          in CPU memory and each layer is moved to the device for its forward (accelerate hooks).
        * FSDP2: sharded like the policy, one unit per decoder layer (``offload_reference``: the
          shards live in CPU memory).
        * DeepSpeed: ZeRO-3 partitioned when the policy is ZeRO-3 (it was loaded partitioned) or with
          ``offload_reference`` (parameters offloaded to the CPU); otherwise a replica, like TRL does
          for ZeRO-1/2 (a frozen model has no gradients or optimizer states to partition).
        """
        model.eval()
        offload = self.offload_reference
        if self.backend == "fsdp2":
            return self._shard_frozen(model, offload)
        if self.backend == "deepspeed" and (self.zero_stage == 3 or offload):
            import deepspeed

            cfg = frozen_deepspeed_config(self.acc.state.deepspeed_plugin.deepspeed_config, offload)
            wrapped, *_ = deepspeed.initialize(model=model, config=cfg)
            wrapped.eval()
            return wrapped
        if offload:
            from accelerate import cpu_offload

            return cpu_offload(model, execution_device=self.device)
        return model.to(self.device)

    def _shard_frozen(self, model, offload: bool):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        offload_policy = CPUOffloadPolicy() if offload else OffloadPolicy()
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in list(model.modules())[1:]:
            if type(module).__name__ in blocks:
                fully_shard(module, offload_policy=offload_policy, reshard_after_forward=True)
        # The root unit (embeddings, final norm, head; tied weights stay in one unit) stays gathered
        # after a forward, like accelerate leaves the policy's head: objectives apply the head to
        # hidden states outside the model's forward (chunked log-probs, KD).
        fully_shard(model, offload_policy=offload_policy, reshard_after_forward=False)
        return model

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    @contextlib.contextmanager
    def no_sync(self, model, enabled: bool) -> Iterator[None]:
        """Mark an accumulation micro-step (all but the step's last micro-batch).

        DDP skips the gradient all-reduce. DeepSpeed is told it is not at the optimizer-step
        boundary (its ``step`` runs inside the boundary's backward). FSDP2 reduce-scatters on every
        micro-batch anyway: skipping it would keep unsharded gradients of the whole model alive.
        """
        if not enabled or self.world_size == 1 and self.backend != "deepspeed":
            yield
        elif self.backend == "deepspeed":
            self.acc.sync_gradients = False
            try:
                yield
            finally:
                self.acc.sync_gradients = True
        elif self.backend == "ddp":
            with self.acc.no_sync(model):
                yield
        else:
            yield

    def clip_grad_norm(self, model, max_norm: float) -> float | None:
        """Clip the global gradient norm (0: don't) and return it, before clipping. DeepSpeed clips
        inside its step with ``gradient_clipping`` and reports the norm it measured (None where it
        measures none: ``zero_optimization.compute_grad_norm=false``)."""
        if self.backend == "deepspeed":
            norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
            return float(norm) if norm is not None else None
        limit = max_norm if max_norm and max_norm > 0 else math.inf
        return float(self.acc.clip_grad_norm_(model.parameters(), limit))

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------ stages and failures
    @property
    def current_stage(self) -> str:
        """What the run is doing, outermost first (``train step 12 > maxright probe``)."""
        return " > ".join(self._stages) or "setup"

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Name what the run does inside: a collective that fails or times out in it (a rank died or
        hung) raises :class:`CollectiveError` naming the stage, on every rank that was waiting."""
        self._stages.append(name)
        try:
            with self._collective():
                yield
        finally:
            self._stages.pop()

    def _collective_error(self, err: BaseException) -> CollectiveError:
        return CollectiveError(
            f"rank {self.rank}/{self.world_size}: a collective operation failed during {self.current_stage} "
            f"(dist.timeout={self.dist.timeout:g}s): another rank died, hung, or ran different collectives; "
            f"see the other ranks' output. Cause: {err}")

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """A failed or timed-out collective inside becomes a :class:`CollectiveError` naming the current
        stage (the engine's own collectives use it too, so that they need no stage around them)."""
        try:
            yield
        except CollectiveError:
            raise
        except Exception as err:
            if is_collective_failure(err):
                raise self._collective_error(err) from err
            raise

    # ------------------------------------------------------------ no-grad forwards outside the step
    def forward_module(self, model):
        """What a no-grad forward of ``model`` goes through: DDP's wrapped module (a no-grad forward
        needs none of DDP's work, and the wrapper broadcasts its buffers in the first forward after a
        training step: a collective a rank without batches never joins), else the model itself
        (FSDP2 / DeepSpeed gather partitioned parameters inside their modules' hooks)."""
        from torch.nn.parallel import DistributedDataParallel

        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_grad_forwards(self, model, fn: Callable[[Any, dict], Any], batches: Sequence[dict], *,
                         filler: dict | None = None, stage: str) -> list:
        """``[fn(m, batch) for batch in batches]`` without gradients, ``model`` in eval mode, for
        forwards outside the training step, where ranks may hold different numbers of batches
        (evaluation, MAXRIGHT's probe, the selector's measure, reference / teacher cache builds).

        ``m`` is :meth:`forward_module` of ``model``; ``batches`` (a sequence: its length is read
        first) are moved to the device one at a time. On engines whose every forward is a collective
        (:attr:`lockstep_forwards`) the ranks first agree on the largest batch count (one all-reduce)
        and a rank with fewer runs uncounted forwards of ``filler`` (default: its first batch; needed
        when a rank may hold none). Every rank must call it, in the same order."""
        with self.stage(stage):
            pad = 0
            if self.lockstep_forwards and self.world_size > 1:
                counts = torch.zeros(self.world_size, dtype=torch.float64)
                counts[self.rank] = len(batches)
                pad = int(self.all_reduce_sum(counts).max().item()) - len(batches)
            if pad and filler is None:
                if not len(batches):
                    raise ValueError(f"{stage}: rank {self.rank} has no batches to run while other ranks do; "
                                     f"pass a filler batch")
                filler = batches[0]
            fwd = self.forward_module(model)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = [fn(fwd, self.to_device(b)) for b in batches]
                    for _ in range(pad):  # the same number of (parameter-gathering) forwards on every rank
                        fn(fwd, self.to_device(filler))  # type: ignore[arg-type]
            finally:
                model.train(was_training)
            return out

    # ------------------------------------------------------------ collectives
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over ranks (identity on one rank)."""
        values = values.to(self.device, torch.float64)
        if self.world_size == 1:
            return values
        with self._collective():
            return self.acc.reduce(values, reduction="sum")

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank (a collective: every rank calls it)."""
        return bool(self.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable) on every rank, e.g. a decision only the main rank can take."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        with self._collective():
            broadcast_object_list(box, from_process=src)
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` on one rank; for
        rare paths: a skipped step's rows, evaluation samples)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as tdist

        out: list = [None] * self.world_size
        with self._collective():
            tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        with self._collective():
            self.acc.wait_for_everyone()

    # ------------------------------------------------------------ the optimizer step
    def optimizer_step(self, optimizer, apply: bool) -> bool:
        """Apply the step's gradients (``apply``) or drop them; returns whether the weights changed.

        DeepSpeed has already stepped inside the boundary micro-batch's backward (accelerate's
        ``DeepSpeedEngineWrapper``), before the loop could look at the step's losses. Its ZeRO
        optimizers check the gradients for inf / NaN (fp16 always, bf16 with
        ``bf16.check_grad_overflow``, its default, fp32 through an invalid gradient norm) and skip
        such a step, clearing them; this reports what DeepSpeed did (``was_step_applied``)."""
        if self.backend == "deepspeed":
            return bool(self.acc.deepspeed_engine_wrapped.engine.was_step_applied())
        if apply:
            optimizer.step()
        else:
            scaler = getattr(self.acc, "scaler", None)
            if scaler is not None:
                # fp16 AMP: the loss scaler still backs off after an overflow (clip_grad_norm has
                # unscaled the gradients, which recorded the overflow for it).
                scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return apply

    def nonfinite_parameters(self, model) -> list[str]:
        """Names of the trained parameters holding inf / NaN on any rank (a collective: every rank
        calls it; sharded parameters are checked shard by shard where they live)."""
        named = [(n, p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad]
        flags = torch.zeros(len(named), dtype=torch.float64, device=self.device)
        for i, (_, p) in enumerate(named):
            t = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
            if type(t).__name__ == "DTensor":  # FSDP2: this rank's shard
                t = t.to_local()
            if t.numel():
                flags[i] = (~torch.isfinite(t.detach())).any().to(flags.device, flags.dtype)
        flags = self.all_reduce_sum(flags).cpu()
        return [n for (n, _), f in zip(named, flags.tolist()) if f > 0]

    # ------------------------------------------------------------ state
    def model_state_dict(self, model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Full (gathered) state dict of a prepared model, complete on the main rank (a collective:
        call it on every rank). ``trainable_only`` gathers just the trained weights (a LoRA
        adapter), not the frozen base."""
        if self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
        if self.backend == "deepspeed" and self.zero_stage == 3 and trainable_only:
            import deepspeed

            named = [(n, p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named} if self.is_main else {}
        state = self.acc.get_state_dict(model)  # DDP / ZeRO-1/2: local copy; ZeRO-3: gathered 16-bit
        if trainable_only:
            keep = {n for n, p in self.unwrap(model).named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in keep}
        return state

    @contextlib.contextmanager
    def local_model_init(self) -> Iterator[None]:
        """Build a model on this rank alone (e.g. for an export on the main rank): ZeRO-3's
        partitioned construction, which would wait for the other ranks, is switched off inside."""
        from transformers.integrations import deepspeed as hf_ds

        saved = hf_ds._hf_deepspeed_config_weak_ref
        hf_ds._hf_deepspeed_config_weak_ref = None
        try:
            yield
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved

    def save_sharded_state(self, model, optimizer, path: Path) -> None:
        """Trained weights and optimizer states, each rank writing its own partition (every rank calls).

        FSDP2: torch.distributed.checkpoint (DCP) files, one per rank, re-shardable to another world
        size. DeepSpeed: the engine's own checkpoint (fp32 master partitions, optimizer states), for
        the same world size.
        """
        if self.backend == "deepspeed":
            model.save_checkpoint(str(path), tag=DS_STATE_TAG, save_latest=False, exclude_frozen_parameters=True)
            return
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(model, optimizer), checkpoint_id=str(path))

    def load_sharded_state(self, model, optimizer, path: Path) -> None:
        """Inverse of :meth:`save_sharded_state` (every rank calls)."""
        if self.backend == "deepspeed":
            loaded, _ = model.load_checkpoint(str(path), tag=DS_STATE_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
        set_optimizer_state_dict(model, _inner_optimizer(optimizer), state["optimizer"])

    @staticmethod
    def _dcp_state(model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        return {
            "model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(model, _inner_optimizer(optimizer)),
        }


def _inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
