"""Settings are read once, validated, and a bad value stops a process with one clear line."""

from __future__ import annotations

import subprocess

import pytest

from cli.stack import venv_script
from core.settings import Settings, SettingsError, load_settings

EMULATED = {"RUNCOMFY_BASE_URL": "http://127.0.0.1:8100"}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(Settings.__dataclass_fields__):
        monkeypatch.delenv(name.upper(), raising=False)
    for name in ("CELERY_BROKER_URL", "RUNCOMFY_API_TOKEN", "RUNCOMFY_API_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_follow_the_contract(env: pytest.MonkeyPatch) -> None:
    env.setenv("RUNCOMFY_API_TOKEN", "t")
    s = load_settings()
    assert s.redis_url == "redis://localhost:6379/0" and s.celery_broker_url == s.redis_url
    assert s.runcomfy_base_url == "https://model-api.runcomfy.net"
    assert s.runcomfy_model_id == "tongyi-mai/z-image/turbo/inpainting/lora"
    assert (s.runcomfy_max_in_flight, s.job_deadline_s, s.submit_unknown) == (32, 900, "resubmit")
    assert s.webhook_retry_schedule_s == (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    assert (s.webhook_timeout_s, s.job_retention_s, s.webhook_allowed_networks) == (15, 604800, ())


def test_token_required_only_for_runcomfy_itself(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="RUNCOMFY_API_TOKEN"):
        load_settings()
    env.setenv("RUNCOMFY_BASE_URL", "http://127.0.0.1:8100")
    assert load_settings().runcomfy_api_token == ""


def test_secret_from_a_file(env: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "token"  # type: ignore[operator]
    path.write_text("s3cret\n")
    env.setenv("RUNCOMFY_API_TOKEN_FILE", str(path))
    settings = load_settings()
    assert settings.runcomfy_api_token == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "localhost:6379"),
        ("CELERY_BROKER_URL", "kafka://x"),
        ("RUNCOMFY_BASE_URL", "ftp://x"),
        ("RUNCOMFY_MAX_IN_FLIGHT", "0"),
        ("RUNCOMFY_MAX_IN_FLIGHT", "many"),
        ("JOB_DEADLINE_S", "soon"),
        ("SUBMIT_UNKNOWN", "maybe"),
        ("WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("WEBHOOK_RETRY_SCHEDULE", "0,5,-1"),
        ("WEBHOOK_RETRY_SCHEDULE", "now,later"),
        ("WEBHOOK_TIMEOUT_S", "0"),
        ("WEBHOOK_RECEIVER_CONCURRENCY", "0"),
        ("JOB_RETENTION_S", "10"),
        ("JOB_RETENTION_S", "3600"),  # shorter than the default schedule
        ("WEBHOOK_RETRY_SCHEDULE", "0,nan"),
        ("WEBHOOK_RETRY_SCHEDULE", "60,300"),  # the first attempt is made at once
        ("WEBHOOK_RETRY_SCHEDULE", "0,inf"),
        ("WEBHOOK_RETRY_SCHEDULE", "0,1e12"),
    ],
)
def test_bad_values_name_the_setting(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    for k, v in EMULATED.items():
        env.setenv(k, v)
    env.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message and "\n" not in message


def test_retention_must_outlast_the_webhook_attempts(env: pytest.MonkeyPatch) -> None:
    """A finished job stays readable while its webhook is tried (the whole schedule), and its
    event outlives the longest wait for a next attempt — a gap, or a receiver's Retry-After of
    up to 24 h (each attempt writes the event again, to live JOB_RETENTION_S)."""
    for k, v in EMULATED.items():
        env.setenv(k, v)
    env.setenv("JOB_RETENTION_S", str(2 * 86400))  # the default schedule spans ~3.2 days
    with pytest.raises(SettingsError, match="JOB_RETENTION_S"):
        load_settings()
    env.setenv("JOB_RETENTION_S", str(4 * 86400))
    assert load_settings().job_retention_s == 4 * 86400
    env.setenv("JOB_RETENTION_S", "90015")
    env.setenv("WEBHOOK_RETRY_SCHEDULE", "0,5,300")  # short, but Retry-After may ask 24 h
    assert load_settings().job_retention_s == 90015
    env.setenv("JOB_RETENTION_S", "86400")
    with pytest.raises(SettingsError, match="Retry-After"):
        load_settings()


def test_a_worker_with_a_bad_setting_exits_with_one_line() -> None:
    result = subprocess.run(
        [venv_script("celery"), "-A", "workers", "worker"],
        env={
            "PATH": "/usr/bin:/bin",
            "RUNCOMFY_BASE_URL": "http://127.0.0.1:1",
            "JOB_DEADLINE_S": "soon",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "bad setting" in line]
    assert lines and "JOB_DEADLINE_S" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_media_settings_have_their_defaults(env: pytest.MonkeyPatch) -> None:
    for key, given in EMULATED.items():
        env.setenv(key, given)
    s = load_settings()
    assert s.media_store_url == "file:///var/lib/inpaint-gateway/media"
    assert (s.media_s3_endpoint_url, s.upload_retention_s) == ("", 7 * 24 * 3600)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEDIA_STORE_URL", "file://relative"),
        ("MEDIA_STORE_URL", "ftp://host/x"),
        ("MEDIA_S3_ENDPOINT_URL", "minio:9000"),
        ("UPLOAD_RETENTION_S", "59"),
    ],
)
def test_a_bad_media_setting_names_itself(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    for key, given in EMULATED.items():
        env.setenv(key, given)
    env.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_an_s3_media_store_with_its_endpoint(env: pytest.MonkeyPatch) -> None:
    for key, given in EMULATED.items():
        env.setenv(key, given)
    env.setenv("MEDIA_STORE_URL", "s3://media-bucket/gateway")
    env.setenv("MEDIA_S3_ENDPOINT_URL", "http://minio:9000")
    s = load_settings()
    assert (s.media_store_url, s.media_s3_endpoint_url) == (
        "s3://media-bucket/gateway",
        "http://minio:9000",
    )
