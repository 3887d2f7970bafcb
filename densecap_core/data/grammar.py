"""Phrases for synthetic regions, and the parser that checks a caption against a region's truth.

Three region kinds, each with synonyms and optional attributes (like human-written Visual Genome phrases):

- object:   "a small striped blue square", "tiny blue box with stripes", "an orange disc"
- group:    "three yellow triangles", "a pair of red circles", "a group of four white stars"
- relation: "a red circle left of a green star", "a blue box beneath a small pink hexagon"

A phrase always names colour and shape (and the count of a group, the relation word of a relation); size and
texture are optional, but when named they are true. ``caption_matches(caption, truth)`` accepts a caption
exactly when it is a phrase of this grammar that states nothing false about the region (``truth`` is a
region record of ``regions_meta.json``); it is the caption-exactness check for models trained on this data.

Torch-free. Tokens come from ``densecap_core.vocab.tokenize`` (lowercase, punctuation deleted), so parsing
sees what a model trained on the preprocessed data can say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densecap_core.vocab import tokenize

#: The preprocessing default (``--max-token-length``): no generated phrase is longer.
MAX_TOKENS = 15

SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium", "medium sized", "midsize"),
              "large": ("large", "big", "huge")}
COLOUR_WORDS = {"red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
                "cyan": ("cyan", "turquoise"), "blue": ("blue",), "purple": ("purple", "violet"),
                "pink": ("pink",), "white": ("white",), "black": ("black",)}
#: singular -> plural, per shape.
SHAPE_WORDS = {"circle": {"circle": "circles", "disc": "discs"},
               "square": {"square": "squares", "box": "boxes"},
               "triangle": {"triangle": "triangles"},
               "star": {"star": "stars"},
               "hexagon": {"hexagon": "hexagons"},
               "diamond": {"diamond": "diamonds", "rhombus": "rhombuses"},
               "pentagon": {"pentagon": "pentagons"},
               "cross": {"cross": "crosses", "plus sign": "plus signs"}}
TEXTURE_ADJECTIVES = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted"),
                      "checkered": ("checkered", "checked")}
TEXTURE_PHRASES = {"striped": ("with stripes",), "dotted": ("with dots", "with polka dots"),
                   "checkered": ("with checks", "with a checkered pattern")}
RELATION_WORDS = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
                  "above": ("above", "over"), "below": ("below", "under", "beneath"),
                  "next to": ("next to", "beside", "near")}
#: "A r B" is the same statement as "B inverse(r) A".
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above",
                    "next to": "next to"}
COUNT_WORDS = {2: ("two", "a pair of"), 3: ("three",), 4: ("four",)}
_FILLERS = ("a", "an", "the", "a group of", "together")


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _with_article(words: list[str]) -> list[str]:
    return ["an" if words[0][0] in "aeiou" else "a"] + words


def object_words(attrs: dict, rng: np.random.Generator, *, size_p: float, texture_p: float,
                 article_p: float = 1.0) -> list[str]:
    """Words describing one object (``attrs``: shape, colour, size, texture)."""
    words: list[str] = []
    if rng.random() < size_p:
        words.append(_choice(rng, SIZE_WORDS[attrs["size"]]))
    tail: list[str] = []
    texture = attrs["texture"]
    if rng.random() < (texture_p * 0.3 if texture == "solid" else texture_p):
        if texture != "solid" and rng.random() < 0.4:
            tail.append(_choice(rng, TEXTURE_PHRASES[texture]))
        else:
            words.append(_choice(rng, TEXTURE_ADJECTIVES[texture]))
    words.append(_choice(rng, COLOUR_WORDS[attrs["colour"]]))
    words.append(_choice(rng, tuple(SHAPE_WORDS[attrs["shape"]])))
    words += tail
    return _with_article(words) if rng.random() < article_p else words


def object_phrase(attrs: dict, rng: np.random.Generator) -> str:
    return " ".join(object_words(attrs, rng, size_p=0.7, texture_p=0.85, article_p=0.8))


def group_phrase(shape: str, colour: str, count: int, rng: np.random.Generator) -> str:
    plural = _choice(rng, tuple(SHAPE_WORDS[shape].values()))
    colour_word = _choice(rng, COLOUR_WORDS[colour])
    template = int(rng.integers(3))
    if template == 0:
        return f"{_choice(rng, COUNT_WORDS[count])} {colour_word} {plural}"
    number = COUNT_WORDS[count][0]
    if template == 1:
        return f"a group of {number} {colour_word} {plural}"
    return f"{number} {colour_word} {plural} together"


def relation_phrase(subject: dict, relation: str, obj: dict, rng: np.random.Generator) -> str:
    """ "A <relation> B", kept within ``MAX_TOKENS`` tokens by dropping optional attributes if needed."""
    words = (object_words(subject, rng, size_p=0.3, texture_p=0.3) + [_choice(rng, RELATION_WORDS[relation])]
             + object_words(obj, rng, size_p=0.3, texture_p=0.3))
    if len(tokenize(" ".join(words))) > MAX_TOKENS:
        # Without optional attributes the longest phrase is 11 tokens ("a red plus sign to the left of ...").
        words = (object_words(subject, rng, size_p=0.0, texture_p=0.0) + [_choice(rng, RELATION_WORDS[relation])]
                 + object_words(obj, rng, size_p=0.0, texture_p=0.0))
    return " ".join(words)


# ---------------------------------------------------------------------------------------------- parsing


def _lexicon() -> dict[tuple[str, ...], tuple[str, object]]:
    lex: dict[tuple[str, ...], tuple[str, object]] = {}

    def add(phrase: str, category: str, value) -> None:
        lex[tuple(phrase.split())] = (category, value)

    for f in _FILLERS:
        add(f, "filler", None)
    for size, words in SIZE_WORDS.items():
        for w in words:
            add(w, "size", size)
    for colour, words in COLOUR_WORDS.items():
        for w in words:
            add(w, "colour", colour)
    for shape, forms in SHAPE_WORDS.items():
        for singular, plural in forms.items():
            add(singular, "shape", shape)
            add(plural, "plural", shape)
    for texture, words in TEXTURE_ADJECTIVES.items():
        for w in words:
            add(w, "texture", texture)
    for texture, words in TEXTURE_PHRASES.items():
        for w in words:
            add(w, "texture", texture)
    for rel, words in RELATION_WORDS.items():
        for w in words:
            add(w, "relation", rel)
    for count, words in COUNT_WORDS.items():
        for w in words:
            add(w, "count", count)
    return lex


_LEXICON = _lexicon()
_LONGEST = max(len(k) for k in _LEXICON)


@dataclass(frozen=True)
class Mention:
    """What a caption says about one object or group: None where it says nothing."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    texture: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    kind: str  # "object", "group" or "relation"
    subject: Mention
    relation: str | None = None
    object: Mention | None = None
    count: int | None = None


def _items(tokens: list[str]) -> list[tuple[str, object]] | None:
    items, i = [], 0
    while i < len(tokens):
        for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
            hit = _LEXICON.get(tuple(tokens[i:i + n]))
            if hit is not None:
                if hit[0] != "filler":
                    items.append(hit)
                i += n
                break
        else:
            return None  # a word outside the grammar
    return items


def _mention(items: list[tuple[str, object]], plural: bool) -> Mention | None:
    fields: dict[str, object] = {}
    for category, value in items:
        key = "shape" if category in ("shape", "plural") else category
        if key not in ("shape", "colour", "size", "texture") or key in fields:
            return None
        if key == "shape" and (category == "plural") != plural:
            return None
        fields[key] = value
    if "shape" not in fields:
        return None
    return Mention(**fields)


def parse_caption(caption: str) -> ParsedCaption | None:
    """Parse a caption of this grammar; None if it uses other words or is not one well-formed phrase."""
    items = _items(tokenize(caption))
    if not items:
        return None
    rel = [k for k, (c, _) in enumerate(items) if c == "relation"]
    if len(rel) == 1:
        k = rel[0]
        subject, obj = _mention(items[:k], False), _mention(items[k + 1:], False)
        if subject is None or obj is None:
            return None
        return ParsedCaption("relation", subject, relation=str(items[k][1]), object=obj)
    if rel:
        return None
    counts = [v for c, v in items if c == "count"]
    if counts or any(c == "plural" for c, _ in items):
        if len(counts) != 1:
            return None
        group = _mention([it for it in items if it[0] != "count"], True)
        return None if group is None else ParsedCaption("group", group, count=int(counts[0]))
    single = _mention(items, False)
    return None if single is None else ParsedCaption("object", single)


def mention_errors(m: Mention, attrs: dict, *, texture_required: bool = False) -> list[str]:
    """Which of colour, shape, size and texture ``m`` gets wrong about ``attrs`` (a missing colour is wrong; a
    missing size or texture is not, except a visible texture when ``texture_required``, as exactness asks)."""
    wrong = [key for key in ("colour", "shape") if getattr(m, key) != attrs.get(key)]
    wrong += [key for key in ("size", "texture") if getattr(m, key) is not None and getattr(m, key) != attrs.get(key)]
    if texture_required and m.texture is None and attrs.get("texture", "solid") != "solid":
        wrong.append("texture")
    return wrong


def _mention_true(m: Mention, attrs: dict) -> bool:
    return not mention_errors(m, attrs)


def caption_errors(parsed: ParsedCaption, truth: dict) -> list[str] | None:
    """What a phrase of the right kind gets wrong about ``truth`` (a ``regions_meta.json`` region), by part:
    objects ``colour``/``shape``/``size``/``texture`` (a visible texture must be named); groups ``count`` and
    the members' ``colour``/``shape``/``size``; relations ``relation`` (the word), ``subject``, ``object``
    (either way round, whichever reading is wrong in fewer parts). ``[]``: exact. None: another kind of phrase.
    """
    if parsed.kind != truth["kind"]:
        return None
    if truth["kind"] == "object":
        return mention_errors(parsed.subject, truth, texture_required=True)
    if truth["kind"] == "group":
        return ["count"] * (parsed.count != truth["count"]) + mention_errors(parsed.subject, truth)
    assert parsed.object is not None
    readings = []
    for relation, subject, obj in ((truth["relation"], truth["subject"], truth["object"]),
                                   (INVERSE_RELATION[truth["relation"]], truth["object"], truth["subject"])):
        readings.append(["relation"] * (parsed.relation != relation)
                        + ["subject"] * bool(mention_errors(parsed.subject, subject))
                        + ["object"] * bool(mention_errors(parsed.object, obj)))
    return min(readings, key=len)


def caption_matches(caption: str, truth: dict) -> bool:
    """True when ``caption`` is a grammatical phrase naming colour and shape that is true of ``truth``.

    ``truth``: a region record of ``regions_meta.json`` (``kind`` object/group/relation and its fields).
    A relation may be stated either way round ("A left of B" == "B right of A").
    """
    parsed = parse_caption(caption)
    if parsed is None or parsed.kind != truth["kind"]:
        return False
    if truth["kind"] == "object":
        return _mention_true(parsed.subject, truth)
    if truth["kind"] == "group":
        return parsed.count == truth["count"] and _mention_true(parsed.subject, truth)
    assert parsed.object is not None
    if parsed.relation == truth["relation"]:
        if _mention_true(parsed.subject, truth["subject"]) and _mention_true(parsed.object, truth["object"]):
            return True
    if parsed.relation == INVERSE_RELATION[truth["relation"]]:
        return _mention_true(parsed.subject, truth["object"]) and _mention_true(parsed.object, truth["subject"])
    return False
