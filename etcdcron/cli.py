"""The ``etcdcron`` command (also ``python -m etcdcron``): see and change a namespace's jobs.

Runs on the main thread of its own short-lived process; ``watch`` reads one etcd watch stream
until Ctrl-C or SIGTERM. It talks to etcd through a :class:`~etcdcron.Cron` that is never started,
so every change goes through the same validation and transactions as the library's API.

Exit status: 0 on success, 1 when a named job does not exist (or cannot be read, or a
confirmation is declined), 2 on usage errors and invalid input, 3 when etcd cannot be reached or
refuses the request. Each error is one line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

# The well-known types are imported so that an Any of any of them reads and prints as JSON.
from google.protobuf import (  # noqa: F401
    any_pb2,
    duration_pb2,
    empty_pb2,
    json_format,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import DecodeError, Message

from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.cron import Cron
from etcdcron.errors import EtcdCronError, EtcdError, ValidationError
from etcdcron.keys import Keys, prefix_end
from etcdcron.schedule import parse_go_duration
from etcdcron.status import JobStatus, count_jobs, lease_ttl, membership
from etcdcron.ticks import to_datetime

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_ETCD = 0, 1, 2, 3

#: Connection options: (flag, environment variable, help).
_CONNECTION = [
    ("--endpoints", "ETCDCRON_ENDPOINTS", "etcd endpoints, comma-separated host:port "
     "(https:// turns TLS on; default 127.0.0.1:2379)"),
    ("--namespace", "ETCDCRON_NAMESPACE", "the namespace (key prefix) of the jobs"),
    ("--ca-cert", "ETCDCRON_CA_CERT", "CA certificate file (PEM) for TLS"),
    ("--cert-key", "ETCDCRON_CERT_KEY", "client key file (PEM) for TLS client authentication"),
    ("--cert-cert", "ETCDCRON_CERT_CERT", "client certificate file (PEM)"),
    ("--user", "ETCDCRON_USER", "etcd user name; the password comes from $ETCDCRON_PASSWORD, "
     "--password-stdin, or a prompt"),
    ("--timeout", "ETCDCRON_TIMEOUT", "seconds to keep retrying an unreachable etcd (default 5)"),
]


class _NotFound(Exception):
    """A named job does not exist (exit 1)."""


class _Declined(Exception):
    """The user did not confirm (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_connection_options(parser: argparse.ArgumentParser, environ: Mapping[str, str],
                            top: bool) -> None:
    group = parser.add_argument_group("connection (each also from its environment variable)")
    for flag, env, text in _CONNECTION:
        # On a subcommand the options default to "not given", so the top level's value stays.
        default = environ.get(env) if top else argparse.SUPPRESS
        group.add_argument(flag, default=default, help=f"{text} [${env}]")
    group.add_argument("--password", default=argparse.SUPPRESS if not top else None,
                       help="the password (visible to other users in the process list: prefer "
                            "$ETCDCRON_PASSWORD or --password-stdin)")
    group.add_argument("--password-stdin", action="store_true",
                       default=argparse.SUPPRESS if not top else False,
                       help="read the password from the first line of standard input")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if not top else False,
                        help="print JSON for scripts instead of tables")


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    parser = _Parser(prog="etcdcron", description="Look at and change the jobs of an etcdcron "
                     "namespace.", epilog="Exit status: 0 success, 1 no such job, 2 usage error, "
                     "3 etcd unreachable or refusing.")
    _add_connection_options(parser, environ, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        _add_connection_options(sub, environ, top=False)
        return sub

    sub = command("list", "list the jobs whose names start with PREFIX")
    sub.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    sub = command("get", "show a job as stored")
    sub.add_argument("name", metavar="NAME")
    sub = command("status", "without NAME: every replica and the job count; with NAME: the "
                  "job's count, last and next trigger, owner")
    sub.add_argument("name", nargs="?", metavar="NAME")
    sub = command("add", "create or replace a job")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--schedule", help="e.g. '*/5 * * * * *', '@every 1h', 'TZ=Europe/Paris "
                     "0 30 8 * * *'")
    sub.add_argument("--due-time", help="RFC 3339 time, or a duration from now ('10s', 'PT1H')")
    sub.add_argument("--ttl", help="when a scheduled job expires (same formats)")
    sub.add_argument("--repeats", type=int, help="how many ticks at most")
    sub.add_argument("--payload-json", help="JSON handed to the trigger as req.payload: a "
                     "protobuf Any in JSON form (with '@type'), else any JSON value, packed as "
                     "google.protobuf.Value")
    sub.add_argument("--metadata-json", help="JSON for req.metadata (same forms)")
    sub.add_argument("--failure-policy", help="'drop', 'constant[:INTERVAL[:MAX_RETRIES]]' "
                     "(e.g. 'constant:500ms:5'), or FailurePolicy JSON")
    sub = command("delete", "delete a job")
    sub.add_argument("name", metavar="NAME")
    sub = command("delete-prefix", "delete every job whose name starts with one of PREFIXES")
    sub.add_argument("prefixes", nargs="+", metavar="PREFIX")
    sub.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    sub = command("watch", "print job events as they happen, one line each, until Ctrl-C")
    sub.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
    commands.add_parser("demo", help="run the half-minute demo (needs etcdcron[server])",
                        description="Run the demo: a throwaway etcd, three replicas, a crash.")
    return parser


# -- formatting -----------------------------------------------------------------------------------

def _time(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _relative(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    seconds = (value - now).total_seconds()
    span = _span(abs(seconds))
    return f"{_time(value)} (in {span})" if seconds >= 0 else f"{_time(value)} ({span} ago)"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _any_dict(value: any_pb2.Any) -> dict[str, Any]:
    """An ``Any`` as JSON, or its type and base64 bytes when its type is unknown here."""
    try:
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    except (TypeError, KeyError):
        return {"@type": value.type_url, "value_base64": base64.b64encode(value.value).decode()}


def _message_dict(message: Message) -> dict[str, Any]:
    copy = type(message)()
    copy.CopyFrom(message)
    extra = {}
    for field in ("payload", "metadata", "replica_data"):
        if field in copy.DESCRIPTOR.fields_by_name and copy.HasField(field):
            extra[field] = _any_dict(getattr(copy, field))
            copy.ClearField(field)
    result = json_format.MessageToDict(copy, preserving_proto_field_name=True)
    result.update(extra)
    return result


def _status_dict(status: JobStatus) -> dict[str, Any]:
    return {
        "name": status.name,
        "count": status.count,
        "attempts": status.attempts,
        "last_trigger": _time(status.last_trigger),
        "next_trigger": _time(status.next_trigger),
        "next_attempt": _time(status.next_attempt),
        "expiration": _time(status.expiration),
        "partition_id": str(status.partition_id),
        "owner": status.owner,
        "staged": status.staged,
        "paused": status.paused,
        "skipped": status.skipped,
        "last_skipped": _time(status.last_skipped),
    }


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def _fields(pairs: list[tuple[str, object]], out: TextIO) -> None:
    width = max(len(key) for key, _ in pairs) + 1
    for key, value in pairs:
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        out.write(f"{key + ':':<{width}} {'-' if value is None else value}\n")


def _json(value: object, out: TextIO) -> None:
    out.write(json.dumps(value, sort_keys=True) + "\n")


# -- parsing job options ----------------------------------------------------------------------------

def _parse_any(text: str, option: str) -> any_pb2.Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{option} is not valid JSON ({exc}): {text!r}") from exc
    packed = any_pb2.Any()
    if isinstance(value, dict) and set(value) == {"@type", "value_base64"}:
        # A message type this command does not know, as `get --json` prints it.
        try:
            packed.type_url = value["@type"]
            packed.value = base64.b64decode(value["value_base64"], validate=True)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{option}: value_base64 is not base64: {exc}") from exc
    elif isinstance(value, dict) and "@type" in value:
        try:
            json_format.ParseDict(value, packed)
        except json_format.ParseError as exc:
            raise ValidationError(f"{option}: cannot read it as a protobuf Any: {exc}") from exc
    else:
        wrapped = struct_pb2.Value()
        json_format.ParseDict(value, wrapped)
        packed.Pack(wrapped)
    return packed


def _parse_failure_policy(text: str) -> api_pb2.FailurePolicy:
    if text.lstrip().startswith("{"):
        try:
            return json_format.Parse(text, api_pb2.FailurePolicy())
        except json_format.ParseError as exc:
            raise ValidationError(f"--failure-policy: not a FailurePolicy: {exc}") from exc
    kind, *rest = text.split(":")
    if kind == "drop" and not rest:
        return api_pb2.FailurePolicy(drop=api_pb2.FailurePolicyDrop())
    if kind != "constant" or len(rest) > 2:
        raise ValidationError(f"--failure-policy must be 'drop', "
                              f"'constant[:INTERVAL[:MAX_RETRIES]]' or JSON, got {text!r}")
    constant = api_pb2.FailurePolicyConstant()
    try:
        constant.interval.FromTimedelta(parse_go_duration(rest[0]) if rest else timedelta(seconds=1))
        if len(rest) == 2:
            constant.max_retries = int(rest[1])
    except ValueError as exc:
        raise ValidationError(f"--failure-policy {text!r}: {exc}") from exc
    return api_pb2.FailurePolicy(constant=constant)


def _job_from(args: argparse.Namespace) -> api_pb2.Job:
    job = api_pb2.Job()
    for field in ("schedule", "due_time", "ttl"):
        value = getattr(args, field)
        if value is not None:
            setattr(job, field, value)
    if args.repeats is not None:
        if args.repeats < 0:
            raise ValidationError(f"--repeats must not be negative, got {args.repeats}")
        job.repeats = args.repeats
    if args.payload_json is not None:
        job.payload.CopyFrom(_parse_any(args.payload_json, "--payload-json"))
    if args.metadata_json is not None:
        job.metadata.CopyFrom(_parse_any(args.metadata_json, "--metadata-json"))
    if args.failure_policy is not None:
        job.failure_policy.CopyFrom(_parse_failure_policy(args.failure_policy))
    return job


# -- commands ---------------------------------------------------------------------------------------

class _Session:
    """What a command works with: a Cron that is never started, and where to print."""

    def __init__(self, cron: Cron, args: argparse.Namespace, out: TextIO, err: TextIO,
                 stdin: TextIO) -> None:
        self.cron, self.args, self.out, self.err, self.stdin = cron, args, out, err, stdin
        self.json = args.json

    def job_status(self, name: str) -> JobStatus:
        status = self.cron.status(name)
        if status is None:
            raise _NotFound(f"no job named {name!r} in namespace {self.args.namespace!r}")
        return status


def _cmd_list(s: _Session) -> None:
    jobs = s.cron.list(s.args.prefix)
    if s.json:
        _json([{"name": j.name, "job": _message_dict(j.job)} for j in jobs], s.out)
        return
    rows = [["NAME", "SCHEDULE", "DUE TIME", "TTL", "REPEATS"]]
    for named in jobs:
        job = named.job
        rows.append([named.name, job.schedule or "-", job.due_time or "-", job.ttl or "-",
                     str(job.repeats) if job.HasField("repeats") else "-"])
    _table(rows, s.out)


def _cmd_get(s: _Session) -> None:
    job = s.cron.get(s.args.name)
    if job is None:
        raise _NotFound(f"no job named {s.args.name!r} in namespace {s.args.namespace!r}")
    if s.json:
        _json({"name": s.args.name, "job": _message_dict(job)}, s.out)
        return
    _fields([("name", s.args.name), *_message_dict(job).items()], s.out)


def _print_status(s: _Session, status: JobStatus) -> None:
    if s.json:
        _json(_status_dict(status), s.out)
        return
    now = datetime.now(timezone.utc)
    _fields([
        ("name", status.name),
        ("count", status.count),
        ("attempts", status.attempts),
        ("last trigger", _relative(status.last_trigger, now)),
        ("next trigger", _relative(status.next_trigger, now) if status.next_trigger
         else "- (finished)"),
        ("next attempt", _relative(status.next_attempt, now)),
        ("expiration", _relative(status.expiration, now)),
        ("partition id", status.partition_id),
        ("owner", status.owner or "- (unknown: no replica, or a rebalance)"),
        ("staged", "unknown (only the owning replica knows)" if status.staged is None
         else str(status.staged).lower()),
        ("paused", str(status.paused).lower()),
        ("skipped", f"{status.skipped} (last {_relative(status.last_skipped, now)})"
         if status.skipped else "0"),
    ], s.out)


def _cmd_status(s: _Session) -> None:
    if s.args.name is not None:
        _print_status(s, s.job_status(s.args.name))
        return
    client, keys = s.cron._client, s.cron._keys
    members = membership(client, keys)
    jobs = count_jobs(client, keys)
    ttls = {r.lease: lease_ttl(client, r.lease) for r in members.replicas if r.lease}
    if s.json:
        _json({"namespace": keys.namespace, "jobs": jobs, "total": members.total,
               "static": members.static, "replicas": [
                   {"replica_id": r.replica_id, "index": r.index, "total": r.total,
                    "lease": f"{r.lease:x}", "ttl": ttls.get(r.lease),
                    "replica_data": (_any_dict(r.replica_data) if r.replica_data is not None
                                     else None)}
                   for r in members.replicas]}, s.out)
        return
    if not members.replicas:
        agreement = "no replica is running"
    elif members.total is None:
        agreement = (f"{len(members.replicas)} replica(s), not agreeing on a partition total "
                     f"(a rebalance is under way, or a key cannot be decoded)")
    else:
        mode = "static partitions" if members.static else "dynamic membership"
        agreement = (f"{len(members.replicas)} replica(s) agree on {members.total} "
                     f"partition(s) ({mode})")
    s.out.write(f"namespace {keys.namespace!r}: {agreement}; {jobs} job(s)\n")
    if members.replicas:
        rows = [["REPLICA", "INDEX", "TOTAL", "LEASE", "TTL", "DATA"]]
        for r in members.replicas:
            ttl = ttls.get(r.lease)
            data = ("-" if r.replica_data is None
                    else json.dumps(_any_dict(r.replica_data), sort_keys=True))
            rows.append([r.replica_id, _dash(r.index), _dash(r.total), f"{r.lease:x}",
                         "-" if ttl is None else f"{ttl}s", data])
        _table(rows, s.out)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _cmd_add(s: _Session) -> None:
    s.cron.add(s.args.name, _job_from(s.args))
    status = s.cron.status(s.args.name)  # None: it has already fired and finished
    if s.json:
        _json({"added": s.args.name, "status": _status_dict(status) if status else None}, s.out)
    elif status is None:
        s.out.write(f"added {s.args.name!r}: it has already fired and finished\n")
    else:
        s.out.write(f"added {s.args.name!r}: next trigger "
                    f"{_relative(status.next_trigger, datetime.now(timezone.utc))}\n")


def _cmd_delete(s: _Session) -> None:
    if s.cron.get(s.args.name) is None:
        raise _NotFound(f"no job named {s.args.name!r} in namespace {s.args.namespace!r}")
    s.cron.delete(s.args.name)
    if s.json:
        _json({"deleted": s.args.name}, s.out)
    else:
        s.out.write(f"deleted {s.args.name!r}\n")


def _cmd_delete_prefix(s: _Session) -> None:
    prefixes = sorted(set(s.args.prefixes))
    client, keys = s.cron._client, s.cron._keys
    count = sum(count_jobs(client, keys, p) for p in prefixes
                if not any(p != q and p.startswith(q) for q in prefixes))
    if not s.args.yes:
        shown = ", ".join(repr(p) for p in prefixes)
        s.err.write(f"delete {count} job(s) whose names start with {shown} in namespace "
                    f"{keys.namespace!r}? [y/N] ")
        s.err.flush()
        answer = s.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise _Declined("not confirmed; nothing deleted (pass --yes to skip the question)")
    s.cron.delete_prefixes(*prefixes)
    if s.json:
        _json({"deleted": count, "prefixes": prefixes}, s.out)
    else:
        s.out.write(f"deleted {count} job(s)\n")


def _cmd_watch(s: _Session) -> None:
    client, keys = s.cron._client, s.cron._keys
    # Read through a key of the namespace (a role may cover no other); fails fast (exit 3) when
    # etcd is unreachable.
    start = client.current_revision(keys.jobs) + 1
    root = f"{keys.namespace}/".encode()
    prefix = s.args.prefix
    stream = client.watch(root, prefix_end(root), start)
    if not s.json:
        s.err.write(f"watching namespace {keys.namespace!r} from revision {start}; "
                    f"Ctrl-C stops\n")
        s.err.flush()
    for events in stream:
        for event in events:
            line = _describe(event, keys, prefix)
            if line is None:
                continue
            line["time"] = _time(datetime.now(timezone.utc))
            line["revision"] = event.kv.mod_revision
            if s.json:
                _json(line, s.out)
            else:
                text = "  ".join(f"{k}={v}" for k, v in line.items()
                                 if k not in ("time", "event", "name", "revision", "job"))
                s.out.write(f"{line['time']}  {line['event']:<14} {line['name']}"
                            f"{'  ' + text if text else ''}\n")
            s.out.flush()


def _describe(event: Any, keys: Keys, prefix: str) -> dict[str, Any] | None:
    """One watch event as a line, or ``None`` for keys that are not this namespace's own."""
    key, deleted = event.kv.key, event.type == event.DELETE
    for kind, base in (("job", keys.jobs), ("counter", keys.counters),
                       ("replica", keys.leadership)):
        if key.startswith(base):
            break
    else:
        return None
    try:
        name = key[len(base):].decode()
    except UnicodeDecodeError:
        return None
    if "/" in name or not name:
        return None  # a nested namespace's key, never one of ours
    if kind == "replica":
        if prefix:
            return None
        if deleted:
            return {"event": "replica-left", "name": name}
        line = {"event": "replica-joined" if event.kv.version == 1 else "replica-updated",
                "name": name}
        try:
            line["total"] = stored_pb2.Leadership.FromString(event.kv.value).total
        except DecodeError:
            line["total"] = "undecodable"
        return line
    if not name.startswith(prefix):
        return None
    if kind == "job":
        if deleted:
            return {"event": "job-deleted", "name": name}
        line = {"event": "job-added" if event.kv.version == 1 else "job-replaced", "name": name}
        try:
            record = stored_pb2.Job.FromString(event.kv.value)
        except DecodeError:
            line["record"] = "undecodable"
            return line
        line["job"] = _message_dict(record.job)
        for field in ("schedule", "due_time", "ttl", "repeats"):
            if record.job.HasField(field):
                line[field] = getattr(record.job, field)
        return line
    if deleted:
        return None  # a counter goes with its job's deletion, which has its own line
    try:
        counter = stored_pb2.Counter.FromString(event.kv.value)
        last = to_datetime(counter.last_trigger) if counter.HasField("last_trigger") else None
    except (DecodeError, OverflowError):
        return {"event": "counter-updated", "name": name, "record": "undecodable"}
    line = {"event": "triggered" if counter.attempts == 0 else "trigger-failed", "name": name,
            "count": counter.count, "attempts": counter.attempts}
    if last is not None:
        line["last_trigger"] = _time(last)
    return line


_COMMANDS: dict[str, Callable[[_Session], None]] = {
    "list": _cmd_list,
    "get": _cmd_get,
    "status": _cmd_status,
    "add": _cmd_add,
    "delete": _cmd_delete,
    "delete-prefix": _cmd_delete_prefix,
    "watch": _cmd_watch,
}


# -- main -------------------------------------------------------------------------------------------

def _password(args: argparse.Namespace, environ: Mapping[str, str],
              stdin: TextIO) -> str | None:
    if args.password is not None:
        return cast(str, args.password)
    if args.password_stdin:
        return stdin.readline().rstrip("\r\n")
    if environ.get("ETCDCRON_PASSWORD") is not None:
        return environ["ETCDCRON_PASSWORD"]
    if args.user and stdin.isatty():
        return getpass.getpass(f"etcd password for {args.user!r}: ")
    return None


def _connect(args: argparse.Namespace, environ: Mapping[str, str], stdin: TextIO) -> Cron:
    if not args.namespace:
        raise ValidationError("no namespace: pass --namespace or set $ETCDCRON_NAMESPACE")
    try:
        timeout = float(args.timeout) if args.timeout is not None else 5.0
    except ValueError as exc:
        raise ValidationError(f"--timeout must be a number of seconds, got {args.timeout!r}") \
            from exc
    return Cron(trigger=_never_called, namespace=args.namespace,
                endpoints=args.endpoints or "127.0.0.1:2379", request_timeout=timeout,
                ca_cert=args.ca_cert, cert_key=args.cert_key, cert_cert=args.cert_cert,
                user=args.user, password=_password(args, environ, stdin))


def _never_called(req: object) -> None:  # pragma: no cover - the CLI's Cron is never started
    raise AssertionError("the etcdcron command never starts its Cron")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None,
         stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    environ = os.environ if environ is None else environ
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = build_parser(environ).parse_args(argv)
    if args.command == "demo":
        from etcdcron import demo

        return demo.main([])
    cron = None
    try:
        cron = _connect(args, environ, stdin)
        _COMMANDS[args.command](_Session(cron, args, out, err, stdin))
        return EXIT_OK
    except (_NotFound, _Declined) as exc:
        err.write(f"etcdcron: {_one_line(exc)}\n")
        return EXIT_NOT_FOUND
    except ValidationError as exc:
        err.write(f"etcdcron: error: {_one_line(exc)}\n")
        return EXIT_USAGE
    except EtcdError as exc:
        where = args.endpoints or "127.0.0.1:2379"
        err.write(f"etcdcron: error: etcd at {where}: {_one_line(exc)}\n")
        return EXIT_ETCD
    except EtcdCronError as exc:
        err.write(f"etcdcron: error: {_one_line(exc)}\n")
        return EXIT_NOT_FOUND
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else 130
    finally:
        if cron is not None:
            cron.stop()


def run() -> None:
    """The console script: ``main()`` with SIGTERM stopping ``watch`` like Ctrl-C, and a closed
    pipe (``etcdcron list | head``) ending quietly."""
    signal.signal(signal.SIGTERM, _interrupt)
    # Errors are reported as one line each by main(); the library's own log lines (such as
    # "etcd unreachable") would add more through Python's last-resort handler.
    logging.getLogger("etcdcron").addHandler(logging.NullHandler())
    if "GRPC_VERBOSITY" not in os.environ:
        _silence_native_stderr()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


def _silence_native_stderr() -> None:
    """Send what native code writes to file descriptor 2 (gRPC logs a line per failed TLS
    handshake, read from ``$GRPC_VERBOSITY`` before this code runs) to /dev/null, and keep
    Python's ``sys.stderr`` on the real one: errors stay one line each, and the message carries
    what gRPC said. Setting ``GRPC_VERBOSITY`` keeps gRPC's lines."""
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=sys.stderr.encoding,
                           errors="backslashreplace")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    run()
