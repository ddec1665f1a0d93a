"""easy-VQA's questions in many words: what a question asks, and the phrasings that ask it, split into
the phrasings training reads and those held out for `evaluate.py --reworded`.

easy-VQA asks every question in one of 24 templates, in lower case ("what color is the shape?", "is
there not a red shape?"). A model drilled on them keys on the sentence, not on what it asks. Here a
question is read into its meaning, a `Question`, and said again in another phrasing:

    q = read_question("is there not a red shape?")     # Question(kind="has_color", value="red", negated=True)
    say(q, rng, "train")       # "Isn't there a red figure in the photo?"
    say(q, rng, "held_out")    # "is there no red object anywhere in the picture"

A phrasing is a template with slots, filled by synonyms, then surface forms: an optional polite
opening or closing, contractions, letter case and end punctuation. `TRAIN` holds the training
phrasings (the data set's own 24 among them) and `HELD_OUT` the others; held-out templates and
openings are never trained on, not even in words (the tests check that no held-out template can
come out of `say(..., "train")`, nor is a training template's words in another order). Answers keep easy-VQA's convention: "is there not a red shape?" is
answered "yes" when there is no red shape, and so is "isn't there a red shape?".
"""
import functools
import random
import re
import string
from dataclasses import dataclass



# The shapes and colours easy-VQA draws, which its questions name (easyvqa.PAINT: each colour's RGB).
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("black", "gray", "red", "green", "blue", "yellow", "teal", "brown")


def is_negated(question: str) -> bool:
    """A yes/no question whose "yes" says the shape or colour is absent: "is there not a ...", "is no ... present?"."""
    words = re.findall(r"[a-z]+", question.lower())
    return "not" in words or "no" in words


@dataclass(frozen=True)
class Question:
    """What an easy-VQA question asks. kind: "color" (what colour is it), "shape" (what shape), or
    "has_color" / "has_shape" (yes/no: is `value` there; `negated`: is it absent). `mention` is the other
    attribute the question names, if any: "what color is the circle?" mentions "circle"."""
    kind: str
    value: str | None = None
    mention: str | None = None
    negated: bool = False


def read_question(question: str, answer: str) -> Question:
    """The meaning of one of easy-VQA's template questions (any letter case), told by its words and its
    right answer: a colour answers a colour question, a shape a shape question, yes/no the others."""
    words = re.findall(r"[a-z]+", question.lower())
    shapes = [w for w in words if w in EASY_VQA_SHAPES]
    colors = [w for w in words if w in EASY_VQA_COLORS]
    if answer in EASY_VQA_COLORS:
        return Question("color", mention=shapes[0] if shapes else None)
    if answer in EASY_VQA_SHAPES:
        return Question("shape", mention=colors[0] if colors else None)
    if answer not in ("yes", "no") or len(shapes) + len(colors) != 1:
        raise ValueError(f"{question!r} ({answer!r}) is not one of easy-VQA's question templates")
    return Question("has_shape" if shapes else "has_color", (shapes or colors)[0], negated=is_negated(question))


def question_kind(q: Question) -> str:
    """The kind evaluate.py reports: "color", "shape", "yes/no color", "yes/no shape" or "yes/no negated"."""
    if q.kind in ("color", "shape"):
        return q.kind
    return "yes/no negated" if q.negated else f"yes/no {q.kind[4:]}"


# ---------------------------------------------------------------------------
# The phrasings. Slots: {c} colour noun, {p} picture noun, {o} the thing asked about ("shape", "object",
# "figure", or the shape a colour question names: "circle"; a shape question's colour goes before it:
# "red shape"), {s} a stance (STANCES: "do you think", "is it true that"), {x} the value a yes/no question
# asks about, {t} it as a thing ("a red shape", "a circle"), {n} the same without its article, {ts} in the
# plural ("red shapes", "circles").
# Yes/no templates are "has" (either attribute), "has_color" or "has_shape"; "not_..." are negated.
# ---------------------------------------------------------------------------

TRAIN = {
    "color": [
        "what color is the {o}?", "what is the color of the {o}?", "what {c} is the {o}?",
        "what is the {c} of the {o}?", "what {c} is the {o} in the {p}?", "which {c} is the {o}?",
        "what {c} does the {o} have?", "tell me the {c} of the {o}.", "the {o} is what {c}?",
        "name the {c} of the {o}.", "what {c} is it?", "what is the {o}'s {c}?", "{c} of the {o}?",
        "which {c} does the {o} in the {p} have?", "identify the {c} of the {o}.", "what {c} is this {o}?",
        "what {c} is the {o} in this {p}?", "can you tell me what {c} the {o} is?", "what {c} is shown?",
        "say the {c} of the {o}.", "describe the {c} of the {o}.", "{c}?", "what {c} is the {o} shown?",
        "the {c} of the {o}?", "what {c} do you think the {o} is?", "{o} {c}?", "{o}, what {c}?",
        "i need the {c} of the {o}.",
    ],
    "shape": [
        "what shape is in the image?", "what shape does the image contain?", "what shape is present?",
        "what is the {o}?", "what shape is in the {p}?", "what shape is the {o}?", "which shape is in the {p}?",
        "what shape does the {p} contain?", "what kind of shape is the {o}?", "what shape do you see?",
        "which shape is shown?", "name the shape in the {p}.", "tell me the shape of the {o}.",
        "what is the shape of the {o}?", "identify the shape.", "the {o} is what shape?",
        "what type of shape is in the {p}?", "what shape is this?", "which shape is the {o}?",
        "what shape is the {o} in the {p}?", "can you tell me what shape the {o} is?", "what shape is it?",
        "what is the {o} in the {p}?", "describe the shape.", "shape?", "the shape of the {o}?",
        "{o}, what shape?", "i need the shape of the {o}.", "what shape do you think the {o} is?",
    ],
    "has": [
        "is there {t}?", "is there {t} in the image?", "is {t} present?", "does the image contain {t}?",
        "is there {t} in the {p}?", "does the {p} contain {t}?", "does the {p} have {t}?",
        "does the {p} show {t}?", "do you see {t}?", "can you see {t}?", "is there {t} in this {p}?",
        "is {t} visible?", "is {t} shown in the {p}?", "does {t} appear in the {p}?", "are there any {ts}?",
        "{t} in the {p}?", "is it true that there is {t}?", "is {t} in the {p}?", "can you see {t} in the {p}?",
        "is there any {n}?", "you see {t}?", "i think there is {t}, right?", "do you think there is {t}?",
        "do you think the {p} shows {t}?", "{s} there is {t}?", "{s} the {p} shows {t}?", "{s} there is {t} in the {p}?",
    ],
    "has_color": ["is the {o} {x}?", "is it {x}?", "is the {c} {x}?", "is the {c} of the {o} {x}?",
                  "is there any {x} in the {p}?", "is the {o} colored {x}?", "is the {o} {x} in color?",
                  "is this {o} {x}?", "do you think the {o} is {x}?", "do you think it is {x}?",
                  "{s} the {o} is {x}?", "{s} it is {x}?", "does the {o} look {x}?", "the {o} is {x}, right?",
                  "is the {o} that you see {x}?",
                  "does the {o} have a {x} {c}?", "is {x} the {c} of the {o}?", "is its {c} {x}?",
                  "looking at the {p}, is the {o} {x}?"],
    "has_shape": ["is it {t}?", "is the {o} {t}?", "is this {t}?", "is the shape in the {p} {t}?",
                  "is the {o} shaped like {t}?", "do you think it is {t}?", "do you think the {o} is {t}?",
                  "{s} the {o} is {t}?", "{s} it is {t}?", "does the {o} look like {t}?", "the {o} is {t}, right?",
                  "is the {o} that you see {t}?", "does the {o} have the shape of {t}?",
                  "is its shape {t}?", "looking at the {p}, is it {t}?"],
    "not": [
        "is there not {t}?", "is there not {t} in the image?", "does the image not contain {t}?",
        "is no {n} present?", "is there no {n}?", "is there no {n} in the {p}?", "does the {p} not contain {t}?",
        "is there not {t} in the {p}?", "is it true that there is no {n}?", "is {t} not present?",
        "does the {p} not show {t}?", "are there no {ts}?", "do you not see {t}?", "is there not any {n}?",
        "can you not see {t}?", "i think there is no {n}, right?", "you see no {n}?", "do you think there is no {n}?",
        "{s} there is no {n}?", "{s} the {p} does not show {t}?", "{s} there is no {n} in the {p}?",
    ],
    "not_color": ["is the {o} not {x}?", "is it not {x}?", "is the {c} not {x}?", "is the {o} not colored {x}?",
                  "is this {o} not {x}?", "do you think the {o} is not {x}?",
                  "{s} the {o} is not {x}?", "{s} it is not {x}?", "does the {o} not look {x}?",
                  "the {o} is not {x}, right?",
                  "is the {c} of the {o} not {x}?"],
    "not_shape": ["is it not {t}?", "is the {o} not {t}?", "is this not {t}?", "do you think the {o} is not {t}?",
                  "{s} the {o} is not {t}?", "{s} it is not {t}?", "does the {o} not look like {t}?",
                  "the {o} is not {t}, right?"],
}

HELD_OUT = {
    "color": [
        "which {c} has the {o} got?", "in what {c} is the {o} drawn?", "what {c} would you say the {o} is?",
        "which {c} appears in the {p}?", "what {c} is the {o} painted?", "the {c} of the {o} is?",
        "could you say what {c} the {o} has?", "what {c} do you see in the {p}?",
    ],
    "shape": [
        "which shape can be seen in the {p}?", "what sort of shape is drawn here?", "what shape has been drawn?",
        "the {p} shows which shape?", "which shape appears in the {p}?", "what shape is depicted?",
        "could you say what shape the {o} has?", "what shape would you say the {o} is?",
    ],
    "has": [
        "is there {t} anywhere in the {p}?", "can {t} be seen in the {p}?", "has the {p} got {t}?",
        "do we see {t} here?", "does this {p} include {t}?", "is {t} drawn in the {p}?",
        "would you say there is {t}?", "would i find {t} in the {p}?",
    ],
    "has_color": ["is the {o} in the {p} {x}?", "would you say the {o} is {x}?", "is the {o} painted {x}?"],
    "has_shape": ["is the thing in the {p} {t}?", "would you call the {o} {t}?", "is the {o} drawn as {t}?"],
    "not": [
        "is there no {n} anywhere in the {p}?", "does the {p} have no {n}?", "would you say there is no {n}?",
        "is there no {n} to be seen?", "does this {p} not include {t}?", "is {t} not shown in the {p}?",
        "can {t} not be seen in the {p}?", "is {t} not drawn in the {p}?",
    ],
    "not_color": ["is the {o} in the {p} not {x}?", "would you say the {o} is not {x}?"],
    "not_shape": ["is the thing in the {p} not {t}?", "would you say the {o} is not {t}?"],
}

# What a yes/no question's {s} slot says before a statement ("{s} the shape is red?"): many ways of asking
# whether something holds, so that a clause the LM has never met does not read as a negation.
STANCES = ("do you think", "do you believe", "can you confirm", "tell me if", "tell me whether", "is it true that",
           "is it correct that", "am i right that", "do you agree that", "can you check if", "check whether",
           "let me know if", "i guess", "i suppose", "maybe", "i believe", "is it the case that", "do you reckon",
           "are you sure", "could it be that", "you think", "honestly,", "quick check:", "true or false:",
           "i am asking if", "is it right that", "do you feel", "are you certain", "did you notice that",
           "in your view,", "from what you see,", "at a glance,", "what do you think,",
           "can you tell if", "please confirm", "right or wrong:")

# Openings and closings said around a question, now and then.
OPENINGS = {"train": ["please, ", "please ", "can you tell me, ", "tell me: ", "hey, ", "quick question: ", "hi! ",
                      "ok, ", "i'd like to know: ", "could you tell me: ", "look at the image. ", "now, ",
                      "i want to know, ", "here is my question: ", "hello. ", "well, ", "answer this: "],
            "held_out": ["excuse me, ", "so, ", "one question: ", "i wonder, ", "would you tell me: "]}
CLOSINGS = {"train": [" please", ", please", " thanks", " thank you", ", if possible", " in one word",
                       ", please answer", " for me"], "held_out": [" if you can", ", thanks a lot"]}

COLOR_NOUNS = ("color", "colour")
PICTURE_NOUNS = ("image", "picture", "photo")
THING_NOUNS = ("shape", "object", "figure")
# Contractions, each made half the time where it fits.
CONTRACTIONS = [(r"\bis there not\b", "isn't there"), (r"\bdoes the (\w+) not\b", r"doesn't the \1"),
                (r"\bwhat is\b", "what's"), (r"\bis not\b", "isn't"), (r"\bdoes not\b", "doesn't"),
                (r"\bdo not\b", "don't"), (r"\bthere is\b", "there's")]
PHRASINGS = {"train": TRAIN, "held_out": HELD_OUT}


def templates(q: Question, phrasings: str) -> list[str]:
    """The templates of `phrasings` ("train" or "held_out") that can ask `q`."""
    table = PHRASINGS[phrasings]
    if q.kind in ("color", "shape"):
        return table[q.kind]
    group = "not" if q.negated else "has"
    return table[group] + table[f"{group}_{q.kind[4:]}"]


def fill(template: str, q: Question, rng: random.Random) -> str:
    """A template with its slots filled for `q`, each synonym drawn by `rng`."""
    noun = rng.choice(THING_NOUNS)
    if q.kind == "color":
        thing = q.mention or noun
    elif q.kind == "shape":
        thing = f"{q.mention} {noun}" if q.mention else noun
    else:
        thing = noun
    named = q.value if q.kind == "has_shape" else f"{q.value} {noun}"  # "circle" or "red shape"
    stance = rng.choice(STANCES) if "{s}" in template else ""
    return template.format(c=rng.choice(COLOR_NOUNS), p=rng.choice(PICTURE_NOUNS), o=thing, x=q.value,
                           t=f"a {named}", n=named, ts=named + "s", s=stance)


def surface(text: str, rng: random.Random, phrasings: str) -> str:
    """Letter case, contractions, end punctuation and an opening or closing, drawn by `rng`."""
    for pattern, short in CONTRACTIONS:
        if rng.random() < 0.5:
            text = re.sub(pattern, short, text)
    end = text[-1] if text[-1] in "?." else ""
    text = text.rstrip("?.")
    if rng.random() < 0.15:
        text += rng.choice(CLOSINGS[phrasings])
    if rng.random() < 0.25:
        text = rng.choice(OPENINGS[phrasings]) + text
    text += rng.choice([end] * 6 + ["", " " + end, end * 2])
    style = rng.random()
    if style < 0.4:
        return text[:1].upper() + text[1:]
    if style < 0.5:
        return text.upper()
    if style < 0.55:
        return string.capwords(text)
    return text


def say(q: Question, rng: random.Random, phrasings: str = "train") -> str:
    """`q` asked in a phrasing of `phrasings` ("train" or "held_out") drawn by `rng`, with its surface forms."""
    return surface(fill(rng.choice(templates(q, phrasings)), q, rng), rng, phrasings)


def reword(question: str, answer: str, rng: random.Random, phrasings: str = "train", keep: float = 0.0) -> str:
    """easy-VQA's `question` asked again in a phrasing of `phrasings`; with probability `keep` in its own
    words instead, in its own lower case or capitalised."""
    if rng.random() < keep:
        return question.lower() if rng.random() < 0.5 else question[:1].upper() + question[1:].lower()
    return say(read_question(question, answer), rng, phrasings)


# ---------------------------------------------------------------------------
# Words from outside the questions: English prose for a from-scratch tokenizer to learn its pieces from,
# and filler words put into training questions now and then, so that the LM has seen those pieces and
# learns to read past a word it does not know (EDA's random insertion, Wei & Zou 2019)
# ---------------------------------------------------------------------------

# Words that would change what a question asks, never put in as filler.
MEANINGFUL = {"not", "no", "none", "never", "nothing", "nor", "neither", "without", "absent", "missing", "lack",
              "lacks", "cannot", "false", "true", "except", "isn", "doesn", "don", "aren", "yes", "any", "all",
              "which", "what", "is", "are", "does", "there", "color", "colour", "shape", "shapes", "object",
              "objects", "figure", "image", "picture", "photo", *EASY_VQA_COLORS, *EASY_VQA_SHAPES}


@functools.cache
def prose() -> list[str]:
    """Paragraphs of English prose that every Python has: the help topics of its own documentation
    (the standard library's pydoc_data, about 460 kB)."""
    from pydoc_data.topics import topics
    return [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.split()) >= 8]


def held_out_words() -> set[str]:
    """Every word of the held-out phrasings (templates, openings, closings): never put in as filler, so
    that training meets none of them through `insert_filler` either."""
    texts = [t for group in HELD_OUT.values() for t in group] + OPENINGS["held_out"] + CLOSINGS["held_out"]
    return {w for t in texts for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t))}


@functools.cache
def filler_words(n: int = 2000) -> list[str]:
    """The `n` commonest words of `prose()` that ask nothing (not in MEANINGFUL) and are no held-out
    phrasing's, three letters or more."""
    counts = {}
    for paragraph in prose():
        for word in re.findall(r"[a-z]{3,}", paragraph.lower()):
            counts[word] = counts.get(word, 0) + 1
    skip = MEANINGFUL | held_out_words()
    return [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in skip][:n]


def insert_filler(text: str, rng: random.Random, p: float = 0.2) -> str:
    """`text` with, with probability `p`, one or two filler words put in between its words."""
    if rng.random() >= p:
        return text
    words = text.split(" ")
    for _ in range(rng.choice((1, 1, 2))):
        words.insert(rng.randint(0, len(words)), rng.choice(filler_words()))
    return " ".join(words)
