"""Turn a conversation into Mistral-instruct prompt token ids.

The layout is Mistral v0.1's own: ``<s>[INST]q1 [/INST]a1</s>[INST]q2 [/INST]``. With no
history the ids are exactly ``tokenizer(f"[INST]{question} [/INST]")["input_ids"]``, the seed's
prompt, so single-turn answers stay bit-for-bit comparable with the seed.

The ids are assembled from per-segment encodings plus the real BOS/EOS ids instead of encoding
one big string: user text is then encoded with special-token parsing switched off, so a user
typing ``</s>`` or ``<s>`` gets plain text pieces and cannot end a turn or forge a new one.
Each segment is encoded once, which also makes trimming to the token budget cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from llm.errors import PromptTooLongError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def user_segment(text: str) -> str:
    """One user turn as the model sees it, ``[INST]text [/INST]``; also what an echo of it looks like."""
    # No space after [INST] but one before [/INST]: the seed's (and the fine-tune's) layout.
    return f"[INST]{text.strip()} [/INST]"


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Encode several segments in one batched call, never turning text into special ids."""
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[tuple[str, str]],
    question: str,
    max_prompt_tokens: int,
) -> list[int]:
    """Return the prompt ids for `question` after `history` ((user, assistant) pairs, oldest first).

    When everything does not fit in `max_prompt_tokens`, whole turns are dropped oldest first;
    the current question is never shortened. Raises `PromptTooLongError` when the question alone
    (with BOS and its ``[INST]`` wrapper) exceeds the budget.
    """
    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id
    if bos_id is None or eos_id is None:
        raise ValueError("the tokenizer needs both a BOS and an EOS token")

    (question_ids,) = _encode(tokenizer, [user_segment(question)])
    used = 1 + len(question_ids)
    if used > max_prompt_tokens:
        raise PromptTooLongError(used, max_prompt_tokens)

    # Walk from the newest turn back, encoding each only once and stopping at the first turn
    # that no longer fits: keeping the longest recent suffix is what "drop oldest first" means,
    # and older turns past that point are never tokenized at all.
    kept: list[list[int]] = []
    for user_text, assistant_text in reversed(history):
        user_ids, answer_ids = _encode(tokenizer, [user_segment(user_text), assistant_text.strip()])
        turn_ids = [*user_ids, *answer_ids, eos_id]
        if used + len(turn_ids) > max_prompt_tokens:
            break
        used += len(turn_ids)
        kept.append(turn_ids)

    ids = [bos_id]
    for turn_ids in reversed(kept):
        ids.extend(turn_ids)
    ids.extend(question_ids)
    return ids
