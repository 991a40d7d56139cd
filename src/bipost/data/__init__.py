"""The data layer: rows from files or the hub → token-space examples → padded batches → streams.

Entry point: :func:`load_objective_data` (one objective's train/eval examples), then
:class:`ExampleStream` (endless deterministic micro-batches) and :func:`eval_batches`.
"""

from bipost.data.collate import collate_pref, collate_sft
from bipost.data.formats import PrefText, SFTText, detect_format, format_row, resolve_format
from bipost.data.load import Example, LoadSummary, ObjectiveData, load_objective_data
from bipost.data.sources import DataError, Row, load_split
from bipost.data.stream import ExampleStream, eval_batches
from bipost.data.tokenize import TokenPolicy, encode_pref, encode_pref_batch, encode_sft, encode_sft_batch
from bipost.data.types import IGNORE_INDEX, PrefExample, SFTExample

__all__ = [
    "DataError", "Example", "ExampleStream", "IGNORE_INDEX", "LoadSummary", "ObjectiveData", "PrefExample",
    "PrefText", "Row", "SFTExample", "SFTText", "TokenPolicy", "collate_pref", "collate_sft", "detect_format",
    "encode_pref", "encode_pref_batch", "encode_sft", "encode_sft_batch", "eval_batches", "format_row",
    "load_objective_data", "load_split", "resolve_format",
]
