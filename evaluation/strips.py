"""Image strips: a query's text over its first-stage and reranked top 5, relevant images framed."""
import hashlib
import io
import logging
import re
import textwrap
from typing import Dict, List

from evaluation.inputs import Query
from schemas import storage

log = logging.getLogger(__name__)

STRIP_TOP = 5
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
THUMB = 128
PAD = 8
LABEL_W = 110
CAPTION_H = 16
FRAME = 4
GREEN, GREY = (0, 160, 60), (170, 170, 170)


def strip_file_name(query_id: str) -> str:
    clean = _SAFE_NAME.sub("_", query_id)[:100]
    if clean != query_id or not clean or clean.startswith("."):
        clean = f"{clean.lstrip('.') or 'query'}-{hashlib.sha256(query_id.encode()).hexdigest()[:10]}"
    return clean + ".png"


def load_images(pattern: str, wanted) -> dict:
    """{image_id: PIL image or a reason string} for the wanted ids found in the shards."""
    from transforms.image_decode import DecodeError, decode_image
    from transforms.shard_files import plan_shards
    from transforms.tar_samples import ShardReadError, iter_samples

    wanted, found = set(wanted), {}
    for spec in plan_shards(pattern).shards:
        if len(found) == len(wanted):
            break
        try:
            with storage.open_read(spec.source) as f:
                for sample in iter_samples(f):
                    if sample.key not in wanted or sample.key in found:
                        continue
                    ext = sample.image_extension()
                    if ext is None:
                        found[sample.key] = "no image"
                        continue
                    try:
                        image = decode_image(sample.members[ext])
                        image.thumbnail((THUMB - 2 * FRAME, THUMB - 2 * FRAME))
                        found[sample.key] = image
                    except DecodeError:
                        found[sample.key] = "undecodable"
        except ShardReadError as e:
            log.warning("%s: %s (images read before the damage are used)", spec.source, e)
        except OSError as e:
            log.warning("%s: unreadable (%s)", spec.source, e)
    return found


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support for the default font
        return ImageFont.load_default()


def _text(draw, xy, text, font, fill=(0, 0, 0)):
    try:
        draw.text(xy, text, font=font, fill=fill)
    except UnicodeEncodeError:  # the bitmap fallback font is Latin-1 only
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), font=font, fill=fill)


def render_strip(query: Query, first: List[str], reranked: List[str], images: dict) -> bytes:
    """One query's strip (first stage above, reranked below) as a PNG."""
    from PIL import Image, ImageDraw

    title_font, small = _font(15), _font(11)
    lines = textwrap.wrap(f"{query.query_id}: {query.text}", 85)[:3]
    top = PAD + 18 * len(lines) + PAD
    row_h = THUMB + CAPTION_H + PAD
    width = LABEL_W + STRIP_TOP * (THUMB + PAD) + PAD
    height = top + 2 * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        _text(draw, (PAD, PAD + 18 * n), line, title_font)
    for r, (label, ranking) in enumerate((("first stage", first), ("reranked", reranked))):
        y = top + r * row_h
        _text(draw, (PAD, y + THUMB // 2 - 8), label, title_font)
        for i, image_id in enumerate(ranking[:STRIP_TOP]):
            x = LABEL_W + i * (THUMB + PAD)
            colour = GREEN if image_id in query.relevant else GREY
            draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill=colour)
            draw.rectangle([x + FRAME, y + FRAME, x + THUMB - 1 - FRAME, y + THUMB - 1 - FRAME], fill=(240, 240, 240))
            image = images.get(image_id, "not found")
            if isinstance(image, str):
                _text(draw, (x + FRAME + 6, y + THUMB // 2 - 6), image, small, fill=(120, 0, 0))
            else:
                canvas.paste(image, (x + (THUMB - image.width) // 2, y + (THUMB - image.height) // 2))
            _text(draw, (x, y + THUMB + 2), f"#{i + 1} {image_id}"[:22], small)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def write_strips(out_dir: str, queries: Dict[str, Query], t2i: dict, pattern: str, count: int) -> List[str]:
    strip_dir = storage.join(out_dir, "strips")
    storage.make_dirs(strip_dir)
    chosen = sorted(t2i)[:count]
    wanted = {i for qid in chosen for ranking in t2i[qid] for i in ranking[:STRIP_TOP]}
    images = load_images(pattern, wanted)
    written = []
    for qid in chosen:
        path = storage.join(strip_dir, strip_file_name(qid))
        storage.write_bytes_atomic(path, render_strip(queries[qid], t2i[qid][0], t2i[qid][1], images))
        written.append(path)
    storage.delete_quietly([p for p in storage.list_dir(strip_dir) if p.endswith(".png") and p not in written])
    return written
