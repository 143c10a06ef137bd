"""Errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path


class VeloxError(Exception):
    """Base class for errors a user can act on."""


class ModelLoadError(VeloxError):
    """A model source could not be loaded; the message names it and the problem."""

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}")
