"""KD from teacher top-k log-probs stored with the data (``teacher_logprobs: data``,
bipost/data/teacher_topk.py) and ``bipost distill-topk`` (bipost/distill.py), which writes them.

The proofs: the written rows are the teacher's top-k at exactly the positions that predict the
response tokens, checked against a plain full-logits forward of each sequence; stored KD trains
exactly as live top-k KD (padded and packed, with a temperature rescale, held-out losses included);
axolotl's per-sequence layout gives the very numbers of bipost's per-response layout; a response
truncated by a smaller ``max_len`` keeps its first rows and still matches live KD; bad columns are
errors naming the file, row and field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from bipost.config import ConfigError, DataConfig
from bipost.data import DataError, load_objective_data
from bipost.data.teacher_topk import TOPK
from bipost.models import load_tokenizer
from bipost.run import build_trainer

from helpers import config, workspace

K = 8


def kd_args(*extra: str) -> list[str]:
    ws = workspace()
    return [f"model.path={ws / 'model'}", "objectives.0.kind=kd", f"objectives.0.data.path={ws / 'copy.jsonl'}",
            "objectives.0.data.max_len=64", f"objectives.0.teacher={ws / 'teacher'}", "train.batch_size=8",
            "train.micro_batch_size=8", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """copy.jsonl plus the teacher's top-8, written once by the command line."""
    from bipost.cli.main import main

    out = tmp_path_factory.mktemp("distill") / "copy-top8.jsonl"
    assert main(["distill-topk", "--out", str(out), "--k", str(K), "--block", "20", *kd_args()]) == 0
    return out


def kd_losses(out: Path, *overrides: str) -> tuple[list[float], dict]:
    result = build_trainer(config(out, "train.max_steps=2", *overrides, kinds=("kd",))).train()
    return [r["kd"] for r in result.train_losses], result.eval_history[-1] if result.eval_history else {}


def test_distilled_rows_are_the_teachers_topk_at_the_response_positions(distilled):
    """Row by row against a plain forward of the unpadded sequence: the logits at position ``t``
    predict token ``t + 1``, so the response's ``n`` rows are positions ``len(prompt) - 1 ..
    len(prompt) + n - 2``; their log-softmax top-8 (temperature 1) is what was written. Every
    original field is kept and the rows stay in order (row ids unchanged)."""
    from transformers import AutoModelForCausalLM

    ws = workspace()
    original = read_jsonl(ws / "copy.jsonl")
    written = read_jsonl(distilled)
    assert len(written) == len(original)
    for a, b in zip(original, written):
        assert {k: b[k] for k in a} == a
    tokenizer = load_tokenizer(str(ws / "model"))
    sft = load_objective_data(DataConfig(path=str(ws / "copy.jsonl"), max_len=64), "sft", tokenizer).train
    teacher = AutoModelForCausalLM.from_pretrained(ws / "teacher", dtype=torch.float32).eval()
    for i in (0, 1, 2, 37):
        e = sft[i]
        p, n = len(e.prompt_ids), len(e.response_ids)
        ids = torch.tensor([[*e.prompt_ids, *e.response_ids]], dtype=torch.long)
        with torch.no_grad():
            logps = torch.log_softmax(teacher(ids).logits[0, p - 1:p + n - 1].float(), -1)
        top = logps.topk(K, -1)
        row = written[e.row_id]
        assert np.array(row["teacher_topk_ids"]).shape == (n, K)
        assert row["teacher_topk_ids"] == top.indices.tolist()
        assert_close(torch.tensor(row["teacher_topk_logps"]), top.values, rtol=1e-5, atol=1e-5)
    stored = load_objective_data(DataConfig(path=str(distilled), max_len=64), TOPK, tokenizer).train
    assert stored[5].teacher_topk_ids.tolist() == written[stored[5].row_id]["teacher_topk_ids"]
    assert stored[5].teacher_topk_logps.tolist() == written[stored[5].row_id]["teacher_topk_logps"]  # exact


def test_parquet_output_round_trips(tmp_path, distilled):
    """The same rows as Parquet (list<list<int32>> / list<list<float32>> columns), read back by the
    data layer into the same examples as the JSON lines file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bipost.cli.main import main

    out = tmp_path / "copy.parquet"
    assert main(["distill-topk", "--out", str(out), "--k", str(K), *kd_args()]) == 0
    table = pq.read_table(out)
    assert table.schema.field("teacher_topk_ids").type.value_type.value_type.bit_width == 32
    assert table.to_pylist() == read_jsonl(distilled)  # float32 values print and parse back exactly
    tokenizer = load_tokenizer(str(workspace() / "model"))
    a = load_objective_data(DataConfig(path=str(out), max_len=64), TOPK, tokenizer).train
    b = load_objective_data(DataConfig(path=str(distilled), max_len=64), TOPK, tokenizer).train
    assert all(np.array_equal(x.teacher_topk_logps, y.teacher_topk_logps) for x, y in zip(a, b))
    # a Parquet source keeps its own column types (an int16 column here, which inference would make int64)
    source = tmp_path / "source.parquet"
    rows = [{**r, "n": i} for i, r in enumerate(read_jsonl(workspace() / "copy.jsonl"))]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("input", pa.string()), ("output", pa.string()),
                                                               ("n", pa.int16())])), source)
    out2 = tmp_path / "from-parquet.parquet"
    assert main(["distill-topk", "--out", str(out2), "--k", str(K), *kd_args(f"objectives.0.data.path={source}")]) == 0
    again = pq.read_table(out2)
    assert again.schema.field("n").type == pa.int16()
    assert again.drop_columns(["n"]).to_pylist() == table.to_pylist()


@pytest.mark.parametrize("packing", ["false", "true"])
def test_stored_topk_trains_as_live_topk(tmp_path, distilled, packing):
    """Live top-8 KD at temperature 2 (teacher log-softmax of z / 2, top-8, renormalized) against the
    stored temperature-1 rows rescaled by 1/2 and renormalized: the same distribution, since the
    top-8 set does not depend on the temperature and ``softmax(z / 2)`` on it is ``p_1^(1/2)``
    renormalized. Equal training and held-out losses, padded and packed; no teacher is loaded."""
    common = ("objectives.0.kd_topk=8", "objectives.0.temperature=2.0", f"train.packing={packing}",
              "objectives.0.data.eval_fraction=0.25")
    live, live_eval = kd_losses(tmp_path / "live", *common)
    trainer = build_trainer(config(tmp_path / "stored", "train.max_steps=2", *common,
                                   f"objectives.0.data.path={distilled}", "objectives.0.teacher_logprobs=data",
                                   "objectives.0.teacher=", kinds=("kd",)))
    task = trainer.runs["kd"].objective
    assert task.teacher is None and task.teacher_cache is None
    result = trainer.train()
    assert_close(torch.tensor([r["kd"] for r in result.train_losses]), torch.tensor(live), rtol=1e-5, atol=1e-6)
    assert result.eval_history[-1]["kd"] == pytest.approx(live_eval["kd"], rel=1e-5)


def test_truncated_responses_keep_their_first_rows(tmp_path, distilled):
    """Rows written at max_len 64, trained at max_len 36 (prompts of 30-34 tokens: most responses are
    cut): a teacher row depends only on the tokens before it, so the first rows are the truncated
    response's, and stored KD equals live KD on the truncated data."""
    short = ("objectives.0.kd_topk=8", "objectives.0.data.max_len=36")
    live, _ = kd_losses(tmp_path / "live", *short)
    stored, _ = kd_losses(tmp_path / "stored", *short, f"objectives.0.data.path={distilled}",
                          "objectives.0.teacher_logprobs=data")
    assert_close(torch.tensor(stored), torch.tensor(live), rtol=1e-5, atol=1e-6)


def test_axolotl_layout_gives_the_same_numbers(tmp_path, distilled):
    """axolotl's ``target_token_ids`` / ``target_logprobs`` hold one row per sequence token, row ``t``
    predicting token ``t + 1`` (its -inf padding rows over the prompt and the final row are not
    used): the response rows are ``len(prompt) - 1 ..``, the very rows of bipost's layout, so the
    batches and losses are identical."""
    tokenizer = load_tokenizer(str(workspace() / "model"))
    sft = load_objective_data(DataConfig(path=str(workspace() / "copy.jsonl"), max_len=64), "sft", tokenizer).train
    prompt_len = {e.row_id: len(e.prompt_ids) for e in sft}
    rows = []
    for i, r in enumerate(read_jsonl(distilled)):
        ids, logps = r.pop("teacher_topk_ids"), r.pop("teacher_topk_logps")
        pad = prompt_len[i] - 1
        rows.append({**r, "target_token_ids": [list(range(K))] * pad + ids + [list(range(K))],
                     "target_logprobs": [[-math.inf] * K] * pad + logps + [[-math.inf] * K],
                     "target_mask": [[0] * K] * pad + [[1] * K] * len(ids) + [[0] * K]})
    axolotl = write_jsonl(tmp_path / "axolotl.jsonl", rows)
    data = ("objectives.0.teacher_logprobs=data", "objectives.0.kd_topk=8")
    a, _ = kd_losses(tmp_path / "a", *data, f"objectives.0.data.path={axolotl}")
    b, _ = kd_losses(tmp_path / "b", *data, f"objectives.0.data.path={distilled}")
    assert a == b


def test_stored_topk_rows_take_per_row_weights(tmp_path, distilled):
    """A kind with its own example type takes data.weight_key like any other: weight 1 everywhere is
    the unweighted run, bit for bit."""
    weighted = write_jsonl(tmp_path / "w.jsonl", [{**r, "w": 1} for r in read_jsonl(distilled)])
    data = ("objectives.0.teacher_logprobs=data",)
    a, _ = kd_losses(tmp_path / "a", *data, f"objectives.0.data.path={distilled}")
    b, _ = kd_losses(tmp_path / "b", *data, f"objectives.0.data.path={weighted}", "objectives.0.data.weight_key=w")
    assert a == b


# ------------------------------------------------------------------------------------ errors

def test_k_other_than_the_datas_is_an_error(tmp_path, distilled):
    with pytest.raises(ValueError, match="stores the teacher's top-8, but kd_topk is 4"):
        build_trainer(config(tmp_path / "k", f"objectives.0.data.path={distilled}",
                             "objectives.0.teacher_logprobs=data", "objectives.0.kd_topk=4", kinds=("kd",)))


def _broken(rows: list[dict], what: str) -> list[dict]:
    r = rows[3]
    if what == "vocabulary":
        r["teacher_topk_ids"][1][2] = 10_000
    elif what == "rows":
        r["teacher_topk_ids"].pop()
        r["teacher_topk_logps"].pop()
    elif what == "missing":
        del r["teacher_topk_logps"]
    elif what == "none":
        del r["teacher_topk_logps"], r["teacher_topk_ids"]
    elif what == "shape":
        r["teacher_topk_logps"] = [x[:-1] for x in r["teacher_topk_logps"]]
    elif what == "ragged":
        r["teacher_topk_ids"][0] = r["teacher_topk_ids"][0][:-1]
    elif what == "float_ids":
        r["teacher_topk_ids"] = [[float(v) for v in x] for x in r["teacher_topk_ids"]]
    elif what == "positive":
        r["teacher_topk_logps"][2][0] = 0.5
    elif what == "nan":
        r["teacher_topk_logps"][2][0] = math.nan
    elif what == "duplicate":
        r["teacher_topk_ids"][1][1] = r["teacher_topk_ids"][1][0]
    elif what == "other_k":
        r["teacher_topk_ids"] = [x[:4] for x in r["teacher_topk_ids"]]
        r["teacher_topk_logps"] = [x[:4] for x in r["teacher_topk_logps"]]
    return rows


@pytest.mark.parametrize("what,message", [
    ("vocabulary", "field 'teacher_topk_ids': token id 10000 is outside the vocabulary of"),
    ("rows", "field 'teacher_topk_ids': 5 rows, but the row tokenizes to 6 response positions"),
    ("missing", "missing key 'teacher_topk_logps'"),
    ("none", "no teacher top-k columns"),
    ("shape", "'teacher_topk_ids' is [6, 8] but 'teacher_topk_logps' is [6, 7]"),
    ("ragged", "field 'teacher_topk_ids': expected a list of equally long lists"),
    ("float_ids", "field 'teacher_topk_ids': token ids must be integers"),
    ("positive", "field 'teacher_topk_logps': response position 2 holds 0.5; log-probs must be finite and <= 0"),
    ("nan", "field 'teacher_topk_logps': response position 2 holds nan"),
    ("duplicate", "field 'teacher_topk_ids': response position 1 lists a token id twice"),
    ("other_k", "top-4 rows, but file"),
])
def test_bad_stored_topk_is_an_error_naming_file_row_and_field(tmp_path, distilled, what, message):
    path = write_jsonl(tmp_path / "bad.jsonl", _broken(read_jsonl(distilled), what))
    tokenizer = load_tokenizer(str(workspace() / "model"))
    with pytest.raises(DataError) as err:
        load_objective_data(DataConfig(path=str(path), max_len=64), TOPK, tokenizer)
    assert f"file '{path}', row 3 (line 4)" in str(err.value) and message in str(err.value)


def test_null_columns_skip_the_row(tmp_path, distilled):
    """distill-topk writes nulls for rows the data layer skipped; training skips them the same way."""
    rows = read_jsonl(distilled)
    rows[3]["teacher_topk_ids"] = rows[3]["teacher_topk_logps"] = None
    path = write_jsonl(tmp_path / "nulls.jsonl", rows)
    data = load_objective_data(DataConfig(path=str(path), max_len=64), TOPK, load_tokenizer(str(workspace() / "model")))
    assert data.summary.skipped == {"null 'teacher_topk_ids'": 1} and 3 not in data.train.row_ids.tolist()


@pytest.mark.parametrize("overrides,message", [
    (("objectives.0.kd_loss=jsd",), "teacher_logprobs=data distils the stored top-k tokens with forward KD"),
    (("objectives.0.kd_topk=8", "objectives.0.cache_teacher=true"), "with teacher_logprobs=data they come from"),
    (("objectives.0.stored_temperature=0",), "stored_temperature must be > 0"),
])
def test_stored_topk_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, "objectives.0.teacher_logprobs=data", *overrides, kinds=("kd",))
    with pytest.raises(ConfigError, match="teacher_logprobs must be model or data"):
        config(tmp_path, "objectives.0.teacher_logprobs=stored", kinds=("kd",))


def test_distill_topk_command_errors(tmp_path, capsys):
    from bipost.cli.main import main

    assert main(["distill-topk", "--out", str(tmp_path / "x.csv"), "--k", "8", *kd_args()]) == 2
    assert "write a .jsonl or a .parquet file" in capsys.readouterr().err
    assert main(["distill-topk", "--out", str(tmp_path / "x.jsonl"), *kd_args()]) == 2
    assert "give --k or objectives.N.kd_topk" in capsys.readouterr().err
    assert main(["distill-topk", "--out", str(tmp_path / "x.jsonl"), "--k", "8", "--objective", "sft",
                 *kd_args()]) == 2
    assert "--objective 'sft' is not an objective name" in capsys.readouterr().err
