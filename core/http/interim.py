"""Interim (1xx) answers read past, as HTTP requires of every client (RFC 9110 §15.2).

http.client skips only `100 Continue`: a `102 Processing` or `103 Early Hints` sent before the
real answer is taken as the answer, with no body — the webhook an attempt delivered recorded as
a failed "HTTP 103" and sent again until exhausted, and the real answer left behind on a kept
connection for the next exchange to read as its own.
"""

from __future__ import annotations

import http.client

# A peer may send several (RFC 8297 allows more than one 103); past this many it is not an
# HTTP answer worth waiting for (the exchange's deadline would end it later anyway).
MAX_INTERIM_ANSWERS = 16


class TooManyInterimAnswers(http.client.HTTPException):
    """More interim answers than MAX_INTERIM_ANSWERS before a final one."""


class FinalAnswerResponse(http.client.HTTPResponse):
    """An http.client response that reads past any interim answers (status and header lines,
    1xx but `101 Switching Protocols`, never asked for here) to the final one."""

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(MAX_INTERIM_ANSWERS + 1):
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's headers: read, unused
        raise TooManyInterimAnswers(f"more than {MAX_INTERIM_ANSWERS} interim (1xx) answers")
