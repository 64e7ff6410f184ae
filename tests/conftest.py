"""Shared fixtures: the real Mistral v1 tokenizer and a tiny random model with a random LoRA.

Nothing is ever downloaded: the tokenizer file ships inside the `mistral-common` package and
the model is built here with random weights in the real architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from llm.synthetic import build_random_checkpoint, write_mistral_tokenizer  # noqa: E402

# `database_url`: each storage test runs on a SQLite file and on a throwaway PostgreSQL server.
pytest_plugins = ["tests.postgres"]


@dataclass(frozen=True)
class TinyCheckpoint:
    base_dir: Path
    adapter_dir: Path


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    write_mistral_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    base_dir, adapter_dir = build_random_checkpoint(tmp_path_factory.mktemp("tiny-model"))
    return TinyCheckpoint(base_dir=base_dir, adapter_dir=adapter_dir)
