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

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from bipost.config import RunConfig
from bipost.data import eval_batches
from bipost.engine import Engine
from bipost.kinds import StepContext
from bipost.objectives import ObjectiveOutput
from bipost.schedules import StepPlan, make_schedule
from bipost.train import checkpoint as ckpt
from bipost.train.build import (
    ObjectiveRun,
    build_objectives,
    build_optimizer,
    build_policy_and_tokenizer,
    step_budget,
    steps_per_pass,
)
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
        self._tracker_ids: dict = {}
        """The trackers' run ids of the resumed run (they continue the same runs)."""
        for hook in self.hooks:
            hook.bind(self.hook_context())
        if cfg.train.resume:
            self._resume()
        self.metrics = MetricsWriter.for_run(cfg, enabled=self.engine.is_main, run_ids=self._tracker_ids)

    def hook_context(self) -> HookContext:
        per_pass = steps_per_pass(self.runs)
        return HookContext(
            output_dir=self.out, max_steps=self.max_steps, comm=self.engine,
            objectives={n: ObjectiveView(r.cfg, r.train, r.data.summary.rows_read, per_pass[n], r.eval,
                                         r.data.examples.name)
                        for n, r in self.runs.items()},
            measure=self.measure_rows, upper_weight=self.schedule.upper_weight,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            save_model=lambda folder: ckpt.save_model(self.engine, self.model, folder, tokenizer=self.tokenizer),
            model=self.model, tokenizer=self.tokenizer,
            log_table=lambda key, rows, step: self.metrics.table(key, rows, step),
        )

    # ------------------------------------------------------------------ setup helpers
    def _prepare_output_dir(self) -> None:
        t = self.cfg.train
        if self.engine.is_main:
            existing = ckpt.list_complete(self.out)
            if existing and not t.resume:
                raise FileExistsError(
                    f"{self.out} already holds checkpoints ({existing[-1].name}); pass train.resume=true "
                    f"to continue that run, or choose another train.output_dir"
                )
            self.out.mkdir(parents=True, exist_ok=True)
            if not t.resume and (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self.cfg), sort_keys=False))
        self.engine.barrier()

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            self.engine.print(f"[resume] no complete checkpoint in {self.out}; starting from scratch")
            return
        state = ckpt.load_checkpoint(path, self.engine, self.model, self.optimizer, self.scheduler)
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
        self.engine.print(f"[resume] from {path} (step {self.step})")

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "streams": {n: r.stream.state_dict() for n, r in self.runs.items()},
            "objectives": {n: r.objective.state_dict() for n, r in self.runs.items()},
            "schedule": self.schedule.state_dict(),
            "hooks": [h.state_dict() for h in self.hooks],
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
            scale = plan.weights[name] * self.engine.world_size / max(units[name], 1.0)
            for batch in micro_batches:
                micro += 1
                acc.tokens += int(batch["attention_mask"].sum())
                acc.add(name, self.forward_backward(name, batch, scale, sync=micro == last))
        grad_norm, lr = self.optimizer_step()
        losses, metrics, tokens = acc.reduce(self.engine, units)
        self.schedule.observe(step, losses)
        rec = {"step": step + 1, "ran": list(batches), "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        rec.update({f"loss/{n}": v for n, v in losses.items()})
        rec.update({f"probe/{n}": v for n, v in plan.probed.items()})
        rec.update({f"schedule/{k}": v for k, v in plan.info.items()})
        rec.update(metrics)
        rec.update({f"epoch/{n}": r.stream.epoch for n, r in self.runs.items()})
        for hook in self.hooks:
            rec.update(hook.after_step(step))
        return rec

    def draw(self, plan: StepPlan) -> dict[str, list[dict]]:
        """The step's micro-batches of every objective the plan runs (in the plan's order)."""
        return {n: [self.runs[n].stream.next()
                    for _ in range(plan.micro_batches[n] if plan.micro_batches else self.runs[n].accum)]
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
            out = self.runs[name].objective.loss(self.model, batch)
            for hook in self.hooks:
                out = hook.transform(name, batch, out)
            self.engine.backward(out.losses.sum() * scale)
        return out

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, optimizer step, LR step; the gradient norm before clipping and the step's LR."""
        grad_norm = self.engine.clip_grad_norm(self.model, self.cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    # ------------------------------------------------------------------ no-grad losses
    @torch.no_grad()
    def _no_grad_outputs(self, name: str, batches, filler: dict | None = None, pad: int = 0) -> list[ObjectiveOutput]:
        """Objective ``name``'s outputs on ``batches`` without gradients. Sharded engines gather
        parameters inside every forward, so a rank with fewer batches runs ``pad`` forwards of a
        filler batch whose output is not returned."""
        objective = self.runs[name].objective
        outs = [objective.measure(self.model, self.engine.to_device(b)) for b in batches]
        for _ in range(pad):
            objective.measure(self.model, self.engine.to_device(filler))  # type: ignore[arg-type]
        return outs

    def _global_loss(self, outs: list[ObjectiveOutput]) -> float:
        s = torch.zeros(2, dtype=torch.float64)
        for out in outs:
            s += torch.tensor([float(out.losses.double().sum()), float(out.units.double().sum())],
                              dtype=torch.float64)
        s = self.engine.all_reduce_sum(s).cpu()
        return float(s[0] / max(float(s[1]), 1.0))

    def _step_batches(self, name: str) -> list[dict]:
        run = self.runs[name]
        return [run.stream.next() for _ in range(run.accum)]

    def probe(self, names: list[str]) -> dict[str, float]:
        """No-grad loss of each named objective on one fresh step's worth of its batches."""
        self.model.eval()
        try:
            return {n: self._global_loss(self._no_grad_outputs(n, self._step_batches(n))) for n in names}
        finally:
            self.model.train()

    def measure_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_ids, per-row mean losses)`` of objective ``name``'s next step's batches on this rank,
        without gradients (for hooks: the selector when the lower objective did not run)."""
        self.model.eval()
        try:
            batches = self._step_batches(name)
            outs = self._no_grad_outputs(name, batches)
        finally:
            self.model.train()
        ids = torch.cat([b["row_ids"] for b in batches])
        return ids, torch.cat([(o.losses / o.units.clamp(min=1.0)).detach().double().cpu() for o in outs])

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of every objective that has eval data (global over ranks)."""
        self.model.eval()
        try:
            result = {}
            for n, r in self.runs.items():
                if not r.eval:
                    continue
                mbs = self.cfg.train.eval_batch_size or r.cfg.micro_batch_size
                collate = r.objective.collate(self.tokenizer.pad_token_id)
                batches = list(eval_batches(r.eval, mbs, collate, self.engine.rank, self.engine.world_size))
                pad = 0
                if self.engine.lockstep_forwards:  # rank 0 holds the most rows: ceil(N / W)
                    pad = math.ceil(math.ceil(len(r.eval) / self.engine.world_size) / mbs) - len(batches)
                filler = batches[0] if batches else collate([r.eval[0]])
                result[n] = self._global_loss(self._no_grad_outputs(n, batches, filler, pad))
            return result
        finally:
            self.model.train()

    # ------------------------------------------------------------------ checkpoints and evaluation
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.out, self.step, self.engine, self.model, self.optimizer,
                                    self.scheduler, self.trainer_state(), self.cfg.train.keep_last)

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
            self.stopped_early = self._should_stop(ev)
        # The hooks' measures of the same model (benchmarks, generations); every rank calls them.
        final = self.stopped_early is not None or self.step >= self.max_steps
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
        t = self.cfg.train
        result = RunResult(self.out, self.max_steps, self.out / "final")
        bar = None
        if t.progress and self.engine.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        if self.step == 0 and t.eval_steps:
            self._log_eval(result)
        while self.step < self.max_steps:
            t0 = time.perf_counter()
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
