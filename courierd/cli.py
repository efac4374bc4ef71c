"""The `courierd` command: parse arguments, build settings once, map errors to exit codes.

Exit codes (CONTRACT.md section 1): 0 ok, 2 bad input or configuration (nothing sent),
1 remote or fatal error. Errors are one line on stderr; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from courierd import __version__
from courierd.config import Settings, load_settings
from courierd.domain.model import CANCEL_REASONS
from courierd.errors import ConfigError, CourierdError, InputError, OneTabletError
from courierd.logs import setup_logging

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
    commands.add_parser(
        "compact",
        parents=[common],
        help="rewrite the SQLite file so it gives freed space back (the daemon stopped)",
    )

    stores = commands.add_parser("stores", help="the store registry (pickup places)")
    store_cmds = stores.add_subparsers(dest="stores_command", required=True, metavar="ACTION")
    imp = store_cmds.add_parser(
        "import", parents=[common], help="load merchant_supplied_id,lat,lng,radius_m from CSV"
    )
    imp.add_argument("file", metavar="FILE", help="CSV file, or - for stdin")
    lst = store_cmds.add_parser("list", parents=[common], help="the stores courierd knows")
    lst.add_argument("--json", action="store_true")
    sug = store_cmds.add_parser(
        "suggest", parents=[common], help="each store's pickup point, from where couriers wait"
    )
    sug.add_argument(
        "--min-orders", type=_positive, default=3, metavar="N", help="stays needed (default 3)"
    )
    sug_fmt = sug.add_mutually_exclusive_group()
    sug_fmt.add_argument("--json", dest="format", action="store_const", const="json")
    sug_fmt.add_argument(
        "--csv", dest="format", action="store_const", const="csv", help="`stores import` format"
    )

    rep = commands.add_parser(
        "replay", parents=[common], help="what other geofence settings would have decided"
    )
    rep.add_argument("--order", action="append", default=[], metavar="ID", help="(repeatable)")
    rep.add_argument("--since", metavar="T", help="orders whose first fix is at or after T")
    rep.add_argument("--until", metavar="T", help="orders whose first fix is before T")
    rep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a geofence.* setting to try (repeatable)",
    )
    rep.add_argument("--json", action="store_true")

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
    sim.add_argument(
        "--mode",
        choices=("status", "telemetry", "mixed"),
        default="status",
        help="status: apps send every status; telemetry: dispatch assigns places, apps send "
        "GPS fixes and only dasher_confirmed and dropoff; mixed: half of each",
    )
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
    sim.add_argument(
        "--glitches",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of telemetry fixes that are wrong: inaccurate (80-300 m) or a GPS jump",
    )
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
        from courierd.daemon.supervisor import run_daemon  # the daemon's imports are for `run` only

        return run_daemon(settings)
    if args.command == "sandbox":
        from courierd.devtools import demo
        from courierd.devtools.sandbox import Faults

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
        from courierd.devtools import demo

        return demo.run_simulate(settings.mqtt.host, settings.mqtt.port, args)
    if args.command == "demo":
        from courierd.devtools import demo

        return demo.run_demo(settings)
    # Only now: the daemon's worker processes re-import this module when they start.
    from courierd.commands import operate, replay, stores
    from courierd.services import orders

    if args.command == "replay":
        return replay.run_replay(settings, args.order, args.since, args.until, args.set, args.json)
    if args.command == "stores":
        if args.stores_command == "import":
            return stores.import_file(settings, args.file)
        if args.stores_command == "suggest":
            return replay.run_suggest(settings, args.min_orders, args.format or "text")
        return stores.list_stores(settings, args.json)
    if args.command in ("outbox", "dead-letters", "backup", "compact"):
        return operate.operate(args, settings)
    if args.command == "config":
        print(json.dumps(masked_settings(settings), indent=2))
        return EXIT_OK
    if args.order_command == "show":
        view = orders.show(settings, args.order_id)
        if view is None:
            print(f"courierd: unknown order {args.order_id!r}", file=sys.stderr)
            return EXIT_REMOTE
        print(json.dumps(view, indent=2))
        return EXIT_OK
    if args.order_command == "submit":
        print(json.dumps(orders.submit(settings, _read(args.file), _source(args.file))))
        return EXIT_OK
    print(json.dumps(orders.cancel(settings, args.order_id, args.reason, args.details)))
    return EXIT_OK


def _source(file: str) -> str:
    return "stdin" if file == "-" else file


def _read(file: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {_source(file)}: {e.strerror}") from None


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


def _fail(args: argparse.Namespace, error: Exception, code: int) -> int:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    print(f"courierd: {error}", file=sys.stderr)
    return code
