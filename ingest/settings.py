"""The one settings object of StorePulse, read from the environment and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "change-me-dev-only"


class InsecureSettingsError(RuntimeError):
    """Raised when a non-dev deployment would run with unsafe settings."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOREPULSE_", env_file=".env", extra="ignore")

    env: Literal["dev", "test", "prod"] = "dev"
    database_url: str = Field(default="", description="SQLAlchemy URL; empty means SQLite under var_dir")
    var_dir: Path = Path("./var")
    mqtt_url: str | None = None
    mqtt_topic_prefix: str = "storepulse/v1"
    mqtt_client_id: str = "storepulse-ingest"
    mqtt_shared_group: str | None = None
    mqtt_session_expiry_s: int = 7 * 24 * 3600
    mqtt_receive_maximum: int = 1000
    # Connections kept open per process; a connection opened past the pool and closed again
    # costs more than the request itself.
    db_pool_size: int = 10
    db_max_overflow: int = 10
    # The API's sync views run on a thread pool capped at this size. Kept below the connection
    # pool's size: a request beyond it waits on the event loop (cheap) instead of opening a new
    # PostgreSQL session (7 ms of server CPU each), which under load snowballed into a collapse.
    api_threads: int = 8
    device_token_cache_s: float = Field(default=10.0, ge=0, description="how long a device token stays trusted")
    ingest_batch_size: int = 2000
    ingest_batch_ms: int = 200
    # While the database cannot store (outage, missing column or privilege, full disk) the worker
    # keeps its batch unacknowledged and retries, backing off up to this many seconds.
    ingest_retry_max_s: float = Field(default=10.0, gt=0)
    # The ingest worker's own GET /healthz (`storepulse ingest-worker --health-port`); unset: none.
    ingest_health_port: int | None = Field(default=None, ge=0, le=65535)
    ingest_health_host: str = "127.0.0.1"
    # Alert delivery: retries back off from notify_backoff_s, doubling up to notify_backoff_max_s.
    notify_backoff_s: float = Field(default=5.0, gt=0)
    notify_backoff_max_s: float = Field(default=600.0, gt=0)
    notify_max_attempts: int = Field(default=10, ge=1)
    notify_interval_s: float = Field(default=5.0, gt=0, description="how often the scheduler delivers")
    # A claim on a notification lasts this long; each send renews it, so it must outlast one send (10 s).
    notify_lease_s: float = Field(default=120.0, gt=10, description="how long a delivery claim holds")
    # A footfall counter that never reported is alerted on once this long after it was registered.
    counter_grace_hours: float = Field(default=24.0, ge=0, description="grace period of a new counter")
    # How approved promotions reach tills: "auto" (MQTT when mqtt_url is set, else HTTP only),
    # "mqtt" or "http_only" (tills poll GET /api/v1/stores/{id}/promotions).
    promotion_publisher: str = "auto"
    promotions_cache_s: float = Field(default=2.0, ge=0, description="how long a scan may see an older set")
    # Where people open StorePulse: links in WeCom / DingTalk messages point here.
    public_url: str = "http://127.0.0.1:8000"
    secret_key: str = PLACEHOLDER_SECRET
    # Session cookies are Secure when the request came over TLS (or X-Forwarded-Proto says so);
    # true / false overrides that, e.g. true behind a proxy that does not set the header.
    cookie_secure: bool | None = None
    # Sign-in attempts per client address (the proxy's X-Forwarded-For only from a trusted proxy,
    # see FORWARDED_ALLOW_IPS of uvicorn), beside the per-account lockout: a `limits` rate string.
    login_rate_limit: str = "20/minute"
    timezone: str = "Asia/Shanghai"
    # For receipts that do not say whether unit prices include their tax (Chinese chains price
    # tax-inclusive) and whether reported sales include tax (as Chinese chains report them).
    prices_include_tax: bool = True
    sales_include_tax: bool = True

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("login_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"not a rate such as '20/minute' or '100/hour' ({value!r})") from exc
        return value

    @field_validator("mqtt_topic_prefix")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.strip("/")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'storepulse.db').as_posix()}"

    @property
    def chain_tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def require_safe_for_serving(self) -> None:
        """Refuse to serve anything outside dev/test while the secret is the shipped placeholder."""
        if self.env == "prod" and (self.secret_key == PLACEHOLDER_SECRET or len(self.secret_key) < 16):
            raise InsecureSettingsError(
                "STOREPULSE_SECRET_KEY is the placeholder or shorter than 16 characters; "
                "set a real secret before running with STOREPULSE_ENV=prod"
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
