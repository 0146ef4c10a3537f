"""Settings: read from the environment once at start-up, validated, frozen."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import environs
import marshmallow
import marshmallow.validate as mv

RUNCOMFY_PUBLIC_BASE_URL = "https://model-api.runcomfy.net"
DEFAULT_MODEL_ID = "tongyi-mai/z-image/turbo/inpainting/lora"
T = TypeVar("T")
DEFAULT_WEBHOOK_RETRY_SCHEDULE_S: tuple[float, ...] = (
    0,
    5,
    300,
    1800,
    7200,
    18000,
    36000,
    50400,
    72000,
    86400,
)
DEFAULT_WEBHOOK_RETRY_SCHEDULE = ",".join(f"{s:g}" for s in DEFAULT_WEBHOOK_RETRY_SCHEDULE_S)
MAX_RETRY_GAP_S = 7 * 24 * 3600
MAX_WEBHOOK_RETRY_AFTER_S = 24 * 3600.0  # a receiver's longer Retry-After is taken as this
DELIVERY_LATENESS_S = 3600
# A directory that outlives the process; `make run` and the tests point it at their own.
DEFAULT_MEDIA_STORE_URL = "file:///var/lib/inpaint-gateway/media"
DEFAULT_UPLOAD_RETENTION_S = 7 * 24 * 3600
DEFAULT_MEDIA_URL_TTL_S = 7 * 24 * 3600
# `?wait` requests one API process holds at once, each on a gunicorn thread of its own (the
# process's threads are API_THREADS more than this: those never wait).
DEFAULT_API_WAIT_SLOTS = 28
INPUT_FORWARD_MODES = ("data", "url")


DEFAULT_REDIS_REPLICA_WAIT_MS = 100
SENTINEL_DEFAULT_PORT = 26379


class SettingsError(ValueError):
    """A setting is missing or malformed; the message is one line naming it."""


@dataclass(frozen=True)
class RedisSentinel:
    """Where Redis Sentinel says the current master of `master` is (REDIS_SENTINELS)."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    password: str = field(default="", repr=False)  # the sentinels' own (REDIS_URL's: the master's)


@dataclass(frozen=True)
class RedisTarget:
    """How to reach the store: REDIS_URL (database, credentials; its host unless sentinels
    are given) and, when set, the sentinels that name the current master."""

    url: str
    sentinel: RedisSentinel | None = None


@dataclass(frozen=True)
class Settings:
    """Every knob of the gateway; see docs/operations.md, "Configuration"."""

    redis_url: str = "redis://localhost:6379/0"
    celery_broker_url: str = "redis://localhost:6379/0"
    runcomfy_base_url: str = RUNCOMFY_PUBLIC_BASE_URL
    runcomfy_api_token: str = field(default="", repr=False)
    runcomfy_model_id: str = DEFAULT_MODEL_ID
    runcomfy_timeout_s: float = 20.0
    runcomfy_max_in_flight: int = 32
    runcomfy_max_rps: float = 50.0
    job_deadline_s: int = 900
    submit_unknown: Literal["resubmit", "fail"] = "resubmit"
    webhook_allowed_networks: tuple[str, ...] = ()
    webhook_retry_schedule_s: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE_S
    webhook_timeout_s: float = 15.0
    webhook_receiver_concurrency: int = 64
    job_retention_s: int = 604800
    dispatch_interval_s: float = 0.5
    dispatch_batch_size: int = 64
    step_lease_s: float = 60.0
    log_level: str = "INFO"
    media_store_url: str = DEFAULT_MEDIA_STORE_URL
    media_s3_endpoint_url: str = ""
    upload_retention_s: int = DEFAULT_UPLOAD_RETENTION_S
    # Input images (PRODUCT §10): URLs a worker fetches for preflight, and how inputs go upstream.
    input_allowed_networks: tuple[str, ...] = ()
    input_forward: Literal["data", "url"] = "data"
    input_fetch_timeout_s: float = 10.0
    # Outputs: copied into the media store before a job succeeds; signed gateway URLs.
    output_copy_deadline_s: float = 120.0
    media_url_ttl_s: int = DEFAULT_MEDIA_URL_TTL_S
    api_wait_slots: int = DEFAULT_API_WAIT_SLOTS
    public_base_url: str = ""  # the gateway's own address, for URLs in webhooks ("": paths)
    redis_sentinel: RedisSentinel | None = None
    # How long accepting a job waits for one replica to hold it (when the master has one).
    redis_replica_wait_ms: int = DEFAULT_REDIS_REPLICA_WAIT_MS

    @property
    def redis(self) -> RedisTarget:
        """The store's address, for core.store.connect_redis."""
        return RedisTarget(self.redis_url, self.redis_sentinel)

    @property
    def uses_public_runcomfy(self) -> bool:
        """True when the upstream is RunComfy itself (so a token is required)."""
        return self.runcomfy_base_url.rstrip("/") == RUNCOMFY_PUBLIC_BASE_URL


def _schedule(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError("must be comma-separated seconds, e.g. 0,5,300") from exc
    if not delays or not all(0 <= d <= MAX_RETRY_GAP_S for d in delays):  # NaN fails too
        raise ValueError(f"must be a non-empty list of seconds from 0 to {MAX_RETRY_GAP_S}")
    if delays[0] != 0:  # a job's event is sent when the job ends, and a redelivery at once
        raise ValueError("must start with 0: the first attempt is made at once")
    return delays


def delivery_needs_s(schedule: tuple[float, ...], attempt_timeout_s: float) -> float:
    """How long a finished job's record must live for its webhook's attempts: the whole
    schedule (so the job, its deliveries and redelivery stay readable while attempts go on),
    and at least the longest wait for a next attempt — a receiver's Retry-After may ask up to
    MAX_WEBHOOK_RETRY_AFTER_S (each attempt writes the event again, to live that long) — plus
    each attempt's own time and DELIVERY_LATENESS_S for attempts that start late."""
    whole = sum(schedule) + len(schedule) * attempt_timeout_s
    longest_wait = max(*schedule, MAX_WEBHOOK_RETRY_AFTER_S) + attempt_timeout_s
    return max(whole, longest_wait) + DELIVERY_LATENESS_S


def load_settings() -> Settings:
    """Read and validate every setting; raise SettingsError naming the first bad one.

    Each variable may instead be given as NAME_FILE (a path), for mounted secrets.
    """
    return _reading(_read)


def load_redis_target() -> RedisTarget:
    """Only REDIS_URL (or REDIS_URL_FILE) and the sentinel settings, as load_settings reads
    them: for tools that need the store alone, and should not demand the rest (the RunComfy
    token) of their user."""
    return _reading(lambda env: RedisTarget(_redis_url(env), _redis_sentinel(env)))


def _reading(read: Callable[[environs.Env], T]) -> T:
    env = environs.FileAwareEnv(eager=True, strip_whitespace=True)
    try:
        return read(env)
    except (environs.EnvError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"bad setting: {exc}") from None


def _redis_url(env: environs.Env) -> str:
    url: str = env.str(
        "REDIS_URL", Settings.redis_url, validate=_url_scheme("redis", "rediss", "unix")
    )
    return url


def _redis_sentinel(env: environs.Env) -> RedisSentinel | None:
    listed: list[str] = env.list("REDIS_SENTINELS", [])
    addresses = tuple(_host_port(part.strip()) for part in listed if part.strip())
    master: str = env.str("REDIS_SENTINEL_MASTER", "")
    password: str = env.str("REDIS_SENTINEL_PASSWORD", "")
    if not addresses:
        if master or password:
            raise SettingsError(
                "bad setting REDIS_SENTINELS: required when REDIS_SENTINEL_MASTER or "
                "REDIS_SENTINEL_PASSWORD is set (comma-separated host:port of the sentinels)"
            )
        return None
    if not master:
        raise SettingsError(
            "bad setting REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS (the name the "
            "sentinels monitor the master by)"
        )
    return RedisSentinel(addresses, master, password)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        number = int(port) if port else SENTINEL_DEFAULT_PORT
    except ValueError:
        number = 0
    if not host.strip("[]") or not 0 < number < 65536:
        raise SettingsError(f"bad setting REDIS_SENTINELS: {text!r} is not host:port")
    return host.strip("[]"), number


def sentinel_broker_url(redis_url: str, sentinel: RedisSentinel) -> str:
    """kombu's `sentinel://` URL for the store's master: each sentinel, the database and
    credentials of REDIS_URL (the master's; the sentinels' own go in transport options)."""
    parts = urllib.parse.urlsplit(redis_url)
    credentials = parts.netloc.rpartition("@")[0]
    login = f"{credentials}@" if credentials else ""
    database = parts.path.strip("/") or "0"
    return ";".join(
        f"sentinel://{login}{host}:{port}/{database}" for host, port in sentinel.addresses
    )


def _broker_url(env: environs.Env, redis_url: str, sentinel: RedisSentinel | None) -> str:
    default = sentinel_broker_url(redis_url, sentinel) if sentinel else redis_url
    url: str = env.str("CELERY_BROKER_URL", default)
    schemes = [part.partition("://")[0] for part in url.split(";")]
    if schemes[0] == "sentinel":
        if sentinel is None:
            raise SettingsError(
                "bad setting CELERY_BROKER_URL: a sentinel:// broker needs REDIS_SENTINELS and "
                "REDIS_SENTINEL_MASTER (the master it names)"
            )
        if set(schemes) != {"sentinel"}:
            raise SettingsError("bad setting CELERY_BROKER_URL: every part must be sentinel://")
        return url
    try:
        _url_scheme("redis", "rediss", "amqp", "amqps")(url)
    except marshmallow.ValidationError as exc:
        raise SettingsError(f"bad setting CELERY_BROKER_URL: {' '.join(exc.messages)}") from None
    return url


def _read(env: environs.Env) -> Settings:
    redis_url = _redis_url(env)
    sentinel = _redis_sentinel(env)
    if sentinel is not None and not redis_url.startswith(("redis://", "rediss://")):
        raise SettingsError(
            "bad setting REDIS_URL: with REDIS_SENTINELS it must be redis:// or rediss:// (its "
            "database and credentials are used; the sentinels name the host)"
        )
    broker = _broker_url(env, redis_url, sentinel)
    base_url = env.str(
        "RUNCOMFY_BASE_URL", RUNCOMFY_PUBLIC_BASE_URL, validate=_url_scheme("http", "https")
    ).rstrip("/")
    token = env.str("RUNCOMFY_API_TOKEN", "")
    schedule = _webhook_retry_schedule(env)
    networks = _allowed_networks(env, "WEBHOOK_ALLOWED_NETWORKS")
    settings = Settings(
        redis_url=redis_url,
        celery_broker_url=broker,
        runcomfy_base_url=base_url,
        runcomfy_api_token=token,
        runcomfy_model_id=env.str("RUNCOMFY_MODEL_ID", DEFAULT_MODEL_ID, validate=mv.Length(min=1)),
        runcomfy_timeout_s=env.float(
            "RUNCOMFY_TIMEOUT_S", 20.0, validate=mv.Range(min=0.1, max=300)
        ),
        runcomfy_max_in_flight=env.int("RUNCOMFY_MAX_IN_FLIGHT", 32, validate=mv.Range(min=1)),
        runcomfy_max_rps=env.float(
            "RUNCOMFY_MAX_RPS", 50.0, validate=mv.Range(min=0.1, max=100000)
        ),
        job_deadline_s=env.int("JOB_DEADLINE_S", 900, validate=mv.Range(min=1)),
        submit_unknown=env.str(
            "SUBMIT_UNKNOWN", "resubmit", validate=mv.OneOf(["resubmit", "fail"])
        ),  # type: ignore[arg-type]
        webhook_allowed_networks=networks,
        webhook_retry_schedule_s=schedule,
        webhook_timeout_s=env.float("WEBHOOK_TIMEOUT_S", 15.0, validate=mv.Range(min=0.1, max=300)),
        webhook_receiver_concurrency=env.int(
            "WEBHOOK_RECEIVER_CONCURRENCY", 64, validate=mv.Range(min=1, max=1000)
        ),
        job_retention_s=env.int("JOB_RETENTION_S", 604800, validate=mv.Range(min=60)),
        dispatch_interval_s=env.float(
            "DISPATCH_INTERVAL_S", 0.5, validate=mv.Range(min=0.05, max=60)
        ),
        dispatch_batch_size=env.int("DISPATCH_BATCH_SIZE", 64, validate=mv.Range(min=1, max=1000)),
        step_lease_s=env.float("STEP_LEASE_S", 60.0, validate=mv.Range(min=5, max=3600)),
        log_level=env.str(
            "LOG_LEVEL", "INFO", validate=mv.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])
        ),
        media_store_url=_media_store_url(env),
        media_s3_endpoint_url=_optional_url(
            "MEDIA_S3_ENDPOINT_URL", env.str("MEDIA_S3_ENDPOINT_URL", ""), "http", "https"
        ),
        upload_retention_s=env.int(
            "UPLOAD_RETENTION_S", DEFAULT_UPLOAD_RETENTION_S, validate=mv.Range(min=60)
        ),
        input_allowed_networks=_allowed_networks(env, "INPUT_ALLOWED_NETWORKS"),
        input_forward=env.str("INPUT_FORWARD", "data", validate=mv.OneOf(INPUT_FORWARD_MODES)),  # type: ignore[arg-type]
        input_fetch_timeout_s=env.float(
            "INPUT_FETCH_TIMEOUT_S", 10.0, validate=mv.Range(min=0.1, max=120)
        ),
        output_copy_deadline_s=env.float(
            "OUTPUT_COPY_DEADLINE_S", 120.0, validate=mv.Range(min=0, max=86400)
        ),
        media_url_ttl_s=env.int(
            "MEDIA_URL_TTL_S", DEFAULT_MEDIA_URL_TTL_S, validate=mv.Range(min=60, max=366 * 86400)
        ),
        api_wait_slots=env.int(
            "API_WAIT_SLOTS", DEFAULT_API_WAIT_SLOTS, validate=mv.Range(min=1, max=10000)
        ),
        public_base_url=_optional_url(
            "PUBLIC_BASE_URL", env.str("PUBLIC_BASE_URL", ""), "http", "https"
        ).rstrip("/"),
        redis_sentinel=sentinel,
        redis_replica_wait_ms=env.int(
            "REDIS_REPLICA_WAIT_MS",
            DEFAULT_REDIS_REPLICA_WAIT_MS,
            validate=mv.Range(min=0, max=10000),
        ),
    )
    _check_together(settings)
    return settings


def _webhook_retry_schedule(env: environs.Env) -> tuple[float, ...]:
    try:
        return _schedule(env.str("WEBHOOK_RETRY_SCHEDULE", DEFAULT_WEBHOOK_RETRY_SCHEDULE))
    except ValueError as exc:
        raise SettingsError(f"bad setting WEBHOOK_RETRY_SCHEDULE: {exc}") from None


def _media_store_url(env: environs.Env) -> str:
    from core.media import check_media_store_url

    url: str = env.str("MEDIA_STORE_URL", DEFAULT_MEDIA_STORE_URL)
    try:
        return check_media_store_url(url)
    except ValueError as exc:
        raise SettingsError(f"bad setting MEDIA_STORE_URL: {exc}") from None


def _allowed_networks(env: environs.Env, name: str) -> tuple[str, ...]:
    listed: list[str] = env.list(name, [])
    networks = tuple(n.strip() for n in listed if n.strip())
    # Imported here: egress imports requests, and settings stays light to import.
    from core.http.egress import EgressPolicy

    try:
        EgressPolicy.from_cidrs(list(networks), setting=name)
    except ValueError as exc:
        raise SettingsError(f"bad setting {exc}") from None
    return networks


def _check_together(settings: Settings) -> None:
    """The rules that tie one setting to another."""
    if settings.uses_public_runcomfy and not settings.runcomfy_api_token:
        raise SettingsError(
            "bad setting RUNCOMFY_API_TOKEN: required when RUNCOMFY_BASE_URL is RunComfy's "
            "(set the token, or point RUNCOMFY_BASE_URL at the emulator)"
        )
    needs_s = delivery_needs_s(settings.webhook_retry_schedule_s, settings.webhook_timeout_s)
    if settings.job_retention_s < needs_s:
        raise SettingsError(
            f"bad setting JOB_RETENTION_S: {settings.job_retention_s} s is shorter than a finished "
            f"job's webhook may still be tried ({needs_s:.0f} s: WEBHOOK_RETRY_SCHEDULE in all, or "
            f"its longest gap or a receiver's Retry-After of up to 24 h, with WEBHOOK_TIMEOUT_S "
            f"per attempt and {DELIVERY_LATENESS_S} s late)"
        )
    if settings.step_lease_s <= settings.runcomfy_timeout_s * 2:
        raise SettingsError("bad setting STEP_LEASE_S: must exceed twice RUNCOMFY_TIMEOUT_S")


def _optional_url(name: str, text: str, *schemes: str) -> str:
    if text:
        try:
            _url_scheme(*schemes)(text)
        except marshmallow.ValidationError as exc:
            raise SettingsError(f"bad setting {name}: {' '.join(exc.messages)}") from None
    return text


def _url_scheme(*schemes: str) -> mv.Validator:
    return mv.URL(schemes=set(schemes), require_tld=False)


def load_settings_or_exit() -> Settings:
    """load_settings for a process entry point: a bad value stops it with one clear line."""
    try:
        return load_settings()
    except SettingsError as exc:
        raise SystemExit(f"inpaint-gateway: {exc}") from None
