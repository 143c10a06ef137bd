"""Number formatting for views: one implementation, shared with the CLI.

``veloxcore.units`` is pure Python and ``import veloxcore`` loads no MLX (its
public API is lazy), so this import is safe on the GUI thread; a contract in
pyproject.toml keeps ``veloxcore.units`` free of MLX.
"""

from veloxcore.units import format_bytes

__all__ = ["format_bytes"]
