"""Fetching inputs, rendering outputs once per distinct input, and keeping them to serve."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from PIL import UnidentifiedImageError

from emulator.images import CONTENT_TYPES, render_emulated_output

FETCH_TIMEOUT_S = 10.0
MAX_INPUT_BYTES = 25 * 1024 * 1024
INPUT_CACHE_ENTRIES = 32
OUTPUT_STORE_ENTRIES = 256


class InputFetchError(Exception):
    """An input image could not be fetched or decoded; the message is shown to the client."""


@dataclass(frozen=True)
class StoredOutput:
    """One rendered image, ready to serve."""

    body: bytes
    content_type: str


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

    def get(self, name: str) -> StoredOutput | None:
        """Return the stored image called `name`, if still kept."""
        with self._lock:
            stored = self._outputs.get(name)
            if stored is not None:
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

    def __init__(self, fetcher: InputFetcher, store: OutputStore) -> None:
        self._fetcher = fetcher
        self._store = store
        self._locks_guard = threading.Lock()
        self._locks_by_name: dict[str, threading.Lock] = {}

    def render(self, model_input: Mapping[str, Any]) -> str:
        """Return the output name for `model_input`; raises InputFetchError."""
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
            if self._store.get(name) is not None:
                return name
            image_bytes = self._fetcher.fetch(image_url, "image_url")
            mask_bytes = self._fetcher.fetch(mask_url, "mask_image_url")
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
