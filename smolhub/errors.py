"""One exception type for every failure a user can cause and fix.

Entry points catch it and print its message as a single line (see `smolhub.cli.run_main`), so the
message must say what went wrong and what to do about it.
"""


class UserError(Exception):
    pass
