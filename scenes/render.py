"""Drawing a scene: per-group jitter, object positions, shapes, the PNG bytes."""
import io
import math
import random
from typing import List, Tuple

from PIL import Image, ImageDraw

from scenes.vocabulary import BACKGROUND, COLORS, SIZES


def draw_jitter(rng: random.Random, n_objects: int) -> dict:
    """Per-group jitter (fractions of the image side), shared by the group's four variants:
    position offsets per slot, radius scale per object."""
    return {"along": [rng.uniform(-0.04, 0.04) for _ in range(n_objects)],
            "across": [rng.uniform(-0.08 if n_objects == 2 else -0.04, 0.08 if n_objects == 2 else 0.04)
                       for _ in range(n_objects)],
            "scale": [rng.uniform(0.9, 1.1) for _ in range(n_objects)]}


def layout(objs, relation: str, jitter: dict, image_size: int) -> List[Tuple[float, float, float]]:
    """(x, y, r) in pixels per object. Slots: first/second along the relation's axis, then object 2."""
    horizontal = relation in ("left of", "right of")
    line = 0.5 if len(objs) == 2 else 0.28  # the pair's row (or column); object 2 sits at 0.74
    slots = [(0.27, line), (0.73, line), (0.5, 0.74)]
    order = [0, 1, 2] if relation in ("left of", "above") else [1, 0, 2]
    out = []
    for i, obj in enumerate(objs):
        slot = order[i]  # jitter belongs to the slot, so v2 swaps exact positions
        along, across = slots[slot][0] + jitter["along"][slot], slots[slot][1] + jitter["across"][slot]
        x, y = (along, across) if horizontal else (across, along)
        r = SIZES[obj.size] * jitter["scale"][i]
        out.append((round(x * image_size, 2), round(y * image_size, 2), round(r * image_size, 2)))
    return out


def _polygon(x, y, r, n, inner=None, start=-90.0):
    """Regular polygon (or star with an inner radius) around (x, y), first vertex at ``start`` degrees."""
    pts, step = [], 360.0 / n
    for k in range(n):
        a = math.radians(start + k * step)
        pts.append((x + r * math.cos(a), y + r * math.sin(a)))
        if inner is not None:
            b = math.radians(start + (k + 0.5) * step)
            pts.append((x + inner * r * math.cos(b), y + inner * r * math.sin(b)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    """Every shape fits in the circle of radius r around (x, y) and covers its centre."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        h = r * 0.8
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(x, y, r, 3), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(x, y, r, 5, inner=0.45), fill=fill)
    elif shape == "cross":
        w = r * 0.32
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_png(objs, placed, image_size: int) -> bytes:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj, (x, y, r) in zip(objs, placed):
        draw_shape(draw, obj.shape, x, y, r, COLORS[obj.color])
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()
