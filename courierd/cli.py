"""The `courierd` command: parse arguments, build settings once, map errors to exit codes.

Exit codes (CONTRACT.md section 1): 0 ok, 2 bad input or configuration (nothing sent),
1 remote or fatal error. Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from courierd import __version__, lifecycle, ops
from courierd.config import Settings, load_settings
from courierd.errors import ConfigError, CourierdError, InputError, OneTabletError
from courierd.logs import setup_logging
from courierd.model import iso
from courierd.onetablet import CANCEL_REASONS, OneTabletClient, with_retries
from courierd.order_schema import check_order
from courierd.store import Store
from courierd.telemetry import MAX_ID

log = logging.getLogger("courierd")

EXIT_OK, EXIT_REMOTE, EXIT_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML settings file (default: $COURIERD_CONFIG, else none)",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--log-format", choices=["text", "json"])

    parser = argparse.ArgumentParser(
        prog="courierd", description="Courier telemetry (MQTT) to OneTablet delivery statuses."
    )
    parser.add_argument("--version", action="version", version=f"courierd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument("--mqtt-url", help="overrides mqtt.url")
    run.add_argument("--store-path", help="overrides store.path")
    run.add_argument("--http-listen", help="overrides http.listen (empty: off)")

    order = commands.add_parser("order", help="submit, cancel or show an order")
    order_cmds = order.add_subparsers(dest="order_command", required=True, metavar="ACTION")
    submit = order_cmds.add_parser("submit", parents=[common], help="POST /orders")
    submit.add_argument("file", metavar="FILE", help="order JSON file, or - for stdin")
    cancel = order_cmds.add_parser("cancel", parents=[common], help="POST /orders/{id}/cancel")
    cancel.add_argument("order_id", metavar="ORDER_ID")
    cancel.add_argument("--reason", choices=CANCEL_REASONS, default="OTHER")
    cancel.add_argument("--details", metavar="TEXT", help="free-text cancellation reason")
    show = order_cmds.add_parser("show", parents=[common], help="print an order as JSON")
    show.add_argument("order_id", metavar="ORDER_ID")

    outbox = commands.add_parser("outbox", help="operator view of pushes waiting or parked")
    outbox_cmds = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    for name, text in (
        ("status", "depth, oldest pending push, failed and dead-letter counts"),
        ("failed", "pushes parked as failed, with OneTablet's reason"),
    ):
        cmd = outbox_cmds.add_parser(name, parents=[common], help=text)
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.add_argument("--limit", type=_positive, default=100)
    retry = outbox_cmds.add_parser(
        "retry", parents=[common], help="send parked pushes again (one order, or --all)"
    )
    retry.add_argument("order_id", nargs="?", metavar="ORDER_ID")
    retry.add_argument("--all", action="store_true", help="every failed push")
    retry.add_argument("--json", action="store_true")
    dead = commands.add_parser("dead-letters", parents=[common], help="rejected MQTT messages")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--limit", type=_positive, default=50)
    dead.add_argument("--reason", help="only this reason (e.g. bad_json)")
    backup = commands.add_parser(
        "backup", parents=[common], help="copy the database with SQLite's online backup API"
    )
    backup.add_argument("destination", type=Path, metavar="FILE")

    sandbox = commands.add_parser(
        "sandbox", parents=[common], help="a local OneTablet stand-in, for trying and testing"
    )
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--api-key", default="sandbox-key", help="the x-api-key it accepts")
    sandbox.add_argument("--error-rate", type=_share, default=0.0, help="share answered 500")
    sandbox.add_argument(
        "--throttle-rate", type=_share, default=0.0, help="share answered 429 with Retry-After"
    )
    sandbox.add_argument("--retry-after", type=int, default=1, metavar="SECONDS")
    sandbox.add_argument("--latency-ms", type=float, default=0.0)
    sandbox.add_argument(
        "--outage",
        type=_window,
        metavar="START:END",
        help="answer 503 from START to END seconds after start",
    )
    sandbox.add_argument("--seed", type=int, default=0)

    sim = commands.add_parser("simulate", parents=[common], help="couriers publishing on MQTT")
    sim.add_argument("--mqtt-url", help="overrides mqtt.url")
    sim.add_argument("--couriers", type=_positive, default=10)
    sim.add_argument(
        "--speed",
        type=float,
        default=60.0,
        help="time compression: 60 turns a minute into a second",
    )
    sim.add_argument("--orders", type=_positive, help="stop after this many orders")
    sim.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    for noise in ("duplicates", "reorder", "offline", "junk"):
        sim.add_argument(f"--{noise}", type=_share, default=0.0, metavar="SHARE")
    sim.add_argument("--seed", type=int)

    commands.add_parser(
        "demo", parents=[common], help="sandbox + broker + daemon + simulator, until Ctrl-C"
    )

    config = commands.add_parser("config", help="configuration tools")
    config_cmds = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_cmds.add_parser(
        "check", parents=[common], help="validate settings and print them, secrets masked"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, _overrides(args))
        setup_logging(settings.log.level, settings.log.format)
        return _dispatch(args, settings)
    except (ConfigError, InputError) as e:
        return _fail(args, e, EXIT_INPUT)
    except (OneTabletError, CourierdError) as e:
        return _fail(args, e, EXIT_REMOTE)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "run":
        from courierd.service import run_daemon  # the daemon's imports are for `run` only

        return run_daemon(settings)
    if args.command == "sandbox":
        from courierd import demo
        from courierd.sandbox import Faults

        faults = Faults(
            args.error_rate,
            args.throttle_rate,
            args.retry_after,
            args.latency_ms,
            args.outage,
            args.seed,
        )
        return demo.run_sandbox(args.host, args.port, args.api_key, faults)
    if args.command == "simulate":
        from courierd import demo

        return demo.run_simulate(settings.mqtt.host, settings.mqtt.port, args)
    if args.command == "demo":
        from courierd import demo

        return demo.run_demo(settings)
    if args.command in ("outbox", "dead-letters", "backup"):
        return _operate(args, settings)
    if args.command == "config":
        print(json.dumps(masked_settings(settings), indent=2))
        return EXIT_OK
    if args.order_command == "show":
        return _order_show(settings, args.order_id)
    if args.order_command == "submit":
        return _order_submit(settings, args.file)
    return _order_cancel(settings, args.order_id, args.reason, args.details)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that map onto settings; only those given, so lower layers still apply."""
    pairs = {
        ("mqtt", "url"): getattr(args, "mqtt_url", None),
        ("store", "path"): getattr(args, "store_path", None),
        ("http", "listen"): getattr(args, "http_listen", None),
        ("log", "level"): args.log_level,
        ("log", "format"): args.log_format,
    }
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _window(text: str) -> tuple[float, float]:
    start, sep, end = text.partition(":")
    try:
        window = (float(start), float(end))
    except ValueError:
        window = (0.0, -1.0)
    if not sep or window[1] <= window[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END in seconds, START < END")
    return window


def masked_settings(settings: Settings) -> dict[str, Any]:
    """Effective settings as JSON; secrets appear as '**********' (or null when unset)."""
    return settings.model_dump(mode="json")


def _client(settings: Settings) -> OneTabletClient:
    ot = settings.require_onetablet()
    assert ot.base_url is not None and ot.api_key is not None
    return OneTabletClient(
        ot.base_url, ot.api_key.get_secret_value(), transport=ot.transport, timeout=ot.timeout_s
    )


def _retrying(settings: Settings) -> dict[str, Any]:
    def on_retry(error: OneTabletError, delay: float) -> None:
        log.warning("onetablet.retry in=%.1fs reason=%r", delay, str(error))

    return {"schedule": settings.onetablet.retry_schedule_s, "on_retry": on_retry}


def _order_submit(settings: Settings, file: str) -> int:
    source = "stdin" if file == "-" else file
    try:
        document = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {source}: {e.strerror}") from None
    order_id = check_order(document, source)
    with _client(settings) as client:
        reply = with_retries(lambda: client.submit_order(document, order_id), **_retrying(settings))
    print(json.dumps({"order_id": order_id, "status": reply.status, "reply": reply.body}))
    return EXIT_OK


def _order_cancel(settings: Settings, order_id: str, reason: str, details: str | None) -> int:
    if not order_id or len(order_id) > MAX_ID or "/" in order_id:
        raise InputError(f"order id {order_id[:40]!r} must be 1-128 characters without '/'")
    store = _store(settings)
    try:
        cancelled = lifecycle.cancel(store.get_order(order_id), order_id)  # refuses after dropoff
        with _client(settings) as client:
            reply = with_retries(
                lambda: client.cancel_order(order_id, reason, details), **_retrying(settings)
            )
        dropped = store.save_cancel(cancelled, iso(time.time()))
    finally:
        store.close()
    print(
        json.dumps(
            {
                "order_id": order_id,
                "cancelled": True,
                "dropped_pushes": dropped,
                "status": reply.status,
                "reply": reply.body,
            }
        )
    )
    return EXIT_OK


def _order_show(settings: Settings, order_id: str) -> int:
    store = _store(settings)
    try:
        view = store.order_view(order_id)
    finally:
        store.close()
    if view is None:
        print(f"courierd: unknown order {order_id!r}", file=sys.stderr)
        return EXIT_REMOTE
    print(json.dumps(view, indent=2))
    return EXIT_OK


def _operate(args: argparse.Namespace, settings: Settings) -> int:
    """The operator commands: outbox status/failed/retry, dead-letters, backup."""
    store = _store(settings)
    try:
        if args.command == "backup":
            size = ops.backup(store, args.destination)
            print(f"backed up {settings.store.path} to {args.destination} ({size} bytes)")
            return EXIT_OK
        if args.command == "dead-letters":
            rows = ops.dead_letters(store, args.limit, args.reason)
            columns = ["id", "received_at", "reason", "topic", "detail"]
            return _emit(args, rows, lambda: ops.table(rows, columns))
        if args.outbox_command == "status":
            status = ops.outbox_status(store, ops.now())
            return _emit(args, status, lambda: "\n".join(f"{k}: {v}" for k, v in status.items()))
        if args.outbox_command == "failed":
            rows = ops.failed_pushes(store, args.limit)
            columns = ["order_id", "status", "attempts", "last_error"]
            return _emit(args, rows, lambda: ops.table(rows, columns))
        if args.all == (args.order_id is not None):
            raise InputError("give either ORDER_ID or --all")
        count = ops.retry_failed(store, args.order_id, ops.now())
        return _emit(args, {"retried": count}, lambda: f"{count} push(es) will be sent again")
    finally:
        store.close()


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else text())
    return EXIT_OK


def _store(settings: Settings) -> Store:
    return Store(settings.store.path, synchronous=settings.store.synchronous)


def _fail(args: argparse.Namespace, error: Exception, code: int) -> int:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    print(f"courierd: {error}", file=sys.stderr)
    return code
