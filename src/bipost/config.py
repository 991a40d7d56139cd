"""Typed run configuration: dataclasses whose attribute docstrings are the documentation.

Loaded from YAML, then ``a.b=c`` overrides (``objectives.0.weight=0.3``), then validated.
``bipost train --help`` prints every field with its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    """Where one objective's rows come from and how they become token-space examples."""

    path: str = ""
    """A local file (.jsonl/.json/.parquet/.csv), a folder of such files, or a Hugging Face dataset name."""
    split: str = "train"
    """Split to train on. For a folder, files whose name starts with the split name form that split."""
    eval_split: Optional[str] = None
    """Split to evaluate on (e.g. ``test``). When unset, ``eval_fraction`` of the rows are held out."""
    eval_fraction: float = 0.0
    """Fraction of the (capped) training rows held out for evaluation when there is no eval split; never overlaps training."""
    max_samples: Optional[int] = None
    """Read at most this many rows of the split (the first ones, in file order)."""
    max_eval_samples: Optional[int] = None
    """Evaluate on at most this many held-out rows."""
    format: str = "auto"
    """Row format: auto | input_output | prompt_completion | messages | preference. ``auto`` looks at the first row's keys."""
    input_key: str = "input"
    """Prompt column of the ``input_output`` format."""
    output_key: str = "output"
    """Response column of the ``input_output`` format."""
    input_template: str = "User: {}\nAssistant: "
    """Template the ``input_output`` prompt is rendered with (``{}`` is the input)."""
    prompt_key: str = "prompt"
    """Prompt column (``prompt_completion`` and ``preference`` formats); a preference row without it has an implicit prompt (the dialogues' common prefix)."""
    completion_key: str = "completion"
    """Completion column of the ``prompt_completion`` format."""
    messages_key: str = "messages"
    """Conversation column of the ``messages`` format (rendered with the tokenizer's chat template)."""
    chosen_key: str = "chosen"
    """Preferred response (string or conversation) of the ``preference`` format."""
    rejected_key: str = "rejected"
    """Dispreferred response of the ``preference`` format."""
    max_len: int = 512
    """Longest sequence in tokens (prompt + response + EOS). Responses are truncated to fit, the prompt is kept; a row with no room left for a response is skipped."""
    seed: int = 0
    """Seed of the held-out eval split."""
    cache_dir: Optional[str] = None
    """Folder of the tokenized data (memory-mapped token stores, reused by every run on the same inputs); default ``$BIPOST_CACHE/data``, else ``~/.cache/bipost/data``. Safe to delete while no run uses it."""
    num_proc: Optional[int] = None
    """Processes that tokenize a data set being cached for the first time; default: the usable cores, at most 8."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft). ``rank: 0`` means full fine-tuning."""

    rank: int = 0
    """LoRA rank r; 0 trains all weights instead."""
    alpha: float = 16.0
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. q_proj v_proj), or ``all-linear``."""
    save_merged: bool = False
    """Also save the final model with the adapter merged into the base weights."""


@dataclass
class ModelConfig:
    """The policy being trained."""

    path: str = ""
    """Hugging Face model name or local directory (any AutoModelForCausalLM)."""
    tokenizer: Optional[str] = None
    """Tokenizer name or path; defaults to ``path``."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on a GPU that supports it, else fp32) | float32 | bfloat16 | float16."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 if installed on GPU, else sdpa) | sdpa | eager | flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""
    compile: bool = False
    """torch.compile every decoder layer of the policy (dynamic shapes; the first steps are slow while it compiles) and fuse the lm_head chunks' elementwise work. Packed rows keep their attention inside the compiled layer where the varlen kernel runs (CUDA, half precision); the per-segment SDPA fallback stays eager."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA settings."""


@dataclass
class ObjectiveConfig:
    """One training objective with its own data, batch sizes and, where needed, reference or teacher."""

    kind: str = "sft"
    """sft | dpo | kd."""
    name: Optional[str] = None
    """Name used in logs and plots; defaults to ``kind`` (``kind_2`` when repeated)."""
    weight: float = 1.0
    """lambda_i: mixing weight (mix), draw probability (alright), gap weight (maxright), step share (sequential). Normalized to sum 1."""
    data: DataConfig = field(default_factory=DataConfig)
    """This objective's dataset."""
    batch_size: Optional[int] = None
    """Examples (pairs for DPO) per optimizer step, over all ranks; defaults to ``train.batch_size``."""
    micro_batch_size: Optional[int] = None
    """Examples per forward on one rank; defaults to ``train.micro_batch_size``."""
    beta: float = 0.1
    """DPO: inverse temperature of the implicit reward."""
    loss_type: str = "sigmoid"
    """DPO: sigmoid (DPO) | ipo."""
    label_smoothing: float = 0.0
    """DPO: conservative DPO label smoothing epsilon in [0, 0.5)."""
    nll_coef: float = 0.0
    """DPO: coefficient of an extra NLL term on the chosen response (token mean per pair)."""
    reference: Optional[str] = None
    """DPO: reference model path. Unset: the policy's initial weights (with LoRA: the adapter disabled, no second copy)."""
    teacher: Optional[str] = None
    """KD: teacher model path (must share the policy's tokenizer)."""
    kd_loss: str = "forward"
    """KD: forward (teacher soft-label cross-entropy) | reverse (reverse KL) | jsd."""
    temperature: float = 1.0
    """KD: softmax temperature (the loss is scaled by T^2)."""
    jsd_beta: float = 0.5
    """KD: interpolation weight of the generalized JSD."""
    kd_topk: int = 0
    """KD: distil from the teacher's k most likely tokens at each position, their probabilities renormalized to sum to 1 (forward KD only; k = vocabulary size is exactly forward KD). 0: the full distribution."""
    cache_teacher: bool = False
    """KD with kd_topk: compute the teacher's top-k log-probs once before training and cache them on disk (8k bytes per response token; keyed by the data, teacher model, tokenizer, max_len, k and temperature; a stale cache is rebuilt). No teacher is kept in memory while training."""
    cache_reference: bool = False
    """DPO: compute the reference log-probs once before training and cache them on disk (keyed by the data, reference model, tokenizer and max_len; a stale cache is rebuilt). No reference model is kept in memory while training."""
    optimum: Optional[float] = None
    """f_i^*: the objective's optimal value, if known (maxright gaps, distance to ideal point)."""


@dataclass
class ScheduleConfig:
    """Which objective(s) run at each optimizer step."""

    name: str = "single"
    """single | sequential | mix | alright | maxright."""
    seed: int = 0
    """Seed of the schedule's own generator (alright draws); checkpointed."""
    max_eval_steps: int = 10
    """maxright: re-evaluate every objective without gradients every this many steps."""
    per_micro_step: bool = False
    """alright: draw the objective per micro-batch instead of per optimizer step."""
    lambda_decay: float = 0.0
    """bilevel: the upper-level weight u (the first objective's lambda) drops by this much after every pass over the second (lower-level) objective's data, clamped at 0 (seed flag --upperlevel_weight_decay)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    scheduler: str = "constant"
    """constant | linear | cosine (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the step budget."""
    min_lr_ratio: float = 0.0
    """cosine/linear: final LR as a fraction of the peak."""


@dataclass
class TrainConfig:
    """Step budget, batch sizes, logging, evaluation and checkpoints."""

    output_dir: str = "runs/bipost"
    """Run directory: resolved config, metrics.jsonl, checkpoints/, final/."""
    max_steps: Optional[int] = None
    """Optimizer steps. When unset: epochs x the steps one pass of the largest objective takes."""
    epochs: float = 1.0
    """Passes over the largest objective's data (used when max_steps is unset)."""
    batch_size: int = 8
    """Default examples per optimizer step for every objective (global, all ranks)."""
    micro_batch_size: int = 2
    """Default examples per forward per rank."""
    seed: int = 42
    """Seed for model init randomness, dropout and data order."""
    eval_steps: int = 0
    """Evaluate every objective's held-out loss every this many steps (0: only at the end if eval data exist)."""
    eval_batch_size: Optional[int] = None
    """Micro-batch size for evaluation; defaults to the objective's micro_batch_size."""
    save_steps: int = 0
    """Checkpoint every this many steps (0: only the final model)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: bool = False
    """Resume from the latest complete checkpoint in output_dir."""
    logging_steps: int = 1
    """Print / log metrics every this many steps."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks: tensorboard, wandb (metrics.jsonl is always written)."""
    wandb_project: str = "bipost"
    """wandb project name."""
    progress: bool = True
    """Show a progress bar."""
    early_stop_eps: Optional[float] = None
    """Stop at an evaluation where every objective's weighted gap lambda_i (f_i - f_i*) is <= eps (needs each objective's optimum)."""
    ref_pareto: list[list[float]] = field(default_factory=list)
    """Reference Pareto points (one loss per objective each): stop at an evaluation whose held-out losses dominate one of them."""
    packing: bool = False
    """Padding-free packing: each micro-batch is one row of its sequences laid end to end (DPO: each prompt once, shared by chosen and rejected); attention never crosses sequences. Needs attn_implementation sdpa or flash_attention_2."""
    prefetch: int = 1
    """Micro-batches each objective collates ahead in a background thread, so collation overlaps the GPU's work (0: collate in the training thread). Batches and resume state are the same either way."""
    logits: str = "auto"
    """How response log-probs come from hidden states: chunked (never holds full-vocabulary fp32 logits) | liger (Liger-Kernel fused linear cross-entropy, GPU) | plain (full logits, the reference path) | auto (chunked, measured faster than liger on an H100; plain for models with logit soft-capping or scaling)."""
    logits_chunk_size: int = 0
    """Positions per lm_head chunk (chunked logits and KD); 0 picks it so one chunk's fp32 logits take <= 256 MiB."""
    cache_dir: Optional[str] = None
    """Where cached reference log-probs are kept (objectives.N.cache_reference); default ``<output_dir>/cache``."""


@dataclass
class DistConfig:
    """How the run is distributed. Under ``accelerate launch`` the accelerate config decides; these
    fields let ``torchrun`` / ``deepspeed --module`` runs (and the seed command lines) pick an engine."""

    backend: str = "auto"
    """auto (what the launcher set up: DDP across ranks, or one device) | ddp | fsdp2 | deepspeed."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3) when backend is deepspeed (seed flag --zero_stage)."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (DeepSpeed/FSDP offload; seed flag --adam_offload)."""
    offload_reference: bool = False
    """Offload frozen reference/teacher weights to the CPU (seed flag --ref_offload)."""
    zero_hpz_partition_size: int = 1
    """DeepSpeed ZeRO++ hierarchical partition size (seed flag --zpg)."""


@dataclass
class SelectorConfig:
    """Bilevel data selection: one learned weight per training row of the lower-level objective
    (see ``bipost.selector``). Weights, ranks and a summary are written under
    ``<train.output_dir>/<selector.name>/``."""

    enabled: bool = False
    """Learn per-row weights of the lower-level objective while training (``bipost select`` turns it on)."""
    objective: Optional[str] = None
    """Name of the lower-level objective whose rows are weighted; defaults to the last objective."""
    activation: str = "softmax"
    """softmax (w = N * softmax(logits), mean weight 1) | sigmoid (w = 2 * sigmoid(logits), each in (0, 2))."""
    init: Optional[float] = None
    """Initial value of every logit; defaults to the seeds' 0.1 (softmax) or -1e-4 (sigmoid)."""
    lr: float = 1e-4
    """Learning rate of the selector's own Adam (seed flag --selector_learning_rate)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas of the selector (no weight decay)."""
    eps: float = 1e-8
    """Adam epsilon of the selector."""
    max_grad_norm: float = 10.0
    """Clip the selector's gradient norm to this (0 disables)."""
    scheduler: str = "constant"
    """Selector LR schedule over the run's steps: constant | linear | cosine (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps of the selector LR."""
    min_lr_ratio: float = 0.0
    """linear/cosine: final selector LR as a fraction of its peak."""
    update_every_step: bool = True
    """When the lower objective does not run in a step (upper weight u = 1, or a schedule that skipped it), measure its per-row losses on its next batch without gradients so the selector still takes its step, as the seeds do."""
    name: str = "selector"
    """Folder under train.output_dir for the weights, summaries and per-epoch models (seed flag --selector_name)."""
    formats: list[str] = field(default_factory=lambda: ["parquet", "jsonl"])
    """Weights file formats: parquet and/or jsonl (columns row_id, logit, weight, rank)."""
    every_epochs: int = 1
    """Write the weights and a summary every this many passes over the lower objective's data (0: only at the end)."""
    save_epoch_models: bool = True
    """With those per-epoch outputs, also save the model (the adapter with LoRA)."""
    summary_rows: int = 10
    """Rows with the highest and the lowest weights shown (with their text) in each summary."""


@dataclass
class RunConfig:
    """A bipost training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    """One or more objectives."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """How objectives share the optimizer steps."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distribution engine."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """Bilevel data selection (off unless enabled)."""
