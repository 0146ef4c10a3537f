"""The console's sessions: a random id in an HttpOnly, SameSite=Lax cookie (Secure over https),
the record in Redis with a TTL, for /console paths only.

Not Flask's default session (a signed cookie holds its data: what is in it, the browser keeps)
nor Flask-Session (it opens a session for every request of the app, the API's hot path too, and
wants a Redis client that answers bytes): ~60 lines that touch nothing outside /console.
The record holds the client id and the hash of its API key, never the key.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import flask
import redis
from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from core.keys import PREFIX

CONSOLE_PATH = "/console"
SESSION_COOKIE = "igw_console"
SESSION_TTL_S = 8 * 3600  # a working day; every request renews it
SESSION_KEY_PREFIX = PREFIX + "console:session:"
MAX_SESSION_ID_CHARS = 64  # ours are 43; a longer cookie is no session of ours


def session_key(session_id: str) -> str:
    return SESSION_KEY_PREFIX + session_id


class ConsoleSession(CallbackDict[str, Any], SessionMixin):
    """One browser's session; `renew_id` asks for a fresh id (at sign-in: no fixation)."""

    def __init__(self, initial: dict[str, Any] | None, session_id: str | None) -> None:
        def on_update(_: CallbackDict[str, Any]) -> None:
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.session_id = session_id
        self.modified = False
        self.renew_id = False


class ConsoleSessionInterface(SessionInterface):
    """Sessions for /console, kept in Redis; every other path has none (a null session)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def open_session(self, app: Flask, request: Request) -> ConsoleSession | None:
        if request.path != CONSOLE_PATH and not request.path.startswith(CONSOLE_PATH + "/"):
            return None
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id and len(session_id) <= MAX_SESSION_ID_CHARS:
            raw = self.redis.get(session_key(session_id))
            if raw is not None:
                return ConsoleSession(json.loads(raw), session_id)
        return ConsoleSession(None, None)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        assert isinstance(session, ConsoleSession)
        if session.session_id and (session.renew_id or not session):
            self.redis.delete(session_key(session.session_id))
            session.session_id = None
        if not session:
            if SESSION_COOKIE in flask.request.cookies:
                response.delete_cookie(SESSION_COOKIE, path=cookie_path(), httponly=True)
            return
        if session.session_id is None:
            session.session_id = secrets.token_urlsafe(32)
        # Written on every request: the TTL slides with use, and CSRF tokens land in it.
        self.redis.set(session_key(session.session_id), json.dumps(dict(session)), ex=SESSION_TTL_S)
        response.set_cookie(
            SESSION_COOKIE,
            session.session_id,
            max_age=SESSION_TTL_S,
            path=cookie_path(),
            secure=flask.request.is_secure,
            httponly=True,
            samesite="Lax",
        )


def cookie_path() -> str:
    """/console under the app's root (a SCRIPT_NAME when mounted below one)."""
    return flask.request.script_root + CONSOLE_PATH
