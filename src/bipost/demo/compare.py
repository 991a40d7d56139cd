"""The demo's comparison: sequential, mix, ALRIGHT and MAXRIGHT on two objectives that conflict.

Starting from the demo's SFT model (it answers "reverse: a b c" with "c b a"), the two objectives
ask for opposite things on the *same* prompts ("copy: a b c"):

* SFT teaches the copy task: the answer is "a b c";
* DPO prefers the reversed sequence "c b a" over a corrupted reversal, which is sometimes the
  copied sequence itself (``demo.data.preference_rows(task="copy", chosen_task="reverse")``).

Training one objective undoes the other, so the sequential method (SFT then DPO) forgets the
copy task in its second half, which the loss-space plot shows as a trajectory running back to
the right. The methods that train both objectives end nearer the ideal point, which the
comparison measures by training each objective alone on the same budget.

Both tasks have checkable answers, so each method's last evaluation also generates (greedily) for
every held-out prompt of both objectives (``eval.generate``): the *copy accuracy* is the exact
match of the generations with the SFT reference, the *reverse accuracy* their exact match with
DPO's chosen answer. On the same prompts the two cannot both be high; ``measures.png`` plots them.
"""

from __future__ import annotations

from pathlib import Path

from bipost.configio import load_config
import bipost.demo.data as D
from bipost.report.compare import Comparison, run_compare


def compare_config(out: Path, start_model: str | Path, steps: int, overrides: tuple[str, ...] = ()):
    """The comparison's config (also in ``configs/compare_demo.yaml``): data written under ``out/data``."""
    copy_sft = D.write_jsonl(out / "data" / "copy.jsonl", D.sft_rows(1500, task="copy", seed=10))
    reverse_pref = D.write_jsonl(out / "data" / "copy_prefers_reverse.jsonl",
                                 D.preference_rows(1500, task="copy", chosen_task="reverse", seed=11))
    return load_config(overrides=[
        f"model.path={start_model}", "schedule.name=alright",
        "objectives.0.kind=sft", "objectives.0.name=sft_copy", f"objectives.0.data.path={copy_sft}",
        "objectives.1.kind=dpo", "objectives.1.name=dpo_reverse", f"objectives.1.data.path={reverse_pref}",
        "objectives.1.beta=0.1",
        *[f"objectives.{i}.data.{k}" for i in (0, 1) for k in ("eval_fraction=0.05", "max_len=64")],
        f"train.max_steps={steps}", "train.batch_size=16", "train.micro_batch_size=16",
        f"train.eval_steps={max(1, steps // 10)}", "train.progress=false", f"train.output_dir={out}",
        "optim.lr=5e-4", "eval.generate=true", "eval.max_new_tokens=16", "eval.batch_size=80", *overrides,
    ])


def run_compare_demo(out: str | Path, start_model: str | Path, quick: bool = False) -> Comparison:
    """Run the comparison into ``out`` and print where its plot and table are."""
    out = Path(out)
    steps = 8 if quick else 120
    cfg = compare_config(out, start_model, steps)
    print(f"[demo] compare: SFT teaches 'copy: a b c' -> 'a b c' while DPO prefers 'c b a' on the same prompts; "
          f"sequential, mix, alright and maxright get {steps} steps each" +
          ("" if quick else ", then each objective is trained alone for the ideal point"), flush=True)
    names = [o.name for o in cfg.objectives]
    result = run_compare(cfg, out, ideal=not quick, measures=[f"gen/{n}/exact_match" for n in names])
    rows = {r["method"]: r for r in result.rows}
    for m, r in rows.items():
        dist = r["distance_to_ideal"]
        print(f"[demo]   {m:<10} final {names[0]} {r[f'f_{names[0]}']:.3f}, {names[1]} {r[f'f_{names[1]}']:.3f}"
              + (f", distance to ideal {dist:.3f}" if dist is not None else "")
              + f"; copy accuracy {_pct(r.get(f'gen/{names[0]}/exact_match'))}, reverse accuracy "
              + f"{_pct(r.get(f'gen/{names[1]}/exact_match'))}"
              + f"; {r['tokens_vs_sequential']:.2f}x sequential's tokens, {r['time_vs_sequential']:.2f}x its time",
              flush=True)
    print(f"[demo] compare: loss-space plot {result.plot}, accuracies {result.measures_plot}\n"
          f"[demo] compare: table {result.table_md} (and {result.table_json.name})", flush=True)
    return result


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"
