"""Everything the end user reads in WeCom, in one place: short, Chinese, specific."""

from __future__ import annotations

from laibao.errors import (
    DifyConnectionError,
    DifyError,
    DifyHTTPError,
    DifyStreamError,
    DifyTimeoutError,
)

EXPIRED = "这条消息已过期，请重新提问。"
BUSY = "服务繁忙，请稍后再试。"
UNSUPPORTED = "暂不支持这种消息，请发送文字。"
GENERIC_ERROR = "抱歉，处理消息时出错，请稍后再试。"
EMPTY = "请输入要问的内容。"
NEW_CONVERSATION = "好的，已开始新的对话。"
STOPPED = "已停止当前回答。"
NOTHING_TO_STOP = "当前没有正在生成的回答。"
STOPPED_NOTE = "（已停止生成）"
TOO_MANY = "你还有几条消息正在回答中，请稍后再发。"
MEDIA_HELD = "已收到，请接着发送你的问题，我会一起参考。"
MEDIA_TOO_LARGE = "文件太大，超过了 AI 应用允许的大小，请压缩后重发。"
MEDIA_UNSUPPORTED = "AI 应用不支持这种文件。"
MEDIA_UNAVAILABLE = "文件已过期或无法下载，请重新发送。"
TOO_MANY_IMAGES = "图片太多了，一条消息最多 10 张，请分开发送。"
WINDOW_NOTE = "（回答较长，完整内容稍后单独发送）"
QUEUED_NOTE = "（前面的消息还在回答中，这条的回答稍后单独发送）"
TURN_TIMEOUT = "前面的消息回答太久，这条消息没能处理，请稍后重新提问。"
LOST = "抱歉，这条消息在处理前丢失了，请重新发送。"
INTERRUPTED = "抱歉，回答在生成过程中中断了，请重新提问。"
OVERFLOW_NOTE = "（内容较长，其余部分稍后单独发送）"
TRUNCATED_NOTE = "（内容超出企业微信的长度上限，后面的部分已省略）"
SIGN_IN_FAILED = "抱歉，登录认证失败，请稍后再试。"
WELCOME = "你好，我是 AI 助手，直接发消息提问即可。"
NO_ANSWER = "抱歉，这次没有生成回答，请换个说法再试。"

DIFY_UNREACHABLE = "抱歉，暂时连不上 AI 服务，请稍后再试。"
DIFY_TIMEOUT = "抱歉，AI 服务响应超时，请稍后再试。"
DIFY_INTERRUPTED = "抱歉，回答中断了，请稍后再试。"
DIFY_BAD_KEY = "抱歉，AI 应用的密钥无效或应用已停用，请联系管理员。"
DIFY_QUOTA = "抱歉，AI 模型额度已用完，请联系管理员。"
DIFY_NOT_CONFIGURED = "抱歉，AI 模型尚未配置好，请联系管理员。"
DIFY_APP_UNAVAILABLE = "抱歉，AI 应用当前不可用，请联系管理员。"
DIFY_MODEL_ERROR = "抱歉，AI 模型调用出错，请稍后再试。"
DIFY_RATE_LIMIT = "当前提问的人太多，请稍后再试。"
DIFY_SERVER_ERROR = "抱歉，AI 服务出了故障，请稍后再试。"
DIFY_BAD_REQUEST = "抱歉，AI 服务拒绝了这个请求，请换个说法再试。"

# Dify error codes (HTTP bodies and `error` events) and what the user is told.
_BY_CODE = {
    "unauthorized": DIFY_BAD_KEY,
    "app_unavailable": DIFY_APP_UNAVAILABLE,
    "provider_not_initialize": DIFY_NOT_CONFIGURED,
    "provider_quota_exceeded": DIFY_QUOTA,
    "model_currently_not_support": DIFY_MODEL_ERROR,
    "completion_request_error": DIFY_MODEL_ERROR,
    "invoke_error": DIFY_MODEL_ERROR,
    "rate_limit_error": DIFY_RATE_LIMIT,
    "too_many_requests": DIFY_RATE_LIMIT,
    "invalid_param": DIFY_BAD_REQUEST,
}


def explain(exc: Exception) -> str:
    """The short sentence a user sees when their answer failed because of ``exc``."""
    if isinstance(exc, DifyTimeoutError):
        return DIFY_TIMEOUT
    if isinstance(exc, DifyConnectionError):
        return DIFY_UNREACHABLE
    if isinstance(exc, DifyHTTPError | DifyStreamError):
        if exc.code in _BY_CODE:
            return _BY_CODE[exc.code]
        status = exc.status
        if status in (401, 403):
            return DIFY_BAD_KEY
        if status == 429:
            return DIFY_RATE_LIMIT
        if status >= 500:
            return DIFY_SERVER_ERROR
        if status >= 400:
            return DIFY_BAD_REQUEST
        return DIFY_INTERRUPTED
    if isinstance(exc, DifyError):
        return DIFY_INTERRUPTED
    return GENERIC_ERROR
