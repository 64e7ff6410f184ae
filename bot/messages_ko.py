"""Every Korean sentence finbot says to users, in one place so tone stays consistent."""

THINKING = "답변을 준비하고 있어요… :hourglass_flowing_sand:"
EMPTY_QUESTION = (
    "무엇이 궁금하신가요? 금융·경제 질문을 함께 적어 주세요.\n"
    "예: `@finbot 기준금리가 뭐야?`"
)
QUESTION_TOO_LONG = (
    "질문이 너무 길어서 한 번에 처리할 수 없어요. 핵심만 줄여서 다시 질문해 주세요. :pray:"
)
ENGINE_BUSY = "지금 질문이 많아 답변이 밀려 있어요. 잠시 후 다시 시도해 주세요. :pray:"
GENERATION_FAILED = (
    "죄송해요, 답변을 만드는 중에 문제가 생겼어요. 질문은 저장해 두었으니 잠시 후 다시 질문해 주세요."
)
EMPTY_ANSWER = "죄송해요, 이 질문에는 알맞은 답변을 만들지 못했어요. 조금 다르게 질문해 주시겠어요?"
