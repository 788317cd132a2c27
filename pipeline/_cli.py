"""Process exit for the jobs' command lines."""
import logging
import os
import sys


def finish(code: int = 0) -> None:
    """Flushes output and leaves without interpreter teardown.

    Arrow's native thread pools can abort the process while being destroyed at exit
    ("terminate called without an active exception", apache/arrow#34314) after all the work is
    done; we have seen it here under load. Every output is complete and flushed by now.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
