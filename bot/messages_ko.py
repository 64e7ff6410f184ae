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

# --- Terminal (finbot chat / finbot ask / finbot term) -----------------------------------------
CHAT_BANNER = (
    "finbot 대화 (엔진: {engine}) — 금융·경제 질문을 입력해 주세요. "
    "/new 새 대화 · /help 도움말 · /quit 끝내기 (Ctrl-D)"
)
CHAT_HELP = (
    "• 질문을 입력하면 이 대화의 앞선 질문과 답변을 기억하고 이어서 답해요.\n"
    "• /new — 새 대화를 시작해요 (앞선 대화는 잊어요).\n"
    "• /quit — 끝내요 (Ctrl-D도 돼요). 답변 중 Ctrl-C는 그 답변만 멈춰요."
)
CHAT_NEW_THREAD = "새 대화를 시작했어요. 무엇이 궁금하신가요?"
CHAT_STOPPED = "(답변을 멈췄어요)"
CHAT_UNKNOWN_COMMAND = "{command}는 알 수 없는 명령이에요. /help 로 쓸 수 있는 명령을 볼 수 있어요."
ASK_EMPTY = '무엇이 궁금하신가요? 질문을 함께 적어 주세요. 예: finbot ask "기준금리가 뭐야?"'
TERM_HISTORY_EMPTY = "아직 게시된 용어가 없어요."
TERM_HISTORY_EMPTY_IN_CHANNEL = "{channel} 채널에는 아직 게시된 용어가 없어요."
TERM_PINS_EMPTY = "아직 고정된 용어가 없어요. finbot term pin YYYY-MM-DD 용어 로 고정할 수 있어요."

# --- App Home tab (bot/home.py) ---------------------------------------------------------------
HOME_TITLE = ":bank: finbot · 금융·경제 도우미"
HOME_INTRO = (
    "금융·경제 용어와 개념을 한국어로 쉽게 설명해 드려요. 답변은 회사 안에서 돌아가는 모델이 만들어요.\n"
    "• 채널에서 `@finbot 기준금리가 뭐야?` 처럼 멘션해 주세요. 같은 스레드에서는 멘션 없이 이어서 물어보면 돼요.\n"
    "• 저에게 DM으로 물어봐도 돼요.\n"
    "• `{command} 환율` 로 용어의 뜻을 짧게 볼 수 있어요.\n"
    "• 답변 아래 👍/👎 를 눌러 주시면 더 나은 답변을 만드는 데 참고할게요."
)
HOME_TERM_TITLE = ":books: 오늘의 금융용어"
HOME_RECENT_TITLE = ":speech_balloon: 내 최근 질문"
HOME_RECENT_EMPTY = "아직 질문하신 적이 없어요. 궁금한 금융·경제 용어를 편하게 물어보세요!"
HOME_STATUS = {"answered": "답변 완료", "failed": "답변 실패", "received": "답변 중", "generating": "답변 중"}
HOME_ADMIN_TITLE = ":gear: 관리자 · 최근 7일"
HOME_ADMIN_STATS = (
    "*질문* {questions}개 (답변 {answered} · 실패 {failed})\n"
    "*평가* 👍 {up} · 👎 {down}\n"
    "*첫 글자까지 걸린 시간(중앙값)* {median}"
)
HOME_ADMIN_NO_MEDIAN = "아직 없음"
HOME_ADMIN_WORST_TITLE = "*👎 를 받은 답변* (검토해 주세요)"
HOME_ADMIN_WORST_EMPTY = "최근 7일 동안 👎 를 받은 답변이 없어요."
HOME_ADMIN_WORST_ITEM = "• {link} · 👍 {up} · 👎 {down}"
HOME_ADMIN_QA_TITLE = "*질문 채널* (멘션 없이 모든 질문에 답하는 채널)"
HOME_ADMIN_QA_EMPTY = "질문 채널이 없어요."
HOME_ADMIN_QA_FROM_ENV = "{channel} (환경 설정 QA_CHANNELS, 여기서는 끌 수 없어요)"
HOME_ADMIN_QA_ADD = "질문 채널 추가"
HOME_ADMIN_QA_REMOVE = "끄기"
HOME_ADMIN_TOD_TITLE = "*오늘의 금융용어 설정*"
HOME_ADMIN_TOD_STATE = "채널: {channels}\n시간: {time} ({timezone}) · {source}"
HOME_ADMIN_TOD_NO_CHANNEL = "없음 (게시하지 않아요)"
HOME_ADMIN_TOD_SOURCE_HOME = "관리자가 여기서 바꾼 설정"
HOME_ADMIN_TOD_SOURCE_ENV = "환경 설정(TERM_OF_DAY_CHANNELS, TERM_OF_DAY_TIME)"
HOME_ADMIN_TOD_CHANNELS = "게시할 채널"
HOME_ADMIN_TOD_TIME = "게시 시간"
HOME_ADMIN_TOD_RESET = "환경 설정으로 되돌리기"
HOME_ADMIN_PINS_TITLE = "*고정된 용어* (그날에는 이 용어를 올려요)"
HOME_ADMIN_PINS_EMPTY = "앞으로 고정된 용어가 없어요."
HOME_ADMIN_PIN_ITEM = "{date} · *{term}*"
HOME_ADMIN_PIN_ADD = "용어 고정하기"
HOME_ADMIN_PIN_REMOVE = "고정 해제"
HOME_PIN_MODAL_TITLE = "용어 고정하기"
HOME_PIN_MODAL_SUBMIT = "고정"
HOME_PIN_MODAL_CANCEL = "취소"
HOME_PIN_MODAL_DATE = "날짜"
HOME_PIN_MODAL_TERM = "용어"
HOME_PIN_ERROR_PAST = "오늘이나 이후의 날짜를 골라 주세요."
HOME_PIN_ERROR_TERM = "용어를 1~{limit}자로 적어 주세요."
HOME_PIN_ERROR_SAVE = "고정하지 못했어요. 잠시 후 다시 시도해 주세요."
HOME_ADMIN_ONLY = "관리자만 바꿀 수 있어요."
