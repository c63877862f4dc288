"""CAT filtering: Complexity, Action and Text-spotting (DiHT section 3.1)."""

from .parser import ParsedCaption, load_nlp, parse_caption, parse_captions
from .spotting import RapidOCRSpotter, DocTRSpotter, TextSpotter, caption_text_match, get_spotter, spot_text
from .filter import FilterDecision, decide

__all__ = [
    "ParsedCaption", "load_nlp", "parse_caption", "parse_captions",
    "TextSpotter", "RapidOCRSpotter", "DocTRSpotter", "get_spotter", "spot_text", "caption_text_match",
    "FilterDecision", "decide",
]
