"""One worker process of the benchmark suite (started by ``suite.py``, not by hand).

``python benchmarks/worker.py SYSTEM --dsn DSN --probe SPEC [--key value ...]``

Imports the system, prints ``ready``, waits for ``go`` on stdin, then runs the
system's worker on its event loop until ``stop`` (or end of file) on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from systems import Probe, ProbeSpec, System, load


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """The system, the DSN, the probe, and any ``--key value`` worker options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--probe", required=True)
    ns, rest = parser.parse_known_args(argv)
    options = {
        key.removeprefix("--"): value for key, value in zip(rest[::2], rest[1::2], strict=True)
    }
    return ns, options


async def serve(system: System, probe: Probe, options: dict[str, str]) -> None:
    """Run the worker until the suite says stop (or goes away)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def read_stop() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stop, daemon=True).start()
    await system.run_worker(probe, stop, options)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the suite stops us via stdin
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns, options = parse_args(argv)
    system = load(ns.system)
    system.dsn = ns.dsn
    probe = Probe(ProbeSpec.from_arg(ns.probe))
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    try:
        if system.worker_loop == "uvloop":
            import uvloop  # noqa: PLC0415 (only the systems that use it need it)

            uvloop.run(serve(system, probe, options))
        else:
            asyncio.run(serve(system, probe, options))
    finally:
        probe.close()


if __name__ == "__main__":
    main()
