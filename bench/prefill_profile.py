"""Where a short prompt's prefill goes, per engine mode (GPU, device tool).

Builds each mode on the random 7B as `bench_engines.py` does, then for each prompt length runs one prompt's
prefill as serving runs it (`prefill_many` through the captured bucket) under torch.profiler, three times.
Writes one kernel table per mode and length (`prefill_profile_<mode>_t<length>.txt` in --out) and prints
one JSON line per mode and length: wall ms per prefill (`bench_engines.mean_ms`: the mean of 3 after a
warm-up, synchronised), GPU kernel ms per prefill, and the ten kernels that took the most.

    python bench/prefill_profile.py --tokenizer-file .tok/tokenizer.model.v1 [--modes nf4,fast]
        [--lengths 32,288] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engines  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

REPEATS = 3


def profile_lengths(engine, tokenizer, lengths: list[int], out_dir: Path) -> None:  # noqa: ANN001
    graphs = engine.scheduler.model.graphs
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for length in lengths:
            ids = torch.tensor(bench_engines.random_prompt(tokenizer, length, generator))
            wall_ms = bench_engines.mean_ms(lambda ids=ids: graphs.prefill_many([0], [ids]), REPEATS)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(REPEATS):
                    graphs.prefill_many([0], [ids])
                bench_engines.sync()
            events = prof.key_averages()
            table = events.table(sort_by="cuda_time_total", row_limit=40)
            (out_dir / f"prefill_profile_{engine.name}_t{length}.txt").write_text(table)
            kernels = sorted(((getattr(e, "self_device_time_total", 0) or 0, e.key, e.count) for e in events),
                             reverse=True)
            print(json.dumps({
                "mode": engine.name, "prompt_tokens": length,
                "wall_ms": wall_ms,
                "gpu_kernel_ms": round(sum(k[0] for k in kernels) / 1e3 / REPEATS, 2),
                "top_kernels_ms": [{"kernel": name[:70], "ms": round(us / 1e3 / REPEATS, 3),
                                    "launches": count // REPEATS} for us, name, count in kernels[:10]],
            }, ensure_ascii=False), flush=True)
        engine.scheduler.model.decoder.kv_release(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-file", default=None)
    parser.add_argument("--modes", default="nf4,fast")
    parser.add_argument("--lengths", default="32,288")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in bench_engines.ENGINE_MODES]:
        parser.error(f"--modes {args.modes}: {', '.join(unknown)} is not one of {', '.join(bench_engines.ENGINE_MODES)}")
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths {args.lengths}: prompt lengths in tokens, e.g. 32,288")
    if not all(0 < n <= 2048 for n in lengths):
        parser.error(f"--lengths {args.lengths}: each between 1 and 2,048 (the bench engines' longest prompt)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = bench_engines.make_tokenizer(args.tokenizer_file, Path("/tmp/prefill_profile_tok"))
    for mode in modes:
        engine = bench_engines.build_engine(mode, bench_engines.build_seed_model(), tokenizer)
        try:
            profile_lengths(engine, tokenizer, lengths, out_dir)
        finally:
            engine.close()
            del engine
            bench_engines.free_gpu()


if __name__ == "__main__":
    main()
