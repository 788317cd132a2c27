"""Captions of a scene: 8 templates over the objects' phrases and the relation."""
from scenes.vocabulary import INVERSE

LONG = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NEAR = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
ENDS = {"left of": ("on the left", "on the right"), "above": ("at the top", "at the bottom")}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# Each template gets (a, b, rel): phrases of objects 0 and 1 (no article), relation of 0 to 1.
TEMPLATES = (
    lambda a, b, rel: f"{_a(a)} {rel} {_a(b)}",
    lambda a, b, rel: f"{_a(b)} {LONG[INVERSE[rel]]} {_a(a)}",
    lambda a, b, rel: f"{_a(a)} is {LONG[rel]} {_a(b)}",
    lambda a, b, rel: (f"{ENDS[rel][0]} {_a(a)}, {ENDS[rel][1]} {_a(b)}" if rel in ENDS
                       else f"{ENDS[INVERSE[rel]][0]} {_a(b)}, {ENDS[INVERSE[rel]][1]} {_a(a)}"),
    lambda a, b, rel: f"there is {_a(a)} and, {NEAR[INVERSE[rel]]}, {_a(b)}",
    lambda a, b, rel: f"{_a(b)} with {_a(a)} {NEAR[rel]}",
    lambda a, b, rel: f"the {b} is {LONG[INVERSE[rel]]} the {a}",
    lambda a, b, rel: f"a picture of {_a(a)} {LONG[rel]} {_a(b)}",
)


def caption(objs, relation: str, template: int, with_size: bool, third_side: bool) -> str:
    """The caption of a scene; ``third_side`` also states where object 2 is (below / right of the pair)."""
    a, b, *rest = (o.phrase(with_size) for o in objs)
    text = TEMPLATES[template](a, b, relation)
    for c in rest:
        side = "below" if relation in ("left of", "right of") else "to the right of"
        text += f", and {_a(c)} {side} them" if third_side else f", and {_a(c)}"
    return text
