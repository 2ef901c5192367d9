"""Several silos on one machine from one process image (benchmarks, co-located test silos).

`silo-node start` imports torch, tenseal and opacus in every silo: about 300 MB of private
memory each before the silo holds a single row. `silo-node host --silos FILE` imports
them once and forks one child per silo; each child then runs exactly `silo-node start`
with that silo's arguments (its own state directory, socket, ledger, audit log and
SuperNode), sharing the parent's imported libraries copy-on-write. Nothing is shared
between silos at run time: a child only has what `start` builds for its own silo.

FILE holds one silo per line: the arguments `silo-node start` would take (shell quoting;
blank lines and lines starting with # are skipped). Every line is checked before any
silo starts, so a typo on line 17 starts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import shlex
import signal
import sys
from pathlib import Path

from policies.errors import PolicyError

# What every silo service imports anyway; importing it before forking is the point.
PRELOAD = ("torch", "opacus", "tenseal", "pandas", "pyarrow.parquet", "silo_node.worker",
           "silo_node.service", "policies.validation", "silo_node.supernode_keeper")


def read_silo_lines(path: Path) -> list[list[str]]:
    """Each silo's `silo-node start` arguments, checked with the `start` parser; names the bad line."""
    from silo_node.cli import build_parser

    parser = build_parser()
    silos: list[list[str]] = []
    names: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            argv = ["start", *shlex.split(line)]
            args = _parse_quietly(parser, argv)
        except ValueError as exc:
            raise PolicyError(f"{path}: line {number}: not valid `silo-node start` arguments ({exc})") from None
        for key, value in (("name", args.name), ("state dir", str(Path(args.state_dir).resolve()))):
            if (key, value) in names:
                raise PolicyError(f"{path}: line {number}: {key} {value!r} is already used on line {names[(key, value)]}")
            names[(key, value)] = number
        silos.append(argv)
    if not silos:
        raise PolicyError(f"{path}: no silos listed (one line of `silo-node start` arguments per silo)")
    return silos


def _parse_quietly(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse prints and exits on an error; keep its message for ours instead."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(argv)
    except SystemExit:
        raise ValueError((said.getvalue().strip().splitlines() or ["unreadable"])[-1]) from None


def preload() -> None:
    """Import what every silo service needs, once, before forking."""
    for name in PRELOAD:
        importlib.import_module(name)


def host(silos: list[list[str]]) -> int:
    """Fork one `silo-node start` per silo; wait for all; the worst exit code.

    SIGTERM/SIGINT to the host are passed to every child once (each stops its own
    SuperNode); a child that exits does not stop the others.
    """
    from silo_node.cli import main as cli_main

    preload()
    children: dict[int, str] = {}
    for argv in silos:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: exactly `silo-node start` for this silo
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = cli_main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = argv[argv.index("--name") + 1] if "--name" in argv else str(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in list(children):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"silo host {os.getpid()}: {len(children)} silos forked: "
          + ", ".join(f"{n} ({p})" for p, n in children.items()), flush=True)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        name = children.pop(pid, None)
        if name is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code:
            print(f"silo {name} exited with code {code}", flush=True)
        worst = max(worst, abs(code))
    return worst
