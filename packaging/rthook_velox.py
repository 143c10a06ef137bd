"""PyInstaller runtime hook: point veloxcore and the studio at the bundled assets/.

Runs before the entry script. Child processes (``velox bits-sweep`` plots) inherit
the variable. A VELOX_ASSETS set by the user wins.
"""

import os
import sys

if getattr(sys, "frozen", False):
    os.environ.setdefault("VELOX_ASSETS", os.path.join(sys._MEIPASS, "assets"))
