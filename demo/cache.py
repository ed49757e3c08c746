"""One JSON file holding a result and the key of the inputs it was computed from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignkit import artifacts


@dataclass(frozen=True)
class KeyedCache:
    """A result stored at `path` beside `key` (a hash of everything it depends on), reused while the key matches.

    The key is stored inside the result as its first entry, so the file reads as the result itself.
    """

    path: Path
    key: str

    def load(self) -> dict | None:
        """The stored result if it was computed from the same inputs, else None."""
        if not self.path.exists():
            return None
        cached = json.loads(self.path.read_text())
        return cached if cached and cached.get("key") == self.key else None

    def save(self, result: dict) -> dict:
        """Store `result` under this key (atomically) and return it with the key."""
        stored = {"key": self.key, **{k: v for k, v in result.items() if k != "key"}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json_atomic(self.path, stored)
        return stored
