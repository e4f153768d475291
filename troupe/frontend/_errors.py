"""How a failure to generate is answered: the HTTP status and the OpenAI error object.

:func:`error_reply` maps each :class:`~troupe.errors.TroupeError` a generation can end with to an
:class:`ErrorReply`; only an engine's own refusal of the request passes its text on to the client,
every other failure gets a generic message (its detail, which may name internal addresses, is only
logged by the caller).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from starlette.responses import JSONResponse

from troupe.errors import (
    ActorError,
    AllWorkersBusy,
    Cancelled,
    InvalidRequest,
    MessageTooLarge,
    NoInstances,
    Overloaded,
    RemoteError,
    TroupeError,
)
from troupe.frontend._openai import error_body

__all__ = ["ErrorReply", "error_reply", "error_status"]

# InvalidRequest's text: "invalid request: {detail}" and maybe " (field {param})".
_REMOTE_INVALID: Final = re.compile(
    r"^(?:invalid request: )?(?P<detail>.*?)(?: \(field (?P<param>[^()\s]+)\))?$", re.DOTALL
)
_MAX_REMOTE_DETAIL: Final = 500  # characters of an engine's refusal passed on to the client


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """How a failure to generate is answered: HTTP status and OpenAI error fields.

    ``message`` is safe to show a client: failures of the worker or the request plane get a
    generic text (their detail, which may name internal addresses, is only logged).
    """

    status: int
    kind: str
    code: str
    message: str
    param: str | None = None
    retry_after: int | None = None
    """Seconds for a ``Retry-After`` header (the client should come back, not go elsewhere)."""

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return error_body(self.message, self.kind, param=self.param, code=self.code)


def error_reply(exc: TroupeError) -> ErrorReply:
    """The answer to a generation that failed with ``exc``."""
    if isinstance(exc, NoInstances):
        return ErrorReply(
            503, "service_unavailable_error", "no_instances", "no worker serves this model now"
        )
    if isinstance(exc, AllWorkersBusy):
        return ErrorReply(
            503,
            "service_unavailable_error",
            "all_workers_busy",
            "every worker of this model is busy; retry later",
            retry_after=1,
        )
    if isinstance(exc, Overloaded):
        return ErrorReply(
            503,
            "service_unavailable_error",
            "overloaded",
            "every worker of this model is at capacity; retry later",
        )
    if isinstance(exc, Cancelled | ActorError):
        return ErrorReply(
            503, "service_unavailable_error", "unavailable", "the frontend cannot route it now"
        )
    if isinstance(exc, InvalidRequest):
        return ErrorReply(400, "invalid_request_error", "invalid_request", exc.detail, exc.param)
    if isinstance(exc, RemoteError) and exc.kind == InvalidRequest.__name__:
        # The engine refused the request: its validation message is meant for the client.
        match = _REMOTE_INVALID.match(exc.remote_message)
        detail = match["detail"] if match else exc.remote_message
        if len(detail) > _MAX_REMOTE_DETAIL:
            detail = detail[:_MAX_REMOTE_DETAIL] + "..."
        param = match["param"] if match else None
        return ErrorReply(
            400, "invalid_request_error", "invalid_request", detail or "invalid request", param
        )
    if isinstance(exc, MessageTooLarge):
        return ErrorReply(
            413,
            "invalid_request_error",
            "request_too_large",
            f"the request is too large for the request plane (limit {exc.limit} bytes)",
        )
    if isinstance(exc, _MalformedChunk):
        return ErrorReply(502, "server_error", "bad_chunk", "the worker sent a malformed response")
    return ErrorReply(502, "server_error", "worker_error", "the worker failed to answer")


def error_status(exc: TroupeError) -> tuple[int, str, str]:
    """``(HTTP status, OpenAI error type, code)`` for a failure to generate."""
    reply = error_reply(exc)
    return reply.status, reply.kind, reply.code


def _error_response(
    status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param=param, code=code), status_code=status)


class _MalformedChunk(TroupeError):
    """Internal: the engine yielded something that is not an engine chunk (answered 502)."""
