"""The `courierd` command, run as a subprocess: exit codes, messages, nothing sent on bad input."""

from __future__ import annotations

import json
from pathlib import Path

from courierd.devtools.sandbox import Sandbox
from courierd.domain.model import Status, StatusEvent
from tests.conftest import Cli, open_path


def seed(db_path: Path, order_id: str, status: Status, ts: str | None = None) -> None:
    """Record one status event for an order, as the daemon would have."""
    s = open_path(db_path)
    s.writer.commit([StatusEvent("e1", order_id, "c1", status, ts)], now=1.0)
    s.close()


ORDER = {
    "id": "o-42",
    "subtotal": 2500,
    "is_pickup": False,
    "custom_field": {"a": [1, None]},
    "consumer": {"id": 12345, "first_name": "John"},
}


def test_submit_sends_the_document_as_written(cli: Cli, tmp_path: Path, onetablet: Sandbox) -> None:
    """A valid order is POSTed byte for byte, OneTablet's reply printed, exit 0."""
    raw = json.dumps(ORDER, indent=3).encode()
    (tmp_path / "order.json").write_bytes(raw)
    r = cli("order", "submit", "order.json")
    assert r.code == 0, r.err
    assert json.loads(r.out) == {"order_id": "o-42", "status": 200, "reply": {"ok": True}}
    (req,) = onetablet.requests()
    assert (req.path, req.body) == ("/orders", raw)
    assert "onetablet.call endpoint='POST /orders' order_id=o-42 status=200" in r.err


def test_submit_from_stdin(cli: Cli, onetablet: Sandbox) -> None:
    """`-` reads the order from standard input."""
    r = cli("order", "submit", "-", stdin=json.dumps(ORDER).encode())
    assert r.code == 0, r.err
    assert onetablet.requests()[0].json == ORDER


def test_submit_invalid_input_exit_2_nothing_sent(
    cli: Cli, tmp_path: Path, onetablet: Sandbox
) -> None:
    """Missing id, wrong types, bad JSON, missing file: exit 2, the field named, no request."""
    cases = {
        "noid.json": (json.dumps({"subtotal": 1}), "field 'id': Field required"),
        "type.json": (json.dumps({"id": "x", "subtotal": "12.50"}), "field 'subtotal'"),
        "nested.json": (
            json.dumps({"id": "x", "categories": [{"items": [{"quantity": 0}]}]}),
            "field 'categories.0.items.0.quantity'",
        ),
        "list.json": ("[1]", "must hold one JSON object"),
        "bad.json": ("{", "is not valid JSON"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        r = cli("order", "submit", name)
        assert r.code == 2, (name, r)
        assert needle in r.err and "Traceback" not in r.err, (name, r.err)
        assert r.err.count("\n") == 1, r.err  # one line
    r = cli("order", "submit", "missing.json")
    assert r.code == 2 and "cannot read missing.json" in r.err
    assert onetablet.requests() == []


def test_submit_remote_errors_exit_1_with_message(
    cli: Cli, tmp_path: Path, onetablet: Sandbox
) -> None:
    """4xx: not retried, OneTablet's message shown; persistent 5xx: retried, then exit 1."""
    (tmp_path / "o.json").write_text(json.dumps(ORDER))
    onetablet.responder = lambda req: (
        400,
        {},
        {"error": "Bad Request", "message": "store unknown"},
    )
    r = cli("order", "submit", "o.json")
    assert r.code == 1 and "store unknown" in r.err
    assert len(onetablet.requests()) == 1
    onetablet.responder = lambda req: (500, {}, {"error": "Internal", "message": "db down"})
    r = cli("order", "submit", "o.json")
    assert r.code == 1 and "db down" in r.err
    assert len(onetablet.requests()) == 1 + 4  # first try and three retries


def test_bad_key_and_missing_config(cli: Cli, tmp_path: Path, onetablet: Sandbox) -> None:
    """401 exits 1 with the reason; a missing base_url exits 2 naming the variable."""
    (tmp_path / "o.json").write_text(json.dumps(ORDER))
    r = cli("order", "submit", "o.json", env={"COURIERD_ONETABLET__API_KEY": "wrong-key"})
    assert r.code == 1 and "401" in r.err and "wrong-key" not in r.err
    r = cli("order", "submit", "o.json", env={"COURIERD_ONETABLET__BASE_URL": ""})
    assert r.code == 2 and "COURIERD_ONETABLET__BASE_URL" in r.err


def test_cancel_records_locally_and_drops_pending_pushes(
    cli: Cli, db_path: Path, onetablet: Sandbox
) -> None:
    """Cancel POSTs the reason, marks the order cancelled and drops its unsent pushes."""
    seed(db_path, "o-7", Status.ARRIVING_AT_STORE)
    r = cli("order", "cancel", "o-7", "--reason", "KITCHEN_BUSY", "--details", "fire")
    assert r.code == 0, r.err
    assert json.loads(r.out)["dropped_pushes"] == 2
    (req,) = onetablet.requests()
    assert (req.path, req.json) == (
        "/orders/o-7/cancel",
        {"cancel_reason": "KITCHEN_BUSY", "cancel_details": "fire"},
    )
    shown = json.loads(cli("order", "show", "o-7").out)
    assert shown["cancelled"] is True and shown["state"] == "cancelled"
    assert {p["state"] for p in shown["pushes"]} == {"cancelled"}


def test_cancel_refusals(cli: Cli, db_path: Path, onetablet: Sandbox) -> None:
    """After dropoff, with an unknown reason, or a bad id: exit 2, nothing sent."""
    seed(db_path, "o-9", Status.DROPOFF)
    r = cli("order", "cancel", "o-9")
    assert r.code == 2 and "already dropped off" in r.err
    r = cli("order", "cancel", "o-1", "--reason", "BORED")
    assert r.code == 2 and "invalid choice" in r.err
    r = cli("order", "cancel", "a/b")
    assert r.code == 2 and "without '/'" in r.err
    assert onetablet.requests() == []


def test_cancel_remote_failure_leaves_order_uncancelled(
    cli: Cli, db_path: Path, onetablet: Sandbox
) -> None:
    """If OneTablet refuses the cancel, the order is not marked cancelled locally."""
    seed(db_path, "o-5", Status.DASHER_CONFIRMED)
    onetablet.responder = lambda req: (400, {}, {"error": "Bad Request", "message": "too late"})
    r = cli("order", "cancel", "o-5")
    assert r.code == 1 and "too late" in r.err
    assert json.loads(cli("order", "show", "o-5").out)["cancelled"] is False


def test_show_contract_shape_and_unknown(cli: Cli, db_path: Path) -> None:
    """show prints the CONTRACT.md fields; an unknown order is exit 1."""
    seed(db_path, "o-3", Status.ARRIVED_AT_STORE, ts="2024-01-15T18:05:00.000Z")
    r = cli("order", "show", "o-3")
    assert r.code == 0
    view = json.loads(r.out)
    assert {
        "order_id",
        "state",
        "courier_id",
        "cancelled",
        "transitions",
        "pushes",
        "courier_last_seen",
        "courier_offline",
        "eta",
    } <= set(view)
    assert view["transitions"][2] == {
        "status": "arrived_at_store",
        "at": "2024-01-15T18:05:00.000Z",
        "inferred": False,
        "source": "app",
        "event_id": "e1",
    }
    assert [t["source"] for t in view["transitions"]] == ["fill", "fill", "app"]
    assert view["courier_offline"] is False and view["eta"] is None  # no position known
    assert {"status", "delivered", "attempts", "last_error"} <= set(view["pushes"][0])
    r = cli("order", "show", "nope")
    assert r.code == 1 and "unknown order 'nope'" in r.err


def test_config_check_masks_secrets_and_flags_errors(cli: Cli, tmp_path: Path) -> None:
    """config check prints effective settings with the key masked; bad config exits 2."""
    r = cli("config", "check")
    assert r.code == 0
    settings = json.loads(r.out)
    assert settings["onetablet"]["api_key"] == "**********"
    assert "test-key" not in r.out
    (tmp_path / "bad.toml").write_text("[mqtt]\nurl = 5\n")
    r = cli("config", "check", "--config", "bad.toml")
    assert r.code == 2 and "mqtt.url (COURIERD_MQTT__URL)" in r.err


def test_json_log_format(cli: Cli, tmp_path: Path, onetablet: Sandbox) -> None:
    """--log-format json prints one JSON object per line, with the stable event name."""
    (tmp_path / "o.json").write_text(json.dumps(ORDER))
    r = cli("order", "submit", "o.json", "--log-format", "json")
    assert r.code == 0
    (line,) = [json.loads(x) for x in r.err.splitlines()]
    assert line["event"] == "onetablet.call" and line["level"] == "info"
    assert line["ts"].endswith("Z") and "order_id=o-42" in line["msg"]
