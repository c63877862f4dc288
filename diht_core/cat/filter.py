"""The CAT keep/drop decision for one pair."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.shards import FAULTS
from .parser import ParsedCaption
from .spotting import matched_text

# a sample with a fault of the shard reader (FAULTS) is dropped before the caption and text-spotting rules
REASONS = ("kept", *FAULTS, "low_complexity", "no_action", "text_spotted")


@dataclass(frozen=True)
class FilterDecision:
    kept: bool
    reason: str  # one of REASONS
    matched: str | None = None


def caption_decision(parsed: ParsedCaption, min_complexity: int = 1, require_action: bool = True):
    """Keep iff complexity >= min_complexity and (if required) the caption has an action."""
    if parsed.complexity < min_complexity:
        return FilterDecision(False, "low_complexity")
    if require_action and not parsed.has_action:
        return FilterDecision(False, "no_action")
    return None


def decide(parsed: ParsedCaption, spotted: list[tuple[str, float]] | None, *, min_complexity: int = 1,
           require_action: bool = True, min_chars: int = 5, min_confidence: float = 0.8) -> FilterDecision:
    """Caption rules first, then the text-spotting rule (spotted=None: spotting off)."""
    d = caption_decision(parsed, min_complexity, require_action)
    if d is not None:
        return d
    if spotted:
        m = matched_text(spotted, parsed.text, min_chars, min_confidence)
        if m is not None:
            return FilterDecision(False, "text_spotted", m)
    return FilterDecision(True, "kept")
