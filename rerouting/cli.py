"""The ``rerouting`` command line: one sub-command per job, each implemented where its work lives.

rerouting audit    budget audit report (rerouting.conformance.audit.cli)
rerouting conform  conformance suite against an implementation (rerouting.conformance.cli)
rerouting bench    speed and memory benchmark of the optimized path (rerouting.optimized.bench)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "audit": (
        "rerouting.conformance.audit.cli",
        "budget audit (TFLOPs, KV cache, average tokens) into report.md/json",
    ),
    "conform": ("rerouting.conformance.cli", "run the conformance suite against an implementation"),
    "bench": ("rerouting.optimized.bench", "benchmark dense / remove / reroute / reference side by side"),
}


def version() -> str:
    """rerouting's version and the installed torch and transformers (read from metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from rerouting import __version__

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return f"rerouting {__version__} (torch {of('torch')}, transformers {of('transformers')})"


def usage() -> str:
    lines = [
        "usage: rerouting COMMAND [options]   (rerouting COMMAND --help for its options)",
        "       rerouting --version",
        "",
        "commands:",
    ]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(version())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"rerouting: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
