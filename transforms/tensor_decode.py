"""JPEG decode + eval preprocessing with torch ops (``--decode torchvision``), on the job's device.

On CUDA, ``torchvision.io.decode_jpeg`` decodes a list of JPEGs in one call with nvjpeg (the
hardware JPEG engines on A100/H100/H200 for baseline JPEGs); on CPU it is libjpeg-turbo one by
one, which is how the tests exercise this path. The decoded uint8 images are then resized,
centre-cropped and normalised with torch ops to match open_clip's eval transform for the
backbone (``Backbone.image_transform``): same output sizes, same crop offsets, bicubic/bilinear
with antialias (torch's antialiased kernels follow PIL's filters), uint8 rounding after the
resize like PIL, then ``/255`` and the model's mean/std.

Only plain JPEGs take this path: ``fast_jpeg_size`` reads the header (no pixels) and says no to
everything else (not a JPEG, grayscale, CMYK/YCCK, Adobe/RGB colour transforms, 12-bit,
lossless/arithmetic coding, odd chroma sampling, no end-of-image marker, over ``max_pixels``).
Those samples, and any that the tensor decoder refuses, go through the PIL path unchanged
(``transforms.image_decode.decode_image`` + the open_clip transform), so a bad image is recorded
exactly as with ``--decode pil``.
"""
import logging
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)
DECODERS = ("pil", "torchvision")
RESIZE_MODES = ("shortest", "longest", "squash")

# torchvision >= 0.29 marks its image decoders deprecated (in favour of torchcodec) on every call.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

_SOF_OK = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every frame type (DHT, JPG, DAC excluded)
_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)}  # 4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1


def fast_jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from the header of a JPEG the tensor decoder may take, else None.

    None means "use PIL": anything that is not a plain 8-bit, 3-component YCbCr JPEG with its
    image data complete up to an end-of-image marker. Reads markers only (no pixels).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, size = 2, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01:  # TEM: no length
            i += 2
            continue
        if 0xD0 <= marker <= 0xD9:  # RSTn, SOI, EOI before the first scan: not a plain JPEG
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        seg = data[i + 4:i + 2 + length]
        if marker == 0xEE and seg[:5] == b"Adobe":  # colour transform flag: libjpeg and nvjpeg may differ
            return None
        if marker in _SOF_ALL:
            if marker not in _SOF_OK or size is not None or len(seg) < 15:
                return None
            precision, height, width, comps = seg[0], int.from_bytes(seg[1:3], "big"), \
                int.from_bytes(seg[3:5], "big"), seg[5]
            if precision != 8 or comps != 3 or len(seg) < 6 + 3 * comps:
                return None
            ids = bytes(seg[6 + 3 * c] for c in range(3))
            sampling = [(seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15) for c in range(3)]
            if ids == b"RGB" or sampling[0] not in _LUMA_SAMPLING or sampling[1] != (1, 1) \
                    or sampling[2] != (1, 1) or width < 1 or height < 1:
                return None
            size = (width, height)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                return None
            # 0xFF 0xD9 cannot occur inside entropy-coded data (0xFF is stuffed as 0xFF00): if it
            # is missing, the file is truncated and PIL refuses it, so let PIL say so.
            return size if data.find(b"\xff\xd9", i + 2 + length) >= 0 else None
        i += 2 + length
    return None


def _sizes(image_size):
    if isinstance(image_size, (tuple, list)):
        return (int(image_size[0]), int(image_size[-1]))
    return (int(image_size), int(image_size))


class TensorPreprocess:
    """open_clip's eval transform (``open_clip.image_transform(..., is_train=False)``) on uint8
    CHW tensors. Built from the backbone's preprocess config; raises ValueError on settings it
    does not reproduce."""

    def __init__(self, image_size, mean=None, std=None, resize_mode=None, interpolation=None, fill_color=0):
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from torchvision.transforms import InterpolationMode
        mean = mean or OPENAI_DATASET_MEAN
        std = std or OPENAI_DATASET_STD
        self.mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
        self.std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
        self.image_size = image_size
        self.size = _sizes(image_size)  # (h, w)
        self.resize_mode = resize_mode or "shortest"
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"--decode torchvision: resize_mode {self.resize_mode!r} is not implemented "
                             f"({', '.join(RESIZE_MODES)}); use --decode pil")
        interpolation = interpolation or "bicubic"
        if interpolation not in ("bicubic", "bilinear", "random"):
            raise ValueError(f"--decode torchvision: interpolation {interpolation!r} is not implemented; "
                             f"use --decode pil")
        # as open_clip: 'random' means bicubic at eval time
        self.interpolation = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
        self.fill_color = fill_color
        self._stats = {}

    @classmethod
    def for_backbone(cls, backbone):
        pp = backbone.preprocess_cfg
        return cls(backbone.image_size, mean=pp.get("mean"), std=pp.get("std"), resize_mode=pp.get("resize_mode"),
                   interpolation=pp.get("interpolation"), fill_color=pp.get("fill_color", 0))

    def _keep_ratio(self, h, w, longest):
        # open_clip.transform.ResizeKeepRatio.get_params without the random parts
        th, tw = self.size
        rh, rw = h / th, w / tw
        ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
        return [round(h / ratio), round(w / ratio)]

    def resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> uint8 (..., 3, h, w) at the model's size, on the image's device
        (a stack of same-size images is resized in one call)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F
        th, tw = self.size
        h, w = img.shape[-2:]
        if self.resize_mode == "squash":
            return F.resize(img, [th, tw], interpolation=self.interpolation, antialias=True)
        if self.resize_mode == "longest":
            from open_clip.transform import center_crop_or_pad
            img = F.resize(img, self._keep_ratio(h, w, 1.0), interpolation=self.interpolation, antialias=True)
            return center_crop_or_pad(img, [th, tw], fill=self.fill_color)
        if th == tw:  # torchvision Resize(int): shortest side -> th, the other truncated (int())
            img = F.resize(img, [th], interpolation=self.interpolation, antialias=True)
        else:  # open_clip uses ResizeKeepRatio(size) here, always bicubic
            img = F.resize(img, self._keep_ratio(h, w, 0.0), interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
        return F.center_crop(img, [th, tw])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) -> float32, as ToTensor (/255) then Normalize(mean, std)."""
        key = (batch.device, batch.dtype)
        if key not in self._stats:
            self._stats[key] = (torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(-1, 1, 1),
                                torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(-1, 1, 1))
        mean, std = self._stats[key]
        return batch.to(torch.float32).div_(255).sub_(mean).div_(std)


class TensorJpegDecoder:
    """JPEG bytes -> uint8 RGB (3, H, W) tensors on ``device``; None for each image it refuses."""

    def __init__(self, device: str):
        from torchvision.io import ImageReadMode
        self.device = torch.device(device)
        self.mode = ImageReadMode.RGB
        self.refused = 0

    def _decode(self, tensors):
        from torchvision.io import decode_jpeg
        return decode_jpeg(tensors, mode=self.mode, device=self.device)

    def decode(self, datas: Sequence[bytes]) -> List[Optional[torch.Tensor]]:
        if not datas:
            return []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if self.device.type == "cuda":
            try:  # one batched nvjpeg call; it returns nothing if any image fails
                return list(self._decode(tensors))
            except RuntimeError:
                pass
        out = []
        for t in tensors:  # CPU (one by one anyway), or a CUDA batch with a bad image in it
            try:
                out.append(self._decode([t])[0])
            except RuntimeError as e:
                self.refused += 1
                if self.refused <= 5 or self.refused % 1000 == 0:  # a broken setup shows, a bad image does not flood
                    log.warning("tensor JPEG decoder refused an image (%d so far; PIL decodes those): %s",
                                self.refused, str(e).splitlines()[0][:200])
                out.append(None)
        return out
