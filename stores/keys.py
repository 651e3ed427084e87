"""Every Redis key and channel laibao uses, in one place, with the prefix (``LAIBAO_REDIS_PREFIX``).

Redis Cluster runs a script only when every key it declares hashes to one slot, so keys that one
script touches share a hash tag (the part in braces):

    {p}:stream:{T}.{r}       hash    a message's session; its id is ``T.r``: T is the tag of its scope
    {p}:turns:{T}            list    the conversation's messages in arrival order (same slot as its sessions)
    {p}:conv:{T}             string  the Dify conversation of the scope
    {p}:media:{T}            list    media held for the scope's next text
    {p}:msgid:{M}            string  the stream id of a WeCom message; M binds bot, user, chat and msgid
    {p}:inflight:{U}         zset    one user's admitted messages; U is the tag of bot + user
    {p}:undelivered          zset    sessions whose response_url delivery may be pending (``stores.relay_store``)
    {p}:auth:lock:{userid}   string  a user's sign-in lock
    {p}:auth:invalidate      channel token invalidations (pub/sub)
    authorization:*          (see ``stores.tokens``: names kept for existing deployments, no prefix)

T, M and U are digests of typed, length-safe parts: two different scopes (a userid with ``/`` in it,
a userid equal to a chatid) never share a key, and user data never reaches a key name verbatim.
"""

from __future__ import annotations

import hashlib
import uuid
from urllib.parse import quote

DEFAULT_PREFIX = "laibao"
TAG_LEN = 20  # hex digits of a digest in a tag: 80 bits, no collision in any real deployment


def _digest(*parts: str) -> str:
    """A tag for typed parts: each part is length-prefixed, so no two tuples give the same input."""
    joined = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:TAG_LEN]


def scope_of(userid: str, chatid: str, group_scope: str) -> str:
    """The typed conversation scope: ``user:U`` alone, ``chat:C`` (a group's), ``chat:C/user:U`` (one user in it)."""
    user, chat = f"user:{quote(userid, safe='')}", f"chat:{quote(chatid, safe='')}"
    if not chatid:
        return user
    return chat if group_scope == "chat" else f"{chat}/{user}"


def new_sid(bot: str, scope: str) -> str:
    """A new stream id whose session shares the slot of its scope's turns (``tag.random``)."""
    return f"{Keys.scope_tag(bot, scope)}.{uuid.uuid4().hex}"


def sid_tag(sid: str) -> str:
    """The hash tag carried by a stream id (the whole id when it carries none)."""
    tag, dot, _ = sid.partition(".")
    return tag if dot else sid


class Keys:
    """The key names for one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix or any(c in prefix for c in "{} \r\n"):
            raise ValueError("the Redis key prefix must be non-empty, without braces or whitespace")
        self.prefix = prefix

    @staticmethod
    def scope_tag(bot: str, scope: str) -> str:
        """The hash tag of a conversation scope."""
        return _digest("scope", bot, scope)

    def stream(self, sid: str) -> str:
        """The hash of a session."""
        tag, dot, rest = sid.partition(".")
        if not dot:
            return f"{self.prefix}:stream:{{{sid}}}"
        return f"{self.prefix}:stream:{{{tag}}}.{rest}"

    def turns(self, bot: str, scope: str) -> str:
        """The turn list of a conversation."""
        return f"{self.prefix}:turns:{{{self.scope_tag(bot, scope)}}}"

    def conversation(self, bot: str, scope: str) -> str:
        """The Dify conversation id of a scope."""
        return f"{self.prefix}:conv:{{{self.scope_tag(bot, scope)}}}"

    def media(self, bot: str, scope: str) -> str:
        """The media held for a scope."""
        return f"{self.prefix}:media:{{{self.scope_tag(bot, scope)}}}"

    def msgid(self, bot: str, user: str, chat: str, msgid: str) -> str:
        """The claim of a WeCom message id, bound to its sender: another user's reuse is another key."""
        return f"{self.prefix}:msgid:{{{_digest('msgid', bot, user, chat, msgid)}}}"

    def inflight(self, bot: str, user: str) -> str:
        """One user's admitted messages."""
        return f"{self.prefix}:inflight:{{{_digest('user', bot, user)}}}"

    @property
    def undelivered(self) -> str:
        """The listing of sessions a delivery sweep looks at (its own slot: written apart from them)."""
        return f"{self.prefix}:undelivered"

    def auth_lock(self, userid: str) -> str:
        """The user's sign-in lock."""
        return f"{self.prefix}:auth:lock:{userid}"

    @property
    def invalidate_channel(self) -> str:
        """The pub/sub channel of token invalidations."""
        return f"{self.prefix}:auth:invalidate"
