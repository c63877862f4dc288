"""Rule-based semantic parser on part-of-speech tags: objects, attributes, action relations, complexity.

The tags come from spaCy's small English tagger (tagging.py); noun phrases, verbs and their subjects and
objects are found by rules on the tag sequence, with no dependency parse. The rules, with the labelling
rules of tests/data/web_captions.jsonl (tests/test_cat_parser.py), define the parse graph:

- an object is the head noun of a noun phrase (determiner, adjectives, numbers, participles, nouns, head);
- its attributes are each adjective, number or participle before it, one for its compound nouns
  ("coffee shop"), a predicative adjective ("the sign is red") and a bare participle after it ("an apple
  isolated on white");
- an action is a verb, not a copula or auxiliary, not an imperative addressed to the reader ("buy shoes
  online"), with a subject or an object: a finite verb's subject is the clause's noun phrase before it,
  its object the noun phrase after it, or after its preposition when it has no direct object; "a man riding
  a horse", "a bird chased by a cat" are actions; passives take the "by" phrase as subject;
- complexity is the maximum, over objects, of its attributes plus the actions it takes part in (DiHT 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from ..config import CatFilterParams
from .tagging import CachedTagger, load_spacy

MAX_CHARS = 2000  # captions are truncated before parsing; web captions past this are boilerplate
NOUN = {"NN", "NNS", "NNP", "NNPS"}
ADJ = {"JJ", "JJR", "JJS"}
VERB = {"VB", "VBD", "VBG", "VBN", "VBP", "VBZ"}
DET = {"DT", "PDT", "PRP$", "WP$"}
PARTICIPLE = {"VBG", "VBN"}
SKIP = {"RB", "RBR", "RBS", "RP"}          # adverbs and particles between a verb and its object
PREP = {"IN", "TO"}
CLAUSE_BREAK = {",", ":", ".", "-LRB-", "-RRB-", "NFP", "``", "''", "WRB", "CC"}
RELATIVE = {"WDT", "WP"}                   # "a man who rides": the subject is the phrase before "who"
BE = {"be", "is", "are", "was", "were", "been", "being", "am", "'s", "'re", "'m"}
HAVE_DO = {"have", "has", "had", "having", "do", "does", "did"}
SINGULAR_DET = {"a", "an", "one", "each", "every", "this", "that", "another"}
NOT_3RD_PERSON = {"ss", "us", "is"}        # "glass", "bus", "tennis" end in -s but are no verb forms


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


def load_nlp():
    """spaCy's English pipeline the tags come from (tok2vec and tagger enabled)."""
    return load_spacy()


@lru_cache(maxsize=1)
def cached_tagger() -> CachedTagger:
    """The process's tagger; its embedding table lives as long as the process (cache_clear(): a cold one)."""
    return CachedTagger(load_spacy())


class _Lex:
    """What spaCy's rule lemmatizer reads of a token."""

    class morph:  # noqa: N801 - mimics Token.morph
        key = 0

        @staticmethod
        def to_dict():
            return {}

    def __init__(self, text: str, pos: str):
        self.text, self.lower_, self.pos_, self.orth, self.pos = text, text, pos, hash(text), hash(pos)


@lru_cache(maxsize=100_000)
def _lemma(word: str, tag: str) -> str:
    """spaCy's rule lemma; the tag says when a word is already its base form (NN, VB, VBP, JJ)."""
    pos = {"NNS": "noun", "NNPS": "noun", "VBD": "verb", "VBG": "verb", "VBN": "verb", "VBZ": "verb",
           "JJR": "adj", "JJS": "adj"}.get(tag)
    if pos is None:
        return word
    return load_spacy().get_pipe("lemmatizer").rule_lemmatize(_Lex(word, pos.upper()))[0].lower()


def _clean(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text is None:
        return ""
    text = str(text).replace("\x00", " ")
    return " ".join(text.split())[:MAX_CHARS]


def _fix_s_verbs(words: list[str], tags: list[str]) -> None:
    """A 3rd-person verb the small tagger calls a noun: "a plane lands at ...", "a dog chases cats".

    A singular determiner ("a", "one", "this"...) cannot head a plural noun phrase. In the run determiner,
    modifiers, singular noun, -s word, the -s word is a verb (VBZ) when the phrase would otherwise end in a
    plural noun (the -s word itself or a later one: "a worker repairs power lines"); a run that ends in a
    singular noun is a compound ("a sports car", "a gifts shop"). "two dogs on the grass" and "the bike racks
    at the station" (plural or ambiguous determiners) keep their plurals.
    """
    n = len(words)
    for i in range(2, n):
        w = words[i]
        if tags[i] not in NOUN or not w.endswith("s") or w[-2:] in NOT_3RD_PERSON or len(w) < 3:
            continue
        if tags[i - 1] not in ("NN", "NNP", "JJ"):  # JJ: "a yellow square floats" (square tagged JJ)
            continue
        j = i - 1
        while j >= 0 and tags[j] in ("NN", "NNP", "JJ", "HYPH"):
            j -= 1
        if j < 0 or words[j] not in SINGULAR_DET:
            continue
        end = i
        while end + 1 < n and (tags[end + 1] in NOUN or tags[end + 1] in ADJ or tags[end + 1] in ("CD", "HYPH")):
            end += 1
        last_noun = max(k for k in range(i, end + 1) if tags[k] in NOUN)
        if tags[last_noun] in ("NNS", "NNPS") and (i + 1 == n or tags[i + 1] != "POS"):
            tags[i] = "VBZ"


def _fix_adjective_heads(tags: list[str]) -> None:
    """A determiner phrase with no noun has an adjective for its head: "a yellow square(JJ) rests", "the left"."""
    n = len(tags)
    for i in range(n):
        if tags[i] == "DT" and i + 1 < n and tags[i + 1] in ADJ:
            j = i + 1
            while j + 1 < n and (tags[j + 1] in ADJ or tags[j + 1] == "CD"):
                j += 1
            if tags[j] in ADJ and (j + 1 == n or tags[j + 1] not in NOUN):
                tags[j] = "NN"


@dataclass
class _Phrase:
    head: int
    name: str
    attributes: list[str]
    actions: int = 0


def _phrases(words: list[str], tags: list[str]) -> tuple[dict[int, _Phrase], set[int]]:
    """Noun phrases by their head index, and the indices of participles used inside them as adjectives."""
    n, i = len(words), 0
    phrases: dict[int, _Phrase] = {}
    inside: set[int] = set()
    while i < n:
        j = i
        while j < n and (tags[j] in DET or tags[j] in ADJ or tags[j] in NOUN or tags[j] == "HYPH"
                         or (tags[j] == "CD" and (j == i or tags[j - 1] not in NOUN))  # "tea 100 bags": two
                         or (tags[j] in PARTICIPLE and j + 1 < n and (tags[j + 1] in NOUN or tags[j + 1] in ADJ)
                             and (j == 0 or tags[j - 1] not in NOUN))):
            j += 1
        heads = [k for k in range(i, j) if tags[k] in NOUN]
        if heads:
            head = heads[-1]
            attrs, compound = [], []
            for k in range(i, head):
                t = tags[k]
                if t in ADJ or t == "CD" or t in PARTICIPLE:
                    attrs.append(_lemma(words[k], t) if t in ADJ else words[k])
                    if t in PARTICIPLE:
                        inside.add(k)
                elif t in NOUN:
                    compound.append(words[k])
            if compound:
                attrs.append(" ".join(compound))
            name = " ".join(compound + [_lemma(words[head], tags[head])])
            phrases[head] = _Phrase(head, name, attrs)
        i = max(j, i + 1)
    return phrases, inside


def _subject(start: int, tags: list[str], phrases: dict) -> int | None:
    """The clause's noun phrase before ``start``; phrases after a preposition are skipped."""
    k = start - 1
    while k >= 0 and tags[k] not in CLAUSE_BREAK:
        if k in phrases:
            first = k
            while first - 1 >= 0 and (tags[first - 1] in DET or tags[first - 1] in ADJ or tags[first - 1] in NOUN
                                      or tags[first - 1] in ("CD", "HYPH", "VBG", "VBN")):
                first -= 1
            if first - 1 >= 0 and tags[first - 1] in PREP:
                k = first - 2
                continue
            return k
        if tags[k] in RELATIVE and k > 0:
            k -= 1
            continue
        k -= 1
    return None


def _object(start: int, words: list[str], tags: list[str], phrases: dict, allow_prep: bool = True):
    """The phrase right after a verb (adverbs skipped), or after its preposition: (head, preposition)."""
    n, k = len(tags), start
    while k < n and tags[k] in SKIP:
        k += 1
    prep = None
    if allow_prep and k < n and tags[k] in PREP:
        prep, k = words[k], k + 1
    while k < n and not (k in phrases) and (tags[k] in DET or tags[k] in ADJ or tags[k] in NOUN
                                            or tags[k] in ("CD", "HYPH") or tags[k] in PARTICIPLE):
        k += 1
    if k < n and k in phrases and (prep is None or prep != "by"):
        return k, prep
    return None, prep


def _parse_tokens(text: str, words: list[str], tags: list[str]) -> ParsedCaption:
    _fix_s_verbs(words, tags)
    _fix_adjective_heads(tags)
    n = len(words)
    aux = [False] * n
    for i, w in enumerate(words):
        if w in BE or tags[i] == "MD":
            aux[i] = True
        elif w in HAVE_DO:
            k = i + 1
            while k < n and tags[k] in SKIP:
                k += 1
            aux[i] = k < n and tags[k] in VERB
    phrases, inside = _phrases(words, tags)
    actions = []
    for v in range(n):
        t = tags[v]
        if t not in VERB or aux[v] or v in inside:
            continue
        k = v - 1
        while k >= 0 and tags[k] in SKIP:
            k -= 1
        chain_start, be_before = k + 1, False
        while k >= 0 and (aux[k] or tags[k] in SKIP):
            be_before = be_before or words[k] in BE
            chain_start, k = k, k - 1
        led = chain_start <= v - 1 and any(aux[j] for j in range(chain_start, v))
        after_noun = not led and k >= 0 and k in phrases and k == v - 1
        to_before = not led and k >= 0 and tags[k] == "TO"
        by = v + 1 < n and words[v + 1] == "by"
        subj = obj = None
        if after_noun and t in ("VBN", "VBD") and (by or t == "VBN"):
            if not by:  # "an apple isolated on white": a participle used as an adjective
                phrases[k].attributes.append(_lemma(words[v], t))
                continue
            subj, obj = _object(v + 2, words, tags, phrases, allow_prep=False)[0], k
        elif after_noun and t == "VBG":
            subj, obj = k, _object(v + 1, words, tags, phrases)[0]
        elif t == "VBG" and not led and not (k < 0 or tags[k] in CLAUSE_BREAK or tags[k] in PREP):
            continue  # "free shipping", "the wedding": a gerund used as a noun
        else:
            passive = led and be_before and t in ("VBN", "VBD")
            subj = None if to_before or (t == "VBG" and not led) else _subject(chain_start, tags, phrases)
            if t == "VB" and not led and not to_before and subj is None:
                continue  # an imperative: "buy shoes online", "click here"
            if passive:
                obj, subj = subj, (_object(v + 2, words, tags, phrases, allow_prep=False)[0] if by else None)
            else:
                obj = _object(v + 1, words, tags, phrases)[0]
        if subj is None and obj is None:
            continue
        actions.append((phrases[subj].name if subj is not None else None, _lemma(words[v], t),
                        phrases[obj].name if obj is not None else None))
        for p in {subj, obj} - {None}:
            phrases[p].actions += 1
    for i, w in enumerate(words):  # predicative adjectives: "the cat is (very) black"
        if tags[i] in ADJ and i not in phrases and i > 0:
            k = i - 1
            while k >= 0 and tags[k] in SKIP:
                k -= 1
            if k >= 0 and words[k] in BE and (s := _subject(k, tags, phrases)) is not None:
                phrases[s].attributes.append(_lemma(w, tags[i]))
    ordered = [phrases[h] for h in sorted(phrases)]
    return ParsedCaption(
        text=text,
        objects=tuple(p.name for p in ordered),
        attributes=tuple((p.name, a) for p in ordered for a in p.attributes),
        actions=tuple(actions),
        complexity=max((len(p.attributes) + p.actions for p in ordered), default=0),
    )


def parse_captions(texts: Iterable, batch_size: int = CatFilterParams().parse_batch_size) -> list[ParsedCaption]:
    """Parse captions in batches; each distinct caption is tagged and parsed once.

    Bad input (None, bytes that are not UTF-8, empty, 10k characters) yields a defined parse, never an error.
    """
    tagger = cached_tagger()
    labels = tagger.labels
    cleaned = [_clean(t) for t in texts]
    unique = list(dict.fromkeys(cleaned))
    parsed = {}
    for text, (doc, scores) in zip(unique, tagger.pipe(unique, batch_size)):
        tags = [labels[i] for i in scores.argmax(1).tolist()]
        for i, tag in enumerate(tags):
            if tag == "HYPH" and (doc[i].whitespace_ or (i > 0 and doc[i - 1].whitespace_)):
                tags[i] = ":"  # a spaced hyphen is a dash: "Stock Photo - red apple"
        parsed[text] = _parse_tokens(text, [t.lower_ for t in doc], tags)
    return [parsed[text] for text in cleaned]


def parse_caption(text) -> ParsedCaption:
    """Parse one caption."""
    return parse_captions([text])[0]
