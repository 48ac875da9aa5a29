"""How a command ends: one stderr line per error and an exit code (`run_cleanly`), SIGTERM raised like Ctrl-C so
that `finally` blocks remove temporary files (`sigterm_raises`). Used by the `svdlite` command and the tools.

Exit codes:
  0    done
  1    the run failed while working (non-finite values, out of memory, a download or write that failed), or
       (batch) an item failed
  2    refused before any work: bad option, image, checkpoint, setting or output path
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""
import contextlib
import os
import signal
import sys
import threading

EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
# errors that mean "this input cannot work", raised by the checks before the model runs
REFUSED = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
           PermissionError)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that `finally` blocks remove temporary files."""


# how long a SIGTERM that arrived inside a finalizer waits before it is sent again
FINALIZER_RETRY_SECONDS = 0.01


def _raise_terminated(signum, frame):
    # Python prints and drops an exception raised inside a finalizer (`__del__`, which the garbage collector runs
    # wherever it happens to collect): there, send the signal again shortly, to arrive once the finalizer returned
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            threading.Timer(FINALIZER_RETRY_SECONDS, os.kill, (os.getpid(), signum)).start()
            return
        frame = frame.f_back
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises `Terminated` instead of killing the process outright.

    Only the main thread can handle signals: elsewhere (svdlite run from a thread) SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_line(err: BaseException) -> str:
    """One line: the message, with the exception type when the message alone would not say what happened."""
    text = " ".join(str(err).split())
    if text and isinstance(err, (*REFUSED, FloatingPointError, RuntimeError)):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_cleanly(command, args) -> int:
    """Run `command(args)` (a subcommand) and turn what it raises into one stderr line and an exit code."""
    debug = getattr(args, "debug", False)
    try:
        with sigterm_raises():
            return command(args)
    except KeyboardInterrupt as err:  # a command that wrote something says what in the exception's message
        print(f"\nsvdlite: interrupted; {str(err) or 'nothing was written'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as err:
        print(f"svdlite: terminated; {str(err) or 'nothing was written'}", file=sys.stderr)
        return EXIT_TERMINATED
    except REFUSED as err:
        if debug:
            raise
        print(f"svdlite: error: {error_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as err:  # noqa: BLE001 - any failure is one line unless --debug
        if debug:
            raise
        print(f"svdlite: error: {error_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED
