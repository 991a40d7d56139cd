"""Rows → text parts for every format, auto-detection, and bad-value handling."""

from __future__ import annotations

import pytest

from bipost.config import DataConfig
from bipost.data import DataError, PrefText, Row, SFTText, format_row, resolve_format


def row(data: dict, index: int = 3) -> Row:
    return Row(row_id=index, data=data, source="train.jsonl", index=index, line=index + 1)


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


CFG = DataConfig(path="train.jsonl")


# --------------------------------------------------------------------------- SFT formats


def test_input_output_uses_template():
    out = format_row(row({"input": "2+2?", "output": "4"}), "input_output", CFG)
    assert out == SFTText("User: 2+2?\nAssistant: ", "4")


def test_input_output_custom_keys_and_template():
    cfg = DataConfig(path="x", input_key="q", output_key="a", input_template="Q: {}\nA:")
    assert format_row(row({"q": "hi", "a": " yo"}), "input_output", cfg) == SFTText("Q: hi\nA:", " yo")


def test_prompt_completion_strings_verbatim():
    out = format_row(row({"prompt": "The sky is", "completion": " blue."}), "prompt_completion", CFG)
    assert out == SFTText("The sky is", " blue.")


def test_prompt_completion_conversational(tiny_tokenizer):
    data = {"prompt": [u("hi")], "completion": [a("yo")]}
    out = format_row(row(data), "prompt_completion", CFG, tiny_tokenizer)
    assert out == SFTText("<|user|>hi<eos><|assistant|>", "yo<eos>")


def test_messages_last_turn_is_response(tiny_tokenizer):
    data = {"messages": [{"role": "system", "content": "be brief"}, u("hi"), a("yo"), u("again"), a("ok")]}
    out = format_row(row(data), "messages", CFG, tiny_tokenizer)
    assert out.prompt == "<|system|>be brief<eos><|user|>hi<eos><|assistant|>yo<eos><|user|>again<eos><|assistant|>"
    assert out.response == "ok<eos>"


def test_messages_not_ending_with_assistant_is_skipped(tiny_tokenizer):
    out = format_row(row({"messages": [u("hi"), a("yo"), u("more")]}), "messages", CFG, tiny_tokenizer)
    assert out == "last turn of 'messages' is not the assistant's"


def test_template_that_does_not_extend_prompt_is_an_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    # The generation prompt differs from how an assistant turn is rendered.
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(DataError, match=r"row 3 \(line 4\), field 'messages'.*does not start with"):
        format_row(row({"messages": [u("hi"), a("yo")]}), "messages", CFG, tok)


def test_conversation_without_chat_template_is_an_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        format_row(row({"messages": [u("hi"), a("yo")]}), "messages", CFG, tok)


# --------------------------------------------------------------------------- preference


def test_preference_strings():
    out = format_row(row({"prompt": "Q:", "chosen": " yes", "rejected": " no"}), "preference", CFG)
    assert out == PrefText("Q:", " yes", " no")


def test_preference_trl_conversational(tiny_tokenizer):
    data = {"prompt": [u("hi")], "chosen": [a("hello")], "rejected": [a("go away")]}
    out = format_row(row(data), "preference", CFG, tiny_tokenizer)
    assert out == PrefText("<|user|>hi<eos><|assistant|>", "hello<eos>", "go away<eos>")


def test_preference_full_conversations_share_prompt_turns(tiny_tokenizer):
    data = {"chosen": [u("hi"), a("x"), u("hi again"), a("hello")],
            "rejected": [u("hi"), a("x"), u("hi again"), a("go away")]}
    out = format_row(row(data), "preference", CFG, tiny_tokenizer)
    assert out == PrefText("<|user|>hi<eos><|assistant|>x<eos><|user|>hi again<eos><|assistant|>",
                           "hello<eos>", "go away<eos>")


def test_preference_string_prompt_with_full_conversations(tiny_tokenizer):
    # UltraFeedback-binarized layout: the prompt string is repeated as the first user turn.
    data = {"prompt": "hi", "chosen": [u("hi"), a("hello")], "rejected": [u("hi"), a("go away")]}
    out = format_row(row(data), "preference", CFG, tiny_tokenizer)
    assert out == PrefText("<|user|>hi<eos><|assistant|>", "hello<eos>", "go away<eos>")


def test_preference_trl_prompt_repeated_in_responses(tiny_tokenizer):
    data = {"prompt": [u("hi")], "chosen": [u("hi"), a("hello")], "rejected": [u("hi"), a("no")]}
    out = format_row(row(data), "preference", CFG, tiny_tokenizer)
    assert out == PrefText("<|user|>hi<eos><|assistant|>", "hello<eos>", "no<eos>")


def test_implicit_prompt_hh_style():
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, it is 4."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, it's 5."
    out = format_row(row({"chosen": chosen, "rejected": rejected}), "preference", CFG)
    assert out.prompt == "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant:"
    assert out.chosen == " Yes, it is 4."
    assert out.rejected == " Yes, it's 5."
    assert out.prompt + out.chosen == chosen and out.prompt + out.rejected == rejected


def test_implicit_prompt_without_marker_cuts_at_whitespace():
    out = format_row(row({"chosen": "Q: name a pet. A: cat", "rejected": "Q: name a pet. A: car"}), "preference", CFG)
    assert out == PrefText("Q: name a pet. A:", " cat", " car")


def test_identical_pair_is_skipped():
    out = format_row(row({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}),
                     "preference", CFG)
    assert out == "identical 'chosen' and 'rejected'"


def test_implicit_prompt_response_missing_is_skipped():
    data = {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    assert format_row(row(data), "preference", CFG) == "empty 'chosen' after the implicit prompt"


# --------------------------------------------------------------------------- auto / example types


@pytest.mark.parametrize("keys,examples,fmt", [
    ({"messages": []}, "sft", "messages"),
    ({"prompt": "", "completion": ""}, "sft", "prompt_completion"),
    ({"chosen": "", "rejected": ""}, "pref", "preference"),
    ({"prompt": "", "chosen": "", "rejected": ""}, "pref", "preference"),
    ({"input": "", "output": ""}, "sft", "input_output"),
    ({"messages": [], "chosen": "", "rejected": ""}, "pref", "preference"),  # the example type breaks the tie
])
def test_auto_detection(keys, examples, fmt, caplog):
    with caplog.at_level("INFO", logger="bipost"):
        assert resolve_format(CFG, row(keys), examples) == fmt
    assert f"auto-detected as '{fmt}'" in caplog.text


def test_auto_unrecognised_keys():
    with pytest.raises(DataError, match=r"can't detect the data format.*\['foo'\]"):
        resolve_format(CFG, row({"foo": 1}), "sft")


@pytest.mark.parametrize("fmt,examples", [("preference", "sft"), ("messages", "pref"), ("input_output", "pref")])
def test_wrong_format_for_example_type(fmt, examples):
    with pytest.raises(DataError, match="objective 'x' needs"):
        resolve_format(DataConfig(path="x", format=fmt), row({}), examples, who="objective 'x'")


def test_auto_wrong_kind():
    with pytest.raises(DataError, match="objective 'dpo' needs a preference format"):
        resolve_format(CFG, row({"input": "a", "output": "b"}), "pref", who="objective 'dpo'")


# --------------------------------------------------------------------------- bad values


def test_missing_key_names_key_file_and_row():
    with pytest.raises(DataError, match=r"file 'train.jsonl', row 3 \(line 4\): missing key 'output'"):
        format_row(row({"input": "a"}), "input_output", CFG)


@pytest.mark.parametrize("value,reason", [
    ("", "empty 'output'"),
    ("  \n", "empty 'output'"),
    (None, "null 'output'"),
    (7, "non-string 'output'"),
    (["x"], "non-string 'output'"),
])
def test_bad_values_are_skips(value, reason):
    assert format_row(row({"input": "a", "output": value}), "input_output", CFG) == reason


@pytest.mark.parametrize("data,reason", [
    ({"prompt": "a", "chosen": None, "rejected": "b"}, "null 'chosen'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "non-string 'prompt'"),
    ({"prompt": "a", "chosen": "x", "rejected": [a("b")]}, "mixed string/conversation 'chosen' and 'rejected'"),
    ({"chosen": [u("hi"), a("x")], "rejected": [u("yo"), a("y")]}, "no shared prompt turns in 'chosen' and 'rejected'"),
    ({"prompt": [u("hi")], "chosen": [a("x")], "rejected": [a("")]}, "empty 'rejected'"),
    ({"prompt": [u("hi")], "chosen": [a(None)], "rejected": [a("y")]}, "null content in 'chosen'"),
    ({"prompt": [u("hi")], "chosen": ["x"], "rejected": [a("y")]}, "malformed message in 'chosen'"),
])
def test_bad_preference_values_are_skips(data, reason, tiny_tokenizer):
    assert format_row(row(data), "preference", CFG, tiny_tokenizer) == reason


def test_empty_messages_is_a_skip(tiny_tokenizer):
    assert format_row(row({"messages": []}), "messages", CFG, tiny_tokenizer) == "empty 'messages'"
