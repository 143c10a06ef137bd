"""Chat history on disk: one JSON file per conversation, written atomically.

Conversations live in ``<AppDataLocation>/chats`` (``$VELOX_DATA_DIR/chats``
when set, which the tests use). A file is written to a temporary name in the
same folder and moved into place with ``os.replace``, so a crash leaves either
the old or the new version, never half of one. Plain Python and Qt's
QStandardPaths only: no MLX.

Format (``"format": "velox.chat"``, version 1)::

    {"id", "title", "created", "updated", "model", "system",
     "messages": [{"role": "user", "content": ...},
                  {"role": "assistant", "content": ..., "meta": {method, tokens,
                   tokens_per_s, prompt_tokens, kv_bytes, kv_fp16_bytes, ...},
                   "compare": {"content", "meta", "divergence"}  # side-by-side turns
                  }]}
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

FORMAT = "velox.chat"
VERSION = 1
TITLE_CHARS = 60


def default_directory() -> Path:
    env = os.environ.get("VELOX_DATA_DIR")
    if env:
        return Path(env).expanduser() / "chats"
    from PySide6.QtCore import QStandardPaths

    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
    return Path(base) / "chats"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


def new_conversation(model: str | None = None, system: str = "") -> dict:
    return {"format": FORMAT, "version": VERSION,
            "id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            "title": "New chat", "created": now_iso(), "updated": now_iso(),
            "model": model, "system": system, "messages": []}


def title_of(conversation: dict) -> str:
    for message in conversation.get("messages", []):
        if message.get("role") == "user" and message.get("content", "").strip():
            text = " ".join(message["content"].split())
            return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"
    return "New chat"


class ChatStore:
    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()

    def path(self, conversation_id: str) -> Path:
        if not conversation_id or "/" in conversation_id or conversation_id.startswith("."):
            raise ValueError(f"bad conversation id {conversation_id!r}")
        return self.directory / f"{conversation_id}.json"

    def save(self, conversation: dict) -> Path:
        conversation["title"] = title_of(conversation)
        conversation["updated"] = now_iso()
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(conversation["id"])
        tmp = self.directory / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(conversation, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def load(self, conversation_id: str) -> dict:
        conversation = json.loads(self.path(conversation_id).read_text(encoding="utf-8"))
        if not isinstance(conversation, dict) or conversation.get("format") != FORMAT:
            raise ValueError(f"{self.path(conversation_id)}: not a Velox chat")
        conversation.setdefault("messages", [])
        conversation.setdefault("system", "")
        return conversation

    def delete(self, conversation_id: str) -> None:
        self.path(conversation_id).unlink(missing_ok=True)

    def list(self) -> list[dict]:
        """{"id", "title", "updated", "messages"} of every readable chat, newest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.glob("*.json"):
            try:
                c = json.loads(path.read_text(encoding="utf-8"))
                if c.get("format") != FORMAT:
                    continue
                out.append({"id": c["id"], "title": c.get("title") or title_of(c),
                            "updated": c.get("updated", ""),
                            "messages": len(c.get("messages", []))})
            except (OSError, ValueError, KeyError, AttributeError):
                continue  # unreadable or foreign files are skipped, never deleted
        return sorted(out, key=lambda c: (c["updated"], c["id"]), reverse=True)
