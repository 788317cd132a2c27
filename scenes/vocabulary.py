"""The scenes benchmark's vocabulary (shapes, colours, sizes, relations) and its train/test split.

A scene is a tuple of objects and the relation of object 0 to object 1. Its split is a function
of its content (``split_of``), so no scene can be in both splits, whatever the seeds.
"""
import hashlib
from dataclasses import dataclass
from typing import Tuple

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {"red": (230, 25, 25), "green": (30, 190, 50), "blue": (40, 80, 255), "yellow": (250, 225, 30),
          "purple": (150, 50, 210), "orange": (255, 135, 0), "white": (245, 245, 245), "cyan": (0, 215, 225)}
SIZES = {"small": 0.09, "large": 0.15}  # radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (22, 22, 26)
TEST_BUCKETS = 10  # sha256(class key) % 10 == 0 -> test
SIZE_IN_CAPTION = 0.4


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str

    def phrase(self, with_size: bool) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


Scene = Tuple[Tuple[Obj, ...], str]  # (objects, relation of object 0 to object 1)


def scene_signature(objects, relation: str, with_size: bool = True) -> str:
    """Canonical description of a scene, ignoring jitter: 'B right of A' is written 'A left of B'.
    ``with_size`` False leaves the sizes out: what a caption that names no size says.

    Accepts Obj instances or the scene graph's object dicts.
    """
    objs = [o if isinstance(o, Obj) else Obj(o["shape"], o["color"], o["size"]) for o in objects]
    if relation in ("right of", "below"):
        objs[0], objs[1], relation = objs[1], objs[0], INVERSE[relation]
    words = [o.phrase(with_size) for o in objs]
    return " | ".join([f"{words[0]} {relation} {words[1]}", *words[2:]])


def class_key(objects, relation: str) -> str:
    """The part of a scene that colour swaps (v1) and relation reversal (v2) leave unchanged."""
    a, b, *rest = objects
    axis = "horizontal" if relation in ("left of", "right of") else "vertical"
    return "|".join([*sorted([f"{a.size} {a.shape}", f"{b.size} {b.shape}"]), *sorted([a.color, b.color]),
                     axis, *(o.phrase(True) for o in rest)])


def split_of(objects, relation: str) -> str:
    """'test' or 'train': a stable function of the scene's content."""
    digest = hashlib.sha256(class_key(objects, relation).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"
