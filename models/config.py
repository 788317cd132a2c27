"""Config dataclasses that round-trip through config.json."""
from dataclasses import asdict


class JsonConfig:
    """Mixin for frozen dataclasses: ``to_dict`` and a strict ``from_dict`` (unknown keys refused)."""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)
