"""Beam step: list the sample keys of each input shard, to find ids repeated across shards.

Only members' headers matter here; the pass costs one sequential read of each shard, small next
to decoding and the backbone. Its output (key -> shards) is shuffled, never image data.
"""
import logging

import apache_beam as beam

from schemas import storage
from transforms.tar_samples import ShardReadError, iter_samples

log = logging.getLogger(__name__)


class ScanKeysFn(beam.DoFn):
    """ShardSpec -> (image_id, (ordinal, shard name)) for the first image-bearing sample of each key."""

    def __init__(self, max_member_bytes: int):
        self.max_member_bytes = max_member_bytes

    def process(self, spec):
        seen = set()
        try:
            with storage.open_read(spec.source) as f:
                for sample in iter_samples(f, read_data=False, max_member_bytes=self.max_member_bytes):
                    if sample.key not in seen and sample.image_extension() is not None:
                        seen.add(sample.key)
                        yield sample.key, (spec.ordinal, spec.name)
        except (ShardReadError, OSError) as e:
            log.info("scan of %s stopped: %s", spec.source, e)


def losers(key_and_owners):
    """(image_id, [(ordinal, name), ...]) -> (name, image_id) for every shard but the earliest."""
    key, owners = key_and_owners
    owners = sorted(set(owners))
    for _, name in owners[1:]:
        yield name, key


class FindCrossShardDuplicates(beam.PTransform):
    """ShardSpecs -> (shard name, image_id) pairs that shard must not serve."""

    def __init__(self, max_member_bytes: int):
        super().__init__()
        self.max_member_bytes = max_member_bytes

    def expand(self, specs):
        return (specs
                | "ScanKeys" >> beam.ParDo(ScanKeysFn(self.max_member_bytes))
                | "GroupByImageId" >> beam.GroupByKey()
                | "LaterCopies" >> beam.FlatMap(losers))
