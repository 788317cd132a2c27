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


def add_flag(parser, *names, **kwargs):
    """parser.add_argument that tolerates a flag another job's options class already added.

    Beam builds one parser from every PipelineOptions subclass imported (get_all_options), so
    two jobs both having --output would otherwise conflict when imported into one process.
    Each job's own view (``options.view_as(JobOptions)``) still parses with its own definitions.
    """
    if any(name in parser._option_string_actions for name in names):
        return
    parser.add_argument(*names, **kwargs)
