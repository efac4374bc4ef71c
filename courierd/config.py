"""Settings (CONTRACT.md section 2): flags > environment > TOML file > defaults.

Environment names are `COURIERD_` + section + `__` + key. Settings are built once at
startup by the CLI; each component is handed only its own section.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from courierd.errors import ConfigError

ENV_PREFIX = "COURIERD_"
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")
_URL_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSettings(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = Field("courierd", min_length=1, max_length=64)
    protocol: Literal["5", "3.1.1"] = "5"
    # How long the broker keeps our session (and queues our messages) while we are away.
    session_expiry_s: int = Field(7 * 24 * 3600, ge=60)
    keepalive_s: int = Field(30, ge=5)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
        _ = parts.port  # raises ValueError on a bad port
        return value

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class OneTabletSettings(_Section):
    base_url: str | None = None
    api_key: SecretStr | None = None
    transport: Literal["rest", "webhooks"] = "rest"
    # The deadline of one call, whole (connect, send, the reply to its last byte).
    timeout_s: float = Field(30.0, gt=0)
    # Waits between attempts of a failed call (the API text's 1 s, 5 s, 30 s).
    retry_schedule_s: tuple[float, ...] = Field((1.0, 5.0, 30.0), min_length=1)
    # Pushes in flight at once, across orders (one per order at a time). OneTablet is
    # 50-300 ms away: 256 in flight carry about 1,000 pushes/s at 100 ms.
    max_concurrency: int = Field(256, ge=1, le=4096)
    # Connections courierd opens to OneTablet's host; a push in flight holds one.
    max_connections_per_host: int = Field(256, ge=1, le=4096)
    # The HTTP library under the OneTablet client (`edges/onetablet_http.py`): the lean
    # one on httptools' parser, or aiohttp (the default before it, kept as a fallback).
    client: Literal["httptools", "aiohttp"] = "httptools"

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if "?" in value or "#" in value:
            # Request paths are appended to it: after a query or fragment they would
            # silently be part of that, and every request would go to the same URL.
            raise ValueError("must not have a query (?) or fragment (#)")
        if not _URL_CHARS.fullmatch(value):
            # Each HTTP client sent other bytes for it (or failed each call, retried forever).
            raise ValueError(
                "must be printable ASCII: an international host name in its xn-- (IDNA) "
                "form, the path %-escaped"
            )
        if "@" in parts.netloc:
            # Every client dropped it silently: OneTablet's credential is onetablet.api_key.
            raise ValueError("must not carry user-info (user:password@); set onetablet.api_key")
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _PRINTABLE_ASCII.fullmatch(value.get_secret_value()):
            # It goes in a header: a character there would break or alter every request,
            # each one failing and retried forever. The value is never echoed.
            raise ValueError("must be printable ASCII (no control or non-ASCII characters)")
        return value

    @field_validator("retry_schedule_s")
    @classmethod
    def _schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value):
            raise ValueError("waits must not be negative")
        return value


class StoreSettings(_Section):
    # postgresql://user:password@host/db selects PostgreSQL (several instances as one
    # cluster); `path` is then ignored. The password is kept out of logs and messages.
    url: SecretStr | None = None
    path: Path = Path("./var/courierd.db")
    # FULL survives power loss; NORMAL in WAL mode may lose the last commits.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # What finished orders leave behind, and dead letters, are deleted after this.
    retention_days: float = Field(30.0, gt=0, le=36500)
    # Accepted fixes (what replay and the operator's track read) are deleted after this:
    # at 10k fixes/s a day of them is about 145 GB, so they go sooner than the orders.
    fix_retention_days: float = Field(7.0, gt=0, le=36500)
    # An order with no transition and no accepted fix for this long becomes `expired`.
    abandon_after_h: float = Field(24.0, gt=0, le=876000)
    # How long a write waits for a lock another connection holds (an operator's shell).
    busy_timeout_s: float = Field(10.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
            raise ValueError("must look like postgresql://user:password@host:5432/dbname")
        return value

    @property
    def postgres_url(self) -> str | None:
        return None if self.url is None else self.url.get_secret_value()


class ClusterSettings(_Section):
    # MQTT sessions the instances of a cluster share out (PostgreSQL only). More slots
    # than instances lets the load spread; keep it once chosen (see README).
    slots: int = Field(4, ge=1, le=64)
    # How long an instance's hold on a slot (and, twice that, on a claimed push) lasts
    # without renewal: a dead instance's share is taken over after this.
    lease_s: float = Field(15.0, ge=3, le=300)


class IngestSettings(_Section):
    # 1000, not 500: each commit also pays an fsync, the write lock and a hand-over
    # between processes; measured, a fifth more statuses a second (docs/performance.md).
    batch_size: int = Field(1000, ge=1, le=10_000)
    # 0: commit whatever is queued at once; messages that arrive during a commit form
    # the next batch, so batches grow with load by themselves (measured: faster than a
    # 10 ms window at every load, and no added latency when traffic is light).
    batch_ms: float = Field(0.0, ge=0)
    # Messages waiting for a batch, at most: the MQTT 5 Receive Maximum, and held on
    # courierd's side too (edges/mqtt.py). Beyond it the broker holds the backlog (in its
    # persistent session), not courierd's memory. 0: twice batch_size (one batch commits
    # while the next arrives), all the throughput needs (README "When courierd is behind").
    window: int = Field(0, ge=0, le=65_535)
    # Ingest that has not caught up for this long is "behind" on /healthz (a warning:
    # health stays 200) and courierd_ingest_behind_seconds says for how long.
    behind_after_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _window_holds_a_batch(self) -> Self:
        # A smaller window never lets a full batch wait: batches would stay small and
        # "behind" (a full batch waiting) could never be seen, however large the backlog.
        if self.window and self.window < self.batch_size:
            raise ValueError(
                f"window ({self.window}) must be 0 or at least batch_size ({self.batch_size})"
            )
        return self

    @property
    def receive_maximum(self) -> int:
        """The window in effect (MQTT's Receive Maximum is 1..65535)."""
        return self.window or min(65_535, self.batch_size * 2)


class HttpSettings(_Section):
    listen: str = "127.0.0.1:8787"
    # Bearer token of the dispatch API and the operator page (`Authorization: Bearer …`).
    # Unset: the API's writes are off, and `listen` must be a loopback address.
    token: SecretStr | None = None
    # Host names this listener answers to, beyond the loopback names and the listen
    # address (CONTRACT.md 6.1): any other `Host` gets 421 (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    # A request (headers and body) must arrive whole this long after the connection is
    # ready for it; else it is cut (every listener, webhook.listen too).
    request_timeout_s: float = Field(10.0, gt=0, le=300)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                "must be host:port, e.g. 127.0.0.1:8787 or [::1]:8787, or empty to turn it off"
            )
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:8787")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(host_name(v) for v in value)

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None  # an empty variable means no token, as if unset
        secret = value.get_secret_value()
        if len(secret) < 16 or len(secret) > 256:
            raise ValueError("must be 16 to 256 characters (e.g. `openssl rand -hex 32`)")
        if not all("!" <= c <= "~" for c in secret):
            raise ValueError("must be printable ASCII without spaces")
        return value


class WebhookSettings(_Section):
    # OneTablet's calls to courierd (CONTRACT.md 11): "host:port", or empty for off.
    listen: str = ""
    # As http.allowed_hosts, for this listener (OneTablet's name for courierd).
    allowed_hosts: tuple[str, ...] = ()
    # The x-api-key OneTablet sends; required when `listen` is set. A secret.
    secret: SecretStr | None = Field(None, validate_default=True)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return HttpSettings._listen(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(host_name(v) for v in value)

    @field_validator("secret")
    @classmethod
    def _needs_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if info.data.get("listen") and (value is None or not value.get_secret_value()):
            raise ValueError("required when webhook.listen is set")
        if value is not None and value.get_secret_value():
            _check_secret(value.get_secret_value())
        return value


def _check_secret(secret: str) -> None:
    """A header value OneTablet can send and courierd can compare: 16 to 256 characters,
    no control characters, no space at either end (HTTP strips it). Non-ASCII is fine:
    it is compared as UTF-8 bytes."""
    if not 16 <= len(secret) <= 256:
        raise ValueError("must be 16 to 256 characters (e.g. `openssl rand -hex 32`)")
    if not secret.isprintable() or secret != secret.strip():
        raise ValueError("must be printable, without control characters or outer spaces")


def host_name(value: str) -> str:
    """A `Host` name as courierd compares it: lower case, no port, no trailing dot, an
    IPv6 address without brackets."""
    name = value.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name or not all(c.isalnum() or c in "-._:" for c in name):
        raise ValueError(f"{value[:60]!r} is not a host name or an IP address (no port)")
    if ":" in name and not all(c in "0123456789abcdef:." for c in name):
        raise ValueError(f"{value[:60]!r} is not a host name or an IP address (no port)")
    return name


class GeofenceSettings(_Section):
    """CONTRACT.md 7: statuses inferred from fixes. Distances in metres, times in seconds
    of the fixes' own clock."""

    enabled: bool = True
    max_accuracy_m: float = Field(50.0, gt=0)  # a fix reporting worse accuracy is ignored
    max_speed_mps: float = Field(50.0, gt=0)  # a fix needing a faster jump is ignored
    approach_m: float = Field(1000.0, gt=0)  # within this of the pickup: arriving_at_store
    radius_m: float = Field(100.0, gt=0)  # the pickup's radius when its place has none
    dwell_s: float = Field(30.0, ge=0)  # inside the radius this long: arrived_at_store
    min_fixes: int = Field(2, ge=1, le=100)  # ...and across this many consecutive fixes
    depart_after_s: float = Field(60.0, ge=0)  # at arrived_at_store this long before leaving
    exit_factor: float = Field(2.0, ge=1.0)  # leaving means beyond exit_factor x radius
    auto_dropoff: bool = False  # infer dropoff too
    dropoff_radius_m: float = Field(50.0, gt=0)
    dropoff_dwell_s: float = Field(60.0, ge=0)


class WatchdogSettings(_Section):
    # A courier with active orders silent this long (by courierd's clock) is offline.
    offline_after_s: float = Field(300.0, ge=10, le=86400)


class OwnTracksSettings(_Section):
    enabled: bool = True
    # Which part of an OwnTracks message names the courier.
    courier_id: Literal["user", "device", "tid"] = "user"


class DaemonSettings(_Section):
    # A loop (ingest, dispatch) silent this long is stuck: /healthz turns 503 and the
    # systemd watchdog pings stop, so systemd restarts the daemon.
    stall_after_s: float = Field(30.0, gt=0, le=3600)
    # SIGTERM to exit, in-flight pushes included; keep it under the unit's TimeoutStopSec.
    stop_timeout_s: float = Field(30.0, gt=0, le=600)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """Every setting of courierd, grouped by the component that uses it."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    mqtt: MqttSettings = MqttSettings()
    onetablet: OneTabletSettings = OneTabletSettings()
    store: StoreSettings = StoreSettings()
    cluster: ClusterSettings = ClusterSettings()
    ingest: IngestSettings = IngestSettings()
    http: HttpSettings = HttpSettings()
    webhook: WebhookSettings = WebhookSettings()
    geofence: GeofenceSettings = GeofenceSettings()
    watchdog: WatchdogSettings = WatchdogSettings()
    owntracks: OwnTracksSettings = OwnTracksSettings()
    daemon: DaemonSettings = DaemonSettings()
    log: LogSettings = LogSettings()

    def require_onetablet(self) -> OneTabletSettings:
        """The OneTablet section, with the settings `run` and the order commands need."""
        for key in ("base_url", "api_key"):
            if getattr(self.onetablet, key) is None:
                raise ConfigError(
                    f"missing setting onetablet.{key} "
                    f"(set {env_name(('onetablet', key))} or [onetablet] {key} in the config file)"
                )
        return self.onetablet


def redact(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def env_name(loc: tuple[str | int, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc[:2])


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build settings once. `overrides` are the command-line flags, as nested dicts."""
    path = config_file or _env_config_file()
    if path is not None:
        _check_toml(path)

    class _Sourced(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    try:
        built = _Sourced(**(overrides or {}))
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from None
    return Settings.model_construct(
        **{name: getattr(built, name) for name in Settings.model_fields}
    )


def _env_config_file() -> Path | None:
    value = os.environ.get(ENV_PREFIX + "CONFIG")
    return Path(value) if value else None


def _check_toml(path: Path) -> None:
    """A named config file must exist and parse; say which file and where it is wrong."""
    try:
        with path.open("rb") as f:
            tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _describe(error: ValidationError, path: Path | None) -> str:
    """One line naming the first bad key and its variable; never echo secret values."""
    first = error.errors()[0]
    loc = tuple(p for p in first["loc"] if isinstance(p, str))
    key = ".".join(loc) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting" + (f" in {path}" if path else "")
    return f"invalid setting {key} ({env_name(loc)}): {message}"
