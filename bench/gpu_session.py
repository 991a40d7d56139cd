"""bench/run.py's GPU preset within a time limit, plus profiles: for one lent GPU session.

The whole ``bench/run.py --gpu`` takes longer than one device call may run. This runs the same
per-config workers (``bench/run.py --worker``: one subprocess per config, the same measurement
code), in priority order or in the order ``--only`` names them, skips whatever can no longer
finish before ``--deadline``, and writes the results JSON after every config. It adds
diagnostics in the same subprocess isolation: ``profile-*`` (per-phase wall time with a sync
around each phase, then a torch.profiler table of 3 steps), ``diag-*-b32`` (micro-batch 32)
and ``diag-*-cppwrap`` (inductor's C++ wrapper).

    python3 bench/gpu_session.py --out /tmp/bench --hh hh.jsonl.gz --deadline 500 --report $OUT \
        [--only NAME,NAME,...] [--no-checks]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec_ = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
br = importlib.util.module_from_spec(spec_)
sys.modules["bench_run"] = br
spec_.loader.exec_module(br)

# Diagnostic preset: the GPU preset with batch (= micro-batch) 32.
br.PRESETS["gpu-b32"] = dict(br.PRESETS["gpu"], batch=32)
br.PRESETS["cpu-b32"] = dict(br.PRESETS["cpu"], batch=32)


_MISSING = object()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ profiling workers
def _profile_summary(prof, steps: int, wall: float, label: str) -> list[str]:
    import torch

    ka = prof.key_averages()
    dev_us, kernels = 0.0, 0
    for e in ka:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            dev_us += getattr(e, "self_device_time_total", 0.0)
            kernels += e.count
    cpu_ops = sum(e.count for e in ka if not str(getattr(e, "device_type", "")).endswith("CUDA"))
    lines = [f"== profile {label}: {steps} steps, wall {wall / steps * 1e3:.1f} ms/step under the profiler; "
             f"GPU kernel time {dev_us / steps / 1e3:.1f} ms/step; {kernels / steps:.0f} kernels/step; "
             f"{cpu_ops / steps:.0f} CPU-side ops/step"]
    sort_dev = "self_device_time_total" if torch.__version__ >= "2.4" else "self_cuda_time_total"
    for key, n in (("self_cpu_time_total", 18), (sort_dev, 18)):
        try:
            lines.append(ka.table(sort_by=key, row_limit=n, max_name_column_width=60))
        except Exception as err:  # noqa: BLE001 - diagnostics only
            lines.append(f"(table by {key} failed: {err})")
    return lines


def profile_bipost(ws: Path, spec: dict, out: Path) -> dict:
    """Wall per phase (each phase synchronised) over 4 steps, then a torch.profiler trace of 3 steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bipost.configio import load_config
    from bipost.run import build_trainer

    torch.manual_seed(0)
    spec["total"] = 20
    cfg = load_config(overrides=br.bipost_overrides(ws, spec, out))
    trainer = build_trainer(cfg)

    def mean_step_s(first: int, last: int) -> float:
        _sync()
        t0 = time.perf_counter()
        for s in range(first, last):
            trainer.train_step(s)
        _sync()
        return (time.perf_counter() - t0) / (last - first)

    mean_step_s(0, 4)  # warm-up (and compilation)
    plain = mean_step_s(4, 8)  # no instrumentation
    # phases, each synchronised
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapped(*a, **kw):
            _sync()
            t = time.perf_counter()
            r = fn(*a, **kw)
            _sync()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
            return r
        return wrapped

    saved = []

    def wrap(obj, attr, name):
        saved.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, timed(name, getattr(obj, attr)))

    for r in trainer.runs.values():
        wrap(r.stream, "next", "data (stream.next: collate)")
        wrap(r.objective, "loss", "forward + loss (objective.loss)")
    wrap(trainer.engine, "backward", "backward")
    wrap(trainer.engine, "to_device", "to_device")
    wrap(trainer.engine, "clip_grad_norm", "clip_grad_norm (+ .item sync)")
    wrap(trainer.optimizer, "step", "optimizer.step")
    synced = mean_step_s(8, 12)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for obj, attr, prev in reversed(saved):  # the profile runs the unwrapped methods
        if prev is _MISSING:
            delattr(obj, attr)
        else:
            setattr(obj, attr, prev)
    _sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for s in range(12, 15):
            trainer.train_step(s)
        _sync()
        wall = time.perf_counter() - t0
    lines = [f"== phases {spec['name']}: plain step {plain * 1e3:.1f} ms; with a sync around each phase "
             f"{synced * 1e3:.1f} ms/step:"]
    lines += [f"   {k}: {v / 4 * 1e3:.1f} ms/step" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    lines += _profile_summary(prof, 3, wall, spec["name"])
    return {"name": spec["name"], "report": "\n".join(lines), "plain_step_s": plain}


def profile_trl(ws: Path, spec: dict, out: Path) -> dict:
    """torch.profiler over 3 TRL steps after 5 (TrainerCallback drives the profiler schedule)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    state = {}
    prof = profile(activities=acts, schedule=schedule(wait=4, warmup=1, active=3, repeat=1))

    class Prof(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            prof.start()

        def on_step_end(self, args, st, control, **kw):
            _sync()
            if st.global_step == 5:
                state["t0"] = time.perf_counter()
            if st.global_step == 8:
                state["wall"] = time.perf_counter() - state["t0"]
            prof.step()

        def on_train_end(self, args, st, control, **kw):
            prof.stop()

    from transformers import Trainer as HFTrainer

    orig_init = HFTrainer.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        self.add_callback(Prof())

    HFTrainer.__init__ = init
    spec = dict(spec, warmup=4, steps=6)
    res = br.run_trl(ws, spec, out)
    lines = _profile_summary(prof, 3, state.get("wall", float("nan")), spec["name"])
    return {"name": spec["name"], "report": "\n".join(lines), "tokens_per_s": res["tokens_per_s"]}


def worker_main(spec: dict, out: Path) -> None:
    ws = out / f"work-{spec['preset']}"
    run_out = out / "runs" / spec["name"].replace("/", "-")
    run_out.mkdir(parents=True, exist_ok=True)
    try:
        if spec.get("profile"):
            res = (profile_bipost if spec["framework"] == "bipost" else profile_trl)(ws, spec, run_out)
        else:
            res = br.worker(spec, ws, out)
    except Exception as err:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        res = {"name": spec["name"], "error": f"{type(err).__name__}: {err}"}
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------ orchestration
def plan(preset: str) -> list[tuple[dict, float, str]]:
    """(spec, seconds it needs to be started, script) in priority order."""
    specs = {s["name"]: s for s in br.configs(preset, None)}
    # The last full GPU run's order: the comparison rows first, then the schedules, then the rest.
    core = ["bipost-sft-compiled/synthetic", "trl-sft-padded/synthetic", "trl-sft-packed-liger/synthetic",
            "bipost-dpo-compiled/synthetic", "trl-dpo-precompute/synthetic", "trl-dpo-precompute-liger/synthetic",
            "bipost-sft-compiled/hh", "bipost-sft-compiled-tokmatch/hh", "trl-sft-packed/hh", "trl-sft-packed-liger/hh",
            "bipost-dpo-compiled/hh", "trl-dpo-precompute/hh", "trl-dpo-precompute-liger/hh",
            "sched-sequential-online-ref", "sched-alright", "sched-maxright", "sched-mix",
            "bipost-sft/synthetic", "bipost-dpo/synthetic", "bipost-sft/hh", "bipost-dpo/hh", "bipost-kd/hh"]
    bench = str(ROOT / "bench" / "run.py")
    me = str(Path(__file__).resolve())
    out = [(specs[n], 60.0 if "compiled" in n else 30.0, bench) for n in core if n in specs]
    big = preset + "-b32"
    sft, dpo = specs["bipost-sft/synthetic"], specs["bipost-dpo/synthetic"]
    sft_c, dpo_c = specs.get("bipost-sft-compiled/synthetic", sft), specs.get("bipost-dpo-compiled/synthetic", dpo)
    trl_pad = specs["trl-sft-padded/synthetic"]
    out += [
        (dict(sft, name="profile-bipost-sft/synthetic", profile=True), 30.0, me),
        (dict(sft_c, name="profile-bipost-sft-compiled/synthetic", profile=True), 60.0, me),
        (dict(trl_pad, name="profile-trl-sft-padded/synthetic", profile=True), 30.0, me),
        (dict(dpo_c, name="profile-bipost-dpo-compiled/synthetic", profile=True), 60.0, me),
        (dict(sft_c, preset=big, name="diag-bipost-sft-compiled-b32/synthetic"), 60.0, me),
        (dict(trl_pad, preset=big, name="diag-trl-sft-padded-b32/synthetic"), 35.0, me),
        (dict(sft_c, name="diag-bipost-sft-compiled-cppwrap/synthetic", env={"TORCHINDUCTOR_CPP_WRAPPER": "1"}),
         75.0, bench),
        (dict(dpo_c, name="diag-bipost-dpo-compiled-cppwrap/synthetic", env={"TORCHINDUCTOR_CPP_WRAPPER": "1"}),
         75.0, bench),
    ]
    for n in ("sched-sequential-cached", "trl-sft-padded/hh", "bipost-sft-padded/hh", "bipost-dpo-online-ref/hh",
              "trl-sft-packed-ckpt/hh", "trl-dpo-precompute-ckpt/hh"):
        if n in specs:
            out.append((specs[n], 30.0, bench))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench")
    ap.add_argument("--hh", default=str(br.HH))
    ap.add_argument("--deadline", type=float, default=400.0, help="seconds from start: launch nothing that would end later")
    ap.add_argument("--report", default=None, help="folder for results JSON / table / profiles")
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--only", default=None, help="comma-separated config names to run (in plan order)")
    ap.add_argument("--no-checks", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if a.worker:
        worker_main(json.loads(a.worker), out)
        return 0
    t_start = time.perf_counter()
    import torch
    import transformers

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**32))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**36))
    if a.preset == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    report = Path(a.report or out)
    report.mkdir(parents=True, exist_ok=True)
    ws = br.build_workspace(a.preset, out, Path(a.hh))
    big = out / f"work-{a.preset}-b32"
    if not big.exists():
        big.symlink_to(ws)
    print(f"[{time.perf_counter() - t_start:6.1f}s] workspace ready", flush=True)
    checks = br.check_equivalence(ws, a.preset) if a.preset == "gpu" and not a.no_checks else []
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for line in checks:
        print(line, flush=True)
    print(f"[{time.perf_counter() - t_start:6.1f}s] checks done", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results, profiles, skipped = [], [], []
    todo = plan(a.preset)
    if a.only:
        want = a.only.split(",")
        todo = [t for t in todo if t[0]["name"] in want]
        todo.sort(key=lambda t: want.index(t[0]["name"]))
    for spec, need, script in todo:
        if a.steps:
            spec["steps"] = a.steps
        left = a.deadline - (time.perf_counter() - t_start)
        if left < need:
            skipped.append(spec["name"])
            print(f"skip {spec['name']}: {left:.0f}s left, needs ~{need:.0f}s", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, script, "--out", str(out), "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, env={**env, **spec.get("env", {})},
                                  timeout=max(left, 10))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"name": spec["name"], "error": proc.stderr[-300:]}
            if "error" in res:
                with (report / "errors.log").open("a") as f:
                    f.write(f"== {spec['name']}\n{proc.stderr[-6000:]}\n")
        except subprocess.TimeoutExpired:
            res = {"name": spec["name"], "error": f"timeout after {left:.0f}s"}
        res["wall_config_s"] = time.perf_counter() - t0
        if "report" in res:
            profiles.append(res)
            print(res["report"], flush=True)
            (report / "profiles.txt").write_text("\n\n".join(p["report"] for p in profiles) + "\n")
            msg = f"profile done ({res.get('plain_step_s', res.get('tokens_per_s'))})"
        else:
            results.append(res)
            msg = res.get("error") or (f"{res['tokens_per_s']:,.0f} tok/s (mean {res['tokens_per_s_mean']:,.0f}), "
                                       f"peak {res['peak']:,.2f} {res['peak_unit']}, "
                                       f"step {res['time'] / max(res['steps'], 1):.3f}s"
                                       + (f", MFU {100 * res['mfu']:.1f}%" if "mfu" in res else ""))
        print(f"[{time.perf_counter() - t_start:6.1f}s] ({res['wall_config_s']:5.1f}s) {spec['name']}: {msg}",
              flush=True)
        (report / "results-gpu.json").write_text(json.dumps({"partial": True, "checks": checks, "results": results,
                                                              "skipped": skipped}, indent=1))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for mod in ("trl", "liger_kernel", "accelerate", "datasets", "peft"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            versions[mod] = "missing"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    header = (f"device: {device}; {versions}; preset {a.preset} {br.PRESETS[a.preset]}; "
              f"{time.strftime('%Y-%m-%d %H:%M')} UTC; total {time.perf_counter() - t_start:.0f}s; skipped {skipped}")
    table = "\n".join(checks + [""] if checks else []) + br.fmt_table(results, a.preset == "gpu")
    (report / "results-gpu.json").write_text(json.dumps({"header": header, "versions": versions, "checks": checks,
                                                          "results": results, "skipped": skipped}, indent=1))
    (report / "table-gpu.md").write_text(header + "\n\n" + table + "\n")
    print("\n" + header + "\n\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
