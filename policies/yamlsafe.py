"""Safe YAML reading for policies that arrive from other parties.

Anchors and aliases are refused outright (billion-laughs style expansion) and so are
files above a size cap, both before the parser builds any object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from policies.errors import PolicyError

MAX_POLICY_BYTES = 1_000_000


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that rejects anchors and aliases instead of expanding them."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise PolicyError(
                f"YAML alias '*{event.anchor}' at line {event.start_mark.line + 1}: "
                "anchors and aliases are not allowed in study policies"
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise PolicyError(
                f"YAML anchor '&{event.anchor}' at line {event.start_mark.line + 1}: "
                "anchors and aliases are not allowed in study policies"
            )
        return super().compose_node(parent, index)


def load_yaml_text(text: str, source: str) -> Any:
    """Parse policy YAML from text; `source` names it in errors."""
    size = len(text.encode("utf-8"))
    if size > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: policy text is {size} bytes, larger than the {MAX_POLICY_BYTES}-byte limit; refused")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - safe loader subclass
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None


def load_yaml_file(path: Path) -> Any:
    """Read and parse a policy file, checking size before reading it whole."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: study policy file not found")
    size = path.stat().st_size
    if size > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: policy file is {size} bytes, above the {MAX_POLICY_BYTES}-byte limit; refused")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: policy file is not UTF-8 text") from None
    return load_yaml_text(text, str(path))
