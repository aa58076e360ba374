"""What every entry point shares: one error type for bad input, turned into one line and exit 2."""
import functools
import sys


class InputError(ValueError):
    """Bad input data, config or flags. The message names the file, row or flag."""


class RunAborted(RuntimeError):
    """A run that cannot go on usefully (e.g. the reward model is down). Exit code 3."""


def exit_on_input_error(main):
    """Decorate an entry point: an InputError becomes `error: <message>` on stderr and exit code 2,
    a RunAborted `aborted: <message>` and exit code 3."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except RunAborted as err:
            print(f"aborted: {err}", file=sys.stderr)
            sys.exit(3)

    return wrapper
