"""Everything the bot says to a WeCom user on its own behalf (notes, refusals, placeholders), in one place.

`BOT_LANGUAGE` picks the catalogue (zh by default). `failure_note()` is the single mapping from a failure behind
the bubble to the short note the user sees; the technical reason goes to the logs and the stream hash instead.
"""

from __future__ import annotations

from services.auth.authorizer import AuthError
from services.transport.errors import (
    BUSY_CODES,
    BackendConnectionError,
    BackendError,
    BackendHTTPError,
    BackendStreamCut,
    BackendStreamError,
    BackendTimeout,
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
        "answer_cut_at_limit": "（回答达到了模型的长度上限，到此为止。）",
        "answer_filtered": "（模型拒绝继续回答这个问题。）",
        "workflow_failed": "（工作流运行失败：{reason}）",
        "run_stopped": "（这次运行在完成前被 AI 应用停止了，以上是停止前的内容。）",
        "input_required": "（这个 AI 应用需要你填写信息后才能继续，本机器人暂时无法提供这一步，"
        "请在 Dify 网页端继续。）",
        "empty_query": "请输入你的问题。",
        "unsupported_message": "暂不支持这种消息。可以发送文字、语音、图片或文件。",
        "internal_error": "抱歉，处理消息时出现内部错误，请稍后再试。",
        "store_unavailable": "服务暂时不可用，请稍后重新发送这条消息。",
        "busy": "当前正在处理的消息较多，请稍后再试。",
        "shutting_down": "服务正在重启，请稍后重新发送这条消息。",
        "unknown_user": "抱歉，你还没有开通 AI 助手的使用权限，请联系管理员开通。",
        "user_disabled": "你的 AI 助手使用权限已被停用，如有疑问请联系管理员。",
        "auth_refused": "身份认证未通过，暂时无法使用 AI 助手，请联系管理员。",
        "auth_unavailable": "身份认证服务暂时不可用，请稍后再试。",
        "database_unavailable": "用户信息服务暂时不可用，请稍后再试。",
        "window_continues": "（回答较长，仍在生成中；完成后会另发一条消息给你。）",
        "overflow_continues": "（内容超出单条消息的长度，其余部分会另发一条消息。）",
        "overflow_truncated": "（内容超出单条消息的长度，已截断。）",
        "continued": "**（接上条回答）**",
        "citations_title": "**参考资料**",
        "progress_step": "⏳ 正在进行：{step}",
        "full_answer": "**（完整回答）**",
        "sent_separately": "（完整回答已另发一条消息。）",
        "rest_sent_separately": "（回答的其余部分已另发一条消息。）",
        "nothing_more": "（上条回答已完整，没有更多内容。）",
        "remainder_truncated": "（内容过长，已截断。）",
        "too_many_in_flight": "你还有 3 条消息正在回答中，请等其中一条完成后再发送。",
        "rate_limited": "你发送消息太频繁了，请稍等一分钟再试。",
        "over_quota_user": "你今天的 {limit} 次提问已用完，{renews} 恢复。",
        "queued": "排队中，前面还有 {ahead} 个问题…",
        "blocked_question": "这个问题包含不允许的内容，无法回答。",
        "queue_busy": "现在提问的人太多，请稍后再试。",
        "bot_retired": "这个机器人已停用，不再回答新的问题。",
        "over_quota_chat": "本群今天的 {limit} 次提问已用完，{renews} 恢复。",
        "new_conversation": "好的，已开始新的对话。",
        "new_group_conversation": "好的，本群已开始新的对话。",
        "stopped_note": "（已停止回答。）",
        "stop_done": "好的，已停止回答。",
        "nothing_to_stop": "当前没有正在进行的回答。",
        "help": "可以直接向我提问，也可以发送图片或语音。\n\n命令：\n"
        "/new 或 /reset：开始新的对话（之前的上下文不再使用）\n/stop 或 /停止：停止正在进行的回答\n"
        "/routes：可用的应用命令\n/help：显示本帮助",
        "route_gone": "（这条回答所属的应用路由已被管理员删除，请重新提问。）",
        "routes_commands": "可用的命令：\n{commands}",
        "routes_command": "{command} <问题>：由「{route}」回答",
        "routes_none": "这里没有可用的应用命令。",
        "routes_here": "在这里直接提问：由「{route}」回答。",
        "routes_own": "在这里直接提问：由本机器人的默认应用回答。",
        "routes_closed": "在这里直接提问不会得到回答，请使用上面的命令。",
        "image_query": "请看这张图片。",
        "file_query": "请阅读这个文件。",
        "quote_context": "我引用了这条消息：\n{quoted}\n\n{query}",
        "quoted_image": "[图片]",
        "quoted_file": "[文件]",
        "quoted_video": "[视频]",
        "images_unsupported": "这个 AI 应用暂不支持图片，请用文字描述你的问题。",
        "images_ignored": "（这个 AI 应用不支持图片，已忽略你发送的图片。）",
        "files_unsupported": "目前我能理解文字、语音和图片消息，暂不支持文件和视频。",
        "media_failed": "抱歉，没能读取你发送的图片或文件（链接可能已过期），请重新发送。",
        "media_partial": "（部分图片或文件没能读取，已忽略。）",
        "welcome_title": "你好",
        "suggestions_title": "你还可以问：",
        "form_title": "需要你的确认",
        "form_choose": "请在下方卡片中选择。",
        "form_choose_typed": "请回复以下选项之一：{choices}",
        "form_type_value": "请直接回复「{label}」的内容（下一条消息即为填写的值）。",
        "form_value_noted": "已记下「{label}」。",
        "form_then_choose": "信息已填写完整，请在卡片中选择。",
        "form_submitted": "已提交：{choice}",
        "form_answered": "已处理：{choice}",
        "form_submit_button": "提交",
        "form_action_question": "操作",
        "form_needs_values": "请先在对话中补充：{label}",
        "form_choose_option": "请回复「{label}」的选项之一：{choices}",
        "form_option_unknown": "「{choice}」不是「{label}」的选项之一。",
        "form_option_not_offered": "所选选项已不在可选范围内，请重新选择。",
        "form_send_file": "请发送「{label}」的文件（{kinds}），下一条消息中的文件即为所填内容。",
        "form_send_files": "请发送「{label}」的文件（{kinds}{limit}），每条消息一个；发完后回复「完成」。",
        "form_files_limit": "，最多 {count} 个",
        "form_file_noted": "已收到「{label}」的文件：{name}。",
        "form_file_refused": "「{name}」不是「{label}」可以接受的文件（{kinds}），未使用。",
        "form_file_failed": "文件未能读取或上传，请重新发送。",
        "form_file_not_needed": "这一步不需要文件，已忽略。",
        "form_refused": "（上次提交未被接受：{reason}）",
        "file_kind_image": "图片",
        "file_kind_document": "文档",
        "file_kind_audio": "音频",
        "file_kind_video": "视频",
        "file_kind_any": "任意文件",
        "form_not_yours": "只有提问的人可以处理这一步。",
        "form_expired": "（这一步已过期或已被处理，未提交。）",
        "form_expired_card": "已过期",
        "form_elsewhere": "（这一步需要在别处审批（邮件或 Dify 网页），请在那里处理。）",
        "form_waiting": "（处理上方卡片后，后续结果会另发一条消息。）",
        "form_timed_out": "（等待确认超时，应用按超时流程继续。）",
        "form_submit_failed": "（提交失败，请稍后再试或在 Dify 网页端处理。）",
        "form_rest": "**（确认后的结果）**",
        "file_link": "📎 [{name}]({url})",
        "file_original": "📎 [{name}]({url})（原图）",
        "file_named": "📎 {name}",
        "file_failed": "（文件 {name} 未能送达。）",
        "file_too_large": "（文件 {name} 超过 {size}，未能送达。）",
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
        "answer_cut_at_limit": "(The answer reached the model's length limit and stops here.)",
        "answer_filtered": "(The model declined to go on with this answer.)",
        "workflow_failed": "(The workflow failed: {reason})",
        "run_stopped": "(The AI app stopped this run before it finished; above is what it gave until then.)",
        "input_required": "(This AI app needs you to fill in a form to go on, which this bot cannot show yet; please "
        "continue in Dify's web app.)",
        "empty_query": "Please type your question.",
        "unsupported_message": "This kind of message is not supported yet. Send text, voice, an image or a file.",
        "internal_error": "Sorry, an internal error occurred while handling your message. Please try again later.",
        "store_unavailable": "The service is temporarily unavailable. Please send your message again shortly.",
        "busy": "Too many messages are being answered right now. Please try again shortly.",
        "shutting_down": "The service is restarting. Please send your message again shortly.",
        "unknown_user": "Sorry, you do not have access to this assistant yet. Please ask your admin to add you.",
        "user_disabled": "Your access to this assistant has been disabled. Please contact your admin.",
        "auth_refused": "Authentication was refused, so the assistant cannot answer you. Please contact your admin.",
        "auth_unavailable": "The authentication service is unavailable right now. Please try again later.",
        "database_unavailable": "The user directory is unavailable right now. Please try again later.",
        "window_continues": "(This answer is taking a while; the rest will follow as a separate message.)",
        "overflow_continues": "(This answer is longer than one message; the rest follows as a separate message.)",
        "overflow_truncated": "(This answer is longer than one message and was cut.)",
        "continued": "**(Continued)**",
        "citations_title": "**Sources**",
        "progress_step": "⏳ Working on: {step}",
        "full_answer": "**(The full answer)**",
        "sent_separately": "(The full answer was sent as a separate message.)",
        "rest_sent_separately": "(The rest of the answer was sent as a separate message.)",
        "nothing_more": "(The previous answer was complete; nothing more to add.)",
        "remainder_truncated": "(Too long; the rest was cut.)",
        "too_many_in_flight": "You have 3 questions being answered. Please wait for one to finish before sending more.",
        "rate_limited": "You are sending messages too quickly. Please wait a minute and try again.",
        "over_quota_user": "You have asked your {limit} questions for today. The quota renews at {renews}.",
        "queued": "In line: {ahead} questions ahead of yours…",
        "blocked_question": "This question contains content that is not allowed, so it cannot be answered.",
        "bot_retired": "This bot has been retired and answers no new questions.",
        "queue_busy": "Too many questions are being answered right now. Please try again in a moment.",
        "over_quota_chat": "This group has asked its {limit} questions for today. The quota renews at {renews}.",
        "new_conversation": "OK, a new conversation has started.",
        "new_group_conversation": "OK, a new conversation has started for this group.",
        "stopped_note": "(Stopped.)",
        "stop_done": "OK, the answer was stopped.",
        "nothing_to_stop": "No answer is in progress.",
        "help": "Ask me anything, or send a picture or a voice message.\n\nCommands:\n/new or /reset: start a "
        "new conversation (earlier context is dropped)\n/stop or /cancel: stop the answer in progress\n"
        "/routes: the app commands you may use\n/help: show this help",
        "route_gone": "(The route this answer belonged to was removed by an administrator: please ask again.)",
        "routes_commands": "Commands you may use:\n{commands}",
        "routes_command": '{command} <question>: answered by "{route}"',
        "routes_none": "No app commands here.",
        "routes_here": 'A question asked here without a command: answered by "{route}".',
        "routes_own": "A question asked here without a command: answered by this bot's own app.",
        "routes_closed": "A question asked here without a command gets no answer: use a command above.",
        "image_query": "Please look at this image.",
        "file_query": "Please read this file.",
        "quote_context": "I am quoting this message:\n{quoted}\n\n{query}",
        "quoted_image": "[image]",
        "quoted_file": "[file]",
        "quoted_video": "[video]",
        "images_unsupported": "This AI app does not accept images. Please describe your question in words.",
        "images_ignored": "(This AI app does not accept images; your images were ignored.)",
        "files_unsupported": "I understand text, voice and images, but not files or videos yet.",
        "media_failed": "Sorry, I could not read the image or file you sent (the link may have expired). "
        "Please send it again.",
        "media_partial": "(Some images or files could not be read and were ignored.)",
        "welcome_title": "Hello",
        "suggestions_title": "You could also ask:",
        "form_title": "Your decision is needed",
        "form_choose": "Please choose on the card below.",
        "form_choose_typed": "Please reply with one of: {choices}",
        "form_type_value": "Please reply with “{label}” (your next message is the value).",
        "form_value_noted": "Noted “{label}”.",
        "form_then_choose": "Everything is filled in; please choose on the card.",
        "form_submitted": "Submitted: {choice}",
        "form_answered": "Done: {choice}",
        "form_submit_button": "Submit",
        "form_action_question": "Action",
        "form_needs_values": "Please first give in the chat: {label}",
        "form_choose_option": "Please reply with one of the options for “{label}”: {choices}",
        "form_option_unknown": "“{choice}” is not one of the options for “{label}”.",
        "form_option_not_offered": "That option is no longer offered; please choose again.",
        "form_send_file": "Please send the file for “{label}” ({kinds}); the file in your next message fills it in.",
        "form_send_files": "Please send the files for “{label}” ({kinds}{limit}), one a message; reply “done” when "
        "that is all.",
        "form_files_limit": ", at most {count}",
        "form_file_noted": "Received the file for “{label}”: {name}.",
        "form_file_refused": "“{name}” is not a file “{label}” takes ({kinds}); it was not used.",
        "form_file_failed": "The file could not be read or uploaded; please send it again.",
        "form_file_not_needed": "This step needs no file; it was left aside.",
        "form_refused": "(The last submission was not accepted: {reason})",
        "file_kind_image": "images",
        "file_kind_document": "documents",
        "file_kind_audio": "audio",
        "file_kind_video": "videos",
        "file_kind_any": "any file",
        "form_not_yours": "Only the person who asked can answer this step.",
        "form_expired": "(This step has expired or was answered already; nothing was submitted.)",
        "form_expired_card": "Expired",
        "form_elsewhere": "(This step awaits approval elsewhere, by e-mail or in Dify's web app; answer it there.)",
        "form_waiting": "(Once you answer the card above, the rest follows as a new message.)",
        "form_timed_out": "(Nobody answered in time; the app went on with its timeout path.)",
        "form_submit_failed": "(The answer could not be submitted; please try again later or use Dify's web app.)",
        "form_rest": "**(After your answer)**",
        "file_link": "📎 [{name}]({url})",
        "file_original": "📎 [{name}]({url}) (original)",
        "file_named": "📎 {name}",
        "file_failed": "(The file {name} could not be delivered.)",
        "file_too_large": "(The file {name} is larger than {size} and could not be delivered.)",
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
        "misconfigured",  # an OpenAI-compatible server's 400, 401, 403 or 404 (services/backends/openai)
    }
)


class Texts:
    """The catalogue of one language; `texts.say("busy")`."""

    def __init__(self, language: str = "zh"):
        self.language = language
        self._catalogue = CATALOGUE[language]

    def say(self, key: str) -> str:
        return self._catalogue[key]

    def failure_note(self, exc: BaseException) -> str:
        """The note shown to the user for a failure behind the bubble (a failed workflow's says why)."""
        if isinstance(exc, BackendStreamError) and exc.code == "workflow_failed":
            return self.say("workflow_failed").format(reason=exc.message[:200])
        return self.say(failure_key(exc))


def failure_key(exc: BaseException) -> str:
    """Which catalogue entry describes `exc` to a user."""
    if isinstance(exc, AuthError):
        return exc.code if exc.code in CATALOGUE["en"] else "auth_unavailable"
    if isinstance(exc, BackendHTTPError):
        if exc.status == 429 or exc.code in BUSY_CODES:
            return "dify_busy"
        if exc.status in (401, 403) or exc.code in _CONFIG_CODES:
            return "dify_rejected"
        if exc.status is not None and exc.status >= 500:
            return "dify_unavailable"
        return "dify_failed"
    if isinstance(exc, BackendConnectionError):
        return "dify_unavailable"
    if isinstance(exc, BackendTimeout):
        return "timeout"
    if isinstance(exc, BackendStreamCut):
        return "stream_cut"
    if isinstance(exc, BackendStreamError):
        if exc.code in BUSY_CODES:
            return "dify_busy"
        if exc.code in _CONFIG_CODES:
            return "dify_rejected"
        return "dify_failed"
    if isinstance(exc, BackendError):
        return "dify_failed"
    return "internal_error"
