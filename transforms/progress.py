"""Progress of a local run, for the launcher's tqdm bar: each worker process counts its units into
a small file of its own under a local directory, which the launcher polls.

Local runners only (in-process or multi_processing workers share the launcher's disk); on remote
runners the tally is None and the DoFns count nothing. Beam's metrics are not live on the
DirectRunner, hence the files.
"""
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Optional

WRITE_EVERY_S = 0.5


class Tally:
    """Picklable worker side: ``add(n)`` as units finish (the file is rewritten at most twice a
    second), ``flush()`` at the end of each bundle."""

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self._path, self._count, self._written = None, 0, 0.0

    def add(self, n: int) -> None:
        if self.directory is None:
            return
        if self._path is None:
            self._path = os.path.join(self.directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.count")
        self._count += n
        now = time.monotonic()
        if now - self._written >= WRITE_EVERY_S:
            self.flush()
            self._written = now

    def flush(self) -> None:
        if self._path is None:
            return
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(str(self._count))
            os.replace(tmp, self._path)
        except OSError:  # the launcher has closed its bar and removed the directory
            pass

    def __getstate__(self):  # a copy starts its own file
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.__init__(state["directory"])


class ProgressBar:
    """Launcher side: a tqdm bar over ``total`` units fed by every worker's tally file."""

    def __init__(self, total: Optional[int], unit: str, desc: str):
        from tqdm import tqdm
        self.directory = tempfile.mkdtemp(prefix="edje-progress-")
        self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def tally(self) -> Tally:
        return Tally(self.directory)

    def _poll(self) -> None:
        done = 0
        for name in os.listdir(self.directory):
            if name.endswith(".count"):
                try:
                    with open(os.path.join(self.directory, name)) as f:
                        done += int(f.read() or 0)
                except (OSError, ValueError):
                    pass
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _loop(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            self._poll()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.bar.close()
        shutil.rmtree(self.directory, ignore_errors=True)
