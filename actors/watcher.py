"""The process watcher: tells pools when the process that holds one of their namespaces exits.

One thread the actor owns polls every watched pidfd; it never touches the actor's state, only hands
exits to the actor through its proxy. Registrations reach the thread through a queue and a wake-up pipe.
"""

import os
import queue
import select
import threading

import pykka
from loguru import logger

from cer.actors.told import tell, told


class ProcessWatcher(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        # pidfd -> (owner, key, pid)
        self._watched: dict[int, tuple[pykka.ActorProxy, object, int]] = {}
        self._keys: dict[object, int] = {}
        self._changes: queue.SimpleQueue = queue.SimpleQueue()

    def on_start(self) -> None:
        self._self = self.actor_ref.proxy()
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._poll, name="cer-process-watcher", daemon=True)
        self._thread.start()

    @told
    def watch(self, pidfd: int, pid: int, owner: pykka.ActorProxy, key: object) -> None:
        """Take ``pidfd`` (now ours to close) and call ``owner.holder_exited(key, pid)`` when it exits.

        A key watched already is moved to the new process.
        """
        self.unwatch(key)
        self._watched[pidfd] = (owner, key, pid)
        self._keys[key] = pidfd
        self._change("add", pidfd)

    @told
    def unwatch(self, key: object) -> None:
        pidfd = self._keys.pop(key, None)
        if pidfd is not None:
            del self._watched[pidfd]
            self._change("remove", pidfd)

    @told
    def exited(self, pidfd: int) -> None:
        entry = self._watched.pop(pidfd, None)
        if entry is None:
            return  # unwatched while the exit was on its way
        owner, key, pid = entry
        del self._keys[key]
        self._change("remove", pidfd)
        tell(owner.holder_exited, key, pid)  # an owner that stopped meanwhile has released all

    def watching(self) -> int:
        return len(self._watched)

    def _change(self, action: str, pidfd: int) -> None:
        self._changes.put((action, pidfd))
        os.write(self._wake_write, b"x")

    def _poll(self) -> None:
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        registered: set[int] = set()  # what this thread polls; a removal can race an exit in one batch
        while True:
            events = poller.poll()
            # Exits first, then changes: a removal applied first would close the fd an exit names.
            for fd, _event in events:
                if fd in registered:
                    registered.discard(fd)
                    poller.unregister(fd)  # reported once; the actor has it closed
                    tell(self._self.exited, fd)
            if not any(fd == self._wake_read for fd, _event in events):
                continue
            try:
                os.read(self._wake_read, 4096)
            except BlockingIOError:
                pass
            while not self._changes.empty():
                action, pidfd = self._changes.get()
                if action == "stop":
                    return
                if action == "add":
                    poller.register(pidfd, select.POLLIN)
                    registered.add(pidfd)
                else:
                    if pidfd in registered:
                        registered.discard(pidfd)
                        poller.unregister(pidfd)
                    os.close(pidfd)

    def on_stop(self) -> None:
        self._changes.put(("stop", -1))
        os.write(self._wake_write, b"x")
        self._thread.join(5)
        # Removals the thread did not get to still hold their fds.
        while not self._changes.empty():
            action, pidfd = self._changes.get()
            if action == "remove":
                os.close(pidfd)
        for pidfd in self._watched:
            os.close(pidfd)
        if self._watched:
            logger.info("stopped watching {} namespace holder(s)", len(self._watched))
        os.close(self._wake_read)
        os.close(self._wake_write)
