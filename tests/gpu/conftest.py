"""GPU-only tests: skipped with a reason where CUDA is missing (CI).

On the device machine `mistral-common` may be absent; FINBOT_TOKENIZER_FILE can point at a copy
of its `tokenizer.model.v1` (carried with the run) and is used instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _tokenizer_file_override():
    path = os.environ.get("FINBOT_TOKENIZER_FILE")
    if not path:
        yield
        return
    import llm.synthetic

    original = llm.synthetic.mistral_v1_tokenizer_file
    llm.synthetic.mistral_v1_tokenizer_file = lambda: Path(path)
    yield
    llm.synthetic.mistral_v1_tokenizer_file = original
