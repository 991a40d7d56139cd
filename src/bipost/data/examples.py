"""Example types: which row formats produce an example, and how examples are encoded, collated and packed.

An objective kind (``bipost.kinds``) names the example type it trains on; the data layer never
switches on objective kinds. Two types exist:

* ``sft``: a prompt and a response (:class:`SFTExample`), from the ``input_output``,
  ``prompt_completion`` and ``messages`` formats;
* ``pref``: a prompt shared by a chosen and a rejected response (:class:`PrefExample`), from the
  ``preference`` format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from bipost.data.collate import collate_pref, collate_sft
from bipost.data.formats import format_row
from bipost.data.packing import pack_pref, pack_sft
from bipost.data.tokenize import encode_pref_rows, encode_sft_rows
from bipost.data.types import PrefExample, SFTExample


@dataclass(frozen=True)
class ExampleType:
    """One kind of token-space example."""

    name: str
    example: type
    """The example dataclass: ``row_id`` plus fields the token store keeps (``data/types.py``)."""
    formats: tuple[str, ...]
    """Row formats (``data.format``) that produce it; ``auto`` prefers them in this order."""
    needs: str
    """What the formats are, for error messages."""
    encode: Callable
    """``(items, tokenizer, max_len) -> [(example | skip reason, truncated)]``, an item being
    ``(row_id, *text parts)`` (``data.tokenize``; runs in the store builder's workers). A row that
    gives several examples (all with its row id) returns ``((example, ...), (truncated, ...))``."""
    collate: Callable[[Sequence, int], dict]
    """Padded micro-batch of examples, given the pad id (``data.collate``)."""
    pack: Callable[[Sequence], dict]
    """Packed (padding-free) micro-batch (``data.packing``)."""
    format_row: Callable = format_row
    """``(row, fmt, cfg, tokenizer) -> text parts | skip reason``: a raw row in one of ``formats`` as
    the text parts ``encode`` takes (``data.formats``). A kind with a format of its own passes its own."""
    detect: Optional[Callable] = None
    """``(keys, cfg) -> format | None``: what ``data.format: auto`` picks from the first row's keys, for
    a type with formats of its own (consulted before the built-in rules of ``formats.detect_format``)."""
    reference: Optional[str] = None
    """The field holding the reference response that held-out generations are scored against (exact
    match, token F1; ``bipost.evaluation``); None: this type has none."""
    preferred: bool = False
    """The reference is a *preferred* response: generations are also judged against it (win rate)."""

    def collate_fn(self, pad_id: int, packing: bool) -> Callable[[list], dict]:
        """The micro-batch collate of a stream: packed rows or padded batches."""
        if packing:
            return self.pack
        return lambda examples: self.collate(examples, pad_id)


SFT = ExampleType("sft", SFTExample, ("input_output", "prompt_completion", "messages"),
                  "an SFT format (input_output, prompt_completion, messages)", encode_sft_rows, collate_sft, pack_sft,
                  reference="response_ids")
PREF = ExampleType("pref", PrefExample, ("preference",), "a preference format (chosen/rejected)",
                   encode_pref_rows, collate_pref, pack_pref, reference="chosen_ids", preferred=True)

EXAMPLE_TYPES = {t.name: t for t in (SFT, PREF)}


def example_type(name: str | ExampleType) -> ExampleType:
    """The example type called ``name`` (an :class:`ExampleType` is returned as is)."""
    if isinstance(name, ExampleType):
        return name
    try:
        return EXAMPLE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown example type {name!r} (expected one of {sorted(EXAMPLE_TYPES)})") from None
