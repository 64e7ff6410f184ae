"""Can a prompt's prefill run beside the decode steps instead of between them? (GPU, device tool)

The experiment before any scheduler change. With 16 staggered answers the prompts stall every
running answer: `nf4`'s exact prompt (weights dequantized for cuBLAS) is ALU-light and memory-bound,
its 16-row decode step is ALU-bound at ~1.8 TB/s, so the two might share the card. For each mode it
builds the engine (start-up timed: on a fresh machine that is the first start's figure), gives 16
rows a 512-token cache, then times, with graph replays only:

- `decode_ms`: one 16-row decode step alone;
- `prefill_ms`: one prompt of L tokens alone (its captured bucket);
- together: P prompts on a second stream while K decode steps run on the first, K x decode_ms about
  P x prefill_ms; `overlap_gain` = (K x decode_ms + P x prefill_ms) / wall, 1.0 = no overlap;
  `decode_ms_beside` = mean decode step while the prompts run. Once with equal stream priorities,
  once with the decode stream at high priority.

The prompt graphs share the decode graphs' memory pool, so the concurrent results are garbage;
only times are read. Prints one JSON line per mode. In run 27 `fast`'s case hung on the GPU (some
kernel of its graphs waits on its own other blocks, which the other stream kept off the SMs) and
took the call's 10 minutes: a case that runs past `--case-timeout` now ends the run with every
thread's stack on stderr.

    python bench/prefill_overlap.py --tokenizer-file .tok/tokenizer.model.v1 [--cases nf4,fast]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_engines import (  # noqa: E402
    _profile_tables,
    _time_decode_ms,
    build_engine,
    build_seed_model,
    free_gpu,
    make_tokenizer,
    mean_ms,
    random_prompt,
    sync,
)

ROWS, KV = 16, 512


def measure(name: str, tokenizer) -> dict:  # noqa: ANN001
    model = build_seed_model()
    sync()
    started = time.perf_counter()
    engine = build_engine(name, model, tokenizer)
    sync()
    result: dict = {"case": name, "engine_build_s": round(time.perf_counter() - started, 1)}
    result["info"] = {k: v for k, v in engine.info.items() if isinstance(v, int | float | str | bool)}
    plan = engine.info.get("nf4_plan") or {}
    result["tune"] = {k: v for k, v in plan.items() if not k.startswith("m")}
    del model
    graphs = engine.scheduler.model.graphs
    decoder = graphs.decoder
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        _profile_tables(decoder, ROWS, KV)
        tokens, positions = [1] * ROWS, [KV - 1] * ROWS
        graphs._prefill_dest.copy_(decoder.prefill_destination([], [], graphs.max_batch))  # all scratch
        decode_ms = result["decode_ms"] = _time_decode_ms(graphs, tokens, positions, warmup=1, repeats=30)
        for length in (32, 288):
            bucket = graphs._prefill_bucket(1, length)
            ids, _, _ = graphs._prefill_buffers(*bucket)
            ids.copy_(torch.tensor(random_prompt(tokenizer, bucket[1], generator)).view_as(ids))
            graph, _ = graphs._prefill_graphs[bucket]
            prefill_ms = mean_ms(graph.replay, 10)
            prompts = 6
            steps = max(1, round(prompts * prefill_ms / decode_ms))
            entry = {"bucket": list(bucket), "prefill_ms": prefill_ms, "prompts": prompts, "steps": steps}
            for label, priority in (("equal", 0), ("decode_high", -1)):
                decode_stream = torch.cuda.Stream(priority=priority)
                prompt_stream = torch.cuda.Stream(priority=0)
                decode_stream.wait_stream(torch.cuda.current_stream())
                prompt_stream.wait_stream(torch.cuda.current_stream())
                sync()
                marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
                start = time.perf_counter()
                with torch.cuda.stream(prompt_stream):
                    for _ in range(prompts):
                        graph.replay()
                with torch.cuda.stream(decode_stream):
                    marks[0].record()
                    for index in range(steps):
                        graphs.decode(tokens, positions)
                        marks[index + 1].record()
                sync()
                wall_ms = (time.perf_counter() - start) * 1000
                step_times = [marks[i].elapsed_time(marks[i + 1]) for i in range(steps)]
                serial = steps * decode_ms + prompts * prefill_ms
                entry[label] = {
                    "wall_ms": round(wall_ms, 2), "serial_ms": round(serial, 2),
                    "overlap_gain": round(serial / wall_ms, 3),
                    "decode_ms_beside": round(sum(step_times) / steps, 3),
                    "decode_ms_max": round(max(step_times), 3),
                }
            result[f"t{length}"] = entry
    engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-file")
    parser.add_argument("--cases", default="nf4,fast")
    parser.add_argument("--case-timeout", type=float, default=240.0, help="seconds per mode before the stacks are dumped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prefill_overlap.py measures a GPU: run it on the device (bench/NOTES.md, Reproduce)")
    tokenizer = make_tokenizer(args.tokenizer_file, Path(tempfile.mkdtemp()) / "tok")
    for name in args.cases.split(","):
        faulthandler.dump_traceback_later(args.case_timeout, exit=True)
        try:
            print("RESULT " + json.dumps(measure(name, tokenizer)), flush=True)
        except Exception as error:  # noqa: BLE001 - one mode's failure leaves the other measured
            import traceback

            print("RESULT " + json.dumps({"case": name, "error": repr(error),
                                          "trace": traceback.format_exc(limit=6)}), flush=True)
        faulthandler.cancel_dump_traceback_later()
        free_gpu()


if __name__ == "__main__":
    main()
