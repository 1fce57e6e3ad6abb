"""The demo's knowledge base: capitals, sums, opposites, animal sounds, colours, counting,
each asked in several phrasings. The single-turn demo data (utils/demo/embedded.py) and the
multi-turn conversations (utils/demo/chat_data.py) are both dealt from `qa_pairs()`.
"""

from __future__ import annotations

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Cuba": "Havana",
    "Chile": "Santiago",
    "India": "Delhi",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "day": "night",
    "happy": "sad",
    "old": "new",
    "open": "closed",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "strong": "weak",
}
SOUNDS = {
    "dog": "woof",
    "cat": "meow",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "lion": "roar",
    "owl": "hoot",
    "frog": "ribbit",
    "horse": "neigh",
    "bee": "buzz",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Several phrasings per task, so the model learns the task rather than one string.
TEMPLATES = {
    "capital": [
        "What is the capital of {x}?",
        "Which city is the capital of {x}?",
        "Tell me the capital of {x}.",
    ],
    "sum": ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}."],
    "opposite": [
        "What is the opposite of {x}?",
        "Give me the opposite of {x}.",
        "Which word means the opposite of {x}?",
    ],
    "sound": ["What sound does a {x} make?", "What does a {x} say?", "How does a {x} sound?"],
    "color": ["What color is {x}?", "Which color is {x}?", "Tell me the color of {x}."],
    "count": ["Count from one to {x}.", "Please count to {x}.", "Count up to {x}."],
}


def qa_pairs() -> list[tuple[str, str, str]]:
    """Every (task, question, answer) of the knowledge base, in every phrasing."""
    pairs = []
    for country, city in CAPITALS.items():
        pairs += [
            ("capital", t.format(x=country), f"The capital of {country} is {city}.")
            for t in TEMPLATES["capital"]
        ]
    for a in range(6):
        for b in range(6):
            pairs += [
                ("sum", t.format(a=a, b=b), f"{a} plus {b} is {a + b}.") for t in TEMPLATES["sum"]
            ]
    for word, opposite in OPPOSITES.items():
        pairs += [
            ("opposite", t.format(x=word), f"The opposite of {word} is {opposite}.")
            for t in TEMPLATES["opposite"]
        ]
    for animal, sound in SOUNDS.items():
        pairs += [
            ("sound", t.format(x=animal), f"A {animal} says {sound}.") for t in TEMPLATES["sound"]
        ]
    for thing, color in COLORS.items():
        pairs += [
            ("color", t.format(x=thing), f"{thing[0].upper()}{thing[1:]} is {color}.")
            for t in TEMPLATES["color"]
        ]
    for n in range(2, 10):
        counted = ", ".join(NUMBER_WORDS[1 : n + 1])
        pairs += [
            ("count", t.format(x=NUMBER_WORDS[n]), f"{counted[0].upper()}{counted[1:]}.")
            for t in TEMPLATES["count"]
        ]
    return pairs
