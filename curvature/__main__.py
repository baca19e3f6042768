"""``python -m curvature``: the ``curvature`` command (the application is imported only here)."""

import sys


def _run() -> int:
    from curvature.app.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_run())
