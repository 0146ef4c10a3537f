"""Fetching or holding inputs, rendering outputs once per distinct input, keeping them to serve."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from PIL import UnidentifiedImageError

from emulator.images import CONTENT_TYPES, render_emulated_output

FETCH_TIMEOUT_S = 10.0
MAX_INPUT_BYTES = 25 * 1024 * 1024
INPUT_CACHE_ENTRIES = 32
OUTPUT_STORE_ENTRIES = 256
# Decoded data-URI inputs wait here between submit and render: bounded by bytes, not count,
# so a burst of large distinct inputs evicts old ones instead of growing without end.
HELD_INPUT_MAX_BYTES = 256 * 1024 * 1024
# model_input carries this reference in place of a held data URI: a few bytes, not megabytes.
HELD_INPUT_PREFIX = "held-sha256:"


class InputFetchError(Exception):
    """An input image could not be fetched or decoded; the message is shown to the client."""


@dataclass(frozen=True)
class StoredOutput:
    """One rendered image, ready to serve."""

    body: bytes
    content_type: str
    stored_monotonic: float = field(default_factory=time.monotonic)


class HeldInputs:
    """Decoded data-URI inputs by SHA-256, the least recently used dropped past a byte budget."""

    def __init__(self, max_bytes: int = HELD_INPUT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self._held_bytes = 0

    def hold(self, body: bytes) -> str:
        """Keep `body`; return the reference that stands for it in a model input."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            if digest not in self._held:
                self._held[digest] = body
                self._held_bytes += len(body)
            self._held.move_to_end(digest)
            while self._held_bytes > self._max_bytes and len(self._held) > 1:
                _, dropped = self._held.popitem(last=False)
                self._held_bytes -= len(dropped)
        return f"{HELD_INPUT_PREFIX}{digest}"

    def take(self, reference: str, field_name: str) -> bytes:
        """Return the held bytes of `reference`, raising InputFetchError once they are dropped."""
        digest = reference.removeprefix(HELD_INPUT_PREFIX)
        with self._lock:
            body = self._held.get(digest)
            if body is not None:
                self._held.move_to_end(digest)
                return body
        raise InputFetchError(
            f"{field_name}: the data URI's bytes are no longer held by the emulator "
            f"(more than {self._max_bytes} B of other inputs arrived since)"
        )


class InputFetcher:
    """GETs input URLs without auth, keeping the last few answers in an LRU."""

    def __init__(self, max_entries: int = INPUT_CACHE_ENTRIES) -> None:
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def fetch(self, url: str, field_name: str) -> bytes:
        """Return the body at `url`, raising InputFetchError named after `field_name`."""
        with self._lock:
            if url in self._cache:
                self._cache.move_to_end(url)
                return self._cache[url]
        try:
            with requests.get(url, timeout=FETCH_TIMEOUT_S) as response:
                if response.status_code != 200:
                    raise InputFetchError(
                        f"could not fetch {field_name}: HTTP {response.status_code} from {url}"
                    )
                body = response.content
        except requests.RequestException as exc:
            raise InputFetchError(f"could not fetch {field_name}: {exc}") from exc
        if len(body) > MAX_INPUT_BYTES:
            raise InputFetchError(f"could not fetch {field_name}: larger than {MAX_INPUT_BYTES} B")
        with self._lock:
            self._cache[url] = body
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return body


class OutputStore:
    """Rendered images by name, evicting the least recently used past a fixed count."""

    def __init__(self, max_entries: int = OUTPUT_STORE_ENTRIES) -> None:
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._outputs: OrderedDict[str, StoredOutput] = OrderedDict()

    def get(self, name: str, max_age_s: float) -> StoredOutput | None:
        """Return the stored image called `name`, unless dropped or older than `max_age_s`."""
        with self._lock:
            stored = self._outputs.get(name)
            if stored is None:
                return None
            if time.monotonic() - stored.stored_monotonic > max_age_s:
                del self._outputs[name]  # gone for good, as RunComfy deletes an old output
                return None
            self._outputs.move_to_end(name)
            return stored

    def put(self, name: str, stored: StoredOutput) -> None:
        """Keep `stored` under `name`."""
        with self._lock:
            self._outputs[name] = stored
            self._outputs.move_to_end(name)
            while len(self._outputs) > self._max_entries:
                self._outputs.popitem(last=False)


class OutputRenderer:
    """Turns a model input into a stored output name, rendering each distinct input once."""

    def __init__(self, fetcher: InputFetcher, held: HeldInputs, store: OutputStore) -> None:
        self._fetcher = fetcher
        self._held = held
        self._store = store
        self._locks_guard = threading.Lock()
        self._locks_by_name: dict[str, threading.Lock] = {}

    def render(self, model_input: Mapping[str, Any], output_ttl_s: float) -> str:
        """Return the output name for `model_input`, rendering it unless a copy younger than
        `output_ttl_s` is kept; raises InputFetchError."""
        image_url = str(model_input["image_url"])
        mask_url = str(model_input["mask_image_url"])
        image_size = str(model_input.get("image_size", "auto"))
        output_format = str(model_input.get("output_format", "png"))
        seed = int(model_input.get("seed", 0))
        cache_key = "\n".join((image_url, mask_url, image_size, output_format, str(seed)))
        name = f"{hashlib.sha256(cache_key.encode()).hexdigest()[:32]}.{output_format}"
        with self._locks_guard:
            name_lock = self._locks_by_name.setdefault(name, threading.Lock())
        # One render per distinct input even when many identical jobs finish at once.
        with name_lock:
            if self._store.get(name, output_ttl_s) is not None:
                return name
            image_bytes = self._input_bytes(image_url, "image_url")
            mask_bytes = self._input_bytes(mask_url, "mask_image_url")
            try:
                body = render_emulated_output(
                    image_bytes,
                    mask_bytes,
                    image_size=image_size,
                    output_format=output_format,
                    seed=seed,
                )
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise InputFetchError(f"could not decode input images: {exc}") from exc
            self._store.put(name, StoredOutput(body, CONTENT_TYPES[output_format]))
        return name

    def _input_bytes(self, reference: str, field_name: str) -> bytes:
        if reference.startswith(HELD_INPUT_PREFIX):
            return self._held.take(reference, field_name)
        return self._fetcher.fetch(reference, field_name)
