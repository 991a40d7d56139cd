"""The one training loop. Per optimizer step:

1. the schedule plans which objective(s) run and with what weights;
2. the step's micro-batches are drawn from those objectives' streams and their loss units
   counted over all ranks (the reduction contract in ``bipost.objectives.base``);
3. ``forward_backward`` per micro-batch, gradient sync only on the last one;
4. the optimizer step (clip, optimizer, LR);
5. the step's sums are all-reduced once and the global pre-update losses go back to the schedule.

Schedules, objectives, data and hooks plug in here without changing this file.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bipost.config import RunConfig
from bipost.data import eval_batches
from bipost.engine import Engine
from bipost.kinds import StepContext
from bipost.objectives import ObjectiveOutput
from bipost.objectives.base import per_unit
from bipost.schedules import StepPlan, make_schedule
from bipost.train import checkpoint as ckpt
from bipost.train import preempt
from bipost.train import resume as resuming
from bipost.train.build import (
    ObjectiveRun,
    build_objectives,
    build_optimizer,
    build_policy_and_tokenizer,
    step_budget,
    steps_per_pass,
)
from bipost.train.guard import NonFiniteGuard
from bipost.train.hooks import HookContext, ObjectiveView, StepHook
from bipost.train.metrics import MetricsWriter
from bipost.train.step_metrics import StepMetrics

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
    def __init__(self, cfg: RunConfig, engine: Engine | None = None, hooks: tuple[StepHook, ...] | list = ()):
        if cfg.selector.enabled and not hooks:
            raise ValueError("selector.enabled: build the run with bipost.run.build_trainer / bipost.run.train, "
                             "which adds the selector's hook")
        self.cfg = cfg
        self.hooks = list(hooks)
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
        self.evaluated_at = -1
        """The step of the last held-out evaluation (checkpointed: a resumed run knows whether its
        first step's evaluation already happened)."""
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps)
        self.signals = preempt.SignalFlag(cfg.train.save_on_signals)
        self._ds_applied = False
        self._tracker_ids: dict = {}
        """The trackers' run ids of the resumed run (they continue the same runs)."""
        for hook in self.hooks:
            hook.bind(self.hook_context())
        self._resume()
        self.metrics = MetricsWriter.for_run(cfg, enabled=self.engine.is_main, run_ids=self._tracker_ids)

    def hook_context(self) -> HookContext:
        per_pass = steps_per_pass(self.runs)
        return HookContext(
            output_dir=self.out, max_steps=self.max_steps, comm=self.engine,
            objectives={n: ObjectiveView(r.cfg, r.train, r.data.summary.rows_read, per_pass[n], r.eval,
                                         r.data.examples)
                        for n, r in self.runs.items()},
            measure=self.measure_rows, upper_weight=self.schedule.upper_weight,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            save_model=lambda folder: ckpt.save_model(self.engine, self.model, folder, tokenizer=self.tokenizer),
            model=self.model, tokenizer=self.tokenizer,
            log_table=lambda key, rows, step: self.metrics.table(key, rows, step),
        )

    # ------------------------------------------------------------------ setup helpers
    def _prepare_output_dir(self) -> None:
        # Decided on the main rank (train.resume false | true | auto), the same error raised on every rank.
        resuming.prepare_output_dir(self.out, self.cfg, self.engine)

    def settings(self) -> dict:
        """What a resumed run must share with this one (``resume.run_settings``)."""
        return resuming.run_settings(self.cfg, self.engine.world_size, self.max_steps)

    def _resume(self) -> None:
        # A verified checkpoint (a damaged one falls back to the previous), its settings checked.
        state = resuming.resume(self.out, self.engine, self.model, self.optimizer, self.scheduler, self.settings())
        if state is None:
            return
        self.step = state["step"]
        self.tokens = state.get("tokens", 0)
        self.elapsed = state.get("elapsed", 0.0)
        for name, s in state["streams"].items():
            self.runs[name].stream.load_state_dict(s)
        for name, s in state.get("objectives", {}).items():
            self.runs[name].objective.load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])
        self._tracker_ids = state.get("trackers", {})
        for hook, hs in zip(self.hooks, state.get("hooks", [])):
            hook.load_state_dict(hs)
        self.guard.load_state_dict(state.get("guard", {}))
        self.evaluated_at = state.get("evaluated_at", self.step)

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "streams": {n: r.stream.state_dict() for n, r in self.runs.items()},
            "objectives": {n: r.objective.state_dict() for n, r in self.runs.items()},
            "schedule": self.schedule.state_dict(),
            "hooks": [h.state_dict() for h in self.hooks],
            "guard": self.guard.state_dict(),
            "evaluated_at": self.evaluated_at,
            "trackers": self.metrics.run_ids(),
        }

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict:
        plan = self.schedule.plan(step, self.probe)
        batches = self.prepare(step, self.draw(plan))
        units = self.count_units(batches)
        acc = StepMetrics(self.engine.device)
        last = sum(len(b) for b in batches.values())
        micro = 0
        for name, micro_batches in batches.items():
            # Global mean over the step's units (DDP averages gradients over ranks, hence x world).
            scale = plan.weights[name] * self.engine.world_size / _denominator(units[name])
            for batch in micro_batches:
                micro += 1
                acc.tokens += int(batch["attention_mask"].sum())
                out = self.forward_backward(name, batch, scale, sync=micro == last)
                self.guard.record(name, batch, out.losses)
                acc.add(name, out)
        # The step's one all-reduce comes before the optimizer step: a non-finite global loss skips the
        # step on every rank, and a preemption signal on any rank stops every rank after it.
        acc.flags["signal"] = self.signals.local_flag()
        sums = acc.reduce(self.engine, units)
        self.signals.agree(sums.flags["signal"])
        grad_norm, lr, applied = self.optimizer_step(sums.losses)
        rec = {"step": step + 1, "ran": list(batches), "lr": lr, "grad_norm": grad_norm, "tokens": sums.tokens}
        if applied:
            self.schedule.observe(step, sums.losses)
            for hook in self.hooks:
                rec.update(hook.after_step(step))
        else:
            rec.update(self.guard.skipped(step, sums.losses, grad_norm, self.engine, self._ds_applied, self.model))
            for hook in self.hooks:
                hook.skipped_step(step)
        rec["skipped_steps"] = self.guard.total
        rec.update({f"loss/{n}": v for n, v in sums.losses.items()})
        rec.update({f"probe/{n}": v for n, v in plan.probed.items()})
        rec.update({f"schedule/{k}": v for k, v in plan.info.items()})
        rec.update(sums.metrics)
        rec.update({f"epoch/{n}": r.stream.epoch for n, r in self.runs.items()})
        return rec

    def draw(self, plan: StepPlan) -> dict[str, list[dict]]:
        """The step's micro-batches of every objective the plan runs (in the plan's order)."""
        return {n: [self.runs[n].stream.next() for _ in range(self.runs[n].objective.batches_to_draw(
                    plan.micro_batches[n] if plan.micro_batches else self.runs[n].accum))]
                for n, w in plan.weights.items() if w > 0}

    def prepare(self, step: int, batches: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Each objective's drawn micro-batches as its loss takes them (``Objective.prepare``)."""
        ctx = StepContext(step, self.engine, self.engine.to_device)
        return {n: self.runs[n].objective.prepare(self.model, mbs, ctx) for n, mbs in batches.items()}

    def count_units(self, batches: dict[str, list[dict]]) -> dict[str, float]:
        """Each objective's loss units in the step, over all ranks (one all-reduce, before any backward)."""
        local = []
        for name, micro_batches in batches.items():
            objective = self.runs[name].objective
            units = 0
            for b in micro_batches:
                u = objective.units(b)
                for hook in self.hooks:
                    u = hook.units(name, b, u)
                units += u
            local.append(units)
        total = self.engine.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).cpu()
        return {n: float(u) for n, u in zip(batches, total)}

    def forward_backward(self, name: str, batch: dict, scale: float, sync: bool) -> ObjectiveOutput:
        """One micro-batch of objective ``name``: its output (after the hooks) and the backward of
        ``scale`` x its loss sum; gradients are synchronized across ranks only when ``sync``."""
        batch = self.engine.to_device(batch)
        with self.engine.no_sync(self.model, enabled=not sync):
            out = _weigh(self.runs[name].objective.loss(self.model, batch), batch)
            for hook in self.hooks:
                out = hook.transform(name, batch, out)
            self.engine.backward(out.losses.sum() * scale)
        return out

    def optimizer_step(self, losses: dict[str, float]) -> tuple[float | None, float, bool]:
        """Clip, then the optimizer and LR steps if the step's global ``losses`` and gradient norm are
        finite (the same decision on every rank); gradients are dropped either way. Returns the
        gradient norm before clipping, the step's LR and whether the step counts (not skipped).
        DeepSpeed steps inside the last backward: ``_ds_applied`` says whether it changed the weights."""
        grad_norm = self.engine.clip_grad_norm(self.model, self.cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        finite = self.guard.finite(losses, grad_norm)
        self._ds_applied = self.engine.optimizer_step(self.optimizer, apply=finite)
        if self._ds_applied:
            self.scheduler.step()
        return grad_norm, lr, finite

    # ------------------------------------------------------------------ no-grad losses
    def _no_grad_outputs(self, name: str, batches, filler: dict | None = None) -> list[ObjectiveOutput]:
        """Objective ``name``'s measure on this rank's ``batches``, without gradients, the model in eval
        mode. Ranks may hold different numbers of batches: the engine keeps every rank's forwards in
        step (``Engine.no_grad_forwards``; ``filler`` is run uncounted where a rank needs one)."""
        objective = self.runs[name].objective
        return self.engine.no_grad_forwards(self.model, lambda m, b: _weigh(objective.measure(m, b), b), batches,
                                            filler=filler, stage=name)

    def _global_loss(self, outs: list[ObjectiveOutput]) -> float:
        s = torch.zeros(2, dtype=torch.float64)
        for out in outs:
            s += torch.tensor([float(out.losses.double().sum()), float(out.units.double().sum())],
                              dtype=torch.float64)
        s = self.engine.all_reduce_sum(s).cpu()
        return float(s[0] / _denominator(float(s[1])))

    def _step_batches(self, name: str) -> list[dict]:
        run = self.runs[name]
        return [run.stream.next() for _ in range(run.accum)]

    def probe(self, names: list[str]) -> dict[str, float]:
        """No-grad loss of each named objective on one fresh step's worth of its batches."""
        with self.engine.stage("probe"):
            return {n: self._global_loss(self._no_grad_outputs(n, self._step_batches(n))) for n in names}

    def measure_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_ids, per-row mean losses)`` of objective ``name``'s next step's batches on this rank,
        without gradients (for hooks: the selector when the lower objective did not run)."""
        batches = self._step_batches(name)
        with self.engine.stage("measure"):
            outs = self._no_grad_outputs(name, batches)
        ids = torch.cat([b["row_ids"] for b in batches])
        return ids, torch.cat([per_unit(o.losses, o.units).detach().double().cpu() for o in outs])

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of every objective that has eval data (global over ranks)."""
        result = {}
        with self.engine.stage(f"eval at step {self.step}"):
            for n, r in self.runs.items():
                if not r.eval:
                    continue
                mbs = self.cfg.train.eval_batch_size or r.cfg.micro_batch_size
                collate = r.objective.collate(self.tokenizer.pad_token_id)
                batches = list(eval_batches(r.eval, mbs, collate, self.engine.rank, self.engine.world_size))
                # a rank may hold no eval rows at all: its uncounted filler forwards need a batch
                filler = batches[0] if batches else collate([r.eval[0]])
                result[n] = self._global_loss(self._no_grad_outputs(n, batches, filler))
        return result

    # ------------------------------------------------------------------ checkpoints and evaluation
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.out, self.step, self.engine, self.model, self.optimizer,
                                    self.scheduler, self.trainer_state(), self.cfg.train.keep_last, self.settings())

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
        self.evaluated_at = self.step
        ev = self.evaluate()
        if ev:
            self.stopped_early = self._should_stop(ev)
        # The hooks' measures of the same model (benchmarks, generations); every rank calls them.
        final = self.stopped_early is not None or self.step >= self.max_steps
        with self.engine.stage(f"generation / benchmark evaluation at step {self.step}"):
            extra = {k: v for hook in self.hooks for k, v in hook.evaluate(self.step, final).items()}
        if ev or extra:
            rec = {"kind": "eval", "step": self.step, **{f"eval/{n}": v for n, v in ev.items()}, **extra}
            self.metrics.write(rec)
            result.eval_history.append({"step": self.step, **ev, **extra})
            self.engine.print("[eval] step %d: %s" % (self.step, ", ".join(f"{n}={v:.4f}" for n, v in
                                                                          {**ev, **extra}.items())))
            if self.stopped_early:
                self.engine.print(f"[early stop] step {self.step}: {self.stopped_early}")

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        with preempt.handling(self.signals):  # train.save_on_signals: checkpoint, then exit
            return self._train()

    def _train(self) -> RunResult:
        t = self.cfg.train
        result = RunResult(self.out, self.max_steps, self.out / "final")
        bar = None
        if t.progress and self.engine.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        # Also after resuming at an eval step whose evaluation did not happen (a preempted run saves
        # before it) ...
        if t.eval_steps and self.step % t.eval_steps == 0 and self.evaluated_at != self.step:
            self._log_eval(result)
        # ... and if it stops the run early, the resumed run stops as the uninterrupted one did.
        while self.step < self.max_steps and not (self.step and self.stopped_early):
            t0 = time.perf_counter()
            with self.engine.stage(f"train step {self.step + 1}"):  # names a hang or a dead rank
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
            if self.signals.stop:  # a signal reached some rank: checkpoint this step, exit (code 75)
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
            hook.on_end(self.step)
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


def _weigh(out: ObjectiveOutput, batch: dict) -> ObjectiveOutput:
    """The per-row weights of the batch, if it has any, applied (the reduction contract)."""
    return out.weighted(batch["weights"]) if "weights" in batch else out


def _denominator(units: float) -> float:
    """A step's unit count as a divisor. Weighted units may sum to less than 1 (one pair of weight
    0.5), so only an empty count (0: no loss either) is replaced."""
    return units if units > 0 else 1.0
