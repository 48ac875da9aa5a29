"""`svdlite batch --processes N`: run N copies of the command, as torchrun would, and report their ends in one line
each.

Each copy gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on
this machine, so `run_batch` shares the work the same way. Unlike torchrun, an item that failed is not a crash: each
process's end is one line, and the exit code is the worst of the processes' (1 when an item failed). Ctrl-C and
SIGTERM reach every copy, which stop cleanly. A copy that crashes stops the others, as torchrun does.
"""
import os
import signal
import socket
import subprocess
import sys
import time

POLL_SECONDS = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int, env=None) -> dict:
    env = dict(os.environ if env is None else env)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def run_copies(argv: list[str], processes: int) -> int:
    """Run `python -m svdlite <argv>` `processes` times with torchrun's environment; the worst exit code."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "svdlite", *argv], env=worker_env(rank, processes, port))
             for rank in range(processes)]
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(procs):
            for rank, proc in enumerate(procs):
                if rank not in codes and proc.poll() is not None:
                    codes[rank] = proc.returncode
                    if proc.returncode not in (0, 1):  # not "done" nor "an item failed": the others cannot finish
                        _stop(procs, signal.SIGTERM)
            time.sleep(POLL_SECONDS)
    except BaseException:  # Ctrl-C or SIGTERM in this process: pass it on and wait for the copies to clean up
        _stop(procs, signal.SIGINT)
        for proc in procs:
            proc.wait()
        raise
    codes = {rank: 128 - code if code < 0 else code for rank, code in codes.items()}  # killed by signal N: 128 + N
    for code in sorted(set(codes.values()) - {0}):  # one line per way of ending
        ranks = [rank for rank in sorted(codes) if codes[rank] == code]
        print(f"svdlite: process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {processes} ended "
              f"with exit code {code}" + (" (an item failed: see the manifest)" if code == 1 else ""),
              file=sys.stderr)
    worst = [code for code in codes.values() if code not in (0, 1)]
    return worst[0] if worst else max(codes.values())


def _stop(procs, sig) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
