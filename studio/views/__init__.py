"""Qt views. They talk to ``studio.engine.Engine`` only (checked by import-linter)."""
