"""Streaming through the batching engine yields whole characters only (Korean byte-fallback tokens)."""

from __future__ import annotations

import threading

import torch

from llm.engine import SamplingParams
from llm.serving.batching import BatchingEngine

ANSWER = "기준금리 동결로 원·달러 환율은 1,380원대에서 안정될 전망입니다. 😊 투자에 유의하세요!"


class ScriptedModel:
    """A StepModel whose logits force a fixed token sequence per slot (then EOS)."""

    def __init__(self, scripts: dict[int, list[int]], eos: int, vocab: int = 32000, max_batch: int = 4) -> None:
        self.max_batch, self.max_seq_len = max_batch, 4096
        self.vocab, self.eos = vocab, eos
        self.scripts = scripts  # first prompt token -> answer tokens
        self.slot_script: dict[int, list[int]] = {}
        self.slot_step: dict[int, int] = {}

    def _logits(self, slot: int) -> torch.Tensor:
        script, step = self.slot_script[slot], self.slot_step[slot]
        token = script[step] if step < len(script) else self.eos
        self.slot_step[slot] = step + 1
        logits = torch.full((self.vocab,), -1e4)
        logits[token] = 1e4
        return logits

    def prefill(self, slot, prompt_ids):
        self.slot_script[slot] = self.scripts[prompt_ids[-1]]
        self.slot_step[slot] = 0
        return self._logits(slot)

    def decode(self, tokens, positions):
        return torch.stack([
            self._logits(slot) if slot in self.slot_script else torch.zeros(self.vocab)
            for slot in range(len(tokens))
        ])

    def close(self):
        pass


def _engine(mistral_tokenizer, scripts):
    model = ScriptedModel(scripts, eos=mistral_tokenizer.eos_token_id)
    return BatchingEngine(model, mistral_tokenizer, name="scripted")


def test_stream_yields_whole_characters_only(mistral_tokenizer):
    answer_ids = mistral_tokenizer(ANSWER, add_special_tokens=False).input_ids
    byte_tokens = [t for t in answer_ids if mistral_tokenizer.convert_ids_to_tokens(t).startswith("<0x")]
    assert len(byte_tokens) >= 6  # the text really exercises multi-token characters
    engine = _engine(mistral_tokenizer, {5: answer_ids, 6: list(answer_ids)})
    try:
        for prompt in ([1, 5], [1, 6]):
            chunks = list(engine.stream(prompt, SamplingParams(greedy=True, max_new_tokens=1000)))
            assert len(chunks) > 5
            assert all("\ufffd" not in chunk for chunk in chunks)
            assert "".join(chunks).strip() == ANSWER
    finally:
        engine.close()


def test_stream_cut_inside_a_character_drops_the_partial_bytes(mistral_tokenizer):
    word = "금리 뷁똠"  # rare syllables: three byte-fallback tokens each
    answer_ids = mistral_tokenizer(word, add_special_tokens=False).input_ids
    assert len(answer_ids) >= 8
    # stop after every possible prefix, including ones that end inside a 3-byte syllable
    engine = _engine(mistral_tokenizer, {5: answer_ids})
    try:
        for limit in range(1, len(answer_ids) + 1):
            text = "".join(engine.stream([1, 5], SamplingParams(greedy=True, max_new_tokens=limit)))
            assert "\ufffd" not in text
            assert word.startswith(text.strip())
    finally:
        engine.close()


def test_concurrent_korean_streams_do_not_mix(mistral_tokenizer):
    texts = {7: "삼성전자 주가 상승", 8: "코스닥 지수 하락 마감", 9: "국채 금리 3.5% 돌파"}
    scripts = {k: mistral_tokenizer(v, add_special_tokens=False).input_ids for k, v in texts.items()}
    engine = _engine(mistral_tokenizer, scripts)
    results: dict[int, list[str]] = {}
    try:
        def worker(key):
            results[key] = list(engine.stream([1, key], SamplingParams(greedy=True, max_new_tokens=100)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in texts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for key, text in texts.items():
            assert "".join(results[key]).strip() == text
            assert all("\ufffd" not in chunk for chunk in results[key])
    finally:
        engine.close()
