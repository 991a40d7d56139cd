"""The data layer: rows from files or the hub → token-space examples in a memory-mapped, cached
token store → padded or packed batches → streams.

Entry point: :func:`load_objective_data` (one objective's train/eval examples), then
:class:`ExampleStream` (endless deterministic micro-batches) and :func:`eval_batches`.
See docs/data.md.
"""

from bipost.data.cache import DATA_CODE_VERSION, default_cache_dir
from bipost.data.collate import collate_pref, collate_sft
from bipost.data.examples import EXAMPLE_TYPES, PREF, SFT, ExampleType, example_type
from bipost.data.formats import LabeledText, PrefText, SFTText, detect_format, format_row, resolve_format
from bipost.data.load import Example, LoadSummary, ObjectiveData, load_objective_data
from bipost.data.sources import DataError, Row, load_split
from bipost.data.store import ExampleView, TokenStore
from bipost.data.stream import ExampleStream, eval_batches
from bipost.data.tokenize import (TokenPolicy, encode_pref, encode_pref_batch, encode_pref_rows, encode_sft,
                                  encode_sft_batch, encode_sft_rows)
from bipost.data.types import IGNORE_INDEX, PrefExample, Ragged, SFTExample, TokenIds, as_tuples

__all__ = [
    "DATA_CODE_VERSION", "DataError", "EXAMPLE_TYPES", "Example", "ExampleStream", "ExampleType", "ExampleView",
    "IGNORE_INDEX", "LabeledText", "LoadSummary", "PREF", "SFT", "example_type",
    "ObjectiveData", "PrefExample", "PrefText", "Ragged", "Row", "SFTExample", "SFTText", "TokenIds", "TokenPolicy",
    "TokenStore", "as_tuples", "collate_pref", "collate_sft", "default_cache_dir", "detect_format", "encode_pref",
    "encode_pref_batch", "encode_pref_rows", "encode_sft", "encode_sft_batch", "encode_sft_rows", "eval_batches",
    "format_row", "load_objective_data", "load_split", "resolve_format",
]
