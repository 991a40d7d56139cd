"""Token policy: separate encoding, BOS once, EOS exactly once, truncation and skips."""

from __future__ import annotations

import copy

import pytest
from tokenizers import processors

from bipost.data import PrefExample, SFTExample, TokenPolicy, encode_pref, encode_sft, encode_sft_batch


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_policy_probe(tok):
    policy = TokenPolicy.of(tok)
    assert policy.bos_id == tok.bos_token_id
    assert policy.eos_id == tok.eos_token_id
    assert policy.pad_id == tok.pad_token_id
    assert TokenPolicy.of(policy) is policy


def test_sft_prompt_and_response_encoded_separately(tok):
    ex = encode_sft(7, "User: hello\nAssistant: ", "the answer", tok, max_len=64)
    assert isinstance(ex, SFTExample) and ex.row_id == 7
    assert ex.prompt_ids == (tok.bos_token_id, *ids(tok, "User: hello\nAssistant: "))
    assert ex.response_ids == (*ids(tok, "the answer"), tok.eos_token_id)


def test_eos_once_when_template_emits_it(tok):
    ex = encode_sft(0, "<|user|>hi<eos><|assistant|>", "yo<eos>", tok, max_len=64)
    assert ex.response_ids[-1] == tok.eos_token_id
    assert ex.response_ids.count(tok.eos_token_id) == 1
    ex2 = encode_sft(0, "p", "yo<eos><eos>", tok, max_len=64)
    assert ex2.response_ids == (*ids(tok, "yo"), tok.eos_token_id)


def test_no_double_bos_when_template_has_bos_text(tok):
    ex = encode_sft(0, "<bos><|user|>hi<eos><|assistant|>", "yo", tok, max_len=64)
    assert ex.prompt_ids[0] == tok.bos_token_id
    assert ex.prompt_ids[1] != tok.bos_token_id
    assert ex.prompt_ids.count(tok.bos_token_id) == 1


def test_no_bos_for_tokenizer_without_default_bos(tok):
    t = copy.deepcopy(tok)
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert TokenPolicy.of(t).bos_id is None
    ex = encode_sft(0, "hello", "world", t, max_len=64)
    assert ex.prompt_ids == tuple(ids(t, "hello"))


def test_tokenizer_without_eos_is_an_error(tok):
    t = copy.deepcopy(tok)
    t.eos_token = None
    with pytest.raises(ValueError, match="no eos_token_id"):
        TokenPolicy.of(t)


def test_pref_shares_prompt_ids(tok):
    ex = encode_pref(3, "\n\nHuman: hi\n\nAssistant:", " hello there", " go", tok, max_len=64)
    assert isinstance(ex, PrefExample)
    assert ex.prompt_ids == (tok.bos_token_id, *ids(tok, "\n\nHuman: hi\n\nAssistant:"))
    assert ex.chosen_ids == (*ids(tok, " hello there"), tok.eos_token_id)
    assert ex.rejected_ids == (*ids(tok, " go"), tok.eos_token_id)


def test_truncation_keeps_prompt_and_eos(tok):
    prompt, response = "User: hello\nAssistant: ", " ".join(["the answer is"] * 20)
    p, r = ids(tok, prompt), ids(tok, response)
    max_len = len(p) + 1 + 5
    ex = encode_sft(0, prompt, response, tok, max_len=max_len)
    assert len(ex) == max_len
    assert ex.prompt_ids == (tok.bos_token_id, *p)  # whole prompt
    assert ex.response_ids == (*r[:4], tok.eos_token_id)  # content cut from the right, EOS last


def test_pref_truncation_same_budget(tok):
    prompt = "Q: hello"
    long, short = " ".join(["dog cat"] * 30), " yes"
    p = ids(tok, prompt)
    max_len = len(p) + 1 + 6
    ex = encode_pref(0, prompt, long, short, tok, max_len=max_len)
    assert len(ex.prompt_ids) + len(ex.chosen_ids) == max_len
    assert ex.chosen_ids == (*ids(tok, long)[:5], tok.eos_token_id)
    assert ex.rejected_ids == (*ids(tok, short), tok.eos_token_id)  # untouched, fits
    ex2 = encode_pref(0, prompt, short, long, tok, max_len=max_len)
    assert ex2.rejected_ids == ex.chosen_ids


def test_too_long_is_skipped_and_counted(tok):
    prompt = "User: hello world the answer"
    p = ids(tok, prompt)
    fits = len(p) + 1 + 2  # BOS + prompt + one token + EOS
    assert isinstance(encode_sft(0, prompt, "x y", tok, max_len=fits), SFTExample)
    assert encode_sft(0, prompt, "x", tok, max_len=fits - 1) == "too long"
    assert encode_pref(0, prompt, "x", "y", tok, max_len=fits - 1) == "too long"


def test_batch_counts_truncations_and_reports_skips(tok):
    from collections import Counter

    counts = Counter()
    out = encode_sft_batch([(0, "a", "b"), (1, "a", "the answer is " * 10), (2, "a", "<eos>")], tok, 8, counts)
    assert isinstance(out[0], SFTExample) and isinstance(out[1], SFTExample)
    assert len(out[1]) == 8
    assert out[2] == "empty response after tokenization"
    assert counts["truncated"] == 1


def test_direct_backend_encoding_equals_the_tokenizer_call(tok):
    """The policy calls a fast tokenizer's backend directly; the ids are those of ``tokenizer(...)``,
    special-token text included, and the call path is used whenever the backend truncates."""
    texts = ["User: hello\nAssistant: ", "<bos><|user|>hi<eos>", "", " the answer is 42 " * 30]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert TokenPolicy.of(tok).encode(texts) == want
    t = copy.deepcopy(tok)
    t.backend_tokenizer.enable_truncation(3)
    assert [len(ids) for ids in TokenPolicy.of(t).encode(texts)] == [len(ids) for ids in want]
