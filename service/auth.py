"""Bearer API keys: every /v1 route knows its client, or answers 401."""

from __future__ import annotations

from flask import g, request
from werkzeug.exceptions import Unauthorized

from core.clients import Client
from service.context import ctx


class MissingOrBadApiKey(Unauthorized):
    """401 with the Bearer challenge."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.data = {"headers": {"WWW-Authenticate": 'Bearer realm="inpaint-gateway"'}}


def authenticate() -> None:
    """Find the calling client from `Authorization: Bearer <api_key>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, api_key = header.partition(" ")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise MissingOrBadApiKey("Send your API key as 'Authorization: Bearer <api_key>'.")
    client = ctx().clients.authenticate(api_key.strip())
    if client is None:
        raise MissingOrBadApiKey("The API key is not valid (unknown or revoked).")
    g.client = client


def current_client() -> Client:
    """The authenticated client of this request."""
    client: Client = g.client
    return client
