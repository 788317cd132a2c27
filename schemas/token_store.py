"""Arrow schemas of the token store's Parquet files and how tokens are encoded in them.

Tokens are stored as one ``fixed_size_binary`` value per image, ``token_scales`` as another, in
the layout of the store's quantization scheme (``schemas.quantization``; the widths follow the
scheme, the columns are the same for all). ``embedding`` is the L2-normalised pooled embedding
as little-endian float16. Decode of the default scheme, ``int8_absmax_per_token``::

    q = np.frombuffer(row["tokens"], np.int8).reshape(num_tokens, token_dim)
    s = np.frombuffer(row["token_scales"], "<f4")
    tokens = q.astype(np.float32) * s[:, None]
    emb = np.frombuffer(row["embedding"], "<f2")

and of any scheme: ``schemas.quantization.decode_tokens(row["tokens"], row["token_scales"],
num_tokens, token_dim, scheme)``.

Fixed-size binary was measured against an Arrow ``fixed_shape_tensor`` column (FACTS.md:
~43k vs ~5.6k rows/s read, int8 widened to INT32 in Parquet), hence the choice.
"""
import pyarrow as pa

from schemas.quantization import DEFAULT_SCHEME, get_scheme
from schemas import columns as C

# The default scheme, and the one of every store written before the scheme could be chosen.
QUANT_SCHEME = DEFAULT_SCHEME

# Parquet writer settings shared by every file of the store. Page checksums make a flipped
# byte an error instead of silently wrong data; statistics only where they are useful (ids).
PARQUET_WRITE_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=False,
    write_statistics=[C.IMAGE_ID],
    write_page_checksum=True,
)
TOKEN_ROW_GROUP_SIZE = 256


def token_schema(num_tokens: int, token_dim: int, embedding_dim: int, scheme: str = QUANT_SCHEME) -> pa.Schema:
    q = get_scheme(scheme)
    return pa.schema(
        [
            pa.field(C.IMAGE_ID, pa.string(), nullable=False),
            pa.field(C.TOKENS, pa.binary(q.token_bytes(num_tokens, token_dim)), nullable=False),
            pa.field(C.TOKEN_SCALES, pa.binary(q.scale_bytes(num_tokens, token_dim)), nullable=False),
            pa.field(C.EMBEDDING, pa.binary(embedding_dim * 2), nullable=False),
            pa.field(C.CAPTION, pa.string()),
            pa.field(C.METADATA, pa.string()),
        ]
    )


FAILURE_SCHEMA = pa.schema(
    [
        pa.field(C.IMAGE_ID, pa.string()),
        pa.field(C.SOURCE, pa.string(), nullable=False),
        pa.field(C.STAGE, pa.string(), nullable=False),
        pa.field(C.REASON, pa.string(), nullable=False),
    ]
)

INDEX_SCHEMA = pa.schema(
    [
        pa.field(C.IMAGE_ID, pa.string(), nullable=False),
        pa.field(C.SHARD, pa.string(), nullable=False),
        pa.field(C.ROW, pa.int64(), nullable=False),
    ]
)


def shard_metadata(fingerprint: str, num_tokens: int, token_dim: int, scheme: str = QUANT_SCHEME) -> dict:
    """Key-value metadata of a token shard: enough to decode it without the manifest."""
    return {"edje.fingerprint": fingerprint, "edje.quantization": scheme,
            "edje.num_tokens": str(num_tokens), "edje.token_dim": str(token_dim)}


def binary_column_to_numpy(column, dtype, shape):
    """A fixed_size_binary column (Array or ChunkedArray) -> numpy (rows, *shape), one copy."""
    import numpy as np
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"{arr.null_count} null value(s) in a column that must have none")
    if len(arr) == 0:
        return np.zeros((0, *shape), dtype=dtype)
    width = arr.type.byte_width
    raw = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return raw.view(dtype).reshape(len(arr), *shape)
