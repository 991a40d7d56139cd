"""The token store: any example dataclass in, the same examples out (as memory-mapped views)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest

from bipost.data import ExampleView, PrefExample, Ragged, SFTExample, TokenIds, TokenStore, as_tuples
from bipost.data.store import MARKER, Concat, StoreError, StoreWriter, schema_of, to_columns, token_dtype


@dataclass(frozen=True)
class KDRow:
    """A future example type: top-k teacher ids/log-probs per response token, a label, a weight, a string."""

    row_id: int
    prompt_ids: TokenIds
    completion_ids: TokenIds
    topk_ids: Ragged[np.int32]
    topk_logps: Ragged[np.float32]
    label: bool
    weight: float
    note: str


def kd_rows() -> list[KDRow]:
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate([3, 0, 2]):
        out.append(KDRow(10 + i, (1, 2 + i), tuple(range(n)), rng.integers(0, 9, (n, 4)).astype(np.int32),
                         rng.normal(size=(n, 4)).astype(np.float32), i % 2 == 0, 0.5 * i, f"row é{i}"))
    return out


def write(folder, cls, examples, chunks=(2,), token="uint16", aux=None):
    w = StoreWriter(folder, cls, token)
    start = 0
    for size in [*chunks, len(examples)]:
        part = examples[start:start + size]
        if part:
            w.append(to_columns(schema_of(cls), part), aux=None if aux is None else {"flag": aux[start:start + size]})
        start += size
    w.close(meta={"who": "test"}, arrays={"extra": np.arange(5, dtype=np.int64)})
    return TokenStore(folder, cls)


def test_schema_from_annotations():
    kinds = {c.name: (c.kind, c.dtype) for c in schema_of(KDRow)}
    assert kinds == {"row_id": ("scalar", "int64"), "prompt_ids": ("ragged", "token"),
                     "completion_ids": ("ragged", "token"), "topk_ids": ("ragged", "int32"),
                     "topk_logps": ("ragged", "float32"), "label": ("scalar", "bool"),
                     "weight": ("scalar", "float64"), "note": ("text", "uint8")}
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "int32"

    @dataclass
    class Bad:
        row_id: int
        ids: list

    with pytest.raises(TypeError, match=r"Bad.ids: the token store can't keep a field annotated"):
        schema_of(Bad)

    @dataclass
    class NoRowId:
        ids: TokenIds

    with pytest.raises(TypeError, match="needs a 'row_id: int' field"):
        schema_of(NoRowId)


def test_new_example_type_round_trips(tmp_path):
    """Ragged 2-D fields keep their trailing shape, scalars their type, strings their text; a row
    with no tokens is an empty [0, k] array."""
    rows = kd_rows()
    store = write(tmp_path / "s", KDRow, rows, aux=np.array([True, False, True]))
    assert len(store) == 3 and store.meta == {"who": "test"}
    for want, got in zip(rows, store.view()):
        assert got.row_id == want.row_id and type(got.row_id) is int
        assert got.prompt_ids.dtype == np.uint16 and got.prompt_ids.tolist() == list(want.prompt_ids)
        assert got.completion_ids.tolist() == list(want.completion_ids)
        assert got.topk_ids.shape == (len(want.completion_ids), 4) and np.array_equal(got.topk_ids, want.topk_ids)
        assert got.topk_logps.dtype == np.float32 and np.array_equal(got.topk_logps, want.topk_logps)
        assert (got.label, got.weight, got.note) == (want.label, want.weight, want.note)
        assert type(got.label) is bool and type(got.weight) is float
    assert store.aux["flag"].tolist() == [True, False, True]
    assert store.arrays["extra"].tolist() == [0, 1, 2, 3, 4]
    assert store.lengths("completion_ids").tolist() == [3, 0, 2]
    assert not store.example(0).prompt_ids.flags.writeable  # a view of the read-only map


def test_views_slices_and_row_ids(tmp_path):
    ex = [SFTExample(r, (1, r), (r, 2)) for r in (3, 5, 8, 9)]
    store = write(tmp_path / "s", SFTExample, ex)
    view = store.view(np.array([3, 1, 2]))
    assert len(view) == 3 and view.row_ids.tolist() == [9, 5, 8]
    assert [as_tuples(e) for e in view] == [ex[3], ex[1], ex[2]]
    assert as_tuples(view[-1]) == ex[2] and as_tuples(view[np.int64(0)]) == ex[3]
    assert view[1:].row_ids.tolist() == [5, 8] and isinstance(view[1:], ExampleView)
    assert store.view()[np.array([True, False, False, True])].row_ids.tolist() == [3, 9]
    assert view.positions([8, 9]).tolist() == [2, 0]
    with pytest.raises(KeyError, match=r"row ids \[4\]"):
        view.positions([4])
    with pytest.raises(IndexError):
        view[3]
    assert len(store.view(np.zeros(0, np.int64))) == 0


def test_empty_store_and_pickle(tmp_path):
    store = write(tmp_path / "e", PrefExample, [])
    assert len(store) == 0 and len(store.view()) == 0 and store.row_ids.tolist() == []
    ex = [PrefExample(0, (1,), (2, 3), (4,))]
    again = pickle.loads(pickle.dumps(write(tmp_path / "p", PrefExample, ex)))
    assert as_tuples(again.example(0)) == ex[0]


def test_incomplete_or_damaged_store_is_never_read(tmp_path):
    ex = [SFTExample(0, (1,), (2, 3))]
    write(tmp_path / "s", SFTExample, ex)
    (tmp_path / "s" / MARKER).unlink()
    with pytest.raises(StoreError, match="not a complete token store"):
        TokenStore(tmp_path / "s", SFTExample)
    write(tmp_path / "t", SFTExample, ex)
    values = tmp_path / "t" / "response_ids.values"
    values.write_bytes(values.read_bytes()[:-1])
    with pytest.raises(StoreError, match="has 3 bytes, the manifest says 4"):
        TokenStore(tmp_path / "t", SFTExample)
    with pytest.raises(StoreError, match="holds bipost.data.types:SFTExample examples"):
        write(tmp_path / "u", SFTExample, ex) and TokenStore(tmp_path / "u", PrefExample)


def test_token_ids_must_fit_the_dtype(tmp_path):
    with pytest.raises(ValueError, match="token id 70000 does not fit the store's uint16"):
        write(tmp_path / "s", SFTExample, [SFTExample(0, (1,), (70000,))])
    store = write(tmp_path / "i", SFTExample, [SFTExample(0, (1,), (70000,))], token="int32")
    assert store.example(0).response_ids.tolist() == [70000]


def test_release_keeps_examples_valid(tmp_path):
    ex = [SFTExample(i, (1, i), (i, 2)) for i in range(50)]
    store = write(tmp_path / "s", SFTExample, ex)
    held = store.example(7)
    store.release()
    assert held.prompt_ids.tolist() == [1, 7] and as_tuples(store.example(49)) == ex[49]


def test_concat_reads_parts_in_order(tmp_path):
    ex = [SFTExample(i, (1, i), (i, 2)) for i in range(5)]
    store = write(tmp_path / "s", SFTExample, ex)
    both = Concat(store.view(np.array([4, 0])), [ex[2]], store.view(np.zeros(0, np.int64)), store.view()[3:])
    assert len(both) == 5 and [as_tuples(e).row_id for e in both] == [4, 0, 2, 3, 4]
    assert as_tuples(both[-1]) == ex[4] and [e.row_id for e in both[1:3]] == [0, 2]
    with pytest.raises(IndexError):
        both[5]
