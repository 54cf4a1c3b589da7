"""One exception for every user mistake; the CLIs print it as one line and exit non-zero."""
import contextlib
import sys


class UserError(Exception):
    """Bad input: a message that names the problem and the fix, never a traceback."""


@contextlib.contextmanager
def exit_on_user_error():
    """Wrap a CLI's main: a UserError (or an unknown model) becomes `error: ...` and exit 2."""
    from resnet_jax.models.registry import UnknownModelError
    try:
        yield
    except (UserError, UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
