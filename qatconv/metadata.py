"""qatconv's own safetensors metadata: one key (`METADATA_KEY`) holding a JSON object.

Safetensors metadata values are strings, so everything qatconv records (stage, pairs, quant
params, metrics) is one JSON document under ``__metadata__["qatconv"]`` beside ``format: pt``.
`header_entries` writes it and `parse_metadata` is the one reader. Imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qatconv.errors import CheckpointError, first_line

__all__ = ["FORMAT_VERSION", "METADATA_KEY", "header_entries", "parse_metadata"]

METADATA_KEY = "qatconv"
FORMAT_VERSION = 1

_HINT = "the file was edited or written by another tool; re-run qatconv to recreate it"


def header_entries(meta: dict[str, Any]) -> dict[str, str]:
    """The safetensors ``__metadata__`` entries for ``meta`` (keys sorted: deterministic)."""
    return {METADATA_KEY: json.dumps(meta, sort_keys=True)}


def parse_metadata(raw: object, where: Path, *, lenient: bool = False) -> dict[str, Any] | None:
    """The metadata object from its raw ``qatconv`` entry (None when there is none).

    Args:
        raw: the entry: a JSON string (a safetensors header), or an object (an index file).
        where: the file it came from, for messages.
        lenient: return None for JSON that is not an object (`inspect` describes any file)
            instead of raising.

    Raises:
        CheckpointError: not valid JSON (or nested too deeply); not an object unless lenient.
    """
    if raw is None:
        return None
    if isinstance(raw, dict):
        return raw
    try:
        obj = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, digit limits, deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else first_line(e)
        raise CheckpointError(
            f"{where}: the {METADATA_KEY!r} metadata is not valid JSON ({why})", hint=_HINT
        ) from None
    if isinstance(obj, dict):
        return obj
    if lenient:
        return None
    raise CheckpointError(f"{where}: the {METADATA_KEY!r} metadata is not a JSON object", hint=_HINT)
