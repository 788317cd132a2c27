"""Streaming a WebDataset tar shard as samples (members grouped by key).

Keys and extensions follow webdataset's convention (``webdataset.tariterators.base_plus_ext``:
key = path up to the first dot of the file name, extension lower-cased). Unlike webdataset's
own iterators, damage is reported instead of swallowed: the samples read before a corrupt
header or a truncation are yielded (the one in progress with the members it had read), then
:class:`ShardReadError` says what went wrong. Members are size-capped before they are read into
memory. Listing keys only (``read_data=False``) still streams the whole file: seeking over member
data read 7.5x fewer bytes but took 1.4x longer on a local 124 MB shard (page cache), and
remote readers fetch large chunks anyway.
"""
import tarfile
from typing import Dict, List, NamedTuple, Optional, Tuple

from webdataset.tariterators import base_plus_ext

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
DEFAULT_MAX_MEMBER_BYTES = 64 << 20


class ShardReadError(Exception):
    """The shard could not be read (further); samples yielded before it are good."""


class Sample(NamedTuple):
    key: str
    members: Dict[str, Optional[bytes]]  # extension -> bytes (None when scanning without data)
    problems: List[Tuple[str, str]]  # (stage, reason) noticed while reading its members

    def image_extension(self) -> Optional[str]:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return ext
        return None


def iter_samples(fileobj, read_data: bool = True, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
    """Yields :class:`Sample` in tar order; consecutive members with one key form one sample."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardReadError(f"not a readable tar archive ({type(e).__name__}: {e})") from e
    key, members, problems = None, {}, []
    yielded = 0
    try:
        for info in tar:
            if not info.isfile():
                continue
            prefix, ext = base_plus_ext(info.name)
            if prefix is None:
                continue
            ext = ext.lower()
            if prefix != key:
                if key is not None:
                    yield Sample(key, members, problems)
                    yielded += 1
                key, members, problems = prefix, {}, []
            if info.size > max_member_bytes:
                problems.append(("read", f"member .{ext} is {info.size} bytes, over the "
                                         f"{max_member_bytes}-byte cap"))
                continue
            if ext in members:
                problems.append(("read", f"member .{ext} repeated within the sample; first kept"))
                continue
            if read_data:
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise ShardReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                members[ext] = data
            else:
                members[ext] = None
        _check_end(tar)
    except (tarfile.TarError, EOFError, OSError, ValueError, ShardReadError) as e:
        if key is not None and members:
            yield Sample(key, members, problems)
            yielded += 1
        raise ShardReadError(f"tar damaged after {yielded} sample(s): {type(e).__name__}: {e}") from e
    finally:
        tar.close()
    if key is not None:
        yield Sample(key, members, problems)


def _check_end(tar) -> None:
    """tarfile ends iteration silently at a corrupt header after the first member; a real end of
    archive is followed by zero blocks only, so anything else left in the stream is damage."""
    while True:
        block = tar.fileobj.read(1 << 20)
        if not block:
            return
        if block.strip(b"\0"):
            raise ShardReadError("corrupt tar header: data follows what tarfile took for the end of the archive")
