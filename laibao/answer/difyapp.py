"""One bot's Dify app: its client, the app's mode and parameters (cached), and who each call is made as."""

from __future__ import annotations

import logging
import time
from typing import Any

from laibao.auth import AuthService, Credential
from laibao.config import BotConfig
from laibao.dify import DifyClient
from laibao.errors import DifyError
from stores.keys import scope_of

log = logging.getLogger("laibao.answer")

MODE_TTL = 600.0  # seconds the app mode and parameters from Dify are trusted
CHAT_MODES = frozenset({"chat", "agent-chat", "advanced-chat"})


class DifyApp:
    """The Dify app behind one bot, shared by all of the bot's answers."""

    def __init__(self, bot: BotConfig, client: DifyClient, auth: AuthService | None) -> None:
        self.bot = bot
        self.client = client
        self._auth = auth
        self._mode: tuple[str, float] | None = None
        self._parameters: tuple[dict[str, Any], float] | None = None

    async def mode(self) -> str:
        """The app's mode from GET /info (cached); "chat" when Dify cannot tell."""
        now = time.monotonic()
        if self._mode is None or now - self._mode[1] > MODE_TTL:
            try:
                mode = str((await self.client.info()).get("mode") or "chat")
            except DifyError as exc:
                log.warning("bot %s: GET /info failed (%s); assuming a chat app", self.bot.key, exc)
                return self._mode[0] if self._mode else "chat"
            self._mode = (mode, now)
        return self._mode[0]

    async def parameters(self, bearer: str | None = None) -> dict[str, Any]:
        """The app's GET /parameters (cached): opening statement, upload settings and limits."""
        now = time.monotonic()
        if self._parameters is None or now - self._parameters[1] > MODE_TTL:
            self._parameters = (await self.client.parameters(bearer), now)
        return self._parameters[0]

    def scope_of(self, userid: str, chatid: str) -> str:
        """The conversation scope: the user in a single chat; the group, or the user in it, in groups (typed parts)."""
        return scope_of(userid, chatid, self.bot.group_scope)

    def dify_user(self, userid: str, chatid: str) -> str:
        """The Dify ``user`` of a message: conversations are scoped by it, so it follows the scope."""
        if chatid and self.bot.group_scope == "chat":
            return f"wecom:group:{chatid}"
        return f"wecom:{userid}"

    @property
    def auth(self) -> AuthService | None:
        """The sign-in service, or None for an open bot."""
        return self._auth

    async def credential(self, userid: str) -> Credential:
        """Who the user is for Dify; open mode needs no lookup."""
        if self._auth is None:
            return Credential(userid)
        return await self._auth.resolve(self.bot, userid)

    async def bearer(self, userid: str) -> str | None:
        """The bearer a side call (stop, feedback) for this user carries; None means the app key."""
        bearer, _ = self.call_auth(await self.credential(userid))
        return bearer

    def call_auth(self, credential: Credential) -> tuple[str | None, dict[str, Any]]:
        """(bearer, inputs) of a Dify call for this user: the token in the header or as an input."""
        if not credential.token:
            return None, {}
        if self.bot.auth_forward == "input":
            return None, {self.bot.auth_input_name: credential.token}
        return credential.token, {}
