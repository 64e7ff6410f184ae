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
GENERATION_TIMED_OUT = (
    "답변을 만드는 데 너무 오래 걸려서 멈췄어요. 질문은 저장해 두었으니 잠시 후 다시 질문해 주세요. :pray:"
)
GENERATION_FAILED = (
    "죄송해요, 답변을 만드는 중에 문제가 생겼어요. 질문은 저장해 두었으니 잠시 후 다시 질문해 주세요."
)
EMPTY_ANSWER = "죄송해요, 이 질문에는 알맞은 답변을 만들지 못했어요. 조금 다르게 질문해 주시겠어요?"
# A question a restart interrupted too long ago to answer it still (see bot/recovery.py).
ANSWER_INTERRUPTED = "답변이 중단되었어요, 다시 질문해 주세요."
# Left in the reply message when a restart interrupts an answer; the next instance replaces it
# with the whole answer within seconds.
ANSWER_RESUMING = "finbot이 잠시 재시작하고 있어요. 곧 이 자리에서 답변을 이어서 드릴게요… ⏳"
# A question that stopped every instance that tried to answer it (see RECOVERY_MAX_ATTEMPTS).
ANSWER_GAVE_UP = "죄송해요, 이 질문에는 답변을 드리지 못했어요. 질문을 조금 바꿔서 다시 물어봐 주시겠어요?"

# 오늘의 금융용어 (term of the day)
TERM_OF_DAY_TITLE = "오늘의 금융용어"
TERM_OF_DAY_HEADER = ":books: 오늘의 금융용어 · {term}"
TERM_OF_DAY_TEXT = "오늘의 금융용어: {term}"
TERM_OF_DAY_CONTEXT = "분류: *{category}* · {date}"
TERM_OF_DAY_INVITE = (
    ":speech_balloon: 더 궁금한 점은 이 스레드에 질문해 주세요. 멘션하지 않아도 이어서 답해 드려요."
)
TERM_OF_DAY_FALLBACK = (
    "지금은 설명을 준비하지 못했어요. 이 스레드에 \"{question}\"라고 물어봐 주시면 바로 설명해 드릴게요. :pray:"
)
TERM_OF_DAY_NOT_YET = "오늘의 금융용어는 아직 올라오지 않았어요. 영업일 {time}에 올라와요. :clock9:"
TERM_OF_DAY_HOLIDAY = "오늘은 {holiday} 오늘의 금융용어를 쉬어요. 다음 용어는 {next_day}에 찾아올게요. :palm_tree:"
TERM_OF_DAY_WEEKEND = "오늘은 주말이라 오늘의 금융용어를 쉬어요. 다음 용어는 {next_day}에 찾아올게요. :palm_tree:"
TERM_OF_DAY_NOT_CONFIGURED = "오늘의 금융용어를 올릴 채널이 아직 설정되지 않았어요. 관리자에게 문의해 주세요."

# --- Slack experience ----------------------------------------------------------------------
RATE_LIMITED_USER = (
    "질문을 너무 빠르게 보내고 계세요. 잠시 후 다시 시도해 주세요. :pray:"
)
RATE_LIMITED_CHANNEL = (
    "이 채널에 질문이 한꺼번에 몰려 있어요. 잠시 후 다시 시도해 주세요. :pray:"
)
ASSISTANT_STATUS = "답변을 작성하고 있어요…"
ASSISTANT_GREETING = "안녕하세요! 금융·경제에 대해 궁금한 점을 편하게 물어보세요. :bank:"
ASSISTANT_PROMPTS: tuple[tuple[str, str], ...] = (
    ("오늘의 금융용어", "오늘의 금융용어 알려줘"),
    ("기준금리", "기준금리가 뭐야?"),
    ("인플레이션 vs 디플레이션", "인플레이션과 디플레이션의 차이는?"),
)
ASSISTANT_PROMPTS_TITLE = "이런 걸 물어볼 수 있어요"
FEEDBACK_THANKS_UP = "의견 고마워요! :blush:"
FEEDBACK_THANKS_DOWN = "의견 고마워요. 더 나은 답변을 위해 참고할게요. :pray:"
FEEDBACK_MISSING = "이 답변에 대한 기록을 찾지 못했어요."
TERM_USAGE = (
    "*금융 용어 찾아보기* :mag:\n"
    "• `{command} 환율` — 용어의 뜻을 짧게 설명해 드려요.\n"
    "• `{command} 질문채널 켜기` / `{command} 질문채널 끄기` — 이 채널의 모든 질문에 멘션 없이 답해요.\n"
    "• `{command} 도움말` — 이 안내를 다시 보여 드려요."
)
TERM_LOOKING_UP = "`{term}`의 뜻을 찾아보고 있어요… :hourglass_flowing_sand:"
TERM_ANSWER = "*{term}*\n{answer}"
TERM_CACHED_NOTE = "저장된 설명이에요. 새로 설명을 받으려면 ↻ 버튼을 눌러 주세요."
TERM_REGENERATE = "↻ 다시 설명"
TERM_FAILED = "죄송해요, `{term}`의 설명을 만들지 못했어요. 잠시 후 다시 시도해 주세요."
TERM_TOO_LONG = "용어가 너무 길어요. 찾고 싶은 용어만 짧게 적어 주세요."
QA_CHANNEL_ON = "이제 이 채널의 질문에는 멘션 없이도 스레드로 답할게요. :raising_hand:"
QA_CHANNEL_ALREADY_ON = "이 채널은 이미 질문 채널이에요."
QA_CHANNEL_OFF = "이 채널은 더 이상 질문 채널이 아니에요. 질문은 `@finbot`을 멘션해 주세요."
QA_CHANNEL_NOT_ON = "이 채널은 질문 채널이 아니에요."
QA_CHANNEL_USAGE = "`{command} 질문채널 켜기` 또는 `{command} 질문채널 끄기`로 적어 주세요."
TERM_OF_DAY_LOOKUP_FAILED = "죄송해요, 오늘의 금융용어를 불러오지 못했어요. 잠시 후 다시 시도해 주세요."
