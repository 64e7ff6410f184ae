"""What an operator is told when the GPU cannot hold the model: one line that names a mode that fits
(`nf4`, the seed's own 4-bit weights), never the retired `low-memory` one."""

from __future__ import annotations

import pytest

from bot import cli
from bot.doctor import GPU_MEMORY_GB, gpu_memory_advice, gpu_memory_need
from bot.errors import FinbotError
from bot.settings import FinbotSettings


@pytest.mark.parametrize(
    ("engine", "paged_kv", "need"),
    [("fast", True, "fast"), ("fast", False, "fast-static"), ("nf4", True, "nf4"), ("nf4", False, "nf4"),
     ("low-memory", True, "low-memory"), ("reference", True, "reference")],
)
def test_each_engine_setting_needs_its_measured_memory(engine, paged_kv, need):
    assert gpu_memory_need(engine, paged_kv) == need
    assert need in GPU_MEMORY_GB


def test_the_advice_names_a_mode_that_fits_and_never_the_retired_one():
    for need in GPU_MEMORY_GB:
        assert "low-memory" not in gpu_memory_advice(need)
        assert gpu_memory_advice(need).startswith("free the GPU")
    assert "ENGINE=nf4 (about 6.4 GB)" in gpu_memory_advice("fast")
    assert "ENGINE_PAGED_KV=true" in gpu_memory_advice("fast-static")
    assert "ENGINE=nf4" not in gpu_memory_advice("nf4")  # already the smallest mode
    assert "ENGINE_KV_CACHE_TOKENS" in gpu_memory_advice("nf4")


@pytest.mark.parametrize(("engine", "names_nf4"), [("fast", True), ("nf4", False)])
def test_running_out_of_gpu_memory_at_load_is_one_line_with_that_advice(monkeypatch, engine, names_nf4):
    # A GPU running out of memory cannot happen on this machine: the loader raises what torch raises then.
    def out_of_memory(settings: FinbotSettings) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 224.00 MiB (GPU 0; 15.57 GiB total)\nmore")

    monkeypatch.setattr(cli, "build_engine_from", out_of_memory)
    monkeypatch.setenv("ENGINE", engine)
    with pytest.raises(FinbotError) as raised:
        cli.load_engine_or_explain(FinbotSettings(_env_file=None), checked=f"ENGINE={engine}")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("not enough GPU memory to load the model")
    assert "CUDA out of memory. Tried to allocate 224.00 MiB" in message
    advice = message.rsplit("; ", 1)[1]  # after what was loaded and torch's own first line
    assert ("ENGINE=nf4" in advice) is names_nf4
    assert "low-memory" not in advice and advice.endswith("(see finbot doctor)")


@pytest.mark.parametrize(("engine", "ok", "served"), [("auto", True, "nf4"), ("fast", False, "fast"), ("nf4", True, "nf4")])
def test_doctor_checks_the_memory_of_what_will_be_served_on_a_16_gib_card(monkeypatch, engine, ok, served):
    # No GPU here: torch's view of one 16 GiB card with 15 GB free, as the doctor asks for it.
    import types

    import torch

    from bot import doctor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "a 16 GiB GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (15.0e9, 17.1e9))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=17.1e9))
    monkeypatch.setenv("ENGINE", engine)
    memory = {c.name: c for c in doctor.check_gpu(FinbotSettings(_env_file=None))}["GPU memory"]
    assert memory.ok is ok and f"ENGINE={engine} ({served})" in memory.found
    assert ("ENGINE=nf4" in memory.fix) is (not ok)


def test_a_gpu_index_past_the_visible_ones_is_one_line_before_anything_loads(monkeypatch):
    # ENGINE=auto asks that GPU for its memory first: a DEVICE past the visible GPUs must be named,
    # not end in torch's assertion. No GPU here: torch's view of a one-GPU machine.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("DEVICE", "cuda:3")
    with pytest.raises(FinbotError) as raised:
        cli.check_engine_device(FinbotSettings(_env_file=None))
    assert str(raised.value) == "DEVICE=cuda:3, but only 1 GPU(s) are visible; DEVICE=auto or cuda:0"
    monkeypatch.setenv("DEVICE", "cuda:0")
    cli.check_engine_device(FinbotSettings(_env_file=None))  # the one that is there
