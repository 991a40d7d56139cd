"""Typed run configuration: dataclasses whose attribute docstrings are the documentation.

Loaded from YAML, then ``a.b=c`` overrides (``objectives.0.weight=0.3``), then validated.
``bipost train --help`` prints every field with its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field and why."""


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
    """Row format: auto | input_output | prompt_completion | messages | preference | unpaired_preference (KTO), or a kind's own (grpo: prompt). ``auto`` looks at the first row's keys."""
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
    label_key: str = "label"
    """Boolean column of the ``unpaired_preference`` format (TRL's KTO data: ``prompt``, ``completion``, ``label``; true: a desirable completion)."""
    max_len: int = 512
    """Longest sequence in tokens (prompt + response + EOS). Responses are truncated to fit, the prompt is kept; a row with no room left for a response is skipped."""
    seed: int = 0
    """Seed of the held-out eval split."""
    cache_dir: Optional[str] = None
    """Folder of the tokenized data (memory-mapped token stores, reused by every run on the same inputs); default ``$BIPOST_CACHE/data``, else ``~/.cache/bipost/data``. Safe to delete while no run uses it."""
    num_proc: Optional[int] = None
    """Processes that tokenize a data set being cached for the first time; default: the usable cores, at most 8."""
    weight_key: Optional[str] = None
    """Column holding each row's loss weight, a number >= 0: the row counts that many times in its objective's loss, in the losses and in the loss units (weight 2 = the row twice, 0 = the row left out). Kept in the token store. Training rows only: held-out losses stay unweighted."""
    weights_file: Optional[str] = None
    """Per-row weights by original row id from a selector weights file (``weights.parquet`` / ``weights.jsonl``, or the folder of ``bipost select train`` holding one): soft selection instead of ``bipost select filter``. Applied when the data is loaded (the tokens are not rebuilt); multiplies ``weight_key``'s weights when both are set."""
    missing_weight: Optional[float] = None
    """With ``weights_file``: the weight of a training row the file does not list (e.g. one the selector held out for evaluation); unset: such a row is an error."""


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
    """One training objective with its own data and batch sizes. Each objective kind extends this
    with its own fields (e.g. DPO's ``beta``, KD's ``teacher``) in its module under ``bipost.kinds``;
    a config's ``objectives.N.kind`` picks the class."""

    kind: str = "sft"
    """The objective kind (see ``bipost train --help`` for each kind's own fields)."""
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
    optimum: Optional[float] = None
    """f_i^*: the objective's optimal value, if known (maxright gaps, distance to ideal point)."""

    aliases: ClassVar[dict[str, str]] = {}
    """Other names a kind accepts for its fields in configs (``{"loss_type": "loss"}``): the name a
    field had in earlier versions, so saved ``config.yaml`` files keep loading. Giving a field under
    both names is an error."""

    def check(self, where: str) -> None:
        """Reject values of this kind's own fields that cannot run (``where``: ``objectives.N``);
        raise ``ValueError`` naming the field. Kinds with fields override it."""


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
    resume: str = "false"
    """false: a fresh run (an output_dir that already holds checkpoints is an error) | true: continue from the latest complete checkpoint in output_dir (an error if there is none) | auto: continue if there is one, else start fresh, so that a requeued job runs the same command."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Settings that may differ from the checkpoint's when resuming, although they change the run's trajectory (e.g. optim.lr, world_size; a prefix such as objectives covers all under it). Without them such a difference is an error that lists every one; the step budget (max_steps, epochs), logging, evaluation and saving settings may always change."""
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals (sent by a scheduler before it stops a job, or Ctrl-C) on which every rank finishes the current step, writes a checkpoint and exits with code 75; a second one stops at once. Empty: the signals keep their default action."""
    max_skipped_steps: int = 5
    """A step whose loss or gradient norm is not finite (on any rank) is skipped: no optimizer or LR step, its gradients dropped, logged with its rows. This many skipped steps in a row stop the run with an error."""
    logging_steps: int = 1
    """Print / log metrics every this many steps."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks: tensorboard, wandb, mlflow, trackio (metrics.jsonl is always written). A resumed run continues the same wandb / mlflow / trackio run (their ids are kept in the checkpoint)."""
    wandb_project: str = "bipost"
    """Project name in wandb and trackio; experiment name in mlflow."""
    run_name: Optional[str] = None
    """Run name in the trackers; unset: wandb's own (``WANDB_NAME`` or a generated one), the output folder's name in mlflow and trackio."""
    mlflow_tracking_uri: Optional[str] = None
    """mlflow tracking server or store (``http://...``, ``file:/path``, ``sqlite:///...``); unset: ``MLFLOW_TRACKING_URI``, else mlflow's default."""
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
    timeout: float = 600.0
    """Seconds a collective may wait for the other ranks (every one: training steps, evaluation, cache builds, checkpoints). A rank that died or hung then surfaces as an error naming the stage instead of a run that waits forever. Keep it above the longest work one rank does alone (the main rank writing a checkpoint)."""


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
class BenchmarkConfig:
    """One lm-evaluation-harness task (``pip install 'bipost[eval]'``)."""

    task: str = ""
    """A task, group or tag name of lm-evaluation-harness (``mmlu``, ``arc_easy``, ``hellaswag``, ``gsm8k``, ...) or the path of a task YAML file; a YAML with local data (``dataset_path: json``, ``dataset_kwargs: {data_files: ...}``) runs offline."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; unset: the task's own default (0 when it has none)."""
    limit: Optional[float] = None
    """Evaluate at most this many documents of each task (a value < 1: that fraction of them); unset: all."""


@dataclass
class JudgeConfig:
    """What decides whether the policy's response beats the data's chosen one (win rate): a reward model or a reward function. Both responses to a prompt are scored; the higher score wins, a tie counts half."""

    model: Optional[str] = None
    """A reward model: any sequence-classification model with one output (local directory or hub name), scoring prompt + response (``bipost.rewards.RewardModel``)."""
    function: Optional[str] = None
    """A reward function instead: a built-in name or ``module:function`` with TRL's signature ``f(prompts, completions) -> list[float]`` (``bipost.rewards``); it gets the prompt and response texts."""
    batch_size: int = 8
    """Texts per reward-model forward."""
    max_length: Optional[int] = None
    """Truncate the reward model's inputs to this many tokens (unset: no truncation)."""
    dtype: str = "float32"
    """Reward model weights dtype: float32 | bfloat16 | float16 | auto."""

    @property
    def enabled(self) -> bool:
        return bool(self.model or self.function)


@dataclass
class EvalConfig:
    """What users measure besides held-out losses: benchmark scores (lm-evaluation-harness) and metrics of each objective's generations on its held-out rows. Measured at the run's held-out evaluations (``train.eval_steps``; always at the last one) on the model being trained, and by ``bipost eval`` on a saved run or model. Scores go to metrics.jsonl and every tracker; per evaluation, ``<output_dir>/eval/step-NNNNNNNN/`` holds the samples and benchmark results."""

    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    """lm-evaluation-harness tasks (each with its own few-shot count and limit). Every rank runs every benchmark on the same documents (a sharded model's forwards are collectives); rank 0 records the scores, as ``bench/<task>/<metric>``."""
    benchmark_steps: int = 0
    """Run the benchmarks at the held-out evaluations whose step is a multiple of this (a multiple of train.eval_steps; step 0 included); 0: at the last evaluation only."""
    benchmark_batch_size: int = 8
    """Requests per benchmark forward."""
    chat_template: bool = False
    """Render benchmark prompts with the tokenizer's chat template (lm-eval's apply_chat_template, few-shot examples as turns)."""
    generate: bool = False
    """Generate a response for each held-out prompt of each objective and score it: exact match and token F1 against the reference response (sft, kd: ``gen/<objective>/exact_match``, ``/f1``) or the chosen response (preference data), and the win rate against the chosen response when a judge is set (``gen/<objective>/win_rate``)."""
    objectives: list[str] = field(default_factory=list)
    """Objectives whose generations are scored (names); empty: every objective with held-out data."""
    generation_steps: int = 0
    """Score generations at the held-out evaluations whose step is a multiple of this (a multiple of train.eval_steps; step 0 included); 0: at the last evaluation only."""
    max_prompts: Optional[int] = None
    """Generate for at most this many held-out rows per objective (the first ones); unset: all of them."""
    max_new_tokens: int = 128
    """Longest generated response in tokens (a response cut here is counted in ``gen/<objective>/truncated``)."""
    batch_size: int = 16
    """Prompts per ``generate`` call (batched, with the KV cache)."""
    temperature: float = 0.0
    """0: greedy decoding; > 0: sampling, seeded by ``seed`` at every evaluation (the samples then depend on the number of ranks, which split the prompts)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1] (sampling only)."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all; sampling only)."""
    seed: int = 0
    """Seed of the sampling generator (each rank adds its rank)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The win-rate judge for preference objectives (off unless ``judge.model`` or ``judge.function`` is set)."""
    samples: bool = True
    """Write every evaluation's generations (prompt, generation, reference, scores) to ``<objective>.samples.jsonl`` (and a wandb table when wandb is on)."""

    @property
    def enabled(self) -> bool:
        return bool(self.benchmarks) or self.generate


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmarks and generation metrics (off unless ``eval.benchmarks`` or ``eval.generate`` is set)."""
