"""The eval section: scores by hand, generation metrics on fixed generations, a local lm-eval task
through the real harness, evaluation during training, and ``bipost eval`` on a saved LoRA run.

The benchmark model is *built* to know the answers: every layer's output projections are zero, so
the residual stream at a position is that token's embedding; the embeddings of the last context
token of each question are distinct one-hot vectors e_i, and the lm_head row of that question's
answer token is ``K * e_i``. After the final RMSNorm (weight 1) the hidden state is ``sqrt(d) e_i``,
so the answer's logit is ``K sqrt(d)`` and every other token's is 0: the model prefers the known
answer of every question, and lm-eval's accuracy must be exactly 1 (0 for the model built to
prefer the next choice instead).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from bipost.config import EvalConfig, JudgeConfig
from bipost.data.examples import PREF, SFT
from bipost.evaluation import LocalComm, evaluate_generations, exact_match, token_f1, wins
from bipost.evaluation.generations import summarize
from bipost.generation import Generations

from helpers import workspace

QUESTIONS = [("the cat", 0), ("the dog", 1), ("the mat", 2)]
"""(question, index of its answer among CHOICES); each question's last token differs."""
CHOICES = ["yes", "no", "good"]
K = 4.0


# ---------------------------------------------------------------- scores by hand
def test_exact_match_and_token_f1_by_hand():
    """Exact match after whitespace normalization; F1 over whitespace tokens as multisets:

    * "c b a" vs " c  b a ": identical after normalization -> EM 1, F1 1;
    * "c b" vs "c b a": common 2, P = 2/2, R = 2/3 -> F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8;
    * "a a b" vs "a b b": common = min(2,1) + min(1,2) = 2, P = R = 2/3 -> F1 = 2/3;
    * "x" vs "a b": nothing shared -> 0; "" vs "": 1; "" vs "a": 0.
    """
    assert exact_match("c b a", " c  b a ") == 1.0 and token_f1("c b a", " c  b a ") == 1.0
    assert exact_match("c b", "c b a") == 0.0 and token_f1("c b", "c b a") == pytest.approx(0.8)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert token_f1("x", "a b") == 0.0 and token_f1("", "") == 1.0 and token_f1("", "a") == 0.0
    assert exact_match("A b", "a b") == 0.0  # case counts


def test_win_rate_by_hand():
    """Policy [1, 0, 2, 5] vs chosen [0, 0, 3, 1]: win, tie (half), loss, win -> [1, .5, 0, 1],
    win rate 2.5 / 4 = 0.625."""
    w = wins([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0])
    assert w == [1.0, 0.5, 0.0, 1.0] and sum(w) / 4 == 0.625
    with pytest.raises(ValueError, match="2 policy scores for 1"):
        wins([1.0, 2.0], [1.0])


# ---------------------------------------------------------------- generation metrics, fixed generations
def judge_by_length(prompts, completions, **columns):
    """A judge for the tests: the number of words of a response."""
    return [float(len(c.split())) for c in completions]


def test_generation_metrics_on_fixed_generations(tiny_tokenizer, monkeypatch):
    """Preference rows with fixed generations; the judge scores a response by its word count.

    | row | generation | chosen  | EM | F1                          | judge (gen, chosen) | win |
    | 0   | "c b a"    | "c b a" | 1  | 1                           | 3, 3                | 0.5 |
    | 1   | "c b"      | "c b a" | 0  | P 1, R 2/3 -> 0.8           | 2, 3                | 0   |
    | 2   | "a b c d"  | "a b"   | 0  | P 2/4, R 2/2 -> 2/3         | 4, 2                | 1   |

    EM 1/3, F1 (1 + 0.8 + 2/3) / 3 = 0.8222..., win rate 1.5 / 3 = 0.5, mean judge score 3 and
    reference score 8/3; one generation (row 2) did not end with EOS -> truncated 1/3.
    """
    from bipost.data.types import PrefExample
    from bipost.evaluation.generations import Judge

    tok = tiny_tokenizer
    eos = tok.eos_token_id

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tok(text, add_special_tokens=False).input_ids)

    rows = [("c b a", "c b a"), ("c b", "c b a"), ("a b c d", "a b")]
    examples = [PrefExample(10 + i, (tok.bos_token_id, *ids(f"User: q{i}\nAssistant:")), (*ids(c), eos), (*ids("x"), eos))
                for i, (_, c) in enumerate(rows)]
    fixed = [list(ids(g)) + ([eos] if i < 2 else []) for i, (g, _) in enumerate(rows)]
    calls = []

    def fake_generate(model, prompts, **kwargs):
        calls.append((len(prompts), kwargs))
        return Generations([fixed[i] for i in range(len(prompts))], [i == 2 for i in range(len(prompts))],
                           list(range(len(prompts))), 0.0)

    monkeypatch.setattr("bipost.evaluation.generations.generate", fake_generate)
    cfg = EvalConfig(generate=True, max_new_tokens=7, batch_size=2, judge=JudgeConfig(function="test_evaluation:judge_by_length"))
    judge = Judge(cfg.judge, "cpu")
    res = evaluate_generations(torch.nn.Linear(1, 1), tok, "dpo", examples, PREF, cfg, LocalComm(), judge)
    m = res.metrics
    assert m["gen/dpo/exact_match"] == pytest.approx(1 / 3)
    assert m["gen/dpo/f1"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert m["gen/dpo/win_rate"] == pytest.approx(0.5)
    assert m["gen/dpo/score"] == pytest.approx(3.0) and m["gen/dpo/reference_score"] == pytest.approx(8 / 3)
    assert m["gen/dpo/truncated"] == pytest.approx(1 / 3) and m["gen/dpo/prompts"] == 3
    assert [s["win"] for s in res.samples] == [0.5, 0.0, 1.0]
    assert [s["row_id"] for s in res.samples] == [10, 11, 12]
    assert res.samples[1]["generation"] == "c b" and res.samples[1]["reference"] == "c b a"
    assert res.samples[0]["prompt"] == "User: q0\nAssistant:"
    (n, kwargs), = calls
    assert n == 3 and kwargs["max_new_tokens"] == 7 and kwargs["batch_size"] == 2 and kwargs["temperature"] == 0.0
    assert kwargs["generator"] is None and kwargs["eos_id"] == [eos]


def test_generation_split_over_ranks_gathers_every_row(tiny_tokenizer, monkeypatch):
    """Two simulated ranks of a sharded engine over 5 rows: rank 0 takes rows 0, 2, 4 and rank 1
    rows 1, 3 plus one filler prompt (so both make the same generate calls); the filler's output is
    dropped and the gathered samples are the 5 rows in order, with the same metrics as one rank."""
    from bipost.data.types import SFTExample

    tok = tiny_tokenizer
    eos = tok.eos_token_id
    examples = [SFTExample(i, (tok.bos_token_id, 5 + i), (7, eos)) for i in range(5)]

    prompts_seen = []

    def fake_generate(model, prompts, **kwargs):
        # right (token 7) for rows whose prompt token is odd
        prompts_seen.append(len(prompts))
        out = [[7 if p[-1] % 2 else 8, eos] for p in prompts]
        return Generations(out, [False] * len(prompts), list(range(len(prompts))), 0.0)

    monkeypatch.setattr("bipost.evaluation.generations.generate", fake_generate)
    seen: dict[int, list] = {}

    class Rank(LocalComm):
        lockstep_forwards = True

        def __init__(self, rank):
            super().__init__()
            self.rank, self.world_size = rank, 2

        def gather_objects(self, obj):
            seen[self.rank] = obj
            return [seen.get(0, []), seen.get(1, [])]

    cfg = EvalConfig(generate=True)
    evaluate_generations(None, tok, "sft", examples, SFT, cfg, Rank(0))
    both = evaluate_generations(None, tok, "sft", examples, SFT, cfg, Rank(1))
    one = evaluate_generations(None, tok, "sft", examples, SFT, cfg, LocalComm())
    assert prompts_seen == [3, 3, 5]
    assert [s["row_id"] for s in both.samples] == [0, 1, 2, 3, 4]
    # prompt tokens 5..9: odd (5, 7, 9) right -> exact match 3/5
    assert both.metrics == one.metrics and both.metrics["gen/sft/exact_match"] == pytest.approx(3 / 5)


def test_summarize_names_every_metric():
    """The same metric names with or without samples; a metric of no samples is NaN, not 0."""
    samples = [{"exact_match": 1.0, "f1": 1.0, "truncated": False, "tokens": 4}]
    names = {f"gen/x/{k}" for k in ("exact_match", "f1", "truncated", "length", "prompts")}
    assert set(summarize("x", samples)) == set(summarize("x", [])) == names
    assert math.isnan(summarize("x", [])["gen/x/exact_match"]) and summarize("x", [])["gen/x/prompts"] == 0


# ---------------------------------------------------------------- lm-eval, a local task
def answer_model(tokenizer, path: Path, shift: int = 0) -> Path:
    """The model of the module docstring (``shift=1``: each question's preferred answer is the
    next choice, a wrong one), saved with its tokenizer."""
    from bipost.tiny import build_model

    model = build_model(tokenizer, hidden_size=32, num_heads=2)
    d = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (question, answer) in enumerate(QUESTIONS):
            last = tokenizer(question).input_ids[-1]
            model.model.embed_tokens.weight[last] = torch.nn.functional.one_hot(torch.tensor(i), d).float()
            choice = tokenizer(" " + CHOICES[(answer + shift) % len(CHOICES)], add_special_tokens=False).input_ids
            assert len(choice) == 1
            model.lm_head.weight[choice[0], i] = K
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def task_yaml(folder: Path) -> Path:
    """A multiple-choice task with local data: each question of QUESTIONS, the same three choices."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": CHOICES, "answer": a}) + "\n" for q, a in QUESTIONS))
    yaml = folder / "known_answers.yaml"
    yaml.write_text(f"""task: known_answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return yaml


@pytest.fixture(scope="module")
def lm_eval_task(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the 'eval' extra")
    return task_yaml(tmp_path_factory.mktemp("task"))


def test_lm_eval_local_task_scores_the_known_answers(lm_eval_task, tiny_tokenizer, tmp_path):
    """Through the real harness on the in-memory model: accuracy 1 for the model built to prefer
    each answer, 0 for the one built to prefer the next choice. The model's train flags and the
    global RNG states (lm-eval seeds them) are as before the evaluation."""
    from transformers import AutoModelForCausalLM

    from bipost.config import BenchmarkConfig
    from bipost.evaluation.benchmarks import run_benchmarks

    right = AutoModelForCausalLM.from_pretrained(answer_model(tiny_tokenizer, tmp_path / "right")).train()
    wrong = AutoModelForCausalLM.from_pretrained(answer_model(tiny_tokenizer, tmp_path / "wrong", shift=1))
    bench = [BenchmarkConfig(task=str(lm_eval_task))]
    torch.manual_seed(123)
    random.seed(7)
    state = torch.get_rng_state()
    scores, results = run_benchmarks(right, tiny_tokenizer, bench, LocalComm(), batch_size=2)
    assert scores == {"bench/known_answers/acc": 1.0}
    assert torch.equal(torch.get_rng_state(), state) and random.random() == random.Random(7).random()
    assert right.training and all(m.training for m in right.modules())
    assert results[0]["results"]["known_answers"]["acc,none"] == 1.0 and results[0]["n-shot"]["known_answers"] == 0
    scores, _ = run_benchmarks(wrong.eval(), tiny_tokenizer, [BenchmarkConfig(task=str(lm_eval_task), limit=2)],
                               LocalComm(), batch_size=2)
    assert scores == {"bench/known_answers/acc": 0.0}


def test_scores_of_keeps_top_level_tasks_and_filters():
    """A group's aggregate, not its subtasks; stderr dropped; a filter other than ``none`` named."""
    from bipost.evaluation.benchmarks import scores_of

    results = {"results": {"mmlu": {"acc,none": 0.6, "acc_stderr,none": 0.01, "alias": "mmlu"},
                           "mmlu_anatomy": {"acc,none": 0.5},
                           "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5,
                                     "exact_match_stderr,strict-match": "N/A"}},
               "group_subtasks": {"mmlu": ["mmlu_anatomy"]}}
    assert scores_of(results) == {"bench/mmlu/acc": 0.6, "bench/gsm8k/exact_match/strict-match": 0.25,
                                  "bench/gsm8k/exact_match/flexible-extract": 0.5}


# ---------------------------------------------------------------- during training, and `bipost eval`
def _eval_run_overrides(out: Path, model: Path, task: Path, *extra: str) -> list[str]:
    ws = workspace()
    return [f"model.path={model}", f"train.output_dir={out}", "train.progress=false", "train.max_steps=4",
            "train.batch_size=4", "train.micro_batch_size=4", "optim.lr=1e-2", "schedule.name=mix",
            "model.lora.rank=4", "model.lora.dropout=0.1", "train.eval_steps=2", "train.save_steps=2",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
            "objectives.0.data.eval_fraction=0.1",
            "objectives.1.kind=dpo", f"objectives.1.data.path={ws / 'pref.jsonl'}", "objectives.1.data.max_len=64",
            "objectives.1.data.eval_fraction=0.1", *extra]


def test_training_evaluates_and_bipost_eval_reproduces_the_saved_lora_run(lm_eval_task, tiny_tokenizer, tmp_path):
    """A LoRA run (adapter dropout 0.1: training draws from the global RNG) with generation metrics
    (a length judge for DPO's win rate) and the local benchmark every 2 steps:

    * evaluations at steps 0, 2, 4 carry ``gen/...`` and ``bench/...`` next to the losses, in
      metrics.jsonl and the run's result; at step 0 the adapter is zero, so the built model answers
      every benchmark question right (accuracy 1);
    * training is unchanged by evaluating: the same losses as the run without an eval section;
    * ``bipost eval`` on the saved run (final/ adapter on the base) reproduces the last evaluation,
      and on the step-2 checkpoint reproduces the step-2 evaluation.
    """
    from bipost.cli.main import main
    from bipost.configio import load_config
    from bipost.run import train
    from bipost.train.metrics import read_metrics

    model = answer_model(tiny_tokenizer, tmp_path / "model")
    evals = ["eval.generate=true", "eval.max_prompts=4", "eval.max_new_tokens=6", "eval.batch_size=3",
             "eval.judge.function=test_evaluation:judge_by_length", f"eval.benchmarks.0.task={lm_eval_task}",
             "eval.benchmark_steps=2", "eval.generation_steps=2", "eval.benchmark_batch_size=2"]
    run = train(load_config(overrides=_eval_run_overrides(tmp_path / "run", model, lm_eval_task, *evals)))
    plain = train(load_config(overrides=_eval_run_overrides(tmp_path / "plain", model, lm_eval_task)))
    assert run.train_losses == plain.train_losses
    assert [e["step"] for e in run.eval_history] == [0, 2, 4]
    for e in run.eval_history:
        assert {"sft", "dpo", "gen/sft/exact_match", "gen/sft/f1", "gen/dpo/win_rate", "gen/dpo/f1",
                "bench/known_answers/acc"} <= set(e)
        assert e["gen/sft/prompts"] == e["gen/dpo/prompts"] == 4
    assert run.eval_history[0]["bench/known_answers/acc"] == 1.0
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "eval"]
    assert records[-1]["gen/dpo/win_rate"] == run.eval_history[-1]["gen/dpo/win_rate"]
    last = tmp_path / "run" / "eval" / "step-00000004"
    samples = [json.loads(x) for x in (last / "dpo.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "generation", "reference", "score", "reference_score", "win"} <= set(samples[0])
    assert json.loads((last / "benchmarks.json").read_text())[0]["results"]["known_answers"]["acc,none"] == \
        run.eval_history[-1]["bench/known_answers/acc"]

    assert main(["eval", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "eval" / "saved" / "final" / "metrics.json").read_text())
    final = {k: v for k, v in run.eval_history[-1].items() if "/" in k}
    assert saved == pytest.approx(final)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert main(["eval", str(ckpt), "--out", str(tmp_path / "at2")]) == 0
    at2 = json.loads((tmp_path / "at2" / "metrics.json").read_text())
    assert at2.pop("step") == 2
    assert at2 == pytest.approx({k: v for k, v in run.eval_history[1].items() if "/" in k})


def test_bipost_eval_of_a_bare_model_runs_benchmarks_only(lm_eval_task, tiny_tokenizer, tmp_path, capsys):
    """A model that is no run's: no objectives needed for benchmarks; nothing asked is an error."""
    from bipost.cli.main import main

    model = answer_model(tiny_tokenizer, tmp_path / "model")
    assert main(["eval", str(model), f"eval.benchmarks.0.task={lm_eval_task}", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text()) == {"bench/known_answers/acc": 1.0}
    assert "bench/known_answers/acc  1.0000" in capsys.readouterr().out
    assert main(["eval", str(model)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_eval_config_is_checked(tmp_path):
    from bipost.configio import ConfigError, load_config

    ws = workspace()
    base = [f"model.path={ws / 'model'}", "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}"]
    cases = {
        "must be a multiple of train.eval_steps": ["train.eval_steps=4", "eval.generate=true", "eval.generation_steps=6"],
        "eval.benchmark_steps=2 must be a multiple": ["eval.benchmarks.0.task=mmlu", "eval.benchmark_steps=2"],
        "eval.judge scores generations": ["eval.judge.model=some/rm"],
        "not both": ["eval.generate=true", "eval.judge.model=a", "eval.judge.function=m:f"],
        "'nope' is not an objective": ["eval.generate=true", "eval.objectives=nope"],
        "eval.benchmarks.0.task is required": ["eval.benchmarks.0.limit=3"],
        "unknown sink 'comet'": ["train.report_to=comet"],
        "neither a built-in reward": ["eval.generate=true", "eval.judge.function=nothing"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=base + overrides)
    cfg = load_config(overrides=base + ["train.eval_steps=2", "eval.generate=true", "eval.generation_steps=4",
                                        "eval.benchmarks.0.task=arc_easy", "eval.benchmarks.0.num_fewshot=1",
                                        "train.report_to=mlflow,trackio"])
    assert cfg.eval.enabled and cfg.eval.benchmarks[0].num_fewshot == 1 and cfg.train.report_to == ["mlflow", "trackio"]


# ---------------------------------------------------------------- two ranks
def evaluation_args(task) -> list[str]:
    """SFT + DPO with generation metrics (judged by length), a benchmark, evaluated at steps 0 and 2."""
    ws = workspace()
    return [f"model.path={ws / 'model'}", "train.progress=false", "train.max_steps=2", "train.eval_steps=2",
            "train.batch_size=4", "train.micro_batch_size=2", "optim.lr=1e-6", "schedule.name=mix",
            "objectives.0.kind=sft", f"objectives.0.data.path={ws / 'sft.jsonl'}", "objectives.0.data.max_len=64",
            "objectives.0.data.eval_fraction=0.1", "objectives.0.data.max_eval_samples=5",
            "objectives.1.kind=dpo", f"objectives.1.data.path={ws / 'pref.jsonl'}", "objectives.1.data.max_len=64",
            "objectives.1.data.eval_fraction=0.1", "objectives.1.data.max_eval_samples=5",
            "eval.generate=true", "eval.max_new_tokens=5", "eval.batch_size=2",
            "eval.judge.function=test_evaluation:judge_by_length", f"eval.benchmarks.0.task={task}",
            "eval.benchmark_steps=2", "eval.generation_steps=2"]


def test_two_fsdp2_ranks_evaluate_like_one(lm_eval_task, tmp_path, two_ranks):
    """FSDP2 on 2 gloo ranks (every forward a collective): 5 held-out prompts per objective split
    3 / 2 (rank 1 pads with a filler prompt, batches of 2: both ranks make 2 generate calls), the
    samples gathered; the benchmark run whole on both ranks. No hang, and every rank holds the
    evaluations of the same run on one rank: the same generation metrics, win rate and benchmark
    score at steps 0 and 2 (a tiny learning rate keeps the two runs' weights within float noise)."""
    from bipost.configio import load_config
    from bipost.run import train

    args = evaluation_args(lm_eval_task)
    ranks = two_ranks("fsdp2_evaluation")  # these args and dist.backend=fsdp2 (tests/two_ranks.py)
    one = train(load_config(overrides=args + [f"train.output_dir={tmp_path / 'one'}"]))
    for got in ranks:
        assert got["backend"] == "fsdp2" and got["lockstep"]
        assert [e["step"] for e in got["eval"]] == [e["step"] for e in one.eval_history] == [0, 2]
        for mine, ref in zip(got["eval"], one.eval_history):
            assert mine.keys() == ref.keys()
            assert mine["gen/sft/prompts"] == mine["gen/dpo/prompts"] == 5
            assert {k: v for k, v in mine.items() if "/" in k} == pytest.approx({k: v for k, v in ref.items() if "/" in k})
    run = two_ranks.root / "fsdp2_evaluation" / "run"
    samples = (run / "eval" / "step-00000002" / "sft.samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["index"] for s in samples] == [0, 1, 2, 3, 4]
