"""Data contracts: Arrow schemas, the store manifest, version constants."""
from schemas.quiet_beam import import_beam_quietly

import_beam_quietly()
