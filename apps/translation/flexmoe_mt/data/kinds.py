"""Phrase kinds of the embedded corpus: the underlying items and how a locale renders them.

An *item* is one language-independent thing (the number 305, the date 2031-03-05, "3 kilometres",
the territory ``JP``). Every locale renders the same item, so the English rendering and the target
rendering are true translations of each other. Kinds that render the same items belong to one
*family* (``cardinal`` and ``ordinal`` render the family ``number``), so a split by item id keeps
a test number out of training in every kind and every language.

Item ids are ``family:field:field...``; a family names which fields are the *parts* of an item
(the unit and the number of ``unit:length-kilometer:305``) and which fields form the combination
held out for the compositional test (a known unit with a number never seen with it).
"""

from __future__ import annotations

import calendar
import datetime
import functools
import itertools
import random
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import babel.localedata
from babel import Locale
from babel.dates import format_date, format_time, format_timedelta
from babel.lists import format_list
from babel.numbers import format_currency, format_percent
from babel.units import format_unit
from num2words import num2words


class Unrenderable(Exception):
    """A locale cannot render an item (missing CLDR entry, unit pattern falling back to its id)."""


@dataclass(frozen=True)
class Item:
    """One underlying item: ``id`` is shared by every language's rendering, ``value`` is what renderers take."""

    id: str
    value: Any


Renderer = Callable[[Any, str], str]


@dataclass(frozen=True)
class Family:
    """Kinds that render the same items.

    make_items(rng, count): up to ``count`` distinct items, in a deterministic order.
    part_fields: indices of the id fields that are an item's parts (empty: no compositional test).
    combination_fields: indices of the fields whose combination the compositional test holds out.
    """

    name: str
    kinds: dict[str, Renderer]
    make_items: Callable[[random.Random, int], list[Item]]
    part_fields: tuple[int, ...] = ()
    combination_fields: tuple[int, ...] = ()


# num2words spells some languages with other codes than CLDR.
NUM2WORDS_LANGUAGE = {"kk": "kz", "nb": "no", "sr_Latn": "sr"}
# Japanese years in Western numbering ("千九百九十九年"), not the era name num2words defaults to.
NUM2WORDS_OPTIONS = {("year", "ja"): {"era": False}}
# num2words 0.5.14 loops forever on some numbers in these languages: their number kinds are left out.
NUM2WORDS_HANGS = frozenset({"am"})


def clean_text(text: str) -> str:
    """NFC, invisible format marks (bidi marks) removed, every kind of space made a plain space.

    CLDR puts U+200F / U+061C bidi marks and narrow no-break spaces in its patterns; they are
    invisible, so a model would have to guess them. Control characters are rejected."""
    text = unicodedata.normalize("NFC", text)
    chars = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cf":
            continue
        if category == "Zs":
            char = " "
        elif category == "Cc":
            raise Unrenderable(f"control character {char!r} in {text!r}")
        chars.append(char)
    cleaned = " ".join("".join(chars).split())
    if not cleaned:
        raise Unrenderable(f"empty rendering {text!r}")
    return cleaned


def _fields(item_id: str) -> list[str]:
    return item_id.split(":")[1:]


def _spell(to: str) -> Renderer:
    def render(number: int, locale: str) -> str:
        if locale in NUM2WORDS_HANGS:
            raise Unrenderable(f"num2words does not terminate on some numbers in {locale}")
        try:
            return num2words(
                number, to=to, lang=NUM2WORDS_LANGUAGE.get(locale, locale), **NUM2WORDS_OPTIONS.get((to, locale), {})
            )
        # num2words' language modules fail in many ways on numbers they do not cover; each such
        # item is skipped for that language and counted (KindSupport.skipped).
        except (
            NotImplementedError,
            OverflowError,
            TypeError,
            ValueError,
            IndexError,
            KeyError,
            AttributeError,
        ) as error:
            raise Unrenderable(f"num2words {to} {number} in {locale}: {error!r}") from error

    return render


def _numbers(rng: random.Random, count: int) -> list[Item]:
    # Log-uniform magnitudes: small numbers (plural forms, irregular words) and large ones alike.
    values: set[int] = set()
    while len(values) < count:
        digits = rng.randint(1, 7)
        values.add(rng.randint(10 ** (digits - 1), 10**digits - 1))
    return [Item(f"number:{value}", value) for value in sorted(values)]


def _years(rng: random.Random, count: int) -> list[Item]:
    years = sorted(rng.sample(range(1000, 2100), min(count, 1100)))
    return [Item(f"year:{year}", year) for year in years]


def _grid(rng: random.Random, count: int, axes: list[list]) -> list[tuple]:
    """Up to ``count`` distinct cells of a product of axes, in order.

    Each axis is first cut to at most ``count // 4`` values, so that every value (a unit, a year)
    recurs in about four items: the compositional test needs parts seen in training apart from
    the held-out combination, at any corpus size."""
    cut = [sorted(rng.sample(axis, min(len(axis), max(2, count // 4)))) for axis in axes]
    cells = list(itertools.product(*cut))
    return [cells[i] for i in sorted(rng.sample(range(len(cells)), min(count, len(cells))))]


def _dates(rng: random.Random, count: int) -> list[Item]:
    cells = _grid(rng, count, [list(range(1950, 2050)), list(range(1, 13))])
    dates = [datetime.date(year, month, rng.randint(1, calendar.monthrange(year, month)[1])) for year, month in cells]
    return [Item(f"date:{d.year}:{d.month:02d}:{d.day:02d}", d) for d in dates]


def _date(length: str) -> Renderer:
    return lambda date, locale: format_date(date, length, locale=locale)


def _times(rng: random.Random, count: int) -> list[Item]:
    cells = _grid(rng, count, [list(range(24)), list(range(60))])
    return [Item(f"time:{h:02d}:{m:02d}", datetime.time(h, m)) for h, m in cells]


UNITS = (
    "length-kilometer", "length-meter", "length-centimeter", "length-mile", "length-foot",
    "mass-kilogram", "mass-gram", "mass-pound", "volume-liter", "volume-milliliter",
    "duration-hour", "duration-minute", "duration-second", "duration-day", "duration-week",
    "duration-month", "duration-year", "temperature-celsius", "speed-kilometer-per-hour",
    "area-square-meter", "area-hectare", "area-square-kilometer", "digital-gigabyte",
    "digital-megabyte", "energy-kilocalorie", "power-kilowatt",
)  # fmt: skip
CURRENCIES = (
    "USD", "EUR", "JPY", "GBP", "CNY", "INR", "RUB", "BRL", "CAD", "AUD", "CHF", "SEK", "NOK",
    "PLN", "TRY", "KRW", "MXN", "ZAR", "EGP", "THB", "ILS", "SAR", "UAH", "CZK", "HUF",
)  # fmt: skip
TIMEDELTA_SECONDS = {
    "year": 365 * 86400, "month": 30 * 86400, "week": 7 * 86400, "day": 86400,
    "hour": 3600, "minute": 60, "second": 1,
}  # fmt: skip


def _amounts() -> list[int]:
    """The numbers quantities are made of: every small one (all plural forms), some large ones."""
    return [*range(1, 101), *(int(1.5**k) for k in range(12, 29))]


def _quantities(family: str, names: tuple[str, ...]) -> Callable[[random.Random, int], list[Item]]:
    def make_items(rng: random.Random, count: int) -> list[Item]:
        return [
            Item(f"{family}:{name}:{amount}", (name, amount))
            for name, amount in _grid(rng, count, [list(names), _amounts()])
        ]

    return make_items


def _unit(value: tuple[str, int], locale: str) -> str:
    unit, amount = value
    text = format_unit(amount, unit, length="long", locale=locale)
    if unit in text:
        raise Unrenderable(f"{locale} has no long form of {unit}: {text!r}")  # babel printed the unit id
    return text


def _currency(value: tuple[str, int], locale: str) -> str:
    code, amount = value
    # format_type="name": the locale's pattern and plural currency name ("3 US dollars", "3 доллара США").
    return format_currency(amount, code, format="#,##0", currency_digits=False, format_type="name", locale=locale)


def _relative_items(rng: random.Random, count: int) -> list[Item]:
    cells = _grid(rng, count, [list(TIMEDELTA_SECONDS), _amounts(), ["future", "past"]])
    return [
        Item(f"relative:{unit}:{amount}:{direction}", (unit, amount, direction)) for unit, amount, direction in cells
    ]


def _relative(value: tuple[str, int, int], locale: str) -> str:
    unit, amount, direction = value
    sign = 1 if direction == "future" else -1
    delta = datetime.timedelta(seconds=sign * amount * TIMEDELTA_SECONDS[unit])
    # granularity=unit and a threshold no value reaches: always this unit ("14 days", not "2 weeks").
    return format_timedelta(delta, granularity=unit, threshold=1e9, add_direction=True, format="long", locale=locale)


@functools.cache
def standalone_names(locale: str) -> tuple[dict[int, str], dict[int, str]]:
    """``locale``'s stand-alone wide month names (1-12) and day names (0 = Monday).

    babel resolves the "stand-alone" context through a CLDR alias and stores the result in locale
    data shared with other locales, so after another locale was loaded it can return that locale's
    names ("3月" for French). Resolving each locale on an empty babel cache gives its own names.
    """
    babel.localedata._cache.clear()
    data = Locale.parse(locale)
    return dict(data.months["stand-alone"]["wide"]), dict(data.days["stand-alone"]["wide"])


def reset_locale_data() -> None:
    """Empty babel's locale-data cache (and the names read from it) so a build starts from the same state."""
    babel.localedata._cache.clear()
    standalone_names.cache_clear()


def _day_name(day: int, locale: str) -> str:
    return standalone_names(locale)[1][day]


def _month_name(month: int, locale: str) -> str:
    return standalone_names(locale)[0][month]


def _lists(rng: random.Random, count: int) -> list[Item]:
    orders = [days for size in (2, 3, 4) for days in itertools.permutations(range(7), size)]
    chosen = [orders[i] for i in sorted(rng.sample(range(len(orders)), min(count, len(orders))))]
    return [Item("list:" + "-".join(map(str, days)), days) for days in chosen]


def _list(days: tuple[int, ...], locale: str) -> str:
    return format_list([_day_name(day, locale) for day in days], locale=locale)


def _percents(rng: random.Random, count: int) -> list[Item]:
    per_mille = sorted(rng.sample(range(2001), min(count, 2001)))
    return [Item(f"percent:{Decimal(k) / 10}", Decimal(k) / 1000) for k in per_mille]


def _percent(value: Decimal, locale: str) -> str:
    # The locale's own pattern ("36 %", "%36"), keeping the one decimal the item has.
    return format_percent(value, locale=locale, decimal_quantization=False)


def _names(family: str, attribute: str) -> tuple[Callable[[random.Random, int], list[Item]], Renderer]:
    def make_items(rng: random.Random, count: int) -> list[Item]:
        codes = sorted(getattr(Locale("en"), attribute))
        chosen = sorted(rng.sample(codes, min(count, len(codes))))
        return [Item(f"{family}:{code}", code) for code in chosen]

    def render(code: str, locale: str) -> str:
        name = getattr(Locale.parse(locale), attribute).get(code)
        if not name:
            raise Unrenderable(f"{locale} has no {attribute} name for {code}")
        return name

    return make_items, render


def _closed(family: str, values: range) -> Callable[[random.Random, int], list[Item]]:
    return lambda rng, count: [Item(f"{family}:{value}", value) for value in values[:count]]


def _name_family(family: str, attribute: str) -> Family:
    make_items, render = _names(family, attribute)
    return Family(family, {family: render}, make_items)


FAMILIES: tuple[Family, ...] = (
    Family("number", {"cardinal": _spell("cardinal"), "ordinal": _spell("ordinal")}, _numbers),
    Family("year", {"year": _spell("year")}, _years),
    Family("date", {"date_full": _date("full"), "date_long": _date("long")}, _dates, (0, 1), (0, 1)),
    Family("time", {"time": lambda t, locale: format_time(t, "short", locale=locale)}, _times, (0, 1), (0, 1)),
    Family("unit", {"unit": _unit}, _quantities("unit", UNITS), (0, 1), (0, 1)),
    Family("relative", {"relative_time": _relative}, _relative_items, (0, 1, 2), (0, 1, 2)),
    Family("money", {"currency_amount": _currency}, _quantities("money", CURRENCIES), (0, 1), (0, 1)),
    Family("list", {"list": _list}, _lists),
    Family("percent", {"percent": _percent}, _percents),
    _name_family("territory", "territories"),
    _name_family("language", "languages"),
    _name_family("currency", "currencies"),
    _name_family("script", "scripts"),
    Family("month", {"month": _month_name}, _closed("month", range(1, 13))),
    Family("day", {"day": _day_name}, _closed("day", range(7))),
)  # fmt: skip

KINDS: tuple[str, ...] = tuple(kind for family in FAMILIES for kind in family.kinds)
FAMILY_OF_KIND: dict[str, Family] = {kind: family for family in FAMILIES for kind in family.kinds}
_FAMILY_BY_NAME = {family.name: family for family in FAMILIES}

# Digit phrases whose correct rendering may be exactly the English one ("35.5%", "15:05").
DIGIT_KINDS = frozenset({"time", "percent"})
# Names that often equal the English name ("Canada"); all of a locale's names doing so is a fallback.
NAME_KINDS = frozenset({"territory", "language", "currency", "script"})
# A kind that renders exactly like another kind of the same item is not implemented (num2words
# returns the cardinal for ordinals in some languages).
FALLBACK_KIND = {"ordinal": "cardinal"}


def render(kind: str, item: Item, locale: str) -> str:
    """``item`` as ``locale`` writes it, cleaned (see :func:`clean_text`); raises :class:`Unrenderable`."""
    try:
        text = FAMILY_OF_KIND[kind].kinds[kind](item.value, locale)
    except (KeyError, ValueError, IndexError) as error:  # babel's missing data / unknown unit errors
        raise Unrenderable(f"{kind} {item.id} in {locale}: {error}") from error
    return clean_text(text)


def parts_of(item_id: str) -> tuple[str, ...]:
    """The parts of an item (``("unit.0:length-kilometer", "unit.1:305")``); empty for atomic items
    and for ids no family generated (a user's TSV rows)."""
    family = _FAMILY_BY_NAME.get(item_id.split(":", 1)[0])
    if family is None:
        return ()
    fields = _fields(item_id)
    return tuple(f"{family.name}.{i}:{fields[i]}" for i in family.part_fields)


def combination_of(item_id: str) -> str:
    """The combination the compositional test holds out (``"date:2031:03"``); ``""`` if none."""
    family = _FAMILY_BY_NAME.get(item_id.split(":", 1)[0])
    if family is None or not family.combination_fields:
        return ""
    fields = _fields(item_id)
    return ":".join([family.name, *(fields[i] for i in family.combination_fields)])
