"""Run 34's one-row decode changes, each switched off in turn, in one process (GPU, device tool).

Builds the `nf4` engine on the random 7B (as `bench_engines.py` does), then captures one-row decode graphs
for each variant and times the step (graph replays, KV 256 and 2,048), with the step's logits compared
against the variant with everything on (max |difference|, same argmax). The variants:

- `all`: as served;
- `no_rope_fold`: q/k/v's launch without the rope kernel's work (the rope kernel runs again);
- `no_combine_fold`: o's launch without the attention's combine (the reduce kernel runs again);
- `float32_absmax`: the x-table kernels read the float32 absmax instead of the one-byte one;
- `run33`: all three off (what run 33 served, but for the loads moved before the wait, which has no switch).

Prints one JSON line per variant.

    python bench/nf4_step_variants.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engines  # noqa: E402
import torch  # noqa: E402

from llm.serving.mistral_decoder import DecodeGraphs  # noqa: E402

VARIANTS = {
    "all": set(),
    "no_rope_fold": {"rope"},
    "no_combine_fold": {"combine"},
    "float32_absmax": {"compact"},
    "run33": {"rope", "combine", "compact"},
}


def _none(*_args: object) -> None:
    return None


@contextlib.contextmanager
def switched_off(decoder, off: set[str]) -> Iterator[None]:  # noqa: ANN001
    """The decoder's layers with the changes in `off` switched off (instance attributes shadowing the
    layers' methods, the projections' weights without their one-byte absmax); restored on exit."""
    missing = object()
    saved: list[tuple[object, str, object]] = []
    for layer in decoder.layers:
        names = [*(("qkv_rope", "after_add_norm_rope") if "rope" in off else ()),
                 *(("o_after_attention",) if "combine" in off else ())]
        for name in names:
            saved.append((layer, name, vars(layer).get(name, missing)))  # the start-up check may have set one
            setattr(layer, name, _none)
        if "compact" in off:
            for projection in layer.projections.values():
                saved.append((projection, "weight", projection.weight))
                projection.weight = replace(projection.weight, compact=None)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--tokenizer-file", default=None)
    args = parser.parse_args()
    tokenizer = bench_engines.make_tokenizer(args.tokenizer_file, Path("/tmp/nf4_step_variants_tok"))
    engine = bench_engines.build_engine("nf4", bench_engines.build_seed_model(), tokenizer)
    graphs = engine.scheduler.model.graphs
    decoder = graphs.decoder
    # The start-up check switches off a fold that disagrees with the separate steps: then "all" lacks it.
    print(json.dumps({"folds_switched_off_at_start_up": engine.info.get("nf4_folds_switched_off")}), flush=True)
    reference: dict[int, torch.Tensor] = {}
    for label, off in VARIANTS.items():
        result: dict = {"variant": label}
        with switched_off(decoder, off), torch.inference_mode():
            base = DecodeGraphs(decoder, batch_buckets=[1, decoder.max_batch], kv_buckets=[graphs.max_seq_len])
            base.capture()
            try:
                for kv in (256, 2048):
                    bench_engines._profile_tables(decoder, 1, kv)
                    try:
                        logits = base.decode([1], [kv - 1]).float()
                        result[f"b1_kv{kv}_ms"] = round(bench_engines.mean_ms(
                            lambda kv=kv, base=base: base.decode([1], [kv - 1]), args.repeats, 5), 4)
                    finally:
                        bench_engines._clear_profile_tables(decoder, 1)
                    if kv not in reference:
                        reference[kv] = logits
                    else:
                        result[f"kv{kv}_max_abs_logit_difference"] = round(
                            (logits - reference[kv]).abs().max().item(), 5)
                        result[f"kv{kv}_same_argmax"] = bool(logits.argmax() == reference[kv].argmax())
            finally:
                base._graphs.clear()  # not base.close(): that would free the shared decoder
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
