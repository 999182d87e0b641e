"""Files that must never be seen half-written."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, data) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
