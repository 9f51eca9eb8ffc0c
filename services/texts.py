"""Everything the bot says to a WeCom user on its own behalf (notes, refusals, placeholders), in one place.

`BOT_LANGUAGE` picks the catalogue (zh by default). `failure_note()` is the single mapping from a failure behind
the bubble to the short note the user sees; the technical reason goes to the logs and the stream hash instead.
"""

from __future__ import annotations

from services.auth import AuthError
from services.dify_client import (
    DifyConnectionError,
    DifyError,
    DifyHTTPError,
    DifyStreamCut,
    DifyStreamError,
    DifyTimeout,
)

CATALOGUE: dict[str, dict[str, str]] = {
    "zh": {
        "placeholder": "正在思考…",
        "unknown_stream": "这条回答已过期或无法找到，请重新提问。",
        "orphaned": "（回答中断：处理这条消息的服务实例已停止，请重新提问。）",
        "window_closed": "（回答耗时过长，超出了企业微信的显示时限，已停止显示。）",
        "dify_unavailable": "抱歉，AI 服务暂时不可用，请稍后再试。",
        "dify_busy": "当前提问的人较多，AI 服务繁忙，请稍后再试。",
        "dify_rejected": "抱歉，AI 应用暂时无法回答（服务配置问题），请联系管理员。",
        "dify_failed": "抱歉，生成回答时出错了，请稍后再试。",
        "stream_cut": "（回答中断：与 AI 服务的连接意外断开，请重新提问。）",
        "timeout": "（回答超时：AI 服务长时间没有响应，请稍后再试。）",
        "empty_answer": "（AI 没有返回任何内容。）",
        "empty_query": "请输入你的问题。",
        "internal_error": "抱歉，处理消息时出现内部错误，请稍后再试。",
        "store_unavailable": "服务暂时不可用，请稍后重新发送这条消息。",
        "busy": "当前正在处理的消息较多，请稍后再试。",
        "shutting_down": "服务正在重启，请稍后重新发送这条消息。",
        "unknown_user": "抱歉，你还没有开通 AI 助手的使用权限，请联系管理员开通。",
        "user_disabled": "你的 AI 助手使用权限已被停用，如有疑问请联系管理员。",
        "auth_refused": "身份认证未通过，暂时无法使用 AI 助手，请联系管理员。",
        "auth_unavailable": "身份认证服务暂时不可用，请稍后再试。",
        "database_unavailable": "用户信息服务暂时不可用，请稍后再试。",
    },
    "en": {
        "placeholder": "Thinking…",
        "unknown_stream": "This answer has expired or cannot be found. Please ask again.",
        "orphaned": "(Answer interrupted: the server handling this message stopped. Please ask again.)",
        "window_closed": "(The answer took longer than WeCom can display and was stopped.)",
        "dify_unavailable": "Sorry, the AI service is unavailable right now. Please try again later.",
        "dify_busy": "The AI service is busy right now. Please try again in a moment.",
        "dify_rejected": "Sorry, the AI app cannot answer right now (a setup problem). Please contact your admin.",
        "dify_failed": "Sorry, something went wrong while generating the answer. Please try again later.",
        "stream_cut": "(Answer interrupted: the connection to the AI service broke. Please ask again.)",
        "timeout": "(The answer timed out: the AI service stopped responding. Please try again later.)",
        "empty_answer": "(The AI returned no content.)",
        "empty_query": "Please type your question.",
        "internal_error": "Sorry, an internal error occurred while handling your message. Please try again later.",
        "store_unavailable": "The service is temporarily unavailable. Please send your message again shortly.",
        "busy": "Too many messages are being answered right now. Please try again shortly.",
        "shutting_down": "The service is restarting. Please send your message again shortly.",
        "unknown_user": "Sorry, you do not have access to this assistant yet. Please ask your admin to add you.",
        "user_disabled": "Your access to this assistant has been disabled. Please contact your admin.",
        "auth_refused": "Authentication was refused, so the assistant cannot answer you. Please contact your admin.",
        "auth_unavailable": "The authentication service is unavailable right now. Please try again later.",
        "database_unavailable": "The user directory is unavailable right now. Please try again later.",
    },
}

# Dify 400 codes that mean the app or its model setup is broken: the user cannot fix it by retrying.
_CONFIG_CODES = frozenset(
    {
        "app_unavailable",
        "not_chat_app",
        "provider_not_initialize",
        "provider_quota_exceeded",
        "model_currently_not_support",
        "unauthorized",
        "forbidden",
    }
)
_BUSY_CODES = frozenset({"too_many_requests", "rate_limit_error"})


class Texts:
    """The catalogue of one language; `texts.say("busy")`."""

    def __init__(self, language: str = "zh"):
        self.language = language
        self._catalogue = CATALOGUE[language]

    def say(self, key: str) -> str:
        return self._catalogue[key]

    def failure_note(self, exc: BaseException) -> str:
        """The note shown to the user for a failure behind the bubble."""
        return self.say(failure_key(exc))


def failure_key(exc: BaseException) -> str:
    """Which catalogue entry describes `exc` to a user."""
    if isinstance(exc, AuthError):
        return exc.code if exc.code in CATALOGUE["en"] else "auth_unavailable"
    if isinstance(exc, DifyHTTPError):
        if exc.status == 429 or exc.code in _BUSY_CODES:
            return "dify_busy"
        if exc.status in (401, 403) or exc.code in _CONFIG_CODES:
            return "dify_rejected"
        if exc.status is not None and exc.status >= 500:
            return "dify_unavailable"
        return "dify_failed"
    if isinstance(exc, DifyConnectionError):
        return "dify_unavailable"
    if isinstance(exc, DifyTimeout):
        return "timeout"
    if isinstance(exc, DifyStreamCut):
        return "stream_cut"
    if isinstance(exc, DifyStreamError):
        if exc.code in _BUSY_CODES:
            return "dify_busy"
        if exc.code in _CONFIG_CODES:
            return "dify_rejected"
        return "dify_failed"
    if isinstance(exc, DifyError):
        return "dify_failed"
    return "internal_error"
