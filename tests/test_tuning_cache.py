"""The nf4 tuner's plans on disk (`llm.serving.tuning_cache`): a restart finds its own plan, never
another GPU's or another kernel version's, and a damaged or unwritable file costs a tuning, not a start."""

from __future__ import annotations

import json
import logging

from llm.serving import tuning_cache

FACTS = {"gpu": "NVIDIA H200", "capability": [9, 0], "torch": "2.11.0", "kernels": "abc", "buckets": [1, 2, 4, 16],
         "projections": {"qkv": {"shape": [6144, 4096], "rank": 32}}}
PLAN = {"choices": {"qkv": {"1": {"config": "mma_16x256w4s2f", "dequant_cublas": False}}}, "timings_ms": {"qkv_m1": 0.4}}


def test_a_stored_plan_is_found_under_its_own_key_only(tmp_path):
    path = tmp_path / "cache" / "nf4-tuning.json"
    key = tuning_cache.plan_key(FACTS)
    assert tuning_cache.load_plan(path, key) is None  # no file yet: simply a first start

    assert tuning_cache.store_plan(path, key, PLAN)

    stored = tuning_cache.load_plan(path, key)
    assert stored is not None and stored["choices"] == PLAN["choices"] and stored["timings_ms"] == PLAN["timings_ms"]
    assert stored["saved_at"]
    for changed in ({"gpu": "NVIDIA L4"}, {"kernels": "abd"}, {"torch": "2.13.0"}, {"buckets": [1, 2, 4, 8, 16]},
                    {"projections": {"qkv": {"shape": [6144, 4096], "rank": 16}}}):
        assert tuning_cache.load_plan(path, tuning_cache.plan_key({**FACTS, **changed})) is None, changed
    assert [p.name for p in path.parent.iterdir()] == ["nf4-tuning.json"]  # no temporary file left behind


def test_the_key_does_not_depend_on_the_order_of_the_facts():
    assert tuning_cache.plan_key(dict(reversed(list(FACTS.items())))) == tuning_cache.plan_key(FACTS)


def test_the_kernels_source_digest_changes_with_any_edit(tmp_path):
    kernel = tmp_path / "kernel.py"
    kernel.write_text("x = 1\n")
    before = tuning_cache.source_digest([kernel])
    kernel.write_text("x = 2\n")
    assert tuning_cache.source_digest([kernel]) != before


def test_a_damaged_file_is_one_warning_and_is_rewritten(tmp_path, caplog):
    path = tmp_path / "nf4-tuning.json"
    path.write_text('{"version": 1, "plans": {"abc"')  # cut short, as by a full disk
    key = tuning_cache.plan_key(FACTS)

    with caplog.at_level(logging.WARNING, logger="llm.serving.tuning_cache"):
        assert tuning_cache.load_plan(path, key) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(path) in lines[0] and "timing the kernels again" in lines[0]
    assert "\n" not in lines[0]

    assert tuning_cache.store_plan(path, key, PLAN)
    assert tuning_cache.load_plan(path, key)["choices"] == PLAN["choices"]


def test_another_programs_json_is_not_taken_for_a_plan(tmp_path, caplog):
    path = tmp_path / "nf4-tuning.json"
    path.write_text(json.dumps({"plans": {tuning_cache.plan_key(FACTS): PLAN}}))  # no version: not ours
    with caplog.at_level(logging.WARNING, logger="llm.serving.tuning_cache"):
        assert tuning_cache.load_plan(path, tuning_cache.plan_key(FACTS)) is None
    assert "not a finbot tuning cache" in caplog.records[0].getMessage()


def test_an_unwritable_place_is_one_warning_and_no_exception(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = blocker / "nf4-tuning.json"  # its parent is a file
    with caplog.at_level(logging.WARNING, logger="llm.serving.tuning_cache"):
        assert not tuning_cache.store_plan(path, tuning_cache.plan_key(FACTS), PLAN)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cannot be written" in lines[0] and "next start times the kernels again" in lines[0]


def test_the_newest_plans_are_kept_and_the_oldest_dropped(tmp_path):
    path = tmp_path / "nf4-tuning.json"
    keys = [tuning_cache.plan_key({**FACTS, "gpu": f"GPU {i}"}) for i in range(tuning_cache.KEPT_PLANS + 2)]
    for key in keys:
        tuning_cache.store_plan(path, key, PLAN)
    assert [key for key in keys if tuning_cache.load_plan(path, key) is not None] == keys[2:]

    tuning_cache.store_plan(path, keys[2], PLAN)  # tuned again: now the newest
    newcomer = tuning_cache.plan_key({**FACTS, "gpu": "one more"})
    tuning_cache.store_plan(path, newcomer, PLAN)

    kept = [key for key in [*keys, newcomer] if tuning_cache.load_plan(path, key) is not None]
    assert kept == [keys[2], *keys[4:], newcomer]  # keys[3] was now the oldest
