"""Collation: shapes, right padding, labels only on response tokens (unshifted)."""

from __future__ import annotations

import torch

from bipost.data import IGNORE_INDEX, PrefExample, SFTExample, collate_pref, collate_sft, encode_sft

PAD = 0


def test_collate_sft():
    a = SFTExample(10, (1, 5, 6), (7, 2))
    b = SFTExample(4, (1, 5), (8, 9, 9, 2))
    batch = collate_sft([a, b], PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, PAD], [1, 5, 8, 9, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    X = IGNORE_INDEX
    assert batch["labels"].tolist() == [[X, X, X, 7, 2, X], [X, X, 8, 9, 9, 2]]
    assert batch["row_ids"].tolist() == [10, 4]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_pref_stacks_chosen_then_rejected():
    a = PrefExample(3, (1, 5), (6, 2), (7, 7, 7, 2))
    b = PrefExample(9, (1,), (8, 2), (9, 2))
    batch = collate_pref([a, b], PAD)
    X = IGNORE_INDEX
    assert batch["input_ids"].shape == (4, 6)
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 2, PAD, PAD],  # a chosen
        [1, 8, 2, PAD, PAD, PAD],  # b chosen
        [1, 5, 7, 7, 7, 2],  # a rejected
        [1, 9, 2, PAD, PAD, PAD],  # b rejected
    ]
    assert batch["labels"].tolist() == [
        [X, X, 6, 2, X, X], [X, 8, 2, X, X, X], [X, X, 7, 7, 7, 2], [X, 9, 2, X, X, X]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 6, 3]
    assert batch["row_ids"].tolist() == [3, 9]


def test_labels_only_on_response_of_real_example(tiny_tokenizer):
    ex = encode_sft(0, "User: hello\nAssistant: ", "the answer", tiny_tokenizer, max_len=64)
    batch = collate_sft([ex], tiny_tokenizer.pad_token_id)
    labels = batch["labels"][0]
    n_prompt = len(ex.prompt_ids)
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert labels[n_prompt:].tolist() == list(ex.response_ids)
    assert labels[-1].item() == tiny_tokenizer.eos_token_id


def test_numpy_examples_collate_and_pack_like_tuples():
    """Examples read from a token store hold uint16 numpy views; collation and packing give the very
    batches of the same examples held as tuples (int64 tensors, same values)."""
    import numpy as np

    from bipost.data.packing import pack_pref, pack_sft

    sft = [SFTExample(10, (1, 5, 6), (7, 2)), SFTExample(4, (1, 5), (8, 9, 9, 2))]
    pref = [PrefExample(3, (1, 5), (6, 2), (7, 7, 7, 2)), PrefExample(9, (1,), (8, 2), (9, 2))]

    def as_numpy(e):
        return type(e)(e.row_id, *(np.asarray(getattr(e, f), dtype=np.uint16)
                                   for f in type(e).__dataclass_fields__ if f != "row_id"))

    for fn, examples in ((lambda x: collate_sft(x, PAD), sft), (lambda x: collate_pref(x, PAD), pref),
                         (pack_sft, sft), (pack_pref, pref)):
        want, got = fn(examples), fn([as_numpy(e) for e in examples])
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            else:
                assert got[key].segments == value.segments
