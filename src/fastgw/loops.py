"""Which event loop runs a process's main coroutine: uvloop's, or the standard library's where
uvloop cannot be imported (it has lagged new CPython releases). Used by `fastgw run`, `fastgw
demo`, `fastgw client`, `python -m fastgw.echo` and bench/loadgen.py."""

from __future__ import annotations

import asyncio
import sys

LOOPS = ("uvloop", "asyncio")


def loop_runner(choice: str | None = None, prog: str = "fastgw", option: str | None = "--loop"):
    """What runs the main coroutine: `uvloop.run` (the default) or, for ``choice`` "asyncio",
    `asyncio.run` on the standard library's loop. Without a choice and without uvloop,
    asyncio's after one warning line on stderr, `PROG: warning: ...`, ending with how
    ``option`` (the command's option choosing the loop; None: it has none) silences it; None
    (after a line on stderr) when uvloop was asked for and is missing."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            print(f"{prog}: {option} uvloop: {exc}", file=sys.stderr)
            return None
        hint = f"; {option} asyncio chooses it without this warning" if option else ""
        print(f"{prog}: warning: uvloop is not installed: running on asyncio's loop (slower)"
              + hint, file=sys.stderr, flush=True)
        return asyncio.run
    return uvloop.run
