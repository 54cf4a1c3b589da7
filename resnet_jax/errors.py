"""One exception for every user mistake; the CLIs print it as one line and exit non-zero."""
import contextlib
import os
import signal
import sys


class UserError(Exception):
    """Bad input: a message that names the problem and the fix, never a traceback. Several
    problems found at once (a config's) go one per line."""

    # True where background threads (orbax's, tensorboard's) still hold failed writes whose
    # tracebacks would follow the message at interpreter exit: the CLI then exits at once.
    exit_at_once = False


def first_line(e: BaseException) -> str:
    """'Class: first line' of the innermost cause of `e`, for a one-line report: libraries wrap
    the message that names the file and the fault (tensorstore's in orbax's, which prints a whole
    spec) in longer ones."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{e.__class__.__name__}: {line[:240]}"


class Terminated(Exception):
    """SIGTERM before there was anything to save (data loading, compiling): one line, exit 0,
    as a preempted run exits; rerunning the command starts or resumes it."""


@contextlib.contextmanager
def stop_on_sigterm(enabled: bool = True):
    """Within: SIGTERM raises Terminated at once instead of killing the process mid-call (and
    letting a runtime such as libtpu print its stack dump). Whatever installs its own handler
    inside (the training loop's preemption) takes over until it restores this one."""
    if not enabled:
        yield
        return

    def handle(signum, frame):
        raise Terminated("SIGTERM before the first step: nothing to save; rerun the same "
                         "command to start")
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def exit_on_user_error():
    """Wrap a CLI's main: a UserError (or an unknown model, a net called wrongly) becomes
    `error: ...` per line and
    exit 2; Ctrl-C outside training (which saves and exits 0) becomes one line and exit 130."""
    from resnet_jax.models import ModelUsageError, UnknownModelError
    try:
        yield
    except (UserError, UnknownModelError, ModelUsageError) as e:
        for line in str(e).splitlines() or [e.__class__.__name__]:
            print(f"error: {line}", file=sys.stderr, flush=True)
        if getattr(e, "exit_at_once", False):
            sys.stdout.flush()
            os._exit(2)
        sys.exit(2)
    except Terminated as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
