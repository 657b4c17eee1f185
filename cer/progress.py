"""Telling the operator how the first fill of the pools goes: a progress bar on a terminal, log lines
elsewhere, and one line when every pool is ready (or can't be)."""

import sys
import threading
import time

from loguru import logger

# States in which a pool will not fill until something outside changes.
_STUCK = {"failed", "unavailable", "crashed", "unresponsive"}


def fill_counts(status: dict) -> tuple[int, int, bool, list[str]]:
    """Namespaces idle and wanted over the pools that can fill, whether some are still loading their
    checkpoint, and the pools that cannot fill."""
    ready = wanted = 0
    loading = False
    stuck = []
    for pool in status["pools"]:
        name = f"{pool['ref']['labels']['namespace']}/{pool['ref']['name']}"
        if pool["state"] in _STUCK:
            stuck.append(f"{name} ({pool['state']}: {pool.get('last_error')})")
            continue
        loading = loading or pool["state"] == "loading"
        for counts in pool["types"].values():
            if counts["supported"]:
                wanted += counts["target"]
                ready += min(counts["idle"], counts["target"])
    return ready, wanted, loading, stuck


class FillReporter:
    """Polls the daemon's status until the pools are full, in a thread of its own."""

    def __init__(self, status, interval: float = 0.2, log_every: float = 2.0) -> None:
        self._status = status
        self._interval = interval
        self._log_every = log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cer-fill-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        bar = _TerminalBar() if sys.stderr.isatty() else None
        last_log = 0.0
        try:
            while not self._stop.wait(self._interval):
                try:
                    ready, wanted, loading, stuck = fill_counts(self._status())
                except Exception as error:  # noqa: BLE001 - progress is best effort, serving is not
                    logger.debug("fill progress: {}", error)
                    continue
                if bar is not None:
                    bar.update(ready, wanted)
                elif time.monotonic() - last_log >= self._log_every:
                    logger.info("filling pools: {}/{} namespaces ready", ready, wanted)
                    last_log = time.monotonic()
                if ready >= wanted and not loading:
                    break
        finally:
            if bar is not None:
                bar.close()
        if self._stop.is_set():
            return
        elapsed = time.monotonic() - started
        if stuck:
            logger.warning("pools ready ({} namespaces in {:.1f} s) except: {}", wanted, elapsed, "; ".join(stuck))
        else:
            logger.info("every pool is ready: {} namespaces in {:.1f} s", wanted, elapsed)


class _TerminalBar:
    def __init__(self) -> None:
        from rich.progress import Progress  # noqa: PLC0415 - only on a terminal

        self._progress = Progress(transient=True)
        self._task = self._progress.add_task("filling pools", total=None)
        self._progress.start()

    def update(self, ready: int, wanted: int) -> None:
        self._progress.update(self._task, completed=ready, total=wanted)

    def close(self) -> None:
        self._progress.stop()
