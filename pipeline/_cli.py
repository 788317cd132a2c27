"""Process exit for the jobs' command lines."""
import argparse
import atexit
import logging
import os
import sys


def finish(code: int = 0) -> None:
    """Flushes output and leaves without interpreter teardown.

    Arrow's native thread pools can abort the process while being destroyed at exit
    ("terminate called without an active exception", apache/arrow#34314) after all the work is
    done; we have seen it here under load. Every output is complete and flushed by now. The
    atexit handlers do run: in them Beam stops the job servers it started (Prism's process).
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Beam's filesystem options that a job without a pipeline takes too: all of S3's, and GCS's
# project and impersonation (the GCS emulator is found through STORAGE_EMULATOR_HOST).
GCS_FLAGS = ("--project", "--impersonate_service_account")


def add_filesystem_flags(parser):
    """Adds Beam's S3 and GCS filesystem flags to ``parser`` as one group; returns their dests."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, S3Options
    group = parser.add_argument_group(
        "object stores", "Beam's filesystem options, for s3:// and gs:// paths (the same flags as "
                         "every Beam job's)")
    before = {a.dest for a in parser._actions}
    S3Options._add_argparse_args(group)
    scratch = argparse.ArgumentParser(add_help=False)
    GoogleCloudOptions._add_argparse_args(scratch)
    for action in scratch._actions:
        if set(action.option_strings) & set(GCS_FLAGS):
            group.add_argument(*action.option_strings, dest=action.dest, default=action.default,
                               help=action.help)
    return sorted({a.dest for a in parser._actions} - before)


def apply_filesystem_flags(args, dests) -> None:
    """Hands the filesystem flags given on a non-Beam command line to Beam's FileSystems."""
    from schemas import storage
    given = {d: getattr(args, d) for d in dests if getattr(args, d) not in (None, False)}
    storage.set_filesystem_options(given or None)


def add_flag(parser, *names, **kwargs):
    """parser.add_argument that tolerates a flag another job's options class already added.

    Beam builds one parser from every PipelineOptions subclass imported (get_all_options), so
    two jobs both having --output would otherwise conflict when imported into one process.
    Each job's own view (``options.view_as(JobOptions)``) still parses with its own definitions.
    """
    if any(name in parser._option_string_actions for name in names):
        return
    parser.add_argument(*names, **kwargs)


class BeamJobCLI:
    """What every Beam job's launcher shares: ``--help`` built from the job's own options class
    (Beam's parser would list every job's flags), required flags, usage errors."""

    EPILOG = ("Standard Beam flags (--runner, --direct_num_workers, --direct_running_mode, "
              "Dataflow and Flink options) pass through.")

    def __init__(self, prog: str, doc: str, options_cls):
        self.prog, self.doc, self.options_cls = prog, doc, options_cls

    def usage(self):
        parser = argparse.ArgumentParser(prog=self.prog, description=self.doc, epilog=self.EPILOG,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.options_cls._add_argparse_args(parser)
        add_filesystem_flags(parser)
        return parser

    def error(self, message: str):
        self.usage().error(message)

    def parse(self, argv, required=()):
        """-> (PipelineOptions, the job's view), or None after printing --help."""
        from apache_beam.options.pipeline_options import PipelineOptions
        argv = list(sys.argv[1:] if argv is None else argv)
        if "-h" in argv or "--help" in argv:
            self.usage().print_help()
            return None
        from schemas import storage
        options = PipelineOptions(argv)
        storage.set_filesystem_options(options)  # before the launcher lists a single input
        opts = options.view_as(self.options_cls)
        missing = [f"--{name}" for name in required if not getattr(opts, name)]
        if missing:
            self.error(f"{', '.join(missing)} required")
        return options, opts


LOCAL_RUNNERS = {None, "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}


def show_progress(flag: str, options) -> bool:
    """--progress on|off|auto; auto shows the bar for runners whose workers share this machine:
    the local runners, and Prism with its default LOOPBACK environment (workers in this process)."""
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions
    runner = options.view_as(StandardOptions).runner
    local = runner in LOCAL_RUNNERS or (
        runner == "PrismRunner" and options.view_as(PortableOptions).environment_type in (None, "LOOPBACK"))
    return flag == "on" or (flag == "auto" and local)


def run_pipeline(pipeline, progress=None):
    """Runs ``pipeline`` to the end; its progress bar (anything with close()) is closed however it ends."""
    try:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    finally:
        if progress is not None:
            progress.close()


def open_store_for(store: str, checkpoint):
    """The store, refused with a clear message unless valid and built with this checkpoint."""
    from models.checkpoint import CheckpointError, fingerprint
    from schemas.reader import StoreError, TokenStore
    try:
        opened = TokenStore(store)
        opened.require_fingerprint(fingerprint(checkpoint))
    except (StoreError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    return opened


def beam_counters(result, namespace: str) -> dict:
    """A finished pipeline's counters in ``namespace``, summed over steps ({} if unsupported)."""
    from apache_beam.metrics.metric import MetricsFilter
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]
    except (AttributeError, NotImplementedError):  # runners without metric support
        return {}
    totals = {}
    for c in counters:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (value or 0)
    return totals


def job_main(run, argv=None, show=None):
    """Runs a job from the command line: warnings-level logging, the JSON summary on stdout."""
    import json
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = run(argv)
    if summary is not None:
        (show or (lambda s: print(json.dumps(s))))(summary)


def resolve_precision(precision: str, device: str, job: str, gpu_precisions=("fp32",)):
    """--precision at the start of a job: ``auto`` resolved on this machine (models.precision), then
    refused, with what to do, where it cannot run. Returns {"precision", "asked", "why"}."""
    from models.precision import PrecisionUnavailable, require, resolve
    chosen, why = resolve(precision, device, job)
    try:
        require(chosen, device, gpu_precisions)
    except PrecisionUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    return {"precision": chosen, "asked": precision, "why": why}
