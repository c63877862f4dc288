"""The CAT keep/drop decision for one pair."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CatFilterParams
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


def caption_decision(parsed: ParsedCaption, cfg: CatFilterParams = CatFilterParams()):
    """Keep iff complexity >= cfg.min_complexity and (if required) the caption has an action."""
    if parsed.complexity < cfg.min_complexity:
        return FilterDecision(False, "low_complexity")
    if cfg.require_action and not parsed.has_action:
        return FilterDecision(False, "no_action")
    return None


def decide(parsed: ParsedCaption, spotted: list[tuple[str, float]] | None,
           cfg: CatFilterParams = CatFilterParams()) -> FilterDecision:
    """Caption rules first, then the text-spotting rule (spotted=None: spotting off)."""
    d = caption_decision(parsed, cfg)
    if d is not None:
        return d
    if spotted:
        m = matched_text(spotted, parsed.text, cfg)
        if m is not None:
            return FilterDecision(False, "text_spotted", m)
    return FilterDecision(True, "kept")
