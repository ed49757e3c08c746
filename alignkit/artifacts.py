"""Run and stage directories: stage.json, atomic completion, finding a stage by name or path.

A stage directory `<run_dir>/<stage_name>/` holds the adapter (PEFT format, at
the top level so the directory is itself a loadable adapter), tokenizer files,
`logs/` (TensorBoard), `checkpoints/` (Trainer checkpoints, for --resume) and
`stage.json`. A stage is complete only when stage.json exists with
`"complete": true`; it is written last, through a temp file and a rename.
While a stage trains, `pending.json` records the hash it is training towards,
so `--resume` never continues a checkpoint made under another config.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

from alignkit.errors import UserError

STAGE_JSON = "stage.json"
PENDING_JSON = "pending.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """Content hash of a file or of every file under a directory (names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("alignkit", "torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def read_stage(stage_dir: str | Path) -> dict | None:
    """The stage.json of a directory, or None if there is none (or it is unreadable)."""
    path = Path(stage_dir) / STAGE_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # missing, a directory, binary junk: not complete
        return None


def weights_problem(stage_dir: str | Path) -> str | None:
    """What is wrong with a complete stage's weights (none, or a file whose header does not read), else None.
    Reads only the safetensors headers: a child stage checks its parents before anything is touched."""
    from safetensors import safe_open

    files = sorted(Path(stage_dir).glob("*.safetensors"))
    if not files:
        return "has no weights (*.safetensors)"
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError for a torn or foreign file
            return f"has an unreadable {f.name} ({str(err).splitlines()[0]})"
    return None


def is_complete(stage_dir: str | Path, expected_hash: str | None = None) -> bool:
    stage = read_stage(stage_dir)
    if not stage or not stage.get("complete"):
        return False
    return expected_hash is None or stage.get("config_hash") == expected_hash


def started_config_hash(stage_dir: Path) -> str | None:
    """The config hash the stage's last unfinished training started under (its checkpoints'), or None."""
    try:
        return json.loads((stage_dir / PENDING_JSON).read_text()).get("config_hash")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def begin_stage(stage_dir: Path, config_hash: str, *, resume: bool) -> bool:
    """Prepare a stage directory for training; returns True if checkpoints may be resumed (they were made
    under the same config hash).

    An old stage.json is removed first, so a crash from here on leaves the stage
    incomplete. Only this stage's own directory is touched.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    pending = stage_dir / PENDING_JSON
    previous = started_config_hash(stage_dir)
    (stage_dir / STAGE_JSON).unlink(missing_ok=True)
    can_resume = resume and previous == config_hash
    if not can_resume:
        # Checkpoints made under another config must not be continued, and the TensorBoard logs of
        # the earlier attempt would plot its steps over the new run's.
        import shutil

        for old in (CHECKPOINTS, "logs"):
            if (stage_dir / old).exists():
                stale = stage_dir / f"{old}.stale-{int(time.time())}"
                os.replace(stage_dir / old, stale)
                shutil.rmtree(stale, ignore_errors=True)
    write_json_atomic(pending, {"config_hash": config_hash, "started": time.time()})
    return can_resume


def complete_stage(stage_dir: Path, record: dict) -> dict:
    """Write stage.json with complete=true, last and atomically."""
    record = dict(record)
    record["complete"] = True
    record["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # Names this training of the stage: a child records its parents' run_ids, so a parent retrained
    # under the same config (after an interruption) still makes its children stale.
    record["run_id"] = uuid.uuid4().hex
    record.setdefault("versions", library_versions())
    write_json_atomic(stage_dir / STAGE_JSON, record)
    (stage_dir / PENDING_JSON).unlink(missing_ok=True)
    return record


def is_complete_checkpoint(ckpt: Path) -> bool:
    """A Trainer checkpoint is complete when trainer_state.json (written last) parses."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    has_weights = any(ckpt.glob("*.safetensors")) or any(ckpt.glob("*.bin"))
    return has_weights


def kept_checkpoint_note(stage_dir: Path) -> str:
    """For messages when a stage stops: which checkpoint --resume would continue from, if any."""
    last = last_complete_checkpoint(stage_dir)
    return f"last good checkpoint {last.name} kept" if last else "no checkpoint saved yet"


def last_complete_checkpoint(stage_dir: Path) -> Path | None:
    """The newest checkpoint under stage_dir/checkpoints that was fully written; half-written ones are skipped."""
    root = Path(stage_dir) / CHECKPOINTS
    if not root.exists():
        return None
    ckpts = []
    for p in root.glob("checkpoint-*"):
        try:
            ckpts.append((int(p.name.split("-")[-1]), p))
        except ValueError:
            continue
    for _, p in sorted(ckpts, reverse=True):
        if is_complete_checkpoint(p):
            return p
    return None


def resolve_stage(name_or_path: str, run_dir: str | Path | None = None) -> Path:
    """A complete stage directory, given its path or its name within run_dir."""
    candidates = [Path(name_or_path)]
    if run_dir is not None:
        candidates.insert(0, Path(run_dir) / name_or_path)
    for c in candidates:
        if (c / STAGE_JSON).exists() or (c / PENDING_JSON).exists():
            if not is_complete(c):
                raise UserError(f"stage {name_or_path} at {c} is not complete")
            return c
    raise UserError(f"no stage {name_or_path!r}" + (f" in {run_dir}" if run_dir else ""))
