"""Settings: precedence, clear errors naming key and variable, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from courierd.config import load_settings
from courierd.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("COURIERD_"):
            monkeypatch.delenv(key)


def test_defaults_match_the_contract() -> None:
    """With nothing set, the CONTRACT.md section 2 defaults apply."""
    s = load_settings()
    assert s.mqtt.url == "mqtt://127.0.0.1:1883" and s.mqtt.client_id == "courierd"
    assert s.onetablet.transport == "rest" and s.onetablet.timeout_s == 30
    assert str(s.store.path) == "var/courierd.db" and s.store.synchronous == "FULL"
    assert s.http.listen == "127.0.0.1:8787"
    assert s.store.abandon_after_h == 24


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flags > environment > TOML file > defaults."""
    f = tmp_path / "c.toml"
    f.write_text(
        '[mqtt]\nurl = "mqtt://file:1"\nclient_id = "from-file"\n'
        '[store]\npath = "/from/file.db"\n[http]\nlisten = "0.0.0.0:1"\n'
    )
    monkeypatch.setenv("COURIERD_MQTT__URL", "mqtt://env:2")
    monkeypatch.setenv("COURIERD_STORE__PATH", "/from/env.db")
    s = load_settings(f, {"store": {"path": "/from/flag.db"}})
    assert s.mqtt.url == "mqtt://env:2"
    assert s.mqtt.client_id == "from-file"
    assert str(s.store.path) == "/from/flag.db"
    assert s.http.listen == "0.0.0.0:1"


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COURIERD_CONFIG names the file when --config is not given."""
    f = tmp_path / "c.toml"
    f.write_text('[onetablet]\ntransport = "webhooks"\n')
    monkeypatch.setenv("COURIERD_CONFIG", str(f))
    assert load_settings().onetablet.transport == "webhooks"


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("COURIERD_MQTT__URL", "http://broker", "invalid setting mqtt.url (COURIERD_MQTT__URL)"),
        (
            "COURIERD_ONETABLET__TRANSPORT",
            "grpc",
            "invalid setting onetablet.transport (COURIERD_ONETABLET__TRANSPORT)",
        ),
        (
            "COURIERD_ONETABLET__BASE_URL",
            "ftp://x",
            "invalid setting onetablet.base_url (COURIERD_ONETABLET__BASE_URL)",
        ),
        (
            "COURIERD_ONETABLET__BASE_URL",
            "https://onetablet.example/api?v=2",
            "must not have a query (?) or fragment (#)",
        ),
        (
            "COURIERD_ONETABLET__BASE_URL",
            "https://onetablet.example/#",
            "must not have a query (?) or fragment (#)",
        ),
        (
            "COURIERD_ONETABLET__BASE_URL",
            "https://bücher.example",
            "invalid setting onetablet.base_url (COURIERD_ONETABLET__BASE_URL): must be "
            "printable ASCII: an international host name in its xn-- (IDNA) form",
        ),
        (
            "COURIERD_ONETABLET__BASE_URL",
            "https://courier:pw-secret@onetablet.example",
            "invalid setting onetablet.base_url (COURIERD_ONETABLET__BASE_URL): must not "
            "carry user-info (user:password@); set onetablet.api_key",
        ),
        (
            "COURIERD_ONETABLET__API_KEY",
            "clé",
            "invalid setting onetablet.api_key (COURIERD_ONETABLET__API_KEY): must be "
            "printable ASCII",
        ),
        (
            "COURIERD_ONETABLET__API_KEY",
            "k\r\nx-evil: 1",
            "invalid setting onetablet.api_key (COURIERD_ONETABLET__API_KEY): must be "
            "printable ASCII",
        ),
        ("COURIERD_HTTP__LISTEN", "8787", "invalid setting http.listen (COURIERD_HTTP__LISTEN)"),
        (
            "COURIERD_INGEST__BATCH_SIZE",
            "0",
            "invalid setting ingest.batch_size (COURIERD_INGEST__BATCH_SIZE)",
        ),
        (
            "COURIERD_STORE__ABANDON_AFTER_H",
            "0",
            "invalid setting store.abandon_after_h (COURIERD_STORE__ABANDON_AFTER_H)",
        ),
    ],
)
def test_bad_setting_names_key_and_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    """A bad value is one message naming the key and its environment variable."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert needle in str(info.value)
    assert "pw-secret" not in str(info.value) and "clé" not in str(info.value)


def test_unknown_key_in_file_and_bad_files(tmp_path: Path) -> None:
    """A typo in the file, a missing file and broken TOML are each named."""
    f = tmp_path / "c.toml"
    f.write_text("[mqtt]\nurll = 'x'\n")
    with pytest.raises(ConfigError, match=r"mqtt\.urll .*unknown setting"):
        load_settings(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    f.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(f)


def test_missing_onetablet_settings_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """run and the order commands need base_url and api_key; the error says how to set them."""
    with pytest.raises(ConfigError, match=r"onetablet\.base_url .*COURIERD_ONETABLET__BASE_URL"):
        load_settings().require_onetablet()
    monkeypatch.setenv("COURIERD_ONETABLET__BASE_URL", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="COURIERD_ONETABLET__API_KEY"):
        load_settings().require_onetablet()


def test_api_key_never_in_repr_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret is masked in reprs and dumps, and not echoed by validation errors."""
    monkeypatch.setenv("COURIERD_ONETABLET__API_KEY", "sk-live-123")
    s = load_settings()
    assert "sk-live-123" not in repr(s) and "sk-live-123" not in str(s.model_dump(mode="json"))
    assert s.onetablet.api_key is not None
    assert s.onetablet.api_key.get_secret_value() == "sk-live-123"
    monkeypatch.setenv("COURIERD_MQTT__PASSWORD", "pw-secret")
    monkeypatch.setenv("COURIERD_MQTT__URL", "bad")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "sk-live-123" not in str(info.value) and "pw-secret" not in str(info.value)


def test_a_window_smaller_than_a_batch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest.window below ingest.batch_size could never hold a full batch, so "behind"
    would never show: a config error naming both; 0 (twice the batch) and larger pass."""
    monkeypatch.setenv("COURIERD_INGEST__BATCH_SIZE", "500")
    monkeypatch.setenv("COURIERD_INGEST__WINDOW", "200")
    with pytest.raises(ConfigError, match=r"window \(200\) must be 0 or at least batch_size"):
        load_settings()
    for ok in ("0", "500", "5000"):
        monkeypatch.setenv("COURIERD_INGEST__WINDOW", ok)
        assert load_settings().ingest.receive_maximum == (int(ok) or 1000)
