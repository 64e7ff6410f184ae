"""Errors the bot turns into polite Korean replies. Each carries an operator-facing English message."""


class FinbotLLMError(Exception):
    """Base class for errors raised by the llm package."""


class PromptTooLongError(FinbotLLMError):
    """The current question alone does not fit the prompt token budget."""

    def __init__(self, question_tokens: int, max_prompt_tokens: int) -> None:
        super().__init__(
            f"question needs {question_tokens} prompt tokens, budget is {max_prompt_tokens}"
        )
        self.question_tokens = question_tokens
        self.max_prompt_tokens = max_prompt_tokens


class EngineBusyError(FinbotLLMError):
    """The engine's queue is full; the caller should ask the user to retry later."""


class GenerationError(FinbotLLMError):
    """Generation failed (model error, timeout, out of memory)."""
