"""Entry point of the PyInstaller bundle: one program for ``velox-studio`` and ``velox``.

Both executables in the bundle are built from this script; it dispatches on the
name it was started as. ``velox bits-sweep`` draws its plot by re-running
``sys.executable -m studio.plots ...``; in a bundle ``sys.executable`` is this
program, so that form is handled here too.
"""

from __future__ import annotations

import os
import sys


def program_name(argv0: str) -> str:
    name = os.path.basename(argv0).lower()
    return name[:-4] if name.endswith(".exe") else name


def main() -> int:
    if sys.argv[1:3] == ["-m", "studio.plots"]:
        from studio.plots import main as plots

        return plots(sys.argv[3:])
    if program_name(sys.argv[0]) == "velox":
        from veloxcore.cli import main as cli

        return cli(sys.argv[1:])
    from studio.app import main as studio

    return studio(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
