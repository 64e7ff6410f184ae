"""bench/mma_whatifs.sh edits the kernel's text with sed patterns; a pattern that no longer matches the
kernel would time the served kernel under a what-if's name (the script refuses that), and one that
breaks the text would only fail on the device. Both are checked here, without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "mma_whatifs.sh"
# q/k/v's served 16-row layout (two groups ahead) and gate/up's (two tiles, shared code pairs):
# (warps, rows, rank, tiles, prefetch_x, ahead, k, fuse_a, shared_lookups)
LAYOUTS = [(4, 16, 32, 1, False, 2, 4096, True, 0), (4, 16, 32, 2, False, 1, 4096, True, 2)]
WRITE_SOURCES = """
import json, sys
from llm.serving import nf4_mma
from tests.test_nf4_mma import NF4_CODE
for i, layout in enumerate(json.loads(sys.argv[1])):
    w, r, rank, tiles, prefetch, ahead, k, fuse, lookups = layout
    text = nf4_mma.source(NF4_CODE, w, r, rank, tiles, prefetch, ahead, k, fuse, shared_lookups=lookups)
    open(f"{sys.argv[2]}/layout{i}.cu", "w").write(text)
print(nf4_mma.launch_blocks(16, 4096, 4096, 32, 8, 1, True, 1)[0])
"""


def run_script(tmp_path: Path, script: Path = SCRIPT, **env: str) -> subprocess.CompletedProcess:
    """bench/mma_whatifs.sh (or a copy) with OUT in tmp_path and `env` added."""
    return subprocess.run(["bash", str(script)], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=120)


def test_every_what_if_edit_still_changes_the_kernel_and_its_text_compiles(tmp_path):
    done = run_script(tmp_path, EDIT_ONLY=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    copies = sorted(tmp_path.glob("mma-whatif-*"))
    assert len(copies) >= 20 and (tmp_path / "mma-whatif-served").is_dir()
    nvcc = shutil.which("nvcc")
    a_blocks = {}
    for copy in copies:
        # each copy's own llm/, the tests' NF4 code from this checkout
        env = {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{ROOT}"}
        made = subprocess.run([sys.executable, "-c", WRITE_SOURCES, json.dumps(LAYOUTS), str(copy)], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, (copy.name, made.stderr[-2000:])
        a_blocks[copy.name.removeprefix("mma-whatif-")] = int(made.stdout.split()[-1])
        if nvcc is None:
            continue
        for source in sorted(copy.glob("layout*.cu")):
            built = subprocess.run([nvcc, "-arch=sm_90", "-ptx", "-o", str(source.with_suffix(".ptx")), str(source)],
                                   capture_output=True, text=True, timeout=300)
            assert built.returncode == 0, (copy.name, source.name, built.stderr[-2000:])
    # the A-block caps edit the grid formula (Python), o's at 16 rows: 32 blocks served
    assert a_blocks["served"] == 32 and a_blocks["a_blocks_8"] == 8 and a_blocks["a_blocks_64"] == 32


def test_an_unknown_what_if_is_named_with_the_known_ones(tmp_path):
    done = run_script(tmp_path, WHATIFS="served_typo")  # refused before anything would run
    assert done.returncode == 1
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["what_if"] == "served_typo" and "no_mma" in line["error"]


def test_an_edit_that_no_longer_matches_is_refused(tmp_path):
    # a copy of the script whose no_mma pattern names an instruction the kernel does not have
    script = tmp_path / "mma_whatifs.sh"
    script.write_text(SCRIPT.read_text().replace('[no_mma]=\'/asm("mma.sync.aligned.m16n8k16/',
                                                 '[no_mma]=\'/asm("mma.sync.aligned.m16n8k32/'))
    done = run_script(tmp_path, script, EDIT_ONLY=str(tmp_path))
    assert done.returncode == 1
    assert '"what_if": "no_mma", "error": "the edit did not change' in done.stdout
