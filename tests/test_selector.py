"""The bilevel data selector: its math, its place in the loop, its outputs, and proof that it selects.

The proof plants rows that contradict the trusted task (dataset_1: "reverse: a b c" -> "c b a") in
dataset_2 and checks that the selector ranks them at the bottom, for an SFT lower level (wrong
answers in letters the task never uses, or the prompt copied as the answer) and for a DPO lower
level (preference pairs with flipped labels).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from bipost.config import ObjectiveConfig, ScheduleConfig, SelectorConfig
from bipost.configio import ConfigError, load_config
from bipost.demo import data as D
from bipost.schedules.bilevel import Bilevel
from bipost.run import build_trainer, train
from bipost.selector import SelectorWeights, filter_rows, read_weights, select_row_ids, write_weights
from bipost.train.metrics import read_metrics

from helpers import config, workspace


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: intra-op threads buy nothing, and on a busy machine their spinning made
    the training tests ~10x slower. One thread for this module, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FOREIGN = "klmnopqrst"
"""Letters the reverse task never outputs (its inputs use a-j)."""


def foreign_answer(seq: list[str], rng: random.Random) -> str:
    return " ".join(rng.choice(FOREIGN) for _ in seq)


def bottom_precision(table: dict, bad: set[int]) -> float:
    """Fraction of the len(bad) lowest-ranked rows that are planted ones."""
    order = sorted(zip(table["rank"], table["row_id"]))
    bottom = {r for _, r in order[-len(bad):]}
    return len(bottom & bad) / len(bad)


# ------------------------------------------------------------------------------------ planted data

def write_planted_sft(path: Path, n_clean: int = 32, n_bad: int = 16, seed: int = 5) -> tuple[set[int], int]:
    """Reverse rows with ``n_bad`` planted wrong answers (half in foreign letters, half the prompt
    copied), plus one unusable row (empty output), written as JSON lines with byte-level quirks the
    filter must preserve: CRLF endings, raw UTF-8, compact and reordered objects, trailing spaces,
    a blank line (not a row), no final newline. Returns (planted row ids, the skipped row's id)."""
    rng = random.Random(seed)
    n = n_clean + n_bad + 1
    skipped = n // 2
    planted = rng.sample([i for i in range(n) if i != skipped], n_bad)
    lines = []
    for i in range(n):
        seq = D.sample_seq(rng)
        row = {"input": D.make_prompt("reverse", seq), "output": D.answer("reverse", seq)}
        if i in planted:
            row["output"] = foreign_answer(seq, rng) if planted.index(i) % 2 else row["input"]
        if i == skipped:
            row["output"] = ""
        if i % 4 == 0:
            text = json.dumps({**row, "note": "ünïcödé ✓"}, ensure_ascii=False)
        elif i % 4 == 1:
            text = json.dumps(row, separators=(",", ":"))
        elif i % 4 == 2:
            text = json.dumps(dict(reversed(list(row.items())))) + "  "
        else:
            text = json.dumps(row)
        lines.append(text + ("\r\n" if i % 7 == 3 else "\n"))
        if i == 10:
            lines.append("\n")
    path.write_bytes("".join(lines).rstrip("\n").encode("utf-8"))
    return set(planted), skipped


def write_planted_pairs(path: Path, n_clean: int = 24, n_bad: int = 8, seed: int = 200) -> set[int]:
    """Pairs preferring the right reversal over a foreign-letter answer, ``n_bad`` of them flipped."""
    rng = random.Random(seed)
    bad = set(rng.sample(range(n_clean + n_bad), n_bad))
    rows = []
    for i in range(n_clean + n_bad):
        seq = D.sample_seq(rng)
        right, wrong = D.answer("reverse", seq), foreign_answer(seq, rng)
        chosen, rejected = (wrong, right) if i in bad else (right, wrong)
        rows.append({"prompt": f"User: {D.make_prompt('reverse', seq)}\nAssistant: ",
                     "chosen": chosen, "rejected": rejected})
    D.write_jsonl(path, rows)
    return bad


def selection_overrides(out: Path, data: Path, kind: str, rows: int, steps: int) -> list[str]:
    ws = workspace()
    return [f"model.path={ws / 'model'}", f"train.output_dir={out}", "train.progress=false",
            f"train.max_steps={steps}", "optim.lr=3e-3",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
            "objectives.0.batch_size=16", "objectives.0.micro_batch_size=16",
            f"objectives.1.kind={kind}", f"objectives.1.data.path={data}", "objectives.1.data.max_len=64",
            f"objectives.1.batch_size={rows}", f"objectives.1.micro_batch_size={rows // 2}",
            # A warmup keeps the selector still while the model is still random (every row's loss
            # is then the same up to noise, and Adam would turn that noise into unit-size steps).
            "selector.lr=0.05", "selector.warmup_steps=10"]


# ------------------------------------------------------------------------------------ the math

def test_softmax_weights_have_mean_one_and_sigmoid_starts_near_one():
    soft = SelectorWeights(range(5), SelectorConfig(activation="softmax"), total_steps=10)
    assert soft.logits.dtype == torch.float32 and soft.logits.tolist() == pytest.approx([0.1] * 5)
    torch.testing.assert_close(soft.weights(), torch.ones(5))
    with torch.no_grad():
        soft.logits.copy_(torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0]))
    soft._cache = None
    assert float(soft.weights().mean()) == pytest.approx(1.0, abs=1e-6)
    sig = SelectorWeights(range(5), SelectorConfig(activation="sigmoid"), total_steps=10)
    # 2 * sigmoid(-1e-4) = 2 / (1 + e^1e-4) = 1 - 5e-5 (to first order)
    torch.testing.assert_close(sig.weights(), torch.full((5,), 1 - 5e-5), rtol=0, atol=1e-7)  # fp32


def test_selector_step_is_the_hand_derived_adam_step():
    """Rows 10, 20, 30 (softmax, w = 1); the step's rows are 10 and 30 with losses 2.0 and 0.5, so
    J = (w_10 * 2 + w_30 * 0.5) / 2 and, with dw_j/dw_k = w_j (delta_jk - p_k), p_k = 1/3:

        g_10 = (2 * (1 - 1/3) + 0.5 * (0 - 1/3)) / 2 =  7/12
        g_20 = (2 * (0 - 1/3) + 0.5 * (0 - 1/3)) / 2 = -5/12
        g_30 = (2 * (0 - 1/3) + 0.5 * (1 - 1/3)) / 2 = -1/6       (they sum to 0: softmax is shift-invariant)

    |g| = sqrt(78)/12 < 10, so no clipping. Adam's bias-corrected first step is lr * g / |g| per
    coordinate: every logit moves by exactly lr against its gradient's sign."""
    lr = 0.01
    sel = SelectorWeights([30, 10, 20], SelectorConfig(lr=lr), total_steps=10)
    stats = sel.step(torch.tensor([10, 30]), torch.tensor([2.0, 0.5]))
    assert stats["objective"] == pytest.approx(1.25)
    torch.testing.assert_close(sel.logits.grad, torch.tensor([7 / 12, -5 / 12, -1 / 6]))
    assert stats["grad_norm"] == pytest.approx(78 ** 0.5 / 12)
    torch.testing.assert_close(sel.logits.detach(), torch.tensor([0.1 - lr, 0.1 + lr, 0.1 + lr]), rtol=0, atol=1e-7)
    # with max_grad_norm 0.1 the same gradient is scaled to norm 0.1 (Adam's first step is unchanged)
    clipped = SelectorWeights([10, 20, 30], SelectorConfig(lr=lr, max_grad_norm=0.1), total_steps=10)
    clipped.step(torch.tensor([10, 30]), torch.tensor([2.0, 0.5]))
    assert float(clipped.logits.grad.norm()) == pytest.approx(0.1, rel=1e-5)


def test_sigmoid_gradient_is_loss_times_sigmoid_slope():
    """w = 2 sigmoid(x): dJ/dx_k = loss_k * 2 s(1 - s) / M for the step's rows, 0 for the others."""
    sel = SelectorWeights([0, 1, 2], SelectorConfig(activation="sigmoid", lr=0.01), total_steps=10)
    sel.step(torch.tensor([0, 2]), torch.tensor([3.0, 1.0]))
    s = torch.sigmoid(torch.tensor(-1e-4))
    slope = float(2 * s * (1 - s))
    torch.testing.assert_close(sel.logits.grad, torch.tensor([3.0 * slope / 2, 0.0, 1.0 * slope / 2]))


def test_weights_are_keyed_by_original_row_id_and_order_free():
    """Ids with gaps (skipped rows) in any order: lookups by id; a step's rows in shuffled order
    (or split across ranks) give the very same update; an unknown id is an error."""
    ids = [7, 3, 12, 40]
    a = SelectorWeights(ids, SelectorConfig(lr=0.1), total_steps=10)
    b = SelectorWeights(list(reversed(ids)), SelectorConfig(lr=0.1), total_steps=10)
    a.step(torch.tensor([12, 3, 40]), torch.tensor([1.0, 2.0, 4.0]))
    b.step(torch.tensor([40, 12, 3]), torch.tensor([4.0, 1.0, 2.0]))
    torch.testing.assert_close(a.logits, b.logits)
    by_id = dict(zip(a.table()["row_id"], a.table()["weight"]))
    assert a.weights_of(torch.tensor([40, 7])).tolist() == pytest.approx([by_id[40], by_id[7]])
    assert a.table()["rank"].tolist() == [1, 2, 3, 4] and by_id[40] == min(by_id.values())  # the highest loss
    with pytest.raises(KeyError, match=r"\[5\]"):
        a.weights_of(torch.tensor([3, 5]))


def test_bilevel_schedule_decays_u_per_epoch_and_clamps_at_zero():
    objs = [ObjectiveConfig(name="up", weight=0.5), ObjectiveConfig(name="low", weight=0.5)]
    sched = Bilevel(objs, ScheduleConfig(name="bilevel", lambda_decay=0.2), max_steps=12,
                    steps_per_pass={"up": 5, "low": 3})
    us = [sched.upper_weight(s) for s in range(12)]
    assert us == pytest.approx([0.5] * 3 + [0.3] * 3 + [0.1] * 3 + [0.0] * 3)  # 0.5 - 0.6 -> 0, not -0.1
    plan = sched.plan(4, probe=None)
    assert plan.weights == pytest.approx({"up": 0.3, "low": 0.7})
    with pytest.raises(ConfigError, match="exactly two"):
        config(Path("/tmp/unused"), "schedule.name=bilevel", kinds=("sft", "dpo", "kd"))


def test_selector_config_is_validated():
    cfg = config(Path("/tmp/unused"), "selector.enabled=true", kinds=("sft", "dpo"))
    assert (cfg.selector.objective, cfg.schedule.name) == ("dpo", "mix")  # the last objective; mix kept
    for bad, match in (((), "needs two objectives"), (("selector.objective=kd",), "not an objective name"),
                       (("selector.activation=relu",), "softmax or sigmoid"), (("selector.formats=csv",), "parquet")):
        with pytest.raises(ConfigError, match=match):
            config(Path("/tmp/unused"), "selector.enabled=true", *bad, kinds=("sft",) if not bad else ("sft", "dpo"))


def test_select_row_ids_criteria_and_ties():
    w = {0: 1.5, 1: 0.2, 2: 1.0, 3: 1.0, 4: 0.9}
    assert select_row_ids(w, top_k=2) == {0, 2}  # 2 and 3 tie: the lower row id wins
    assert select_row_ids(w, top_p=0.6) == {0, 2, 3}  # round(0.6 * 5) = 3
    assert select_row_ids(w, min_weight=0.95) == {0, 2, 3}
    with pytest.raises(ValueError, match="exactly one"):
        select_row_ids(w, top_k=1, top_p=0.5)


# ------------------------------------------------------------------------------------ filter

def test_filter_copies_csv_records_and_parquet_rows_unchanged(tmp_path):
    """CSV records (one spans two lines, CRLF endings) are copied byte for byte under the header;
    Parquet keeps its schema and the kept rows' values; a folder is filtered file by file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_text = ('input,output\r\n"reverse: a b","b a"\r\n"reverse: c\nd",d c\r\n'
                'reverse: e f,"f e"\r\n\r\nreverse: g h,h g')
    (tmp_path / "d.csv").write_bytes(csv_text.encode())
    res = filter_rows({0: 1.0, 1: 2.0, 2: 0.1, 3: 3.0}, tmp_path / "d.csv", tmp_path / "kept.csv", top_k=2)
    assert (tmp_path / "kept.csv").read_bytes() == b'input,output\r\n"reverse: c\nd",d c\r\nreverse: g h,h g'
    assert (res.kept, res.weighted) == (2, 4)

    folder = tmp_path / "folder"
    folder.mkdir()
    table = pa.table({"input": ["p0", "p1", "p2"], "output": ["r0", "r1", "r2"], "n": pa.array([0, 1, 2], pa.int8())})
    pq.write_table(table, folder / "train-a.parquet")
    (folder / "train-b.jsonl").write_text('{"input": "p3", "output": "r3"}\n{"input": "p4", "output": "r4"}\n')
    res = filter_rows({0: 0.0, 1: 5.0, 2: 4.0, 3: 3.0, 4: 0.5}, folder, tmp_path / "out", top_p=0.6)
    kept = pq.read_table(tmp_path / "out" / "train-a.parquet")
    assert kept.schema == table.schema and kept.to_pylist() == table.take([1, 2]).to_pylist()
    assert (tmp_path / "out" / "train-b.jsonl").read_text() == '{"input": "p3", "output": "r3"}\n'
    with pytest.raises(ValueError, match="other data"):
        filter_rows({0: 1.0, 9: 1.0}, folder, tmp_path / "out2", top_k=1)


# ------------------------------------------------------------------------------------ the proof (SFT)
# Tuned for robustness: over 20 data/training seeds the bottom-k precision was >= 0.94 (mean 0.997)
# for SFT and 1.00 for DPO (docs/selector.md); the tests assert >= 0.8.

@pytest.fixture(scope="module")
def sft_pipeline(tmp_path_factory):
    """`bipost select pipeline` on planted SFT data: select (40 steps; the lower batch is the whole
    dataset, 2 micro-batches), keep the top 2/3 of the rows, then retrain 2 steps on them."""
    from bipost.cli.main import main

    root = tmp_path_factory.mktemp("select")
    data = root / "noisy.jsonl"
    planted, skipped = write_planted_sft(data)
    out = root / "run"
    args = selection_overrides(out, data, "sft", rows=48, steps=40)
    args += ["selector.every_epochs=20"]
    code = main(["select", "pipeline", *args, "--top-p", "0.6667", "--then-set", "train.max_steps=2"])
    assert code == 0
    return {"out": out, "data": data, "planted": planted, "skipped": skipped}


def test_planted_sft_rows_are_ranked_at_the_bottom(sft_pipeline):
    table, meta = read_weights(sft_pipeline["out"] / "selector" / "weights.parquet")
    precision = bottom_precision(table, sft_pipeline["planted"])
    print(f"bottom-16 precision (SFT lower level): {precision:.2f}")
    assert precision >= 0.8
    assert sum(table["weight"]) / len(table["weight"]) == pytest.approx(1.0, abs=1e-5)  # softmax: mean 1
    # keyed by original row id: the unusable row has no weight; every other row of the file has one
    assert sorted(table["row_id"]) == [i for i in range(49) if i != sft_pipeline["skipped"]]
    assert meta["data_path"] == str(sft_pipeline["data"]) and meta["rows_read"] == 49


def test_selector_writes_weights_and_summary_every_epoch_and_at_the_end(sft_pipeline):
    sel = sft_pipeline["out"] / "selector"
    for folder in (sel / "epoch-020", sel / "epoch-040", sel):
        parquet, _ = read_weights(folder / "weights.parquet")
        jsonl, _ = read_weights(folder / "weights.jsonl")
        assert {k: v.tolist() for k, v in parquet.items()} == {k: v.tolist() for k, v in jsonl.items()}
        assert list(parquet) == ["row_id", "logit", "weight", "rank"]
        assert parquet["rank"].tolist() == list(range(1, 49))
        assert (folder / "weights_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["bottom"][0]["row_id"] == parquet["row_id"][-1]
        assert set(summary["bottom"][0]["text"]) == {"prompt", "response"}
        assert "Lowest weights" in (folder / "summary.md").read_text()
    assert (sel / "epoch-020" / "model" / "model.safetensors").exists()
    assert json.loads((sel / "epoch-020" / "meta.json").read_text())["step"] == 20
    records = [r for r in read_metrics(sft_pipeline["out"] / "metrics.jsonl") if r.get("kind", "train") == "train"]
    assert all(r["selector/u"] == 0.5 for r in records)  # lambda_decay = 0: u stays lambda


def test_filtered_file_holds_exactly_the_kept_original_lines(sft_pipeline):
    table, _ = read_weights(sft_pipeline["out"] / "selector" / "weights.jsonl")
    keep = set(table["row_id"][:32])  # top 2/3 by rank
    lines = [ln for ln in sft_pipeline["data"].read_bytes().decode().splitlines(keepends=True) if ln.strip()]
    expected = "".join(lines[i] for i in range(len(lines)) if i in keep).encode()
    filtered = sft_pipeline["out"] / "filtered" / "noisy.jsonl"
    assert filtered.read_bytes() == expected
    assert load_config(sft_pipeline["out"] / "config.yaml").schedule.name == "bilevel"  # the selector's default
    retrain = load_config(sft_pipeline["out"] / "retrain" / "config.yaml")
    assert retrain.objectives[1].data.path == str(filtered) and not retrain.selector.enabled
    assert (sft_pipeline["out"] / "retrain" / "final" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ the proof (DPO)

def test_flipped_preference_pairs_are_ranked_at_the_bottom(tmp_path):
    """DPO lower level: pairs whose labels are flipped (a foreign-letter answer preferred over the
    right reversal) contradict both the trusted SFT data and the other pairs."""
    planted = write_planted_pairs(tmp_path / "pairs.jsonl")
    cfg = load_config(overrides=selection_overrides(tmp_path / "run", tmp_path / "pairs.jsonl", "dpo", rows=32,
                                                    steps=30) + ["selector.enabled=true", "schedule.name=bilevel",
                                                                "selector.every_epochs=0"])
    trainer = build_trainer(cfg)
    trainer.train()
    table, meta = read_weights(tmp_path / "run" / "selector")
    precision = bottom_precision(table, planted)
    print(f"bottom-8 precision (DPO lower level): {precision:.2f}")
    assert precision >= 0.8 and meta["kind"] == "dpo"


# ------------------------------------------------------------------------------------ loop integration

def selector_args(out: Path, *overrides: str) -> list[str]:
    """sft (upper, u from 1.0 decaying by 0.5 per pass of the lower data) + sft_2 (lower: 16 rows,
    2 steps per pass): u = 1, 1, 0.5, 0.5, 0, 0 — both ends of the clamp are exercised."""
    ws = workspace()
    return [f"model.path={ws / 'model'}", f"train.output_dir={out}", "train.progress=false", "train.max_steps=6",
            "train.batch_size=8", "train.micro_batch_size=8", "optim.lr=1e-3",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
            "objectives.0.weight=1.0", "objectives.1.kind=sft", f"objectives.1.data.path={ws / 'copy.jsonl'}",
            "objectives.1.data.max_len=64", "objectives.1.data.max_samples=16", "objectives.1.weight=0.0",
            "schedule.name=bilevel", "schedule.lambda_decay=0.5",
            "selector.enabled=true", "selector.lr=0.05", "selector.every_epochs=0", *overrides]


def selector_config(out: Path, *overrides: str):
    return load_config(overrides=selector_args(out, *overrides))


def test_selector_state_resumes_exactly(tmp_path):
    cfg = selector_config(tmp_path / "run", "train.save_steps=3", "selector.scheduler=cosine",
                          "objectives.1.micro_batch_size=4")
    full = train(cfg)
    assert [r["ran"] for r in full.train_losses] == [["sft"]] * 2 + [["sft", "sft_2"]] * 2 + [["sft_2"]] * 2
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind", "train") == "train"]
    # u = 1: the lower objective does not train the model, but the selector still steps on its losses
    assert all("selector/objective" in r for r in records)
    assert [r["selector/u"] for r in records] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    first, _ = read_weights(tmp_path / "run" / "selector")
    shutil.rmtree(tmp_path / "run" / "final")
    cfg.train.resume = True
    resumed = build_trainer(cfg)
    assert resumed.step == 3
    rest = resumed.train()
    assert rest.train_losses == full.train_losses[3:]
    again, _ = read_weights(tmp_path / "run" / "selector")
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in first.items()}  # bit-identical


def test_rows_are_the_loss_units_under_accumulation(tmp_path):
    """The lower objective counts rows: micro-batch 4 x accumulation 2 gives the same weighted losses
    and the same selector as one micro-batch of 8 (the global mean over the step's rows)."""
    big = train(selector_config(tmp_path / "big", "train.max_steps=3", "objectives.0.weight=0.5",
                                "objectives.1.weight=0.5"))
    small = train(selector_config(tmp_path / "small", "train.max_steps=3", "objectives.0.weight=0.5",
                                  "objectives.1.weight=0.5", "train.micro_batch_size=4"))
    for a, b in zip(big.train_losses, small.train_losses):
        assert a["sft_2"] == pytest.approx(b["sft_2"], rel=1e-5)
    wa, _ = read_weights(tmp_path / "big" / "selector")
    wb, _ = read_weights(tmp_path / "small" / "selector")
    assert wa["row_id"].tolist() == wb["row_id"].tolist()
    torch.testing.assert_close(torch.tensor(wa["logit"]), torch.tensor(wb["logit"]), rtol=0, atol=1e-5)


def test_two_ranks_hold_the_same_selector_as_one_rank(tmp_path, two_ranks):
    """torchrun, 2 ranks (DDP, gloo; the ``selector`` scenario of tests/two_ranks.py): each rank gathers
    both ranks' rows, so the selector is identical on both, and equal to one rank's with the same
    global batch (micro 4 x accumulation 2). The first pass has u = 1, so the selector's own no-grad
    measurement of the lower losses runs too."""
    ranks = two_ranks("selector")
    assert ranks[0]["logits"] == ranks[1]["logits"]
    single = build_trainer(selector_config(tmp_path / "single", *DIST_OVERRIDES))
    result = single.train()
    torch.testing.assert_close(torch.tensor(ranks[0]["logits"]), single.hooks[0].weights.logits.detach(),
                               rtol=0, atol=1e-6)
    assert [r["ran"] for r in ranks[0]["train"]] == [r["ran"] for r in result.train_losses]
    for a, b in zip(ranks[0]["train"], result.train_losses):
        assert [a[n] for n in a["ran"]] == pytest.approx([b[n] for n in b["ran"]], rel=1e-5)


DIST_OVERRIDES = ["train.max_steps=4", "train.micro_batch_size=4", "selector.every_epochs=1"]


# ------------------------------------------------------------------------------------ command lines

SEED_ARGS = [
    "--lora_alpha", "16", "--lora_rank", "4", "--target_modules", "q_proj", "v_proj", "--lambd", "0.5",
    "--train_batch_size", "8", "--micro_train_batch_size", "4", "--learning_rate", "1e-3",
    "--obj_1", "SFT", "--input_key", "input", "--output_key", "output", "--max_samples_1", "16",
    "--obj_2", "SFT", "--selector_learning_rate", "1e-2", "--selector_activation", "softmax",
    "--max_samples_2", "16", "--max_epochs", "1", "--zero_stage", "2", "--save_steps", "-1",
    "--logging_steps", "1", "--eval_steps", "-1", "--load_checkpoint", "--gradient_checkpointing",
]


def test_seed_command_line_parses_into_the_config(tmp_path):
    from bipost.cli.train_selector import build_parser, to_config

    ws = workspace()
    args = ["--pretrain", str(ws / "model"), "--dataset_1", str(ws / "sft.jsonl"), "--dataset_2",
            str(ws / "copy.jsonl"), "--save_path", str(tmp_path / "s"), *SEED_ARGS, "--bf16",
            "--upperlevel_weight_decay", "0.2", "--selector_name", "sel", "--max_len", "64", "--local_rank", "0"]
    cfg = to_config(build_parser().parse_args(args))
    assert (cfg.model.path, cfg.model.dtype, cfg.model.gradient_checkpointing) == (str(ws / "model"), "bfloat16", True)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (4, 16.0, ["q_proj", "v_proj"])
    assert [(o.kind, o.weight, o.data.max_samples, o.data.max_len) for o in cfg.objectives] == [
        ("sft", 0.5, 16, 64), ("sft", 0.5, 16, 64)]
    assert (cfg.schedule.name, cfg.schedule.lambda_decay) == ("bilevel", 0.2)
    s = cfg.selector
    assert (s.enabled, s.lr, s.activation, s.name, s.objective) == (True, 1e-2, "softmax", "sel", "sft_2")
    t = cfg.train
    assert (t.output_dir, t.batch_size, t.micro_batch_size, t.epochs, t.save_steps, t.eval_steps, t.resume) == (
        str(tmp_path / "s"), 8, 4, 1.0, 0, 0, "auto")  # --load_checkpoint: resume if there is a checkpoint
    assert (cfg.optim.lr, cfg.dist.zero_stage) == (1e-3, 2)


def test_seed_command_line_runs_and_saves_under_save_path(tmp_path, capsys):
    from bipost.cli.train_selector import main

    ws = workspace()
    save = tmp_path / "checkpoint" / "test_selector"
    # --zero_stage 0: DeepSpeed ZeRO-2 on one CPU process is the engine's business (tests/test_distributed.py)
    args = list(SEED_ARGS)
    args[args.index("--zero_stage") + 1] = "0"
    code = main(["--pretrain", str(ws / "model"), "--dataset_1", str(ws / "sft.jsonl"),
                 "--dataset_2", str(ws / "copy.jsonl"), "--save_path", str(save), *args])
    assert code == 0
    assert (save / "final" / "adapter_config.json").exists()
    assert (save / "selector" / "epoch-001" / "model" / "adapter_config.json").exists()
    table, meta = read_weights(save / "selector" / "weights.parquet")
    assert len(table["row_id"]) == 16 and meta["activation"] == "softmax"
    assert main(["--pretrain", str(ws / "model"), "--dataset_1", "x", "--dataset_2", "y",
                 "--save_path", str(tmp_path / "bad"), "--lambd", "1.5"]) == 2
    assert "--lambd must be in [0, 1]" in capsys.readouterr().err


def test_select_filter_command_and_its_errors(tmp_path, capsys):
    from bipost.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"p{i}", "output": f"r{i}"}) + "\n" for i in range(4)))
    from bipost.selector import write_weights

    write_weights({"row_id": [2, 0, 1, 3], "logit": [0.0] * 4, "weight": [1.6, 1.2, 0.8, 0.4], "rank": [1, 2, 3, 4]},
                  tmp_path / "sel", ["jsonl"], {"data_path": str(data), "split": "train", "rows_read": 4})
    assert main(["select", "filter", "--weights", str(tmp_path / "sel"), "--top-p", "0.5",
                 "--out", str(tmp_path / "f.jsonl")]) == 0
    assert (tmp_path / "f.jsonl").read_text() == '{"input": "p0", "output": "r0"}\n{"input": "p2", "output": "r2"}\n'
    assert main(["select", "filter", "--weights", str(tmp_path / "sel"), "--top-k", "1",
                 "--out", str(data)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_selector_state_and_outputs_at_a_million_rows(tmp_path):
    """1 M rows with gaps in their ids (skipped rows): weights, an Adam step on a batch, ranks, the
    table and a Parquet round trip, and the top-p selection, all as numpy/torch arrays (no Python
    object per row). Hand-derived: with w = N softmax(z) and the step's objective
    f = (1/B) sum_b w[r_b] l_b, df/dz_j = (1/B) sum_b N l_b s_{r_b} (1[j = r_b] - s_j). The batch is
    ids 10, 20 (loss 0) and 30 (loss 5): row 30 gets N l s (1 - s)/B - s f > 0, every other row
    (10 and 20 included, their loss being 0) exactly -s_j f. So row 30 ranks last and all others tie,
    ranked by the lower row id: 7, 9, 10, 11, ..."""
    import time

    import numpy as np

    from bipost.selector.filter import select_ids

    t0 = time.perf_counter()
    ids = np.arange(1_000_000, dtype=np.int64) * 2 + 1  # every other row was skipped
    ids[:3] = [10, 20, 30]
    sel = SelectorWeights(ids, SelectorConfig(lr=0.1), total_steps=4)
    sel.step(torch.tensor([10, 20, 30]), torch.tensor([0.0, 0.0, 5.0]))
    table = sel.table()
    assert table["row_id"].dtype == np.int64 and len(table["row_id"]) == 1_000_000
    assert table["row_id"][-1] == 30 and table["row_id"][:4].tolist() == [7, 9, 10, 11]
    assert table["rank"][0] == 1 and table["rank"][-1] == 1_000_000
    write_weights(table, tmp_path, ["parquet"], {"rows_read": 2_000_001})
    back, meta = read_weights(tmp_path)
    assert np.array_equal(back["row_id"], table["row_id"]) and np.array_equal(back["weight"], table["weight"])
    kept = select_ids(back, top_p=0.5)
    assert len(kept) == 500_000 and kept[:3].tolist() == [7, 9, 10] and 30 not in kept
    assert time.perf_counter() - t0 < 5.0  # ~1 s here; a list-based version took ~15 s


def test_filter_streams_chunk_by_chunk(tmp_path, monkeypatch):
    """JSON lines read in chunks of a few rows still come out as the original lines, byte for byte
    (CRLF and blank lines included, rows numbered across files); a hub split is written as JSON lines."""
    import datasets

    from bipost.data import sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 40)
    monkeypatch.setattr(sources, "CHUNK_ROWS", 2)
    folder = tmp_path / "d"
    folder.mkdir()
    lines = [json.dumps({"input": f"p{i}", "output": f"r{i}"}) for i in range(9)]
    (folder / "train-a.jsonl").write_bytes(("\r\n".join(lines[:5]) + "\r\n\r\n").encode())
    (folder / "train-b.jsonl").write_bytes(("\n".join(lines[5:])).encode())  # no final newline
    weights = {i: float(i % 3) for i in range(9)}  # keep rows 2, 5, 8 (weight 2) and 1, 4 (weight 1)
    res = filter_rows(weights, folder, tmp_path / "out", min_weight=1.0)
    assert res.kept == 6 and res.files == [tmp_path / "out" / "train-a.jsonl", tmp_path / "out" / "train-b.jsonl"]
    assert (tmp_path / "out" / "train-a.jsonl").read_bytes() == (lines[1] + "\r\n" + lines[2] + "\r\n" + lines[4]
                                                                 + "\r\n").encode()
    assert (tmp_path / "out" / "train-b.jsonl").read_bytes() == (lines[5] + "\n" + lines[7] + "\n" + lines[8]).encode()

    rows = [{"input": f"p{i}", "output": f"r{i}"} for i in range(5)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows))
    filter_rows({0: 0.1, 1: 3.0, 2: 2.0, 3: 0.2, 4: 1.0}, "someone/data", tmp_path / "hub.jsonl", top_k=3)
    assert (tmp_path / "hub.jsonl").read_text() == "".join(json.dumps(rows[i]) + "\n" for i in (1, 2, 4))
