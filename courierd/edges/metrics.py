"""Prometheus metrics (prometheus-client), one registry per daemon so tests can run several."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the output and nobody alerts on them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every metric courierd exports on /metrics (CONTRACT.md section 6)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter(
            "courierd_messages_received", "MQTT messages received, by kind", ["kind"], registry=r
        )
        self.events = Counter(
            "courierd_status_events",
            "Status events by outcome (accepted, duplicate, stale, cancelled, wrong_courier)",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "courierd_messages_rejected",
            "Messages kept as dead letters, by reason",
            ["reason"],
            registry=r,
        )
        self.transitions = Counter(
            "courierd_transitions", "Transitions recorded (inferred included)", registry=r
        )
        self.pushes = Counter(
            "courierd_pushes",
            "Delivery-status push attempts by outcome (delivered, retry, failed, unauthorized)",
            ["outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "courierd_ingest_batch_messages",
            "Messages per committed ingest batch",
            buckets=(1, 5, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.outbox_depth = Gauge(
            "courierd_outbox_pending", "Pushes waiting to be delivered", registry=r
        )
        self.outbox_failed = Gauge(
            "courierd_outbox_failed", "Pushes parked as failed (need an operator)", registry=r
        )
        self.oldest_pending = Gauge(
            "courierd_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending push (0 when none)",
            registry=r,
        )
        self.push_latency = Histogram(
            "courierd_push_latency_seconds",
            "From the commit of a transition to OneTablet's 2xx for its push",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.stages = Histogram(
            "courierd_latency_stage_seconds",
            "Where a status spends its time: receive (in the MQTT process until its batch "
            "goes to ingest; the batch's oldest message), commit (until ingest says it is "
            "committed), claim (from the push's creation to its claim), send (claimed to "
            "sent), reply (sent to OneTablet's reply), record (reply to its commit)",
            ["stage"],
            buckets=(
                0.0005,
                0.001,
                0.002,
                0.003,
                0.005,
                0.0075,
                0.01,
                0.015,
                0.02,
                0.03,
                0.05,
                0.075,
                0.1,
                0.15,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
            ),
            registry=r,
        )
        self.auth_paused = Gauge(
            "courierd_onetablet_auth_paused", "1 while pushes are paused by a 401", registry=r
        )
        self.dropped_qos0 = Counter(
            "courierd_mqtt_dropped_qos0",
            "QoS 0 messages dropped because ingest was too far behind (QoS 1 never is)",
            registry=r,
        )
        self.fixes_ignored = Counter(
            "courierd_fixes_ignored",
            "Location fixes the filters ignored (inaccurate, not_newer, too_fast)",
            ["reason"],
            registry=r,
        )
        self.geofence_statuses = Counter(
            "courierd_geofence_statuses",
            "Statuses inferred from fixes and accepted (each is pushed like an app's)",
            registry=r,
        )
        self.alerts = Counter(
            "courierd_alerts",
            "Alerts written to dispatch/alerts (courier_offline, courier_back)",
            ["type"],
            registry=r,
        )
        self.ignored = Counter(
            "courierd_messages_ignored",
            "Valid messages courierd has no use for (OwnTracks waypoints, its own output)",
            ["kind"],
            registry=r,
        )
        self.couriers_offline = Gauge(
            "courierd_couriers_offline",
            "Couriers with active orders reported offline (silent, or their last will)",
            registry=r,
        )
        self.database_ok = Gauge(
            "courierd_database_ok",
            "1 while the database takes writes (0: disk full, locked, unreachable)",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "courierd_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.ingest_behind = Gauge(
            "courierd_ingest_behind_seconds",
            "How long ingest has not caught up (a full batch was waiting each time): above "
            "a few seconds, courierd runs at its maximum and the broker holds the backlog",
            registry=r,
        )
        self.ingest_lag = Gauge(
            "courierd_ingest_lag_seconds",
            "Age of the oldest message courierd received and has not committed (0: none)",
            registry=r,
        )
        self.inflight = Gauge(
            "courierd_mqtt_inflight_messages",
            "QoS 1 messages received and not yet acknowledged (queued or being committed)",
            registry=r,
        )
        self.window = Gauge(
            "courierd_mqtt_window_messages",
            "The most courierd takes from the broker before a commit (ingest.window, in "
            "total over the MQTT sessions it holds): inflight at this means the broker "
            "holds the rest",
            registry=r,
        )
        self.broker_stored = Gauge(
            "courierd_broker_stored_messages",
            "Messages the broker holds, all clients (Mosquitto $SYS; NaN: not readable)",
            registry=r,
        )
        self.broker_dropped = Gauge(
            "courierd_broker_dropped_messages",
            "Messages the broker dropped since it started, a client's queue being full "
            "(Mosquitto $SYS; NaN: not readable): rising means messages are lost",
            registry=r,
        )
        self.broker_stored.set(math.nan)
        self.broker_dropped.set(math.nan)
        self.slots_unheld = Gauge(
            "courierd_cluster_slots_unheld",
            "Cluster MQTT session slots no live instance holds, as this instance last saw "
            "(their messages wait in the broker); always 0 outside a cluster",
            registry=r,
        )
