"""Text parts → token-space examples, under one policy for every format and objective.

* Prompt and response are encoded *separately* with ``add_special_tokens=False`` and
  concatenated, so the prompt/response boundary is exact and a preference pair's chosen and
  rejected sequences share the very same prompt ids.
* BOS: ``bos_token_id`` is prepended to the prompt once iff the tokenizer adds BOS by default
  (probed once: ``tokenizer("a")["input_ids"][0] == bos_token_id``) and the prompt ids do not
  already start with it (chat templates often contain the BOS text). Never two BOS.
* EOS: the response ends with exactly one ``eos_token_id``: trailing EOS ids the text already
  produced (chat templates often emit it) are collapsed into one, else one is appended.
* Truncation to ``max_len`` tokens (prompt + response incl. EOS): the prompt is kept whole, the
  response content is cut from the right and EOS stays last. When ``len(prompt) + 2 > max_len``
  (no room for one response token and EOS) the row is skipped as ``"too long"``. Chosen and
  rejected get the same budget ``max_len - len(prompt)``, each truncated by that rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from bipost.data.types import PrefExample, SFTExample

TOO_LONG = "too long"
"""Skip reason of a row whose prompt leaves no room for a response within ``max_len``."""
EMPTY_RESPONSE = "empty response after tokenization"
"""Skip reason of a response that is nothing but EOS once tokenized."""

_BATCH = 1024  # texts per tokenizer call: fast tokenizers parallelise within a batch


@dataclass(frozen=True, eq=False)
class TokenPolicy:
    """What the tokenizer implies for BOS/EOS/padding, probed once. Build with :meth:`of`."""

    tokenizer: Any
    bos_id: Optional[int]
    """Prepended to every prompt (unless already there), or ``None`` when the tokenizer adds no BOS."""
    eos_id: int
    """Ends every response exactly once."""
    pad_id: int
    """Padding id for collation: ``pad_token_id``, else ``eos_token_id`` (padding is masked anyway)."""

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenPolicy":
        """The policy of ``tokenizer`` (returned as is when it already is a policy)."""
        if isinstance(tokenizer, TokenPolicy):
            return tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token_id: responses must end with EOS "
                f"so the model learns to stop; set tokenizer.eos_token (e.g. to the chat template's end-of-turn token)"
            )
        bos = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(tokenizer, bos if adds_bos else None, int(eos), int(eos if pad is None else pad))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens, tokenized in batches.

        A fast tokenizer's backend is called directly (``encode_batch_fast``: no offsets, no
        attention masks), which gives the ids ``tokenizer(texts, add_special_tokens=False)`` gives
        at ~20% less CPU, when nothing it would set on the backend is in play (truncation, padding,
        ``split_special_tokens``).
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        direct = (backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
                  and backend.padding is None and not getattr(self.tokenizer, "split_special_tokens", False))
        out: list[list[int]] = []
        for i in range(0, len(texts), _BATCH):
            batch = list(texts[i:i + _BATCH])
            if direct:
                out.extend(e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False))
            else:
                out.extend(self.tokenizer(batch, add_special_tokens=False)["input_ids"])
        return out

    def prompt(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Prompt ids with the BOS policy applied."""
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            return (self.bos_id, *ids)
        return tuple(ids)

    def content(self, ids: Sequence[int]) -> list[int]:
        """Response ids without their trailing EOS ids (re-added once after truncation)."""
        ids = list(ids)
        while ids and ids[-1] == self.eos_id:
            ids.pop()
        return ids


def _fit(content: list[int], budget: int, eos: int) -> tuple[tuple[int, ...], bool]:
    """Content cut to ``budget - 1`` tokens plus EOS, and whether it was cut."""
    cut = len(content) > budget - 1
    return (*content[: budget - 1], eos), cut


def _finish_sft(row_id: int, p: Sequence[int], r: Sequence[int], policy: TokenPolicy,
                max_len: int) -> tuple[SFTExample | str, bool]:
    prompt = policy.prompt(p)
    content = policy.content(r)
    if not content:
        return EMPTY_RESPONSE, False
    budget = max_len - len(prompt)
    if budget < 2:
        return TOO_LONG, False
    response, cut = _fit(content, budget, policy.eos_id)
    return SFTExample(row_id, prompt, response), cut


def _finish_pref(row_id: int, p: Sequence[int], c: Sequence[int], r: Sequence[int], policy: TokenPolicy,
                 max_len: int) -> tuple[PrefExample | str, bool]:
    prompt = policy.prompt(p)
    chosen, rejected = policy.content(c), policy.content(r)
    if not chosen or not rejected:
        return EMPTY_RESPONSE, False
    budget = max_len - len(prompt)  # the same for both, so neither side is favoured by length
    if budget < 2:
        return TOO_LONG, False
    chosen_ids, cut_c = _fit(chosen, budget, policy.eos_id)
    rejected_ids, cut_r = _fit(rejected, budget, policy.eos_id)
    # One prompt tuple for both sides: the DPO log-ratio must compare responses to the same context.
    return PrefExample(row_id, prompt, chosen_ids, rejected_ids), cut_c or cut_r


def _check_max_len(max_len: int) -> None:
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one response token and EOS), got {max_len}")


def encode_sft_rows(items: Sequence[tuple[int, str, str]], tokenizer: Any,
                    max_len: int) -> list[tuple[SFTExample | str, bool]]:
    """Encode ``(row_id, prompt, response)`` items: per item ``(example or skip reason, truncated)``.

    This is the row encoder the token store's builder calls (``data/build.py``): ``truncated``
    says the response was cut to fit ``max_len``.
    """
    _check_max_len(max_len)
    policy = TokenPolicy.of(tokenizer)
    prompts = policy.encode([p for _, p, _ in items])
    responses = policy.encode([r for _, _, r in items])
    return [_finish_sft(rid, p, r, policy, max_len) for (rid, _, _), p, r in zip(items, prompts, responses)]


def encode_pref_rows(items: Sequence[tuple[int, str, str, str]], tokenizer: Any,
                     max_len: int) -> list[tuple[PrefExample | str, bool]]:
    """Encode ``(row_id, prompt, chosen, rejected)`` items: per item ``(example or skip reason,
    truncated)``, ``truncated`` when either side was cut to fit ``max_len``."""
    _check_max_len(max_len)
    policy = TokenPolicy.of(tokenizer)
    prompts = policy.encode([it[1] for it in items])
    chosen = policy.encode([it[2] for it in items])
    rejected = policy.encode([it[3] for it in items])
    return [_finish_pref(it[0], p, c, r, policy, max_len) for it, p, c, r in zip(items, prompts, chosen, rejected)]


def _counted(results: list[tuple[Any, bool]], counts: Optional[Counter]) -> list:
    if counts is not None:
        counts["truncated"] += sum(cut for _, cut in results)
    return [example for example, _ in results]


def encode_sft_batch(items: Sequence[tuple[int, str, str]], tokenizer: Any, max_len: int,
                     counts: Optional[Counter] = None) -> list[SFTExample | str]:
    """Encode ``(row_id, prompt, response)`` items; each result is an example or a skip reason.

    ``counts["truncated"]`` (when given) counts responses cut to fit ``max_len``.
    """
    return _counted(encode_sft_rows(items, tokenizer, max_len), counts)


def encode_pref_batch(items: Sequence[tuple[int, str, str, str]], tokenizer: Any, max_len: int,
                      counts: Optional[Counter] = None) -> list[PrefExample | str]:
    """Encode ``(row_id, prompt, chosen, rejected)`` items; each result is an example or a skip reason.

    ``counts["truncated"]`` (when given) counts pairs with at least one side cut to fit.
    """
    return _counted(encode_pref_rows(items, tokenizer, max_len), counts)


def encode_sft(row_id: int, prompt: str, response: str, tokenizer: Any, max_len: int) -> SFTExample | str:
    """One SFT example (or its skip reason). ``tokenizer`` may be a :class:`TokenPolicy` (probed once)."""
    return encode_sft_batch([(row_id, prompt, response)], tokenizer, max_len)[0]


def encode_pref(row_id: int, prompt: str, chosen: str, rejected: str, tokenizer: Any,
                max_len: int) -> PrefExample | str:
    """One preference example (or its skip reason). ``tokenizer`` may be a :class:`TokenPolicy`."""
    return encode_pref_batch([(row_id, prompt, chosen, rejected)], tokenizer, max_len)[0]
