"""Shared entry-point plumbing: one-line errors and exit codes for every script."""
import sys
from typing import Callable

from smolhub.errors import UserError


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's main; a UserError becomes one `error: ...` line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
