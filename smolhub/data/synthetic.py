"""Children's stories from a seeded grammar: an offline stand-in for TinyStories.

The stories follow a plot (meet, want, trouble, help, ending) and keep their facts straight: the
hero's name, pronoun, object and friend recur across sentences. A tiny model trained on them
learns things that show in its loss and samples: agreement of pronouns, names carried over,
quotes that open and close, the plot's order.
"""
import random
from typing import Iterator

_HEROES = [  # (name, he/she/they)
    ("Lily", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Sara", "she"),
    ("Max", "he"), ("Lucy", "she"), ("Sam", "they"), ("Anna", "she"), ("Leo", "he"),
    ("Zoe", "she"), ("Jack", "he"), ("Emma", "she"), ("Finn", "he"), ("Rosie", "she"),
    ("Tim", "he"), ("Ella", "she"), ("Noah", "he"), ("Ivy", "she"), ("Kai", "they"),
    ("Pip", "he"), ("Daisy", "she"), ("Oscar", "he"), ("Ruby", "she"), ("Alex", "they"),
]
_KINDS = ["child", "pony", "rabbit", "bear", "cat", "dog", "fox", "mouse", "bird", "duck",
          "frog", "squirrel", "owl", "turtle", "puppy", "kitten", "lamb", "pig", "hedgehog", "deer"]
_TRAITS = ["little", "happy", "curious", "brave", "kind", "shy", "silly", "small", "clever",
           "friendly", "sleepy", "playful", "gentle", "busy"]
_PLACES = [  # (place, something in it)
    ("park", "a big tree"), ("forest", "an old log"), ("garden", "the flower bed"),
    ("beach", "a sand castle"), ("farm", "the red barn"), ("pond", "the tall reeds"),
    ("meadow", "a patch of daisies"), ("village", "the well"), ("hill", "a round rock"),
    ("river", "the wooden bridge"), ("school", "the swings"), ("zoo", "the lion's cage"),
    ("kitchen", "the big table"), ("backyard", "the fence"), ("library", "a tall shelf"),
    ("market", "a fruit stall"), ("playground", "the slide"), ("lake", "a little boat"),
]
_OBJECTS = ["ball", "kite", "hat", "book", "toy car", "balloon", "teddy bear", "drum",
            "shell", "crayon", "cup", "blanket", "apple", "cookie", "boat", "flower",
            "key", "box", "scarf", "bell", "puzzle", "sticker", "spoon", "feather"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "shiny", "soft",
           "striped", "tiny", "golden"]
_ACTIVITIES = ["play", "run", "jump", "sing", "dance", "paint", "read", "build things",
               "look at the clouds", "pick flowers", "climb", "swim", "draw", "splash in puddles"]
_WEATHER = ["sunny", "windy", "rainy", "warm", "cold", "cloudy", "snowy", "bright"]
_TIMES = ["morning", "afternoon", "evening", "day"]
_TROUBLES = [  # what happens to the object; how it gets fixed
    ("fell into the water", "pulled it out with a long stick"),
    ("got stuck in a tree", "climbed up and got it down"),
    ("rolled under a bush", "crawled in and found it"),
    ("was blown away by the wind", "ran after it and caught it"),
    ("broke into two pieces", "fixed it with some glue"),
    ("got lost in the tall grass", "looked everywhere until it turned up"),
    ("fell into a deep hole", "reached in and lifted it out"),
    ("got covered in mud", "washed it clean in the river"),
]
_SAD = ["sad", "upset", "worried", "scared", "grumpy", "lonely"]
_GLAD = ["happy", "glad", "proud", "excited", "thankful", "calm"]
_MORALS = [
    "friends help each other", "it is good to share", "being kind makes everyone happy",
    "it is brave to ask for help", "trying again is better than giving up",
    "playing together is more fun than playing alone", "it is important to be careful",
    "saying sorry makes things better",
]
_PRONOUNS = {  # subject, possessive
    "she": ("she", "her"),
    "he": ("he", "his"),
    "they": ("they", "their"),
}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random) -> str:
    (name, pron), (friend, fpron) = rng.sample(_HEROES, 2)
    he, his = _PRONOUNS[pron]
    kind, friend_kind = rng.choice(_KINDS), rng.choice(_KINDS)
    trait = rng.choice(_TRAITS)
    place, landmark = rng.choice(_PLACES)
    thing = f"{rng.choice(_COLORS)} {rng.choice(_OBJECTS)}"
    activity = rng.choice(_ACTIVITIES)

    s = [rng.choice([
        f"Once upon a time, there was {_a(trait)} {kind} named {name}.",
        f"There once was {_a(trait)} {kind} called {name} who lived near the {place}.",
        f"{name} was {_a(trait)} {kind}.",
        f"One {rng.choice(_WEATHER)} {rng.choice(_TIMES)}, {name} the {kind} went to the {place}.",
    ])]
    short = rng.random() < 0.15  # some stories are just a beginning, a middle and an end
    if short or rng.random() < 0.6:
        s.append(rng.choice([
            f"{_cap(he)} loved to {activity} every day.",
            f"{name} had {_a(thing)} that {he} liked very much.",
            f"{_cap(his)} favorite thing was {_a(thing)}.",
        ]))
    if short:
        return " ".join(s + [f"{name} was {rng.choice(_GLAD)}, and it was a good {rng.choice(_TIMES)}."])
    s.append(rng.choice([
        f"One day, {name} took {his} {thing} to the {place} to {activity}.",
        f"At the {place}, {name} found {_a(thing)} next to {landmark}.",
        f"It was a {rng.choice(_WEATHER)} day, and {name} played with {his} {thing} near {landmark}.",
    ]))
    met_friend = rng.random() < 0.7
    if rng.random() < 0.75:
        trouble, fix = rng.choice(_TROUBLES)
        s.append(f"Oh no! The {thing} {trouble}.")
        if rng.random() < 0.5:
            s.append(f"{name} was very {rng.choice(_SAD)}.")
        if met_friend:
            s.append(f'"Can you help me?" {name} asked {friend} the {friend_kind}.')
            s.append(f"{friend} smiled and {fix}.")
            if len(s) < 7:
                s.append(f"{name} felt {rng.choice(_GLAD)} and said, \"Thank you, {friend}!\"")
        else:
            s.append(f"{name} did not give up, and {he} {fix}.")
    elif met_friend:
        s.append(f"There {name} met {friend}, {_a(friend_kind)} who wanted to {activity} too.")
        s.append(f'"Let\'s {activity} together!" said {friend}.')
    endings = [
        f"{name} learned that {rng.choice(_MORALS)}.",
        f"At the end of the day, {name} went home and told {his} mom all about it.",
        f"That night, {name} went to sleep with a big smile.",
    ]
    if met_friend:
        endings.append(f"From that day on, {name} and {friend} were best friends.")
    s.append(rng.choice(endings))
    return " ".join(s)


def synthetic_stories(n_stories: int, seed: int) -> Iterator[str]:
    """`n_stories` stories, the same ones for the same seed on every machine."""
    rng = random.Random(seed)
    for _ in range(n_stories):
        yield _story(rng)
