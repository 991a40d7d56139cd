"""The one training loop. Per optimizer step:

1. the schedule plans which objective(s) run and with what weights;
2. the step's micro-batches are drawn from those objectives' streams and their loss units
   counted over all ranks (the reduction contract in ``bipost.objectives.base``);
3. forward/backward per micro-batch, gradient sync only on the last one;
4. clip, optimizer step, LR step; the global pre-update losses go back to the schedule.

Schedules, objectives and data plug in here without changing this file.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bipost.config import RunConfig
from bipost.data import eval_batches
from bipost.schedules import make_schedule
from bipost.train import checkpoint as ckpt
from bipost.train import preempt
from bipost.train.engine import Engine
from bipost.train.guard import NonFiniteGuard
from bipost.train.metrics import MetricsWriter
from bipost.train.setup import (
    ObjectiveRun,
    build_objectives,
    build_optimizer,
    build_policy_and_tokenizer,
    step_budget,
    steps_per_pass,
)
from bipost.train.hooks import StepHook, hooks_from_config

log = logging.getLogger("bipost")


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    final_dir: Path
    train_losses: list[dict] = field(default_factory=list)
    """Per step: {"step", "ran": [...], name: global loss, ...}."""
    eval_history: list[dict] = field(default_factory=list)
    """Per evaluation: {"step", name: held-out loss, ...}."""
    wall_time: float = 0.0
    tokens: int = 0
    stopped_early: str | None = None


class Trainer:
    def __init__(self, cfg: RunConfig, engine: Engine | None = None, hooks: tuple[StepHook, ...] = ()):
        self.cfg = cfg
        self.hooks = [*hooks_from_config(cfg), *hooks]
        self.engine = engine or Engine.for_run(cfg)
        self.out = Path(cfg.train.output_dir)
        self._prepare_output_dir()
        from transformers import set_seed

        set_seed(cfg.train.seed)
        self.tokenizer, policy = build_policy_and_tokenizer(cfg)
        self.runs: dict[str, ObjectiveRun] = build_objectives(cfg, self.tokenizer, policy, self.engine)
        self.max_steps = step_budget(cfg, self.runs)
        optimizer, self.scheduler = build_optimizer(cfg.optim, policy, self.max_steps)
        # The LR scheduler is stepped by us, once per optimizer step (accelerate's wrapper would
        # step it once per rank).
        self.model, self.optimizer = self.engine.prepare(policy, optimizer)
        self.schedule = make_schedule(cfg.objectives, cfg.schedule, self.max_steps,
                                      steps_per_pass=steps_per_pass(self.runs),
                                      accum={n: r.accum for n, r in self.runs.items()})
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.stopped_early: str | None = None
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps)  # [issue 10] non-finite steps: skip, count, stop
        self.signals = preempt.SignalFlag(cfg.train.save_on_signals)  # [issue 10] preemption signals
        for hook in self.hooks:
            hook.bind(self)
        self._resume()  # [issue 10] train.resume false | true | auto is decided in ckpt.resume
        self.metrics = MetricsWriter(self.out, cfg.train.report_to, dataclasses.asdict(cfg),
                                     enabled=self.engine.is_main, wandb_project=cfg.train.wandb_project)

    # ------------------------------------------------------------------ setup helpers
    def _prepare_output_dir(self) -> None:
        # [issue 10] decided on the main rank, the same error raised on every rank (train.resume modes)
        ckpt.prepare_output_dir(self.out, self.cfg, self.engine)

    def _resume(self) -> None:
        # [issue 10] verified checkpoint (falls back to the previous one), settings diff, then load
        state = ckpt.resume(self.out, self.engine, self.model, self.optimizer, self.scheduler,
                            ckpt.run_settings(self.cfg, self.engine.world_size, self.max_steps))
        if state is None:
            return
        self.step = state["step"]
        self.tokens = state.get("tokens", 0)
        self.elapsed = state.get("elapsed", 0.0)
        for name, s in state["streams"].items():
            self.runs[name].stream.load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])
        for hook, hs in zip(self.hooks, state.get("hooks", [])):
            hook.load_state_dict(hs)
        self.guard.load_state_dict(state.get("guard", {}))  # [issue 10]

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "streams": {n: r.stream.state_dict() for n, r in self.runs.items()},
            "schedule": self.schedule.state_dict(),
            "hooks": [h.state_dict() for h in self.hooks],
            "guard": self.guard.state_dict(),  # [issue 10] skipped-step counters
        }

    # ------------------------------------------------------------------ one step
    def _count(self, name: str, batches: list[dict]) -> tuple[int, int]:
        task = self.runs[name].task
        units = 0
        for b in batches:
            u = task.units(b)
            for hook in self.hooks:
                u = hook.units(name, b, u)
            units += u
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return units, tokens

    def train_step(self, step: int) -> dict:
        plan = self.schedule.plan(step, self.probe)
        names = [n for n, w in plan.weights.items() if w > 0]
        batches = {
            n: [self.runs[n].stream.next()
                for _ in range(plan.micro_batches[n] if plan.micro_batches else self.runs[n].accum)]
            for n in names
        }
        counts = [self._count(n, batches[n]) for n in names]
        units = self.engine.all_reduce_sum(torch.tensor([c[0] for c in counts], dtype=torch.float64))
        world = self.engine.world_size
        total_micro = sum(len(b) for b in batches.values())
        # Sums stay on the device until the step's single all-reduce: a .cpu()/float() per
        # micro-batch would stall the host on every forward (measured as a fixed per-step cost on GPU).
        dev = self.engine.device
        sums = torch.zeros(len(names), dtype=torch.float64, device=dev)
        metric_sums: dict[str, torch.Tensor] = {}
        micro = 0
        for i, name in enumerate(names):
            task = self.runs[name].task
            # Global mean over the step's units (DDP averages gradients over ranks, hence x world).
            scale = plan.weights[name] * world / max(float(units[i]), 1.0)
            for batch in batches[name]:
                micro += 1
                batch = self.engine.to_device(batch)
                with self.engine.no_sync(self.model, enabled=micro < total_micro):
                    out = task.loss(self.model, batch)
                    for hook in self.hooks:
                        out = hook.transform(name, batch, out)
                    self.engine.backward(out.losses.sum() * scale)
                sums[i] += out.losses.detach().double().sum()
                self.guard.record(name, batch, out.losses)  # [issue 10] row ids, for a skipped step's log
                for k, v in out.metrics.items():
                    key = f"{name}/{k}"
                    pair = torch.stack([v.detach().double().sum(),
                                        torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device)])
                    metric_sums[key] = metric_sums.get(key, 0) + pair.to(dev)
        # [issue 10] The step's one all-reduce runs BEFORE the optimizer step: loss sums, tokens, this
        # rank's preemption flag (a signal on any rank stops every rank after this step) and metric sums.
        keys = sorted(metric_sums)
        flat = torch.cat([sums, torch.tensor([float(sum(c[1] for c in counts)), self.signals.local_flag()],
                                             dtype=torch.float64, device=dev)]
                         + [metric_sums[k] for k in keys])
        flat = self.engine.all_reduce_sum(flat).cpu()
        self.signals.agree(float(flat[len(names) + 1]))
        losses = {n: float(flat[i] / max(float(units[i]), 1.0)) for i, n in enumerate(names)}
        grad_norm = self.engine.clip_grad_norm(self.model, self.cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        # [issue 10] A non-finite global loss or gradient norm skips the step on every rank: no optimizer
        # or LR step, gradients dropped, no losses for the schedule, hooks told (guard.skipped raises
        # after train.max_skipped_steps in a row).
        finite = self.guard.finite(losses, grad_norm)
        applied = self.engine.optimizer_step(self.optimizer, apply=finite)  # DeepSpeed: what its step did
        if applied:
            self.scheduler.step()
        tokens = int(flat[len(names)])
        hook_metrics: dict = {}
        if finite:
            self.schedule.observe(step, losses)
            for hook in self.hooks:
                hook_metrics.update(hook.after_step(step))
        else:
            hook_metrics = self.guard.skipped(step, losses, grad_norm, self.engine, applied, self.model)
            for hook in self.hooks:
                hook.skipped_step(step)
        rec = {"step": step + 1, "ran": names, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "skipped_steps": self.guard.total}
        rec.update({f"loss/{n}": v for n, v in losses.items()})
        rec.update({f"probe/{n}": v for n, v in plan.probed.items()})
        rec.update({f"schedule/{k}": v for k, v in plan.info.items()})
        off = len(names) + 2
        for j, k in enumerate(keys):
            s, c = flat[off + 2 * j], flat[off + 2 * j + 1]
            rec[k] = float(s / max(float(c), 1.0))
        for n, r in self.runs.items():
            rec[f"epoch/{n}"] = r.stream.epoch
        rec.update(hook_metrics)
        return rec

    # ------------------------------------------------------------------ no-grad losses
    def _global_loss(self, name: str, batches, stage: str, filler: dict | None = None) -> float:
        """Loss of objective ``name`` over every rank's ``batches``, without gradients. [issue 10] The
        forwards go through ``engine.no_grad_forwards``: ranks may hold different numbers of batches
        on any engine (the engine pads where every forward is a collective)."""
        task = self.runs[name].task

        def sums(model, batch):
            out = task.loss(model, batch)
            return torch.stack([out.losses.detach().double().sum(), out.units.detach().double().sum()])

        with self.engine.stage(stage):
            outs = self.engine.no_grad_forwards(self.model, sums, batches, filler=filler, stage=name)
            s = torch.stack(outs).sum(0) if outs else torch.zeros(2, dtype=torch.float64)
            s = self.engine.all_reduce_sum(s).cpu()
        return float(s[0] / max(float(s[1]), 1.0))

    def probe(self, names: list[str]) -> dict[str, float]:
        """No-grad loss of each named objective on one fresh step's worth of its batches."""
        return {n: self._global_loss(n, [self.runs[n].stream.next() for _ in range(self.runs[n].accum)],
                                     stage="maxright probe") for n in names}

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of every objective that has eval data (global over ranks)."""
        result = {}
        for n, r in self.runs.items():
            if not r.eval:
                continue
            mbs = self.cfg.train.eval_batch_size or r.cfg.micro_batch_size
            collate = r.task.collate(self.tokenizer.pad_token_id)
            batches = list(eval_batches(r.eval, mbs, collate, self.engine.rank, self.engine.world_size))
            # a rank may hold no eval rows at all; its uncounted filler forwards need a batch
            filler = batches[0] if batches else collate([r.eval[0]])
            result[n] = self._global_loss(n, batches, f"eval at step {self.step}", filler)
        return result

    # ------------------------------------------------------------------ the loop
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.out, self.step, self.engine, self.model, self.optimizer,
                                    self.scheduler, self.trainer_state(), self.cfg.train.keep_last,
                                    ckpt.run_settings(self.cfg, self.engine.world_size, self.max_steps))  # [issue 10]

    def _should_stop(self, ev: dict[str, float]) -> str | None:
        """The seeds' early stopping, on held-out losses: near the ideal point, or past a reference front."""
        t = self.cfg.train
        objs = self.cfg.objectives
        if len(ev) < len(objs):
            return None
        f = [ev[o.name] for o in objs]
        if t.early_stop_eps is not None:
            gaps = [o.weight * (fi - o.optimum) for o, fi in zip(objs, f)]  # type: ignore[operator]
            if max(gaps) <= t.early_stop_eps:
                return f"every weighted gap to the optimum is <= {t.early_stop_eps} ({gaps})"
        for p in t.ref_pareto:
            if all(a <= b for a, b in zip(f, p)) and any(a < b for a, b in zip(f, p)):
                return f"held-out losses {f} dominate the reference point {p}"
        return None

    def _log_eval(self, result: RunResult) -> None:
        ev = self.evaluate()
        if ev:
            rec = {"kind": "eval", "step": self.step, **{f"eval/{n}": v for n, v in ev.items()}}
            self.metrics.write(rec)
            result.eval_history.append({"step": self.step, **ev})
            self.engine.print("[eval] step %d: %s" % (self.step, ", ".join(f"{n}={v:.4f}" for n, v in ev.items())))
            self.stopped_early = self._should_stop(ev)
            if self.stopped_early:
                self.engine.print(f"[early stop] step {self.step}: {self.stopped_early}")

    def train(self) -> RunResult:
        with preempt.handling(self.signals):  # [issue 10] train.save_on_signals handlers while the loop runs
            return self._train()

    def _train(self) -> RunResult:
        t = self.cfg.train
        result = RunResult(self.out, self.max_steps, self.out / "final")
        bar = None
        if t.progress and self.engine.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        # [issue 10] also after a resume at an eval step: a preempted run stopped before its evaluation
        if t.eval_steps and self.step % t.eval_steps == 0:
            self._log_eval(result)
        # [issue 10] ... and if that evaluation stops the run early, it stops as the uninterrupted run did
        while self.step < self.max_steps and not (self.step and self.stopped_early):
            t0 = time.perf_counter()
            with self.engine.stage(f"train step {self.step + 1}"):  # [issue 10] names a hang / dead rank
                rec = self.train_step(self.step)
            dt = time.perf_counter() - t0
            self.step += 1
            self.elapsed += dt
            self.tokens += rec["tokens"]
            rec["tokens_per_s"] = rec["tokens"] / max(dt, 1e-9)
            rec["elapsed"] = self.elapsed
            self.metrics.write(rec)
            result.train_losses.append({"step": rec["step"], "ran": rec["ran"],
                                        **{k[5:]: v for k, v in rec.items() if k.startswith("loss/")}})
            if bar is not None:
                bar.update(1)
                if self.step % max(1, t.logging_steps) == 0:
                    bar.set_postfix({**{k[5:]: f"{v:.4f}" for k, v in rec.items() if k.startswith("loss/")},
                                     "tok/s": f"{rec['tokens_per_s']:.0f}"})
            if self.signals.stop:  # [issue 10] a signal reached some rank: checkpoint this step, exit 75
                if bar is not None:
                    bar.close()
                preempt.save_and_stop(self, self.signals.received)
            if t.eval_steps and self.step % t.eval_steps == 0:
                self._log_eval(result)
                if self.stopped_early:
                    break
            if t.save_steps and self.step % t.save_steps == 0 and self.step < self.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        if not t.eval_steps or self.step % t.eval_steps != 0:
            self._log_eval(result)
        self.save_final()
        for hook in self.hooks:
            hook.on_end()
        result.wall_time = self.elapsed
        result.tokens = self.tokens
        result.stopped_early = self.stopped_early
        self.metrics.close()
        return result

    def save_final(self) -> None:
        final = self.out / "final"
        if self.engine.is_main and final.exists():
            shutil.rmtree(final)
        self.engine.barrier()
        ckpt.save_model(self.engine, self.model, final, tokenizer=self.tokenizer,
                        merged=self.cfg.model.lora.save_merged)
        self.engine.barrier()
        self.engine.print(f"[done] {self.step} steps; final model in {final}")


def train(cfg: RunConfig, engine: Engine | None = None) -> RunResult:
    return Trainer(cfg, engine).train()
