#!/usr/bin/env bash
# What a device call needs beside the working tree, made here once (ignored by git; carry them):
#   .whl   bitsandbytes 0.50.2 (the GPU image has torch, transformers, peft and Triton, not bitsandbytes)
#   .whl2  the bot's own dependencies, for `bench/load_bot_gpu.sh` (the versions of the active venv)
#   .tok   the Mistral v1 tokenizer that mistral-common ships (the random 7B's tokenizer)
# Usage, from the repository root with the test venv active: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.whl2/ /.tok/; do
    grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
# The GPU image runs CPython 3.12 on x86-64 Linux.
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p .whl .whl2 .tok
pip download -q "${target[@]}" -d .whl bitsandbytes==0.50.2
bot_packages=(slack_bolt slack_sdk SQLAlchemy alembic Mako MarkupSafe APScheduler tzlocal pydantic pydantic_core
              pydantic-settings python-dotenv typing-inspection annotated-types typing_extensions holidays
              python-dateutil six prometheus_client psutil aiohttp aiohappyeyeballs aiosignal attrs frozenlist
              multidict propcache yarl idna PyYAML sentencepiece)
pinned=$(python3 - "${bot_packages[@]}" <<'PY'
import importlib.metadata
import sys

print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in sys.argv[1:]))
PY
)
# shellcheck disable=SC2086  # one argument per pinned package
pip download -q "${target[@]}" -d .whl2 $pinned
python3 -c "from llm.synthetic import mistral_v1_tokenizer_file as f; import shutil; shutil.copy(f(), '.tok/tokenizer.model.v1')"
echo "ready to carry: .whl ($(ls .whl | wc -l) wheel), .whl2 ($(ls .whl2 | wc -l) wheels, $(du -sh .whl2 | cut -f1)), .tok"
