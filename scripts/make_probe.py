"""Generate tuneforge's general-ability probe: short multiple-choice items over varied skills, every answer
computed here (arithmetic, dates, string operations, orderings) or read from the small tables below (geography,
animals, words), never typed by hand next to its question.

Each item: {"id", "subject", "skill", "question", "choices": [4 strings], "answer": index}. Deterministic (a
seeded random.Random per skill): running it twice writes the same bytes, and tests/test_forgetting.py checks that
the shipped file is what this script writes. Correct answers are spread evenly over the four positions within each
skill, so always picking one position scores 25%.

    python scripts/make_probe.py                  # writes src/tuneforge/assets/probes/general_mc.jsonl
    python scripts/make_probe.py --output x.jsonl
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
from pathlib import Path

SEED = 24
TARGET = Path(__file__).resolve().parent.parent / "src" / "tuneforge" / "assets" / "probes" / "general_mc.jsonl"

# -- tables (facts a reader can check at a glance) --------------------------------------------------------------------
# country | capital | continent (transcontinental countries and disputed or split capitals are left out)
GEOGRAPHY = [row.split("|") for row in """France|Paris|Europe Germany|Berlin|Europe Italy|Rome|Europe Spain|Madrid|Europe
Portugal|Lisbon|Europe Greece|Athens|Europe Norway|Oslo|Europe Sweden|Stockholm|Europe Poland|Warsaw|Europe
Ireland|Dublin|Europe Austria|Vienna|Europe Finland|Helsinki|Europe Denmark|Copenhagen|Europe Hungary|Budapest|Europe
Belgium|Brussels|Europe Japan|Tokyo|Asia China|Beijing|Asia Thailand|Bangkok|Asia Vietnam|Hanoi|Asia
Iran|Tehran|Asia Pakistan|Islamabad|Asia Philippines|Manila|Asia Egypt|Cairo|Africa Kenya|Nairobi|Africa
Nigeria|Abuja|Africa Ghana|Accra|Africa Morocco|Rabat|Africa Senegal|Dakar|Africa Canada|Ottawa|North_America
Mexico|Mexico_City|North_America Cuba|Havana|North_America Argentina|Buenos_Aires|South_America
Peru|Lima|South_America Chile|Santiago|South_America Venezuela|Caracas|South_America Australia|Canberra|Oceania
New_Zealand|Wellington|Oceania""".split()]
GEOGRAPHY = [[cell.replace("_", " ") for cell in row] for row in GEOGRAPHY]
CONTINENTS = ["Europe", "Asia", "Africa", "North America", "South America", "Oceania"]

# animal | legs | sound | young | home
ANIMALS = [row.split("|") for row in """dog|4|bark|puppy|kennel cat|4|meow|kitten|- cow|4|moo|calf|- horse|4|neigh|foal|stable
sheep|4|baa|lamb|- pig|4|oink|piglet|sty duck|2|quack|duckling|- hen|2|cluck|chick|coop spider|8|-|-|web
bee|6|buzz|-|hive ant|6|-|-|anthill bird|2|tweet|-|nest snake|0|hiss|-|- lion|4|roar|cub|- frog|4|croak|tadpole|-
owl|2|hoot|owlet|- goat|4|-|kid|- rabbit|4|-|-|burrow deer|4|-|fawn|- goose|2|honk|gosling|-
kangaroo|-|-|joey|- swan|2|-|cygnet|- fox|4|-|-|den""".split()]
# size tiers: any animal of a higher tier is much bigger than any of a lower one
SIZE_TIERS = [["ant", "bee", "fly"], ["mouse", "frog"], ["cat", "rabbit", "hen"], ["horse", "cow", "camel"],
              ["elephant", "whale"]]

# opposite pairs, grouped by meaning; distractors come from other groups only
ANTONYM_GROUPS = [
    ["big small", "tall short", "wide narrow", "thick thin"], ["hot cold", "warm cool"], ["fast slow"],
    ["happy sad", "laugh cry", "love hate"],
    ["up down", "above below", "inside outside", "top bottom", "left right", "arrive leave"],
    ["early late", "first last", "before after", "day night"],
    ["open closed", "full empty", "wet dry", "clean dirty", "awake asleep"],
    ["strong weak", "rich poor", "loud quiet", "cheap expensive", "safe dangerous", "true false"],
    ["push pull", "buy sell", "win lose", "remember forget"], ["north south", "east west"],
    ["black white"], ["king queen", "boy girl", "man woman"],
]
CATEGORIES = {
    "fruit": "apple banana grape pear mango strawberry pineapple watermelon fig papaya",
    "animal": "dog horse tiger rabbit elephant giraffe zebra monkey wolf camel",
    "colour": "red blue green yellow purple brown pink",
    "piece of furniture": "chair table sofa bed desk wardrobe bookshelf",
    "vehicle": "car bus train bicycle truck motorbike tractor",
    "tool": "hammer screwdriver wrench drill chisel shovel",
    "musical instrument": "piano guitar violin drum flute trumpet",
    "piece of clothing": "shirt jacket sock scarf coat trousers",
    "body part": "hand knee elbow nose ear shoulder",
    "metal": "iron zinc tin aluminium nickel",
    "planet": "Mars Venus Jupiter Saturn Neptune",
    "shape": "circle square triangle rectangle",
}
# singular plural three-wrong-plurals
PLURALS = [row.split() for row in """mouse mice mouses mices mousen|child children childs childes childrens
man men mans manes mens|woman women womans womanes womens|foot feet foots feets footes|tooth teeth tooths teeths toothes
goose geese gooses geeses goosen|person people persones peoplies personen|knife knives knifes knifs knive
leaf leaves leafen leafes leavs|wolf wolves wolfs wolfes wolve|city cities citys cityes citis
baby babies babys babyes babis|box boxes boxs boxen boxies|bus buses buss busies bus's|dish dishes dishs dishies dishen
fox foxes foxs foxen foxies|potato potatoes potatos potatoe potatoies|sheep sheep sheeps sheepes sheepen
tomato tomatoes tomatos tomatoe tomatoies""".replace("\n", "|").split("|")]
# base past third-person -ing
VERBS = [row.split() for row in """go went goes going|eat ate eats eating|see saw sees seeing|run ran runs running
swim swam swims swimming|write wrote writes writing|take took takes taking|give gave gives giving
come came comes coming|buy bought buys buying|think thought thinks thinking|bring brought brings bringing
sing sang sings singing|drink drank drinks drinking|fly flew flies flying|speak spoke speaks speaking
break broke breaks breaking|drive drove drives driving|teach taught teaches teaching|find found finds finding
walk walked walks walking|play played plays playing|jump jumped jumps jumping|try tried tries trying""".replace("\n", "|").split("|")]
SPELLING = ("because different beautiful tomorrow friendly library necessary separate calendar government knowledge "
            "restaurant business probably remember together question important yesterday children everything "
            "sometimes birthday chocolate elephant mountain umbrella vegetable adventure kitchen holiday difficult "
            "beginning interesting dangerous").split()
WORDS = ("cat dog sun tree book fish apple house water bread chair lamp river cloud green table plant stone "
         "window garden rabbit pencil orange summer winter purple candle basket monkey").split()
NAMES = "Ann Ben Cara Dan Eva Finn Gina Hugo Ivy Jack Kim Leo Mia Nora Omar Pia Raj Sara Tom Uma".split()
PLACES = "market park library beach museum zoo station bakery".split()
DAYS = list(calendar.day_name)
MONTHS = list(calendar.month_name)[1:]
ITEMS = "apples pears eggs stamps pencils candles cups books".split()
COLOURS = "red blue green yellow purple brown white black".split()
NONCE = "blicket zorb wug dax fep toma glim mipa".split()
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()


# -- helpers --------------------------------------------------------------------------------------------------------

def pick(rng: random.Random, pool, k: int, exclude=()) -> list:
    return rng.sample([x for x in dict.fromkeys(pool) if x not in exclude], k)


def numbers_near(rng: random.Random, answer: int, spread: list[int], minimum: int = 0) -> list[str]:
    """Three distinct wrong numbers near `answer` (answer + one of `spread`), none below `minimum`."""
    options = [answer + d for d in dict.fromkeys(spread) if d and answer + d >= minimum]
    return [str(v) for v in rng.sample(options, 3)]


# -- skills: each yields (question, correct, [3 wrong]) forever from its own seeded rng. A question with "{options}"
# lists the four choices in it (in the order they are scored), for items that cannot be answered without seeing them.

def arithmetic(rng):
    while True:
        a, b, kind = rng.randint(2, 60), rng.randint(2, 40), rng.randrange(4)
        if kind == 1:
            a, b = a + b, b
        elif kind > 1:
            a, b = rng.randint(2, 12), rng.randint(2, 10)
        q, r = [(f"What is {a} + {b}?", a + b), (f"What is {a} - {b}?", a - b), (f"What is {a} times {b}?", a * b),
                (f"What is {a * b} divided by {b}?", a)][kind]
        yield q, str(r), numbers_near(rng, r, [-10, -2, -1, 1, 2, 10], minimum=1)


def word_problems(rng):
    while True:
        name, item, a, b, kind = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(3, 15), rng.randint(2, 9), rng.randrange(4)
        q, r = [(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b),
                (f"{name} has {a + b} {item} and gives away {b}. How many {item} are left?", a),
                (f"{name} buys {b} bags with {a} {item} in each bag. How many {item} is that?", a * b),
                (f"{name} shares {a * b} {item} equally among {b} friends. How many does each friend get?", a)][kind]
        yield q, str(r), numbers_near(rng, r, [-3, -2, -1, 1, 2, 3, b, -b], minimum=1)


def number_comparison(rng):
    while True:
        values = rng.sample(range(10, 1000), 4)
        if rng.random() < 0.5:  # close values: the same hundreds digit
            hundreds = 100 * rng.randint(1, 9)
            values = [hundreds + v for v in rng.sample(range(100), 4)]
        word, best = rng.choice([("largest", max), ("smallest", min)])
        yield f"Which number is the {word}: {{options}}?", str(best(values)), [str(v) for v in values if v != best(values)]


def sequences(rng):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    while True:
        kind = rng.randrange(3)
        if kind == 0:
            step = rng.choice([2, 3, 4, 5, 10, -2, -3])
            start = rng.randint(1, 20) + (40 if step < 0 else 0)
            seq = [start + step * i for i in range(5)]
            wrong = numbers_near(rng, seq[4], [-step, step, 1, -1, 2 * step])
        elif kind == 1:
            start = rng.randint(1, 5)
            seq = [start * 2 ** i for i in range(5)]
            wrong = [str(seq[4] - start * 2), str(seq[3] + start * 2), str(seq[4] + 2)]
        else:
            step = rng.choice([1, 2, 3])
            start = rng.randrange(0, 26 - 4 * step)
            seq = [letters[start + step * i] for i in range(5)]
            wrong = pick(rng, letters[start:start + 5 * step + 3], 3, exclude=seq[3:])
        what = "letter" if kind == 2 else "number"
        yield f"Which {what} comes next: {', '.join(map(str, seq[:4]))}, ...?", str(seq[4]), wrong


def unit_conversion(rng):
    units = [("metres", "centimetres", 100), ("kilometres", "metres", 1000), ("kilograms", "grams", 1000),
             ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
             ("litres", "millilitres", 1000), ("years", "months", 12), ("dozen", "eggs", 12)]
    while True:
        (big, small, factor), n = rng.choice(units), rng.randint(2, 9)
        q = f"How many eggs are in {n} dozen?" if big == "dozen" else f"How many {small} are in {n} {big}?"
        wrong = {n * factor * 10, n * factor // 10 if factor >= 100 else n * factor + factor, n + factor,
                 n * (factor + (10 if factor >= 100 else 2)), n * factor - factor} - {n * factor}
        yield q, str(n * factor), [str(v) for v in rng.sample(sorted(wrong), 3)]


def calendar_dates(rng):
    while True:
        kind, i, m = rng.randrange(5), rng.randrange(7), rng.randrange(12)
        if kind < 2:
            n = rng.choice([1, 1, 2, 3, 4, 5])
            day = DAYS[(i + n) % 7] if kind == 0 else DAYS[(i - n) % 7]
            when = ["tomorrow", "yesterday"][kind] if n == 1 else [f"in {n} days", f"{n} days ago"][kind]
            yield (f"Today is {DAYS[i]}. What day {['will it be', 'was it'][kind]} {when}?", day,
                   pick(rng, DAYS, 3, exclude=[day, DAYS[i]]))
        elif kind == 2:
            after = rng.random() < 0.5
            month = MONTHS[(m + 1) % 12] if after else MONTHS[(m - 1) % 12]
            yield (f"Which month comes right {'after' if after else 'before'} {MONTHS[m]}?", month,
                   pick(rng, MONTHS, 3, exclude=[month, MONTHS[m]]))
        elif kind == 3:
            days = calendar.monthrange(2023, m + 1)[1]  # 2023: not a leap year
            yield (f"How many days are in {MONTHS[m]} (not in a leap year)?", str(days),
                   [str(d) for d in (28, 29, 30, 31) if d != days])
        else:
            yield f"Which is the {ORDINALS[m]} month of the year?", MONTHS[m], pick(rng, MONTHS, 3, exclude=[MONTHS[m]])


def _other_groups(*groups: int) -> list[str]:
    return [w for k, group in enumerate(ANTONYM_GROUPS) if k not in groups for pair in group for w in pair.split()]


def antonyms(rng):
    while True:
        g = rng.randrange(len(ANTONYM_GROUPS))
        a, b = rng.sample(rng.choice(ANTONYM_GROUPS[g]).split(), 2)
        yield f"What is the opposite of '{a}'?", b, pick(rng, _other_groups(g), 3)


def analogies(rng):
    young = [(r[0], r[3]) for r in ANIMALS if r[3] != "-"]
    while True:
        if rng.random() < 0.5:
            g1, g2 = rng.sample(range(len(ANTONYM_GROUPS)), 2)
            (a, b), (c, d) = (rng.choice(ANTONYM_GROUPS[g]).split() for g in (g1, g2))
            yield f"'{a}' is to '{b}' as '{c}' is to what?", d, pick(rng, _other_groups(g1, g2), 3)
        else:
            (a, b), (c, d) = rng.sample(young, 2)
            yield f"'{b}' is to '{a}' as '{d}' is to what?", c, pick(rng, [x for x, _ in young], 3, exclude=[a, c])


def categories(rng):
    while True:
        target, *others = rng.sample(list(CATEGORIES), 4)
        article = "an" if target[0] in "aeiou" else "a"
        yield (f"Which of these is {article} {target}: {{options}}?", rng.choice(CATEGORIES[target].split()),
               [rng.choice(CATEGORIES[o].split()) for o in others])


def grammar(rng):
    while True:
        if rng.random() < 0.5:
            singular, plural, *wrong = rng.choice(PLURALS)
            yield f"What is the plural of '{singular}'?", plural, wrong
        else:
            base, past, third, ing = rng.choice(VERBS)
            naive = base + ("d" if base.endswith("e") else "ed")
            yield f"What is the past tense of '{base}'?", past, [third, ing, naive if naive != past else "will " + base]


def spelling(rng):
    while True:
        word, wrong = rng.choice(SPELLING), []
        while len(wrong) < 3:
            i, kind = rng.randrange(1, len(word) - 1), rng.randrange(3)
            w = [word[:i] + word[i + 1] + word[i] + word[i + 2:], word[:i] + word[i + 1:], word[:i] + word[i] + word[i:]][kind]
            if w != word and w not in wrong:  # kinds: swap two neighbours, drop a letter, double a letter
                wrong.append(w)
        yield "Which word is spelled correctly: {options}?", word, wrong


def letters(rng):
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    while True:
        word, kind, i = rng.choice(WORDS), rng.randrange(5), rng.randrange(1, 25)
        if kind == 0:
            yield (f"How many letters are in the word '{word}'?", str(len(word)),
                   numbers_near(rng, len(word), [-2, -1, 1, 2], minimum=1))
        elif kind in (1, 2):
            letter = word[0] if kind == 1 else word[-1]
            yield (f"What is the {['first', 'last'][kind - 1]} letter of the word '{word}'?", letter,
                   pick(rng, alphabet, 3, exclude=[letter]))
        elif kind == 3:
            before = rng.random() < 0.5
            letter = alphabet[i - 1] if before else alphabet[i + 1]
            yield (f"Which letter comes right {'before' if before else 'after'} '{alphabet[i]}' in the alphabet?", letter,
                   pick(rng, alphabet[max(0, i - 4):i + 5], 3, exclude=[letter, alphabet[i]]))
        else:
            word, wrong = rng.choice([w for w in WORDS if len(w) <= 5]), set()
            while len(wrong) < 3:
                shuffled = "".join(rng.sample(word, len(word)))
                wrong |= {shuffled} - {word, word[::-1]}
            yield f"What is '{word}' written backwards?", word[::-1], sorted(wrong)


def geography(rng):
    while True:
        (country, capital, continent), kind = rng.choice(GEOGRAPHY), rng.randrange(3)
        if kind == 0:
            yield f"What is the capital of {country}?", capital, pick(rng, [r[1] for r in GEOGRAPHY], 3, exclude=[capital])
        elif kind == 1:
            yield (f"{capital} is the capital of which country?", country,
                   pick(rng, [r[0] for r in GEOGRAPHY], 3, exclude=[country]))
        else:
            yield f"On which continent is {country}?", continent, pick(rng, CONTINENTS, 3, exclude=[continent])


def animals(rng):
    while True:
        column = rng.randrange(1, 6)  # legs, sound, young, home; 5: size
        if column == 5:
            chosen = [rng.choice(SIZE_TIERS[t]) for t in sorted(rng.sample(range(len(SIZE_TIERS)), 4))]
            biggest = rng.random() < 0.5
            answer = chosen[-1] if biggest else chosen[0]
            yield (f"Which animal is the {'biggest' if biggest else 'smallest'}: {{options}}?", answer,
                   [c for c in chosen if c != answer])
            continue
        rows = [r for r in ANIMALS if r[column] != "-"]
        row = rng.choice(rows)
        answer, pool = {1: (row[1], ["0", "2", "4", "6", "8", "10"]), 2: (row[0], [r[0] for r in rows])}.get(
            column, (row[column], [r[column] for r in rows]))
        question = {1: f"How many legs does a {row[0]} have?", 2: f"Which animal says '{row[2]}'?",
                    3: f"What is a baby {row[0]} called?", 4: f"What is the home of a {row[0]} called?"}[column]
        yield question, answer, pick(rng, pool, 3, exclude=[answer])


def logic(rng):
    scales = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest")]
    while True:
        if rng.random() < 0.6:
            ranked = rng.sample(NAMES, 4)  # ranked[0] is the most; ranked[3] is not in the story
            comparative, top, bottom = rng.choice(scales)
            facts = [f"{ranked[0]} is {comparative} than {ranked[1]}.", f"{ranked[1]} is {comparative} than {ranked[2]}."]
            rng.shuffle(facts)
            most = rng.random() < 0.5
            answer = ranked[0] if most else ranked[2]
            yield f"{' '.join(facts)} Who is the {top if most else bottom}?", answer, [p for p in ranked if p != answer]
        else:
            thing, name, colour = rng.choice(NONCE), rng.choice(NAMES), rng.choice(COLOURS)
            yield (f"All {thing}s are {colour}. {name} has a {thing}. What colour is {name}'s {thing}?", colour,
                   pick(rng, COLOURS, 3, exclude=[colour]))


def reading(rng):
    while True:
        (name, friend), place, day, item = rng.sample(NAMES, 2), rng.choice(PLACES), rng.choice(DAYS), rng.choice(ITEMS)
        n, kind = rng.randint(2, 9), rng.randrange(5)
        story = f"On {day}, {name} went to the {place} with {friend} and bought {n} {item}."
        yield [(f"{story} Where did {name} go?", f"the {place}", [f"the {p}" for p in pick(rng, PLACES, 3, exclude=[place])]),
               (f"{story} On which day?", day, pick(rng, DAYS, 3, exclude=[day])),
               (f"{story} Who went with {name}?", friend, pick(rng, NAMES, 3, exclude=[name, friend])),
               (f"{story} How many {item} did {name} buy?", str(n), numbers_near(rng, n, [-2, -1, 1, 2, 3], minimum=1)),
               (f"{story} What did {name} buy?", item, pick(rng, ITEMS, 3, exclude=[item]))][kind]


# skill -> (subject, generator, how many items)
SKILLS = {
    "arithmetic": ("math", arithmetic, 36), "word_problems": ("math", word_problems, 32),
    "number_comparison": ("math", number_comparison, 32), "sequences": ("math", sequences, 32),
    "unit_conversion": ("math", unit_conversion, 32), "calendar": ("time", calendar_dates, 36),
    "antonyms": ("language", antonyms, 32), "analogies": ("language", analogies, 24),
    "categories": ("language", categories, 32), "grammar": ("language", grammar, 32),
    "spelling": ("language", spelling, 32), "letters": ("language", letters, 36),
    "geography": ("knowledge", geography, 40), "animals": ("knowledge", animals, 36),
    "logic": ("reasoning", logic, 36), "reading": ("reasoning", reading, 36),
}


def make_items(seed: int = SEED) -> list[dict]:
    items = []
    for skill, (subject, generator, count) in SKILLS.items():
        rng = random.Random(f"{seed}:{skill}")
        positions = [k % 4 for k in range(count)]  # the right answer equally often in each position
        rng.shuffle(positions)
        seen: set[tuple[str, str]] = set()
        source = generator(rng)
        for n, answer in enumerate(positions, 1):
            question, correct, wrong = next(source)
            while (question, correct) in seen:  # one item per question and answer
                question, correct, wrong = next(source)
            assert len(wrong) == 3 and len({correct, *wrong}) == 4, (skill, question, correct, wrong)
            seen.add((question, correct))
            wrong = list(wrong)
            rng.shuffle(wrong)
            choices = wrong[:answer] + [correct] + wrong[answer:]
            shown = ", ".join(choices[:3]) + " or " + choices[3]
            items.append({"id": f"{skill}-{n:02d}", "subject": subject, "skill": skill,
                          "question": question.replace("{options}", shown), "choices": choices, "answer": answer})
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=TARGET)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    items = make_items(args.seed)
    args.output.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    print(f"wrote {len(items)} items over {len(SKILLS)} skills to {args.output}")


if __name__ == "__main__":
    main()
