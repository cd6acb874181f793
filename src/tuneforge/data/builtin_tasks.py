"""``builtin:tasks``: a small instruction dataset generated here, deterministic by seed.

Each task type draws an input, renders it with one of several instruction phrasings and
gives the exact short answer. A few task types (``HELD_OUT_TASKS``) never appear in train:
they measure whether what was learned carries over to related but unseen instructions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.data.conversation import Example, Message
from tuneforge.errors import ConfigError

WORDS = (
    "apple anchor basket beach bottle bridge butter button camera candle carpet castle chair "
    "cheese circle cloud coffee copper cotton desert dinner doctor dragon engine forest garden "
    "guitar hammer harbor helmet island jacket jungle kettle kitchen ladder lemon letter marble "
    "market meadow mirror monkey motor needle number ocean orange paper parrot pencil pepper "
    "pillow planet pocket potato rabbit river rocket saddle silver spider spoon summer sunset "
    "table ticket tomato tower travel tunnel velvet village violin wagon window winter wizard "
    "yellow bamboo blanket canvas cookie dollar feather finger flower frozen ginger honey "
    "insect lantern magnet mountain noodle office pirate puzzle shadow sister stone sugar "
    "thunder turtle wallet water"
).split()
NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Laura Maria Nora Oscar Paul Rosa "
    "Sam Tina Victor Wendy Oliver Sophie Lucas Hannah Daniel Chloe Martin Julia Peter Anna"
).split()
ANIMALS = (
    "dog cat horse rabbit tiger lion sheep goat mouse zebra camel eagle whale snake bear wolf "
    "fox deer duck goose frog owl shark monkey donkey turtle parrot hamster otter"
).split()
FRUITS = (
    "apple banana cherry grape lemon mango orange peach pear plum kiwi melon apricot lime "
    "papaya coconut fig guava raspberry strawberry blueberry pineapple watermelon"
).split()
THINGS = "movie book phone hotel meal laptop song game jacket chair camera service".split()
PLACES = "market library station park museum beach office bakery harbor garden school".split()
DOMAINS = "example.com mail.org company.net school.edu shop.io".split()
POSITIVE = ("I really love this {thing}.", "The {thing} was wonderful.", "What a great {thing}!",
            "This {thing} made me so happy.", "Best {thing} I have ever had.")
NEGATIVE = ("I really hate this {thing}.", "The {thing} was terrible.", "What an awful {thing}!",
            "This {thing} made me so angry.", "Worst {thing} I have ever had.")


def sentence(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    """A space-separated sequence of distinct lower-case words."""
    return " ".join(rng.sample(WORDS, rng.randint(lo, hi)))


def make_upper(rng):
    w = rng.choice(WORDS)
    return {"word": w}, w.upper()


def make_lower(rng):
    w = rng.choice(WORDS).upper()
    return {"word": w}, w.lower()


def make_capitalize(rng):
    w = rng.choice(WORDS)
    return {"word": w}, w.capitalize()


def make_first_letter(rng):
    w = rng.choice(WORDS)
    return {"word": w}, w[0]


def make_last_letter(rng):
    w = rng.choice(WORDS)
    return {"word": w}, w[-1]


def make_first_word(rng):
    s = sentence(rng)
    return {"sentence": s}, s.split()[0]


def make_last_word(rng):
    s = sentence(rng)
    return {"sentence": s}, s.split()[-1]


def make_count_words(rng):
    s = sentence(rng, 2, 5)
    return {"sentence": s}, str(len(s.split()))


def make_repeat_word(rng):
    w, n = rng.choice(WORDS), rng.randint(2, 3)
    return {"word": w, "n": n}, " ".join([w] * n)


def make_sort_words(rng):
    words = rng.sample(WORDS, 2)
    return {"words": ", ".join(words)}, ", ".join(sorted(words))


def make_join_hyphen(rng):
    words = rng.sample(WORDS, rng.randint(2, 4))
    return {"words": " ".join(words)}, "-".join(words)


def make_add(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return {"a": a, "b": b}, str(a + b)


def make_sub(rng):
    a = rng.randint(2, 20)
    b = rng.randint(1, min(a - 1, 9))
    return {"a": a, "b": b}, str(a - b)


def make_mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    return {"a": a, "b": b}, str(a * b)


def make_larger(rng):
    a, b = rng.sample(range(1, 1000), 2)
    return {"a": a, "b": b}, str(max(a, b))


def make_smaller(rng):
    a, b = rng.sample(range(1, 1000), 2)
    return {"a": a, "b": b}, str(min(a, b))


def make_even_odd(rng):
    n = rng.randint(1, 999)
    return {"n": n}, "even" if n % 2 == 0 else "odd"


def make_km_to_m(rng):
    n = rng.randint(1, 99)
    return {"n": n}, str(n * 1000)


def make_kg_to_g(rng):
    n = rng.randint(1, 99)
    return {"n": n}, str(n * 1000)


def make_m_to_cm(rng):
    n = rng.randint(1, 99)
    return {"n": n, "unit": rng.choice(("m", "meters"))}, str(n * 100)


def make_liters_to_ml(rng):
    n = rng.randint(1, 99)
    return {"n": n, "unit": rng.choice(("L", "liters"))}, str(n * 1000)


def make_extract_email(rng):
    name = rng.choice(NAMES)
    email = f"{name.lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    text = rng.choice(("You can reach {name} at {email} any time.", "Send the report to {email} by Friday.",
                       "My email is {email}, thanks.", "Contact {email} if {name} is away."))
    return {"text": text.format(name=name, email=email)}, email


def make_extract_number(rng):
    n, thing = rng.randint(2, 500), rng.choice(THINGS)
    text = rng.choice(("The shop sold {n} {thing}s today.", "We counted {n} {thing}s in the room.",
                       "There are {n} {thing}s on the list.", "She ordered {n} {thing}s last week."))
    return {"text": text.format(n=n, thing=thing)}, str(n)


def make_extract_name(rng):
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    text = rng.choice(("Yesterday {name} walked to the {place}.", "At the {place} we met {name}.",
                       "The {place} was closed, so {name} went home.", "I saw {name} near the {place}."))
    return {"text": text.format(name=name, place=place)}, name


def make_to_json(rng):
    name, age = rng.choice(NAMES), rng.randint(18, 90)
    return {"name": name, "age": age}, json.dumps({"name": name, "age": age})


def make_sentiment(rng):
    label = rng.choice(("positive", "negative"))
    text = rng.choice(POSITIVE if label == "positive" else NEGATIVE).format(thing=rng.choice(THINGS))
    labels = rng.choice(("positive or negative", "negative or positive"))
    return {"text": text, "labels": labels}, label


def make_animal_or_fruit(rng):
    label = rng.choice(("animal", "fruit"))
    item = rng.choice(ANIMALS if label == "animal" else FRUITS)
    labels = rng.choice(("animal or fruit", "fruit or animal"))
    return {"item": item, "labels": labels}, label


@dataclass(frozen=True)
class Task:
    """A task type: draws an input, phrases the instruction, and gives the exact answer."""

    name: str
    phrasings: tuple[str, ...]
    make: Callable[[random.Random], tuple[dict, str]]

    def __call__(self, rng: random.Random) -> tuple[str, str, dict]:
        """Return ``(prompt, answer, fields)`` for one random input."""
        fields, answer = self.make(rng)
        return rng.choice(self.phrasings).format(**fields), answer, fields


SPECS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "upper": (make_upper, ("Write the word '{word}' in capital letters.", "Convert to upper case: {word}",
                           "Upper-case this word: {word}", "What is '{word}' in all caps?")),
    "lower": (make_lower, ("Write the word '{word}' in lowercase letters.", "Convert to lower case: {word}",
                           "Lower-case this word: {word}", "What is '{word}' without capital letters?")),
    "capitalize": (make_capitalize, ("Capitalize the first letter of '{word}'.",
                                     "Write '{word}' with only its first letter in upper case.",
                                     "Title-case this word: {word}")),
    "first_letter": (make_first_letter, ("What is the first letter of '{word}'?",
                                         "Give the first letter of the word {word}.",
                                         "Which letter does '{word}' start with?")),
    "last_letter": (make_last_letter, ("What is the last letter of '{word}'?",
                                       "Give the last letter of the word {word}.",
                                       "Which letter does '{word}' end with?")),
    "first_word": (make_first_word, ("What is the first word of: {sentence}",
                                     "Give the first word in this text: {sentence}",
                                     "Which word comes first here? {sentence}")),
    "last_word": (make_last_word, ("What is the last word of: {sentence}",
                                   "Give the last word in this text: {sentence}",
                                   "Which word comes last here? {sentence}")),
    "count_words": (make_count_words, ("How many words are in this text: {sentence}",
                                       "Count the words: {sentence}",
                                       "What is the number of words in '{sentence}'?")),
    "repeat_word": (make_repeat_word, ("Repeat the word '{word}' {n} times.",
                                       "Write {word} {n} times, separated by spaces.",
                                       "Say '{word}' {n} times in a row.")),
    "sort_words": (make_sort_words, ("Sort these words alphabetically: {words}",
                                     "Put in alphabetical order: {words}",
                                     "Arrange these words from A to Z: {words}")),
    "join_hyphen": (make_join_hyphen, ("Join these words with hyphens: {words}",
                                       "Connect the words with '-': {words}",
                                       "Write these words as one hyphenated string: {words}")),
    "add": (make_add, ("What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                       "{a} plus {b} equals?")),
    "sub": (make_sub, ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.",
                       "{a} minus {b} equals?")),
    "mul": (make_mul, ("What is {a} * {b}?", "Multiply {a} by {b}.", "Compute the product of {a} and {b}.",
                       "{a} times {b} equals?")),
    "larger": (make_larger, ("Which is larger, {a} or {b}?", "Give the bigger number: {a}, {b}",
                             "What is the maximum of {a} and {b}?")),
    "smaller": (make_smaller, ("Which is smaller, {a} or {b}?", "Give the lesser number: {a}, {b}",
                               "What is the minimum of {a} and {b}?")),
    "even_odd": (make_even_odd, ("Is {n} even or odd?", "Classify {n} as even or odd.",
                                 "Answer even or odd: {n}")),
    "km_to_m": (make_km_to_m, ("How many meters are in {n} km?", "Convert {n} kilometers to meters.",
                               "{n} km is how many meters?")),
    "kg_to_g": (make_kg_to_g, ("How many grams are in {n} kg?", "Convert {n} kilograms to grams.",
                               "{n} kg is how many grams?")),
    "m_to_cm": (make_m_to_cm, ("How many centimeters are in {n} {unit}?", "Convert {n} {unit} to centimeters.",
                               "{n} {unit} is how many cm?")),
    "liters_to_ml": (make_liters_to_ml, ("How many milliliters are in {n} {unit}?",
                                         "Convert {n} {unit} to milliliters.", "{n} {unit} is how many ml?")),
    "extract_email": (make_extract_email, ("Extract the email address: {text}",
                                           "What email address appears in this text? {text}",
                                           "Find the email in: {text}")),
    "extract_number": (make_extract_number, ("Extract the number: {text}",
                                             "What number appears in this sentence? {text}",
                                             "Find the number in: {text}")),
    "extract_name": (make_extract_name, ("Extract the person's name: {text}",
                                         "Who is mentioned in this sentence? {text}",
                                         "Find the name in: {text}")),
    "to_json": (make_to_json, ("Format as JSON with keys name and age: {name} is {age} years old.",
                               "Write a JSON object with name {name} and age {age}.",
                               "Give JSON {{\"name\": ..., \"age\": ...}} for {name}, aged {age}.")),
    "sentiment": (make_sentiment, ("Classify the sentiment as {labels}: {text}",
                                   "Is this review {labels}? {text}",
                                   "Sentiment ({labels}) of: {text}")),
    "animal_or_fruit": (make_animal_or_fruit, ("Which category is '{item}' in: {labels}?",
                                               "Classify '{item}' as {labels}.",
                                               "Answer {labels}: {item}")),
}
TASKS: dict[str, Task] = {name: Task(name, phr, make) for name, (make, phr) in SPECS.items()}
HELD_OUT_TASKS: tuple[str, ...] = ("capitalize", "last_letter", "smaller", "liters_to_ml")


@dataclass
class BuiltinSplits:
    """Train and test examples of the trained task types, and examples of held-out types."""

    train: list[Example]
    test: list[Example]
    heldout: list[Example]


def draw(task: Task, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``task`` with pairwise distinct inputs."""
    seen: set[tuple] = set()
    out: list[tuple[str, str]] = []
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        prompt, answer, fields = task(rng)
        key = tuple(sorted(fields.items()))
        if key not in seen:
            seen.add(key)
            out.append((prompt, answer))
    if len(out) < n:
        raise ConfigError(f"builtin:tasks: task '{task.name}' has too few distinct inputs for {n} "
                          "examples; lower data.n_train / data.n_test")
    return out


def to_example(task: str, i: int, prompt: str, answer: str) -> Example:
    return Example(messages=[Message("user", prompt), Message("assistant", answer)],
                   source=f"builtin:tasks#{task}/{i}", task=task)


def builtin_tasks(seed: int = 0, n_train: int = 40, n_test: int = 20) -> BuiltinSplits:
    """Generate the splits: ``n_train`` and ``n_test`` examples per trained task type, ``n_test``
    per held-out type. Test inputs never occur in train; the same seed gives the same data."""
    train: list[Example] = []
    test: list[Example] = []
    heldout: list[Example] = []
    for name, task in TASKS.items():
        rng = random.Random(f"builtin:tasks/{seed}/{name}")
        if name in HELD_OUT_TASKS:
            heldout += [to_example(name, i, p, a) for i, (p, a) in enumerate(draw(task, rng, n_test))]
            continue
        pairs = draw(task, rng, n_test + n_train)
        test += [to_example(name, i, p, a) for i, (p, a) in enumerate(pairs[:n_test])]
        train += [to_example(name, i, p, a) for i, (p, a) in enumerate(pairs[n_test:], start=n_test)]
    random.Random(f"builtin:tasks/{seed}/order").shuffle(train)
    return BuiltinSplits(train=train, test=test, heldout=heldout)
