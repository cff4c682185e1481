"""The embedded default task: multiple-choice questions about world countries (no files, no network).

A small fact table (:data:`FACTS`: country, capital, continent, currency) is turned into a
:class:`~scalabl_pyro.data.TaskData`:

* **in-distribution** (``shifted=False``): for every country a *capital* question
  ("What is the capital of France?") and a *currency* question ("What is the currency of France?");
* **shifted / OOD** (``shifted=True``, split ``"test"`` only): other question types about the same
  held-out test countries: reverse lookup ("Which country has Paris as its capital?", country choices)
  and continent ("On which continent is France?", continent choices).

Countries (entities) are split into train and test by ``seed``: no test country appears in any train
question, and the distractors of a question are drawn from the countries of its own split only.
Everything is deterministic in ``seed``.

Example::

    from scalabl_pyro.tasks import country_task

    train = country_task("train", seed=0)                  # capital + currency questions
    test = country_task("test", seed=0)                    # same question types, held-out countries
    ood = country_task("test", seed=0, shifted=True)       # reverse-capital + continent questions
    print(len(train), len(test), len(ood), train.num_classes)
    print(train[0].prompt)
"""
from __future__ import annotations

import random
from typing import NamedTuple

from .data import LETTERS, Example, TaskData, letter_prompt, qa_context

__all__ = ["CountryFact", "FACTS", "CONTINENTS", "country_task"]


class CountryFact(NamedTuple):
    """One row of the fact table."""

    country: str
    capital: str
    continent: str
    currency: str


#: The continents used by the continent questions.
CONTINENTS: tuple[str, ...] = ("Africa", "Asia", "Europe", "North America", "Oceania", "South America")

# Countries whose capital, continent or currency is disputed, recently changed or commonly confused are
# left out on purpose (e.g. Bolivia, South Africa, Russia, Turkey, Indonesia, Tanzania, Zimbabwe,
# Bulgaria, Croatia, Kazakhstan, Sri Lanka, Israel, Yemen, Sudan, El Salvador, Panama, microstates whose
# capital has the country's name).
_RAW: tuple[tuple[str, str, str, str], ...] = (
    # Europe
    ("Albania", "Tirana", "Europe", "Albanian lek"),
    ("Andorra", "Andorra la Vella", "Europe", "euro"),
    ("Austria", "Vienna", "Europe", "euro"),
    ("Belarus", "Minsk", "Europe", "Belarusian ruble"),
    ("Belgium", "Brussels", "Europe", "euro"),
    ("Bosnia and Herzegovina", "Sarajevo", "Europe", "Bosnia and Herzegovina convertible mark"),
    ("Czech Republic", "Prague", "Europe", "Czech koruna"),
    ("Denmark", "Copenhagen", "Europe", "Danish krone"),
    ("Estonia", "Tallinn", "Europe", "euro"),
    ("Finland", "Helsinki", "Europe", "euro"),
    ("France", "Paris", "Europe", "euro"),
    ("Germany", "Berlin", "Europe", "euro"),
    ("Greece", "Athens", "Europe", "euro"),
    ("Hungary", "Budapest", "Europe", "Hungarian forint"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic krona"),
    ("Ireland", "Dublin", "Europe", "euro"),
    ("Italy", "Rome", "Europe", "euro"),
    ("Latvia", "Riga", "Europe", "euro"),
    ("Liechtenstein", "Vaduz", "Europe", "Swiss franc"),
    ("Lithuania", "Vilnius", "Europe", "euro"),
    ("Malta", "Valletta", "Europe", "euro"),
    ("Moldova", "Chisinau", "Europe", "Moldovan leu"),
    ("Montenegro", "Podgorica", "Europe", "euro"),
    ("Netherlands", "Amsterdam", "Europe", "euro"),
    ("North Macedonia", "Skopje", "Europe", "Macedonian denar"),
    ("Norway", "Oslo", "Europe", "Norwegian krone"),
    ("Poland", "Warsaw", "Europe", "Polish zloty"),
    ("Portugal", "Lisbon", "Europe", "euro"),
    ("Romania", "Bucharest", "Europe", "Romanian leu"),
    ("Serbia", "Belgrade", "Europe", "Serbian dinar"),
    ("Slovakia", "Bratislava", "Europe", "euro"),
    ("Slovenia", "Ljubljana", "Europe", "euro"),
    ("Spain", "Madrid", "Europe", "euro"),
    ("Sweden", "Stockholm", "Europe", "Swedish krona"),
    ("Switzerland", "Bern", "Europe", "Swiss franc"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian hryvnia"),
    ("United Kingdom", "London", "Europe", "pound sterling"),
    # Asia
    ("Afghanistan", "Kabul", "Asia", "Afghan afghani"),
    ("Bahrain", "Manama", "Asia", "Bahraini dinar"),
    ("Bangladesh", "Dhaka", "Asia", "Bangladeshi taka"),
    ("Bhutan", "Thimphu", "Asia", "Bhutanese ngultrum"),
    ("Brunei", "Bandar Seri Begawan", "Asia", "Brunei dollar"),
    ("Cambodia", "Phnom Penh", "Asia", "Cambodian riel"),
    ("China", "Beijing", "Asia", "Chinese yuan"),
    ("India", "New Delhi", "Asia", "Indian rupee"),
    ("Iran", "Tehran", "Asia", "Iranian rial"),
    ("Iraq", "Baghdad", "Asia", "Iraqi dinar"),
    ("Japan", "Tokyo", "Asia", "Japanese yen"),
    ("Jordan", "Amman", "Asia", "Jordanian dinar"),
    ("Kuwait", "Kuwait City", "Asia", "Kuwaiti dinar"),
    ("Kyrgyzstan", "Bishkek", "Asia", "Kyrgyzstani som"),
    ("Laos", "Vientiane", "Asia", "Lao kip"),
    ("Lebanon", "Beirut", "Asia", "Lebanese pound"),
    ("Maldives", "Male", "Asia", "Maldivian rufiyaa"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian tugrik"),
    ("Myanmar", "Naypyidaw", "Asia", "Burmese kyat"),
    ("Nepal", "Kathmandu", "Asia", "Nepalese rupee"),
    ("North Korea", "Pyongyang", "Asia", "North Korean won"),
    ("Oman", "Muscat", "Asia", "Omani rial"),
    ("Pakistan", "Islamabad", "Asia", "Pakistani rupee"),
    ("Philippines", "Manila", "Asia", "Philippine peso"),
    ("Qatar", "Doha", "Asia", "Qatari riyal"),
    ("Saudi Arabia", "Riyadh", "Asia", "Saudi riyal"),
    ("South Korea", "Seoul", "Asia", "South Korean won"),
    ("Syria", "Damascus", "Asia", "Syrian pound"),
    ("Tajikistan", "Dushanbe", "Asia", "Tajikistani somoni"),
    ("Thailand", "Bangkok", "Asia", "Thai baht"),
    ("Turkmenistan", "Ashgabat", "Asia", "Turkmenistani manat"),
    ("United Arab Emirates", "Abu Dhabi", "Asia", "UAE dirham"),
    ("Uzbekistan", "Tashkent", "Asia", "Uzbekistani som"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese dong"),
    # Africa
    ("Algeria", "Algiers", "Africa", "Algerian dinar"),
    ("Angola", "Luanda", "Africa", "Angolan kwanza"),
    ("Botswana", "Gaborone", "Africa", "Botswana pula"),
    ("Burkina Faso", "Ouagadougou", "Africa", "West African CFA franc"),
    ("Cameroon", "Yaounde", "Africa", "Central African CFA franc"),
    ("Cape Verde", "Praia", "Africa", "Cape Verdean escudo"),
    ("Central African Republic", "Bangui", "Africa", "Central African CFA franc"),
    ("Chad", "N'Djamena", "Africa", "Central African CFA franc"),
    ("Comoros", "Moroni", "Africa", "Comorian franc"),
    ("Democratic Republic of the Congo", "Kinshasa", "Africa", "Congolese franc"),
    ("Republic of the Congo", "Brazzaville", "Africa", "Central African CFA franc"),
    ("Egypt", "Cairo", "Africa", "Egyptian pound"),
    ("Eritrea", "Asmara", "Africa", "Eritrean nakfa"),
    ("Ethiopia", "Addis Ababa", "Africa", "Ethiopian birr"),
    ("Gabon", "Libreville", "Africa", "Central African CFA franc"),
    ("Gambia", "Banjul", "Africa", "Gambian dalasi"),
    ("Ghana", "Accra", "Africa", "Ghanaian cedi"),
    ("Guinea", "Conakry", "Africa", "Guinean franc"),
    ("Guinea-Bissau", "Bissau", "Africa", "West African CFA franc"),
    ("Kenya", "Nairobi", "Africa", "Kenyan shilling"),
    ("Lesotho", "Maseru", "Africa", "Lesotho loti"),
    ("Liberia", "Monrovia", "Africa", "Liberian dollar"),
    ("Libya", "Tripoli", "Africa", "Libyan dinar"),
    ("Madagascar", "Antananarivo", "Africa", "Malagasy ariary"),
    ("Malawi", "Lilongwe", "Africa", "Malawian kwacha"),
    ("Mali", "Bamako", "Africa", "West African CFA franc"),
    ("Mauritania", "Nouakchott", "Africa", "Mauritanian ouguiya"),
    ("Mauritius", "Port Louis", "Africa", "Mauritian rupee"),
    ("Morocco", "Rabat", "Africa", "Moroccan dirham"),
    ("Mozambique", "Maputo", "Africa", "Mozambican metical"),
    ("Namibia", "Windhoek", "Africa", "Namibian dollar"),
    ("Niger", "Niamey", "Africa", "West African CFA franc"),
    ("Nigeria", "Abuja", "Africa", "Nigerian naira"),
    ("Rwanda", "Kigali", "Africa", "Rwandan franc"),
    ("Sao Tome and Principe", "Sao Tome", "Africa", "Sao Tome and Principe dobra"),
    ("Senegal", "Dakar", "Africa", "West African CFA franc"),
    ("Seychelles", "Victoria", "Africa", "Seychellois rupee"),
    ("Sierra Leone", "Freetown", "Africa", "Sierra Leonean leone"),
    ("Somalia", "Mogadishu", "Africa", "Somali shilling"),
    ("South Sudan", "Juba", "Africa", "South Sudanese pound"),
    ("Togo", "Lome", "Africa", "West African CFA franc"),
    ("Tunisia", "Tunis", "Africa", "Tunisian dinar"),
    ("Uganda", "Kampala", "Africa", "Ugandan shilling"),
    ("Zambia", "Lusaka", "Africa", "Zambian kwacha"),
    # North America (incl. Central America and the Caribbean)
    ("Canada", "Ottawa", "North America", "Canadian dollar"),
    ("United States", "Washington, D.C.", "North America", "United States dollar"),
    ("Mexico", "Mexico City", "North America", "Mexican peso"),
    ("Guatemala", "Guatemala City", "North America", "Guatemalan quetzal"),
    ("Belize", "Belmopan", "North America", "Belize dollar"),
    ("Honduras", "Tegucigalpa", "North America", "Honduran lempira"),
    ("Nicaragua", "Managua", "North America", "Nicaraguan cordoba"),
    ("Costa Rica", "San Jose", "North America", "Costa Rican colon"),
    ("Cuba", "Havana", "North America", "Cuban peso"),
    ("Jamaica", "Kingston", "North America", "Jamaican dollar"),
    ("Haiti", "Port-au-Prince", "North America", "Haitian gourde"),
    ("Dominican Republic", "Santo Domingo", "North America", "Dominican peso"),
    ("Bahamas", "Nassau", "North America", "Bahamian dollar"),
    ("Barbados", "Bridgetown", "North America", "Barbadian dollar"),
    ("Saint Lucia", "Castries", "North America", "East Caribbean dollar"),
    ("Grenada", "St. George's", "North America", "East Caribbean dollar"),
    ("Dominica", "Roseau", "North America", "East Caribbean dollar"),
    ("Antigua and Barbuda", "St. John's", "North America", "East Caribbean dollar"),
    ("Saint Vincent and the Grenadines", "Kingstown", "North America", "East Caribbean dollar"),
    ("Saint Kitts and Nevis", "Basseterre", "North America", "East Caribbean dollar"),
    # South America
    ("Argentina", "Buenos Aires", "South America", "Argentine peso"),
    ("Brazil", "Brasilia", "South America", "Brazilian real"),
    ("Chile", "Santiago", "South America", "Chilean peso"),
    ("Colombia", "Bogota", "South America", "Colombian peso"),
    ("Ecuador", "Quito", "South America", "United States dollar"),
    ("Guyana", "Georgetown", "South America", "Guyanese dollar"),
    ("Paraguay", "Asuncion", "South America", "Paraguayan guarani"),
    ("Peru", "Lima", "South America", "Peruvian sol"),
    ("Suriname", "Paramaribo", "South America", "Surinamese dollar"),
    ("Uruguay", "Montevideo", "South America", "Uruguayan peso"),
    ("Venezuela", "Caracas", "South America", "Venezuelan bolivar"),
    # Oceania
    ("Australia", "Canberra", "Oceania", "Australian dollar"),
    ("New Zealand", "Wellington", "Oceania", "New Zealand dollar"),
    ("Fiji", "Suva", "Oceania", "Fijian dollar"),
    ("Papua New Guinea", "Port Moresby", "Oceania", "Papua New Guinean kina"),
    ("Samoa", "Apia", "Oceania", "Samoan tala"),
    ("Tonga", "Nuku'alofa", "Oceania", "Tongan pa'anga"),
    ("Vanuatu", "Port Vila", "Oceania", "Vanuatu vatu"),
    ("Solomon Islands", "Honiara", "Oceania", "Solomon Islands dollar"),
    ("Marshall Islands", "Majuro", "Oceania", "United States dollar"),
    ("Federated States of Micronesia", "Palikir", "Oceania", "United States dollar"),
)

#: The fact table: one :class:`CountryFact` per country (unique countries and capitals).
FACTS: tuple[CountryFact, ...] = tuple(CountryFact(*row) for row in _RAW)

# Names that read with "the" inside a sentence ("the capital of the United Kingdom").
_WITH_THE = frozenset({
    "Bahamas", "Central African Republic", "Comoros", "Czech Republic", "Democratic Republic of the Congo",
    "Dominican Republic", "Federated States of Micronesia", "Gambia", "Maldives", "Marshall Islands",
    "Netherlands", "Philippines", "Republic of the Congo", "Seychelles", "Solomon Islands",
    "United Arab Emirates", "United Kingdom", "United States",
})


def _in_sentence(country: str) -> str:
    return f"the {country}" if country in _WITH_THE else country


def _mc_example(qid: str, question: str, answer: str, pool: set[str], *, seed: int, num_choices: int,
                label_words: tuple[str, ...]) -> Example:
    """A question with the answer at a seeded random position among seeded distractors from ``pool``."""
    rng = random.Random(f"countries:{seed}:{qid}")  # str seeds are hashed with SHA-512: stable across runs
    candidates = sorted(v for v in pool if v != answer)
    distractors = rng.sample(candidates, num_choices - 1)
    pos = rng.randrange(num_choices)
    choices = tuple(distractors[:pos] + [answer] + distractors[pos:])
    return Example(id=qid, label=pos, choices=choices,
                   prompt=letter_prompt(question, choices, label_words=label_words),
                   context=qa_context(question), continuations=tuple(" " + c for c in choices))


def _split_countries(seed: int, test_fraction: float) -> tuple[list[CountryFact], list[CountryFact]]:
    names = sorted(f.country for f in FACTS)
    random.Random(f"countries-split:{seed}").shuffle(names)
    n_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    test_names = set(names[:n_test])
    train = [f for f in FACTS if f.country not in test_names]
    test = [f for f in FACTS if f.country in test_names]
    return train, test


def country_task(split: str = "train", *, seed: int = 0, shifted: bool = False, num_choices: int = 4,
                 test_fraction: float = 0.5, distractors: str = "continent") -> TaskData:
    """The embedded countries task (see the module docstring).

    :param split: ``"train"`` or ``"test"``; the two hold disjoint countries.
    :param seed: seeds the country split, the distractors and the answer positions.
    :param shifted: the OOD variant (reverse-capital and continent questions); ``split="test"`` only.
    :param num_choices: choices per question, 2 to 6 (continent questions have 6 continents to draw from).
    :param test_fraction: fraction of countries held out for ``"test"``. The default 0.5 holds out 78 countries (156
        test questions); 0.3 left 94, too few for a 15-bin ECE, whose sampling noise grows as predictions spread
        over more bins.
    :param distractors: ``"continent"`` (default): capital/currency distractors come from countries on the
        answer's continent (in the same split) when there are enough, which makes the questions test knowledge
        rather than continent cues; ``"random"``: from any country of the split.
    :returns: :class:`~scalabl_pyro.data.TaskData` named ``"countries"`` or ``"countries_shifted"``,
        with label words ``("A", "B", ...)``; ids like ``"capital:France"``, ``"currency:France"``,
        ``"capital_of:Paris"``, ``"continent:France"``.

    Example::

        train = country_task("train", seed=0)
        test = country_task("test", seed=0)            # held-out countries, same question types
        ood = country_task("test", seed=0, shifted=True)
        print(train[0].id, train[0].prompt, train[0].label)
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: the countries task has splits 'train' and 'test'")
    if shifted and split != "test":
        raise ValueError(f"split={split!r} with shifted=True: the shifted (OOD) variant exists only for the "
                         f"held-out countries, use country_task('test', shifted=True); train on "
                         f"country_task('train') instead")
    if isinstance(num_choices, bool) or not isinstance(num_choices, int) or not 2 <= num_choices <= len(CONTINENTS):
        raise ValueError(f"num_choices={num_choices!r} must be an integer from 2 to {len(CONTINENTS)} "
                         f"(continent questions draw from {len(CONTINENTS)} continents)")
    if distractors not in ("continent", "random"):
        raise ValueError(f"distractors={distractors!r}; allowed: 'continent', 'random'")
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be strictly between 0 and 1 (e.g. 0.5)")

    train, test = _split_countries(seed, test_fraction)
    facts = test if split == "test" else train
    label_words = LETTERS[:num_choices]
    if shifted:
        kinds = {"countries": {f.country for f in facts}, "continents": set(CONTINENTS)}
    else:
        kinds = {"capitals": {f.capital for f in facts}, "currencies": {f.currency for f in facts}}
    for kind, pool in kinds.items():
        if len(pool) < num_choices:
            raise ValueError(f"the {split} split has only {len(pool)} distinct {kind} for num_choices={num_choices}; "
                             f"use fewer choices or a test_fraction nearer 0.5 (got {test_fraction})")

    def mc(qid: str, question: str, answer: str, pool: set[str]) -> Example:
        return _mc_example(qid, question, answer, pool, seed=seed, num_choices=num_choices, label_words=label_words)

    def local(attr: str, f: CountryFact, pool: set[str]) -> set[str]:
        if distractors == "random":
            return pool
        near = {getattr(g, attr) for g in facts if g.continent == f.continent}
        return near if len(near - {getattr(f, attr)}) >= num_choices - 1 else pool

    examples: list[Example] = []
    for f in facts:
        c = _in_sentence(f.country)
        if shifted:
            examples.append(mc(f"capital_of:{f.capital}", f"Which country has {f.capital} as its capital?",
                               f.country, kinds["countries"]))
            examples.append(mc(f"continent:{f.country}", f"On which continent is {c}?", f.continent,
                               kinds["continents"]))
        else:
            examples.append(mc(f"capital:{f.country}", f"What is the capital of {c}?", f.capital,
                               local("capital", f, kinds["capitals"])))
            examples.append(mc(f"currency:{f.country}", f"What is the currency of {c}?", f.currency,
                               local("currency", f, kinds["currencies"])))
    note = (f"embedded fact table: {len(FACTS)} countries, {len(train)} train / {len(test)} test countries "
            f"(seed {seed}, test_fraction {test_fraction}); test countries never appear in train questions; "
            f"distractors come from the same split's countries"
            + (" on the answer's continent where possible" if distractors == "continent" and not shifted else ""))
    if shifted:
        note += "; shifted (OOD) question types: reverse capital lookup and continent"
    return TaskData("countries_shifted" if shifted else "countries", split, tuple(examples), label_words, note=note)
