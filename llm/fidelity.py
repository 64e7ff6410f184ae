"""Comparing a serving mode's next-token distributions with the reference path's."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A Korean finance paragraph (real text, not from any dataset) used by the fidelity checks.
KOREAN_FINANCE_TEXT = (
    "한국은행 금융통화위원회는 이날 기준금리를 연 3.50%로 동결했다. 소비자물가 상승률이 "
    "둔화하고 있지만 가계부채 증가세와 원·달러 환율 변동성이 여전히 크다는 판단에서다. "
    "시장에서는 하반기 인하 가능성을 점치고 있으나, 미국 연방준비제도의 통화정책 방향과 "
    "부동산 시장 흐름을 좀 더 지켜봐야 한다는 의견이 많다. 코스피는 외국인 순매수에 힘입어 "
    "1.2% 오른 2,650선에서 마감했고, 반도체와 2차전지 업종이 상승을 이끌었다. 채권시장에서 "
    "국고채 3년물 금리는 전 거래일보다 0.05%포인트 하락했다. 전문가들은 수출 회복세가 "
    "이어진다면 올해 경제성장률이 2%대 초반을 기록할 것으로 내다봤다."
)


def kl_per_position(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || test) in nats for each row of [T, V] logits."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    test = torch.log_softmax(test_logits.float().to(ref.device), dim=-1)
    return (ref.exp() * (ref - test)).sum(dim=-1)


def kl_summary(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> dict[str, float]:
    kl = kl_per_position(reference_logits, test_logits)
    agree = (reference_logits.argmax(-1) == test_logits.to(reference_logits.device).argmax(-1)).float()
    return {
        "positions": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(agree.mean()),
    }


@torch.inference_mode()
def teacher_forced_decode_logits(step_model, token_ids: Sequence[int], slot: int = 0) -> torch.Tensor:  # noqa: ANN001
    """Logits [T, V] for every position of `token_ids`, computed the way serving does: prefill of
    the first token, then one decode step per further token (through the graphs on CUDA)."""
    rows = [step_model.prefill(slot, [token_ids[0]])]
    for position in range(1, len(token_ids)):
        tokens = [0] * (slot + 1)
        positions = [0] * (slot + 1)
        tokens[slot], positions[slot] = token_ids[position], position
        rows.append(step_model.decode(tokens, positions)[slot])
    return torch.stack(rows)
