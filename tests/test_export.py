"""`finbot export-merged`: the merged bf16 checkpoint computes what the seed's 4-bit PeftModel computes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.process import run_finbot


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged")
    result = run_finbot(
        "export-merged", str(out), cwd=out.parent,
        BASE_MODEL=str(tiny_checkpoint.base_dir), ADAPTER=str(tiny_checkpoint.adapter_dir), DEVICE="cpu",
    )
    assert result.returncode == 0, result.stderr
    return out


def test_export_writes_plain_bf16_safetensors_and_tokenizer(exported):
    files = {path.name for path in exported.iterdir()}
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)
    assert "tokenizer.model" in files or "tokenizer.json" in files
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


def test_exported_logits_match_the_4bit_peft_reference(exported, tiny_checkpoint, mistral_tokenizer):
    from transformers import AutoModelForCausalLM

    from llm.loading import load_reference_model
    from llm.prompt import encode_prompt

    reference = load_reference_model(str(tiny_checkpoint.base_dir), str(tiny_checkpoint.adapter_dir), "cpu")
    merged = AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.bfloat16)
    merged.eval()
    ids = torch.tensor([encode_prompt(mistral_tokenizer, [("기준금리?", "정책금리예요.")], "환율은?", 512)])
    with torch.inference_mode():
        want = reference(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.03 * scale + 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95
    # The LoRA (lm_head included) is really in there: the base alone differs clearly.
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint.base_dir, torch_dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = base(input_ids=ids).logits.float()
    assert (plain - want).abs().max().item() > (got - want).abs().max().item()


def test_exported_tokenizer_round_trips(exported, mistral_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "[INST]중앙은행의 역할에 대해서 설명해줄래? 金利 rate 2.5% [/INST]"
    assert tokenizer(text)["input_ids"] == mistral_tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
