"""The nf4 tuner's plan kept on disk, on the GPU: a second start serves the first start's choice after
checking it, without timing every layout; a plan this version cannot serve is timed again."""

from __future__ import annotations

import json
import logging

import pytest

pytestmark = pytest.mark.gpu

BUCKETS = [1, 16]


def _groups():  # noqa: ANN202
    from tests.gpu.test_nf4_kernels import _projection

    # a fused projection of three parts, small enough to tune in seconds, in the tensor-core kernel's shapes
    return {"qkv": [_projection([(1024, 0), (256, 0), (256, 0)], 1024)], "down": [_projection([(1024, 0)], 2048)]}


@pytest.fixture
def fresh_plan(monkeypatch):  # noqa: ANN201
    """Each tuning starts from an empty plan, as a new process does."""
    from llm.serving import nf4_kernels

    def reset() -> nf4_kernels.NF4Plan:
        plan = nf4_kernels.NF4Plan()
        monkeypatch.setattr(nf4_kernels, "PLAN", plan)
        return plan

    return reset


def test_a_restart_serves_the_stored_plan_after_checking_it(tmp_path, fresh_plan, caplog):
    from llm.serving import nf4_kernels

    cache = tmp_path / "nf4-tuning.json"
    groups = _groups()
    fresh_plan()
    first = nf4_kernels.tune(groups, BUCKETS, cache=cache)
    assert first["tuning_cache"] == "miss" and cache.exists()
    chosen = {key: value for key, value in first.items() if key.startswith("m")}
    assert chosen

    fresh_plan()
    with caplog.at_level(logging.INFO, logger="llm.serving.nf4_kernels"):
        second = nf4_kernels.tune(groups, BUCKETS, cache=cache)
    print("TUNING_CACHE " + json.dumps({"first_s": first["tune_s"], "second_s": second["tune_s"]}))
    assert second["tuning_cache"] == "hit"
    assert {key: value for key, value in second.items() if key.startswith("m")} == chosen
    assert second["tune_s"] < first["tune_s"] / 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "serving the layouts timed at" in lines[0] and str(cache) in lines[0]


def test_a_stored_layout_this_version_does_not_serve_is_timed_again(tmp_path, fresh_plan, caplog):
    from llm.serving import nf4_kernels

    cache = tmp_path / "nf4-tuning.json"
    groups = _groups()
    fresh_plan()
    first = nf4_kernels.tune(groups, BUCKETS, cache=cache)
    data = json.loads(cache.read_text())
    (plan,) = data["plans"].values()
    plan["choices"]["down"]["16"]["config"] = "mma_16x256w3s1f"  # no such layout
    cache.write_text(json.dumps(data))

    fresh_plan()
    with caplog.at_level(logging.WARNING, logger="llm.serving.nf4_kernels"):
        again = nf4_kernels.tune(groups, BUCKETS, cache=cache)
    assert again["tuning_cache"] == "stale"
    assert {k for k in again if k.startswith("m")} == {k for k in first if k.startswith("m")}  # all timed again
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "mma_16x256w3s1f" in warnings[0] and "timing the kernels again" in warnings[0]
    (rewritten,) = json.loads(cache.read_text())["plans"].values()
    assert rewritten["choices"]["down"]["16"]["config"] != "mma_16x256w3s1f"
