"""Reward functions (bipost.rewards): loading by import path, weighted combination with None as
"not applicable", clear errors for failing functions, and the built-ins (exact match, regex,
math-verify, a tiny reward model built from a config)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from bipost.rewards import (
    RewardError,
    RewardFunctions,
    RewardModel,
    RewardSpec,
    exact_match,
    math_answer,
    regex_match,
)


# ---------------------------------------------------------------- tiny in-test reward functions
def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def bonus_if_flagged(prompts, completions, flag, **columns):
    """Applies only to rows with a flag (None elsewhere): 2 if flagged true, else 0."""
    return [None if f is None else (2.0 if f else 0.0) for f in flag]


def scaled(prompts, completions, *, factor, **columns):
    return [factor * len(c) for c in completions]


class Counter:
    """A class named by path is instantiated with args; its instance is the function."""

    def __init__(self, char: str):
        self.char = char

    def __call__(self, prompts, completions, **columns):
        return [c.count(self.char) for c in completions]


def raises(prompts, completions, **columns):
    raise RuntimeError("boom")


def too_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def gives_nan(prompts, completions, **columns):
    return [0.0, math.nan, 1.0][: len(completions)]


def gives_text(prompts, completions, **columns):
    return [1.0, "yes", 0.0][: len(completions)]


def all_none(prompts, completions, **columns):
    return [None] * len(completions)


PROMPTS = ["Q1", "Q1", "Q2"]
COMPLETIONS = ["abc", "a", "hello"]


def test_weighted_sum_with_none_as_not_applicable():
    """length (w = 1) gives [3, 1, 5]; bonus (w = 0.5) gives [2, None, 0] for flags [True, None, False].
    Totals: 3 + 0.5 * 2 = 4; 1 (bonus does not apply); 5 + 0.5 * 0 = 5. Per function, NaN marks None;
    bonus's metrics use its two applicable values: mean 1, std sqrt(2)."""
    fns = RewardFunctions([RewardSpec("test_rewards:length_reward"),
                           RewardSpec("test_rewards:bonus_if_flagged", weight=0.5, name="bonus")])
    scores = fns(PROMPTS, COMPLETIONS, {"flag": [True, None, False]})
    assert scores.names == ["length_reward", "bonus"]
    assert_close(scores.total, torch.tensor([4.0, 1.0, 5.0]))
    assert scores.per_function[:, 0].tolist() == [3.0, 1.0, 5.0]
    assert scores.per_function[0, 1] == 2.0 and math.isnan(scores.per_function[1, 1]) and scores.per_function[2, 1] == 0
    s = scores.summary()
    assert s["reward/bonus/mean"] == 1.0 and s["reward/bonus/std"] == pytest.approx(math.sqrt(2))
    assert s["reward/mean"] == pytest.approx(10 / 3)


def test_args_bind_to_functions_and_build_classes():
    fns = RewardFunctions([RewardSpec("test_rewards:scaled", args={"factor": 2}),
                           RewardSpec("test_rewards:Counter", args={"char": "l"}, weight=10.0)])
    scores = fns(PROMPTS, COMPLETIONS)
    assert scores.names == ["scaled", "Counter"]
    assert scores.total.tolist() == [6.0, 2.0, 10.0 + 10 * 2]


def test_plain_callables_and_completion_ids():
    seen = {}

    def with_ids(prompts, completions, completion_ids, **columns):
        seen["ids"] = completion_ids
        return [float(len(i)) for i in completion_ids]

    scores = RewardFunctions([with_ids])(PROMPTS, COMPLETIONS, completion_ids=[[1, 2], [3], [4, 5, 6]])
    assert scores.total.tolist() == [2.0, 1.0, 3.0] and seen["ids"][2] == [4, 5, 6]


def test_conversational_prompts_get_trl_completion_messages():
    """Conversation prompts -> completions passed as [{"role": "assistant", "content": text}]."""
    seen = {}

    def check(prompts, completions, **columns):
        seen["c"] = completions
        return [1.0] * len(completions)

    conv = [[{"role": "user", "content": "hi"}]] * 2
    RewardFunctions([check])(conv, ["x", "y"])
    assert seen["c"] == [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]
    scores = RewardFunctions([RewardSpec("exact_match", args={"column": "gold"})])(conv, [" x ", "z"], {"gold": ["x", "y"]})
    assert scores.total.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("fn, message", [
    ("raises", r"reward function 'raises' raised RuntimeError: boom"),
    ("too_short", r"reward function 'too_short' returned 2 rewards for 3 completions"),
    ("gives_nan", r"reward function 'gives_nan' returned nan at index 1; completion 1: 'a'"),
    ("gives_text", r"reward function 'gives_text' returned a str \('yes'\) at index 1"),
    ("all_none", r"completion 0 has no reward: every reward function \(all_none\) returned None"),
])
def test_failing_reward_functions_are_named_errors(fn, message):
    with pytest.raises(RewardError, match=message):
        RewardFunctions([RewardSpec(f"test_rewards:{fn}")])(PROMPTS, COMPLETIONS)


def test_loading_errors():
    with pytest.raises(RewardError, match="neither a built-in"):
        RewardSpec("no_such_builtin")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        RewardFunctions([RewardSpec("no_such_module:f")])
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        RewardFunctions([RewardSpec("test_rewards:nope")])
    with pytest.raises(RewardError, match="weight must be a finite number"):
        RewardSpec("exact_match", weight=math.inf)
    with pytest.raises(RewardError, match="two reward functions are named 'exact_match'"):
        RewardFunctions([RewardSpec("exact_match"), RewardSpec("exact_match", args={"column": "b"})])
    with pytest.raises(RewardError, match="building test_rewards:Counter with args"):
        RewardFunctions([RewardSpec("test_rewards:Counter")])
    with pytest.raises(RewardError, match="data column 'x' has 2 values for 3 completions"):
        RewardFunctions([length_reward])(PROMPTS, COMPLETIONS, {"x": [1, 2]})
    with pytest.raises(RewardError, match="clashes with a reward function argument"):
        RewardFunctions([length_reward])(PROMPTS, COMPLETIONS, {"completions": [1, 2, 3]})


# ---------------------------------------------------------------- built-ins
def test_exact_match_normalizes_whitespace():
    """'  42 ' == '42'; 'a  b\\n' == 'a b'; '42.0' != '42'; a None answer is not applicable."""
    out = exact_match(None, ["  42 ", "a  b\n", "42.0", "x"], answer=["42", "a b", "42", None])
    assert out == [1.0, 1.0, 0.0, None]
    with pytest.raises(KeyError, match="needs the data column 'answer'; the rows have solution"):
        exact_match(None, ["x"], solution=["x"])
    with pytest.raises(RewardError, match="reward function 'exact_match' raised KeyError"):
        RewardFunctions([RewardSpec("exact_match")])(["p"], ["x"], {"solution": ["x"]})


def test_regex_format_reward():
    fmt = r"<think>.*?</think>\s*<answer>.*?</answer>"
    comps = ["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>", "x <think></think><answer>1</answer>"]
    assert regex_match(None, comps, pattern=fmt) == [1.0, 0.0, 0.0]
    assert regex_match(None, comps, pattern=fmt, mode="search") == [1.0, 0.0, 1.0]
    assert regex_match(None, comps, pattern=fmt, dotall=False) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="regex mode"):
        regex_match(None, comps, pattern=fmt, mode="match")


def test_math_answer_with_math_verify():
    """\\frac{1}{2} == \\boxed{0.5}; 42 found in prose; 41 != 42; an unparsable gold answer -> None."""
    pytest.importorskip("math_verify")
    out = math_answer(None, ["so \\boxed{0.5}", "The answer is 42", "41", "anything"],
                      answer=["$\\frac{1}{2}$", "42", "42", "no number here"])
    assert out == [1.0, 1.0, 0.0, None]


def test_math_answer_without_math_verify_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify":
            raise ImportError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(RewardError, match=r"'math' raised ImportError: .*pip install 'bipost\[math\]'"):
        RewardFunctions([RewardSpec("math")])(["p"], ["1"], {"answer": ["1"]})


@pytest.fixture(scope="module")
def reward_model_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny LlamaForSequenceClassification (one label) built from a config and saved: no hub."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("reward_model")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_batched_like_one_by_one(reward_model_dir, tiny_tokenizer):
    """Each score is the model's logit at the last token of prompt + completion, whatever the batch
    padding: batch 2 over texts of different lengths == one text per forward == a manual forward."""
    rm = RewardModel(str(reward_model_dir), batch_size=2, device="cpu")
    prompts = ["User: hello", "User: the cat", "User: what"]
    comps = [" Assistant: world", " Assistant: sat on the mat", " yes"]
    scores = rm(prompts, comps)
    one = RewardModel(str(reward_model_dir), batch_size=1, device="cpu")(prompts, comps)
    assert_close(torch.tensor(scores), torch.tensor(one), rtol=1e-5, atol=1e-5)
    ids = tiny_tokenizer(prompts[1] + comps[1], return_tensors="pt").input_ids
    with torch.no_grad():
        manual = rm.model(input_ids=ids).logits[0, 0].item()
    assert scores[1] == pytest.approx(manual, rel=1e-5, abs=1e-5)
    assert len(set(scores)) == 3
    assert not any(p.requires_grad for p in rm.model.parameters()) and not rm.model.training


def test_reward_model_through_a_spec_and_chat_template(reward_model_dir):
    fns = RewardFunctions([RewardSpec("reward_model", args={"path": str(reward_model_dir), "device": "cpu"})])
    conv = [[{"role": "user", "content": "hello"}]]
    scores = fns(conv, ["world"])
    rm = fns.functions[0]
    assert rm.texts(conv, ["world"]) == ["<|user|>hello<eos><|assistant|>world<eos>"]
    assert scores.names == ["reward_model"] and math.isfinite(scores.total.item())
    with pytest.raises(RewardError, match="reward_model.*failed: OSError"):
        RewardFunctions([RewardSpec("reward_model", args={"path": str(reward_model_dir / "missing")})])
