"""`Session`: one session as an object, for sync code (a thin layer over `AsyncSession`).

Every method is `AsyncSession`'s, run on the client's loop thread (`blocking.mirror`);
the rules (offset tracking, `OffsetConflict`, chat formats) are documented there.  Calls
on one object from several threads are serialised by the async session's lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.blocking import mirror
from memoryd_sdk.chat import ChatTemplate
from memoryd_sdk.types import SessionInfo

if TYPE_CHECKING:
    from memoryd_sdk.client import MemoryClient


@mirror(AsyncSession)
class Session:
    """A memoryd session: append, generate, fork, reset, delete, export, chat (see `AsyncSession`).

    Get one from `MemoryClient.create_session`, `.session(id)`, `.import_session` or
    `Session.fork`.  As a context manager it deletes the session on exit only if it was
    made with `temporary=True` (a scratch fork, say); otherwise it is memory to keep.
    """

    def __init__(
        self,
        client: MemoryClient,
        session_id: str,
        *,
        info: SessionInfo | None = None,
        temporary: bool = False,
        template: ChatTemplate | None = None,
    ) -> None:
        self.client = client
        self._core = AsyncSession(client._core, session_id, info=info, temporary=temporary, template=template)

    @classmethod
    def _of(cls, client: MemoryClient, core: AsyncSession) -> Session:
        s = cls.__new__(cls)
        s.client, s._core = client, core
        return s

    def _sync(self, out: Any) -> Any:
        return self.client._sync(out, self)

    def __repr__(self) -> str:
        return f"Session({self.id!r}, offset={self.offset})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client._runner.run(self._core.__aexit__(*exc))

    # The async session's state, read and written through (one object, one truth).
    id = property(lambda self: self._core.id)
    temporary = property(lambda self: self._core.temporary)
    last_info = property(lambda self: self._core.last_info)
    template = property(lambda self: self._core.template, lambda self, v: setattr(self._core, "template", v))
    offset = property(
        lambda self: self._core.offset,
        lambda self, v: setattr(self._core, "offset", v),
        doc="The offset this object believes the session has (None until known).",
    )
