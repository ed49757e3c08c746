"""`alignkit label ...`: import, serve, add-user, export, simulate, stats.

Bad input raises UserError; `alignkit.cli` prints it as one line and exits 2
(running this module directly does the same).
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import secrets
import sys
from pathlib import Path

from alignkit.errors import UserError


def _checked(s: str, cast: type, ok, expected: str):
    """`s` as an int or float that passes `ok`, else argparse's one-line refusal saying what was expected."""
    try:
        x = cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if cast is int else 'a number'}: {s!r}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {s}")
    return x


def _fraction(s: str) -> float:
    return _checked(s, float, lambda x: 0.0 <= x <= 1.0, "between 0 and 1")


def _positive(s: str) -> int:
    return _checked(s, int, lambda x: x >= 1, "at least 1")


def _seconds(s: str) -> float:
    return _checked(s, float, lambda x: math.isfinite(x) and x > 0, "a finite number of seconds above 0")


def _non_negative(s: str) -> float:
    return _checked(s, float, lambda x: math.isfinite(x) and x >= 0, "a finite number of seconds, 0 or more")


def _port(s: str) -> int:
    return _checked(s, int, lambda x: 1 <= x <= 65535, "between 1 and 65535")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are bad input like any other: one line (no usage dump), exit status 2."""

    def error(self, message: str):
        # The caller prints "alignkit: error: ", so the subcommand goes without "alignkit" again.
        raise UserError(f"{self.prog.removeprefix('alignkit ')}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignkit label", description="label store and labeling app")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="import prompts and responses (JSONL) into a label store")
    p.add_argument("--db", required=True, help="label store: a SQLite file path or a postgresql+psycopg:// URL")
    p.add_argument("file", nargs="?", help="JSONL: {prompt | messages, responses: [...] (>= 2)}; prompts alone with "
                                           "--generate")
    p.add_argument("--scale", type=int, choices=(1, 2, 4), default=None,
                   help="preference strength levels per side: 2 = much / slightly better, 4 = Llama 2's four; "
                        "set before the first vote (default: none, A / B / tie / both bad)")
    p.add_argument("--guidelines", metavar="FILE", help="markdown guidelines shown to annotators (an admin can edit them)")
    p.add_argument("--rank", action="store_true",
                   help="each prompt's 3..9 responses become one ranking task (ranks 1..K, ties allowed) instead of "
                        "every pair")
    p.add_argument("--criteria", metavar="NAMES",
                   help="comma-separated criteria (e.g. helpfulness,harmlessness,honesty): each pairwise item asks "
                        "one choice per criterion; set before the first vote (default: one overall choice)")
    p.add_argument("--gold", metavar="FILE", help="gold items, JSONL: {prompt | messages, chosen, rejected}, chosen "
                                                  "being the known answer: served to every annotator, never exported")
    p.add_argument("--generate", action="append", default=[], metavar="MODEL_SPEC",
                   help="sample a response per prompt with this model (repeat per model; given once: two samples)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive, default=16)

    p = sub.add_parser("serve", help="serve the labeling app (login required unless --no-auth)")
    p.add_argument("--db", required=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860)
    p.add_argument("--users", help="users file written by `alignkit label add-user`")
    p.add_argument("--overlap", type=_positive, default=3, help="distinct annotators per comparison (default 3)")
    p.add_argument("--no-auth", action="store_true", help="no login, one local annotator; loopback only")
    p.add_argument("--lease-seconds", type=_seconds, default=600.0, help="an unanswered item is served again after this")
    p.add_argument("--export-dir", help="where the admin tab's export writes (default: DB.export next to the store)")
    p.add_argument("--concurrency-limit", type=_positive, default=None,
                   help="handler calls run at once (default: labeling_ui.app.DEFAULT_CONCURRENCY_LIMIT)")
    p.add_argument("--gold-rate", type=_fraction, default=0.1,
                   help="share of an annotator's new items that are gold items they have not seen (default 0.1)")
    p.add_argument("--min-display-seconds", type=_non_negative, default=None,
                   help="a vote on an item shown for less than this is refused (default 0.3; 0 for scripted "
                        "annotators)")
    p.add_argument("--session-hours", type=_seconds, default=12.0,
                   help="a login lasts this long, then the annotator logs in again (default 12)")

    p = sub.add_parser("add-user", help="add or update an annotator in a users file")
    p.add_argument("--users", required=True)
    p.add_argument("name")
    p.add_argument("--password", help="asked for when not given")
    p.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                   help="may see the admin tab (agreement, export); an existing user keeps theirs unless given")

    p = sub.add_parser("export", help="votes -> preference dataset (HF dataset dir + preferences.jsonl)")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--min-agreement", type=_fraction, default=0.0)
    p.add_argument("--ties", choices=["drop", "ignore"], default="drop",
                   help="drop: comparisons whose plurality is tie are dropped; ignore: tie votes are left out")
    p.add_argument("--both-bad", choices=["drop", "ignore", "undesirable"], default="drop",
                   help="drop / ignore as for --ties; undesirable (with --unpaired): both responses undesirable")
    p.add_argument("--min-votes", type=_positive, default=1)
    p.add_argument("--unpaired", action="store_true",
                   help="prompt / completion / label rows (KTO's unpaired format), two per comparison")
    p.add_argument("--criterion", metavar="NAME",
                   help="on a store with criteria: that criterion's answers (default: all combined, the side more "
                        "criteria chose; equal counts are ties)")

    p = sub.add_parser("simulate", help="simulated annotators labeling through a running server")
    p.add_argument("--url", required=True)
    p.add_argument("--judge", default="length", help="length | random | python:module:function")
    p.add_argument("--annotators", type=_positive, default=1)
    p.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="log in as (repeatable)")
    p.add_argument("--users", help="users file of the server: add sim-1..sim-N with fresh passwords and use them")
    p.add_argument("--votes", type=_positive, default=None, help="stop after this many votes in all")
    p.add_argument("--noise", type=_fraction, default=0.0, help="share of votes replaced by a random choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arena", action="store_true", help="vote on the Arena's blind battles instead of the Label tab's pairs")
    p.add_argument("--dwell", type=_non_negative, default=0.35,
                   help="seconds each item is on screen before the vote (default 0.35: above the server's default "
                        "minimum of 0.3; 0 against a server started with --min-display-seconds 0)")

    p = sub.add_parser("exclude", help="leave an annotator's votes out of every export (nothing is deleted)")
    p.add_argument("--db", required=True)
    p.add_argument("name")
    p.add_argument("--include", action="store_true", help="take their votes into exports again")

    p = sub.add_parser("stats", help="agreement, per-annotator statistics and length bias as JSON")
    p.add_argument("--db", required=True)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # a missing command names the choices, not `command`
    return parser


def _import(args) -> int:
    from alignkit.generation import SamplingParams
    from alignkit.store import open_store
    from alignkit.store.db import check_store, display_name
    from alignkit.store.importer import check_generate, parse_gold_file, parse_import_file, prepare_rows, write_rows

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, batch_size=args.batch_size)
    from alignkit.store.settings import parse_criteria

    if args.file is None and args.gold is None and args.scale is None and args.guidelines is None \
            and args.criteria is None:
        raise UserError("label import: give a prompts FILE, --gold FILE, --scale, --criteria or --guidelines")
    if args.rank and (args.generate or args.file is None):
        raise UserError("label import: --rank ranks the responses of the prompts FILE (not --generate samples)")
    guidelines = _read_text(args.guidelines) if args.guidelines else None
    criteria = parse_criteria(args.criteria) if args.criteria is not None else None
    if args.gold and args.generate and args.file is None:
        raise UserError("label import: --generate samples for the prompts FILE; gold items bring their own answers")
    gold = parse_gold_file(args.gold) if args.gold else []  # every file checked before any store is created
    if args.file is None:
        store = open_store(args.db)
        try:
            _store_settings(store, args.scale, guidelines, criteria)
            if gold:
                print(f"imported gold items into {display_name(args.db)}: {write_rows(store, gold)}")
        finally:
            store.close()
        return 0
    rows = parse_import_file(args.file, responses_required=not args.generate, rank=args.rank)
    if args.generate:
        check_generate(args.generate, params)
        check_store(args.db, create=True)  # an unusable --db fails before minutes of sampling, not after
    rows, skipped = prepare_rows(rows, generate=args.generate, params=params)  # a failure here leaves no store
    store = open_store(args.db)
    try:
        _store_settings(store, args.scale, guidelines, criteria)
        summary = write_rows(store, rows + gold)  # one transaction: a refused gold row imports nothing
    finally:
        store.close()
    summary.skipped = skipped
    print(f"imported into {display_name(args.db)}: {summary}" + (f" (with {len(gold)} gold items)" if gold else ""))
    return 0


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--guidelines {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise UserError(f"--guidelines {path}: not a UTF-8 text file ({err.__class__.__name__})") from None


def _store_settings(store, scale: int | None, guidelines: str | None, criteria: list[str] | None = None) -> None:
    from alignkit.store import settings

    if criteria is not None:
        settings.set_criteria(store, criteria)
        print(f"{store.name}: one choice per criterion: {', '.join(criteria)}")
    if scale is not None:
        settings.set_scale(store, scale)
        print(f"{store.name}: preference strength scale {scale}")
    if guidelines is not None:
        settings.set_guidelines(store, guidelines)
        print(f"{store.name}: guidelines set ({len(guidelines):,} characters)")


def _serve(args) -> int:
    from alignkit.store import open_store
    from alignkit.store.db import check_store, display_name
    from labeling_ui.app import (DEFAULT_CONCURRENCY_LIMIT, DEFAULT_MIN_DISPLAY_SECONDS, build_app, check_port,
                                 is_loopback, launch)
    from labeling_ui.guard import GuardSettings
    from labeling_ui.users import UsersFile

    if args.no_auth and args.users:
        raise UserError("give either --users FILE or --no-auth, not both")
    if not args.no_auth and not args.users:
        raise UserError("serving needs --users FILE (see `alignkit label add-user`); "
                        "--no-auth is allowed on loopback only")
    if args.no_auth and not is_loopback(args.host):
        raise UserError(f"--no-auth serves only on loopback (127.0.0.1, ::1, localhost), not {args.host}")
    auth = UsersFile(args.users) if args.users else None
    check_store(args.db, create=False, look_inside=False)  # a missing store is named whatever the port's state
    check_port(args.host, args.port)  # before the store is opened: a busy port leaves it untouched
    limit = args.concurrency_limit or DEFAULT_CONCURRENCY_LIMIT
    store = open_store(args.db, create=False, overlap=args.overlap, lease_seconds=args.lease_seconds,
                       pool_size=limit + 4, gold_rate=args.gold_rate)
    min_display = DEFAULT_MIN_DISPLAY_SECONDS if args.min_display_seconds is None else args.min_display_seconds
    demo = build_app(store, auth=auth, overlap=args.overlap, export_dir=args.export_dir, concurrency_limit=limit,
                     min_display_seconds=min_display, guard=GuardSettings(session_seconds=args.session_hours * 3600))
    blocked = [Path(args.users)] if args.users else []
    if "://" not in str(args.db):
        blocked.append(Path(args.db))
    # quiet: Gradio's banner would suggest share=True, which this app keeps off; our line says where it listens,
    # printed once it does.
    launch(demo, host=args.host, port=args.port, blocked_paths=blocked, prevent_thread_lock=True, quiet=True)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"alignkit label: serving {display_name(args.db)} on http://{host}:{args.port} "
          f"(overlap {args.overlap}, {'no login' if auth is None else 'login required'}); Ctrl-C stops", flush=True)
    demo.block_thread()
    return 0


def _add_user(args) -> int:
    from labeling_ui.users import add_user

    password = args.password
    if password is None:
        if not sys.stdin.isatty():
            raise UserError("no --password given and no terminal to ask on")
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise UserError("passwords differ")
    new = add_user(args.users, args.name, password, admin=args.admin)
    admin = json.loads(Path(args.users).read_text())["users"][args.name].get("admin", False)
    print(f"{'added' if new else 'updated'} {args.name}{' (admin)' if admin else ''} in {args.users}")
    return 0


def _export(args) -> int:
    from alignkit.store import open_store
    from alignkit.store.export import export_dataset

    store = open_store(args.db, create=False)
    try:
        s = export_dataset(store, args.out, min_agreement=args.min_agreement, ties=args.ties,
                           both_bad=args.both_bad, min_votes=args.min_votes, unpaired=args.unpaired,
                           criterion=args.criterion)
    finally:
        store.close()
    rows = f"{s['rows']} rows (two per comparison)" if args.unpaired else f"{s['rows']} rows"
    print(f"exported {rows} to {s['out']} (comparisons per reason: {s['per_reason']})")
    return 0


def _simulate(args) -> int:
    from labeling_ui.simulate import load_judge, run_simulated_annotators
    from labeling_ui.users import add_user

    judge = load_judge(args.judge)
    users: list[tuple[str, str]] | None = None
    if args.user:
        users = []
        for entry in args.user:
            name, sep, pw = entry.partition(":")
            if not sep or not name:
                raise UserError(f"--user {entry!r}: expected NAME:PASSWORD")
            users.append((name, pw))
    elif args.users:
        users = [(f"sim-{i + 1}", secrets.token_urlsafe(12)) for i in range(args.annotators)]
        for name, pw in users:
            add_user(args.users, name, pw)
    result = run_simulated_annotators(args.url, users, judge, args.votes, args.noise, args.seed,
                                      clients_without_auth=args.annotators, arena=args.arena, dwell=args.dwell)
    print(json.dumps(result, indent=2))
    return 0


def _exclude(args) -> int:
    from alignkit.store import open_store
    from alignkit.store.export import excluded_annotators, set_excluded

    store = open_store(args.db, create=False)
    try:
        set_excluded(store, args.name, not args.include)
        now = excluded_annotators(store)
    finally:
        store.close()
    print(f"{args.name}: votes {'in exports again' if args.include else 'left out of exports'}; "
          f"excluded now: {', '.join(now) or 'nobody'}")
    return 0


def _stats(args) -> int:
    from alignkit.store import open_store
    from alignkit.store.agreement import agreement_report, length_report

    store = open_store(args.db, create=False)
    try:
        print(json.dumps({**agreement_report(store), "length": length_report(store)}, indent=2))
    finally:
        store.close()
    return 0


COMMANDS = {"import": _import, "serve": _serve, "add-user": _add_user, "export": _export, "simulate": _simulate,
            "exclude": _exclude, "stats": _stats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(COMMANDS[args.command](args) or 0)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as err:
        print(f"alignkit: error: {err}", file=sys.stderr)
        sys.exit(2)
