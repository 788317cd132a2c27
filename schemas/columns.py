"""Column names and store layout names: the one place each is defined."""

# Token shard columns.
IMAGE_ID = "image_id"
TOKENS = "tokens"
TOKEN_SCALES = "token_scales"
EMBEDDING = "embedding"
CAPTION = "caption"
METADATA = "metadata"

# Failure record columns.
SOURCE = "source"
STAGE = "stage"
REASON = "reason"

# Index columns (IMAGE_ID plus these).
SHARD = "shard"
ROW = "row"

# Store layout (relative to the store root).
MANIFEST = "manifest.json"
MANIFESTS_DIR = "manifests"  # every committed version, manifests/NNNNNNNNNN.json
LEASE = "lease.json"  # the writer's lease while a job writes the store
SHARDS_DIR = "shards"
FAILURES_DIR = "failures"
INDEX_DIR = "index"
STATS_DIR = "stats"

# Failure stages.
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_ENCODE = "encode"
STAGE_WRITE = "write"
STAGE_DEDUP = "dedup"

REASON_DUPLICATE = "duplicate_id"

CAPTION_MAX_CHARS = 4096
METADATA_MAX_BYTES = 64 * 1024
