"""The Mistral v1 tokenizer that the `mistral-common` package ships, usable without a download.

komt-mistral-7b-v1 keeps Mistral-7B's tokenizer unchanged (32,000 SentencePiece pieces), so this
file tokenizes exactly as the model's own copy does. The fake engine uses it when no model
directory is given, so that `ENGINE=fake` works with no network at all (`BundledMistralTokenizer`:
no transformers needed); tests and benchmarks build their random checkpoints around it (see
`llm.synthetic`).

Torch-free on purpose: the fake engine's start-up must not pay for importing torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Mistral-7B-v0.1's published tokenizer_config.json (the fields that change tokenization).
MISTRAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "model_max_length": 32768,
    "spaces_between_special_tokens": False,
}


def mistral_v1_tokenizer_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_tokenizer_dir(out_dir: Path, tokenizer_file: Path) -> None:
    """A directory `AutoTokenizer.from_pretrained` loads: the SentencePiece file plus Mistral's config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_file, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(MISTRAL_TOKENIZER_CONFIG, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def load_bundled_mistral_tokenizer() -> PreTrainedTokenizerBase:
    """Mistral's v1 tokenizer from mistral-common's data as a transformers tokenizer, offline."""
    from transformers import AutoTokenizer

    # transformers loads tokenizers from a directory; a throwaway one keeps the package's data
    # read-only and leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="finbot-tokenizer-") as directory:
        write_tokenizer_dir(Path(directory), mistral_v1_tokenizer_file())
        return AutoTokenizer.from_pretrained(directory)


class BundledMistralTokenizer:
    """The same SentencePiece model read by `sentencepiece` alone, behind the calls the fake engine's
    pipeline makes (prompt encoding, decoding, token counts).

    Why not transformers' tokenizer: importing transformers (and torch with it) takes about 3 s,
    most of `ENGINE=fake`'s start-up, for a model that does not exist. Ids match transformers'
    (legacy Llama, no special-token parsing of user text) except in rare corner cases (a text
    starting with several spaces), which a template engine does not care about.
    """

    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 0
    pad_token_id = None
    bos_token = "<s>"
    eos_token = "</s>"

    def __init__(self, model_file: Path | None = None) -> None:
        from sentencepiece import SentencePieceProcessor

        self._processor = SentencePieceProcessor(model_file=str(model_file or mistral_v1_tokenizer_file()))
        self.vocab_size = self._processor.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True, **_: object) -> list[int]:
        # SentencePiece never reads "<s>" or "</s>" in text as control tokens: user text stays text.
        ids = list(self._processor.encode(text))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(
        self, texts: str | Sequence[str], add_special_tokens: bool = True, **_: object
    ) -> dict[str, list[int] | list[list[int]]]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(text, add_special_tokens) for text in texts]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: object) -> str:
        special = {self.bos_token_id: self.bos_token, self.eos_token_id: self.eos_token}
        parts: list[str] = []
        run: list[int] = []

        def flush() -> None:
            text = self._processor.decode(run)
            # SentencePiece drops a piece's leading "▁" at the start of every decode; transformers
            # only at the start of the whole text, so a run after a special token keeps its space.
            if run and any(parts) and self._processor.id_to_piece(run[0]).startswith("\u2581"):
                text = " " + text
            parts.append(text)
            run.clear()

        for token_id in ids:
            if token_id in special:
                flush()
                if not skip_special_tokens:
                    parts.append(special[token_id])
            else:
                run.append(int(token_id))
        flush()
        return "".join(parts)
