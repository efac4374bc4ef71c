"""courierd's outgoing MQTT connection: QoS 1 publishes, one at a time, awaited.

Separate from the ingest connection (which lives in another process and must never
wait on anything): the dispatch process uses this one to publish notifications from
the database. The session is clean on purpose: what is not yet acknowledged is still
in the database and is simply published again after a reconnect.

It also reads the broker's own counts (Mosquitto's `$SYS` topics, where the broker
and its ACL allow it): how many messages it holds, and how many it dropped because a
client's queue was full. That is the one way a message can be lost between the phones
and courierd, so /metrics shows it (README "When courierd is behind").
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from courierd.config import MqttSettings

log = logging.getLogger(__name__)


# The broker's counts (Mosquitto 2.0, every sys_interval): what it holds, what it
# dropped for a full client queue (max_queued_messages / max_queued_bytes), since it
# started. Broker-wide: with a broker of its own, courierd's session is most of it.
BROKER_COUNTS = {
    "$SYS/broker/store/messages/count": "stored",
    "$SYS/broker/publish/messages/dropped": "dropped",
}


class MqttPublisher:
    """`start()`, then `publish()` (True once the broker acknowledged), `stop()`."""

    def __init__(self, settings: MqttSettings, client_id: str) -> None:
        self.settings = settings
        self.connected = threading.Event()
        self.broker_counts: dict[str, int] = {}  # "stored", "dropped": the last values seen
        v5 = settings.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.suppress_exceptions = True
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        # Nothing is queued in memory: a message not acknowledged stays in the database.
        client.max_queued_messages_set(1)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        for topic in BROKER_COUNTS:
            client.message_callback_add(topic, self._on_broker_count)
        self._client = client

    def start(self) -> None:
        self._client.connect_async(
            self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def publish(self, topic: str, payload: str, timeout: float = 10.0) -> bool:
        """Publish QoS 1 and wait for the PUBACK; False if not connected or not acked."""
        if not self.connected.is_set():
            return False
        try:
            info = self._client.publish(topic, payload.encode(), qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                return False
            info.wait_for_publish(timeout)
            return bool(info.is_published())
        except (RuntimeError, ValueError, OSError) as e:
            log.warning("mqtt.publish_failed topic=%s error=%r", topic, e)
            return False

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("mqtt.publisher_refused reason=%r", str(reason))
            return
        # QoS 0, a SUBSCRIBE of its own: a broker without $SYS, or an ACL that does not
        # let courierd read it, only leaves the counts unknown.
        client.subscribe([(topic, 0) for topic in BROKER_COUNTS])
        self.connected.set()

    def _on_broker_count(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.broker_counts[BROKER_COUNTS[msg.topic]] = int(msg.payload)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self.connected.clear()
