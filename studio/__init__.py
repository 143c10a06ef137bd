"""Velox Studio: the PySide6 + pyqtgraph desktop front end. Views never import MLX."""
