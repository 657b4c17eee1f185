"""cer's lazy-pages server: one process per lazy restore, in place of ``criu lazy-pages``.

    python -m cer.lazy.server lazy-pages -D IMAGES -W WORK_DIR [-o LOG] [--working-set FILE --ref REF]

It speaks to an unmodified ``criu restore --lazy-pages`` (or ``runc restore --lazy-pages``) exactly as CRIU's
own server does (criu/uffd.c): it listens on ``lazy-pages.socket`` in its work directory; the restore
connects once and sends, for each task of the checkpoint (pstree.img), the task's pid as a native int and
then, unless the pid is negative (a zombie), one byte carrying the task's userfaultfd (SCM_RIGHTS). Once its
tasks are restored and stopped, just before they resume, it sends ``LAZY_PAGES_RESTORE_FINISHED`` (u32) and
closes the connection. The server answers every page fault with UFFDIO_COPY from the checkpoint's pages
(UFFDIO_ZEROPAGE where the checkpoint has no lazy page), follows fork, mremap, madvise(DONTNEED) and munmap
as the kernel reports them, and after the restore has finished copies every page still missing in the
background, in large chunks, faults first. It exits 0 once every task has all its pages (or has exited),
and non-zero on anything it cannot handle: cer then kills the restored process rather than let it run with
holes.

What it does beyond CRIU's server:

- With ``--working-set FILE``, the first restore *records*: the pages its tasks fault from the start until
  they have been quiet for ``--record-quiet`` seconds after the restore finished (or ``--record-limit``
  seconds have passed) are written to FILE (cer.lazy.working_set), and only then does the background copy
  start, so that it hides no fault. A later restore of the same checkpoint finds FILE and copies those
  pages first, in runs as large as they come, the moment the restore says its tasks are about to resume;
  then the rest in the background.
- Pages come from one read-only shared mapping of the pages files (cer.lazy.pages): no copy per restore.
- At exit it writes what it did to ``lazy-pages.stats`` (JSON) in its work directory: faults, pages copied,
  the working set's use.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from cer.errors import ImageError, WorkingSetError
from cer.lazy import working_set as ws
from cer.lazy.pages import PAGE_SIZE, Ranges, TaskImage, load_checkpoint
from cer.linux.userfaultfd import (EVENT_FORK, EVENT_PAGEFAULT, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP, MESSAGE_SIZE,
                                   PageFiller, parse_message)

SOCKET_NAME = "lazy-pages.socket"
STATS_NAME = "lazy-pages.stats"
RESTORE_FINISHED = 0x52535446  # "ReSTore Finished", criu/uffd.c
CHUNK_MIN, CHUNK_MAX = 64 << 10, 4 << 20
"""Bytes per UFFDIO_COPY in the background: back to the least after every fault (a fault waits for the chunk
being copied), one step larger after every chunk copied while the process faults nothing (as CRIU's)."""
SLICE = 4 << 20
"""Background bytes between two looks at the userfaultfds."""
PUSH_BATCH = 16
"""Working-set copies between two looks at the userfaultfds: a fault meanwhile waits for at most these."""
GAP_PAGES = 2
"""Working-set runs closer than this many pages are copied as one, the missing pages between them included
(a copy costs about as much as two pages more in it)."""
BACKGROUND_NICE = 10
EARLY_RETRY = 0.002
"""Seconds between two tries of a working-set copy whose VMA the restore has not registered yet."""
_READ_SIZE = MESSAGE_SIZE * 64
_PID = struct.Struct("=i")
_FAULT_ADDRESS = struct.Struct("<16xQ")  # struct uffd_msg: event, reserved, then the fault's flags and address
_FINISHED = struct.Struct("=I")
_MAX_FDS_PER_READ = 16


# Not in cer.errors: raised and caught inside this server's loop only, it never leaves this process.
class ProtocolError(Exception):
    """Something the restore or the kernel said that this server cannot go on from."""


@dataclass(eq=False)
class Task:
    pid: int
    image: TaskImage
    filler: PageFiller
    ranges: Ranges
    exited: bool = False
    child: bool = False


@dataclass
class Stats:
    tasks: int = 0
    forks: int = 0
    faults: int = 0
    zero_faults: int = 0
    pages_on_fault: int = 0
    pages_working_set: int = 0
    pages_background: int = 0
    working_set: str = "none"  # none, recording, recorded, used, ignored (stale or garbled)
    working_set_pages: int = 0
    working_set_reason: str | None = None
    seconds_to_finished: float | None = None  # from the restore's connect
    seconds_working_set: float | None = None  # from the restore's connect until the working set was in
    seconds_total: float | None = None
    events: dict = field(default_factory=dict)


class LazyPagesServer:
    def __init__(self, images: str, working_set: str | None, ref: str | None,
                 record_quiet: float, record_limit: float, log) -> None:
        self.images = images
        self.working_set_path = working_set
        self.ref = ref or images
        self.record_quiet = record_quiet
        self.record_limit = record_limit
        self.log = log
        self.stats = Stats()
        self.checkpoint: dict[int, TaskImage] = {}
        self.tasks: dict[int, Task] = {}  # by the userfaultfd
        self.epoll = select.epoll()
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        self._stream = b""
        self._fds: list[int] = []
        self._announced = 0  # tasks whose pid the restore has sent
        self.finished_at: float | None = None
        self.connected_at = 0.0
        self.started = time.monotonic()
        self.recording: list[tuple[int, int]] | None = None
        self.last_fault = 0.0
        self.queue: list[tuple[Task, int, int, int]] = []  # working-set copies: (task, address, source, length)
        self._queued = 0  # how far self.queue has been copied
        self._early_retry = 0.0  # before the restore finishes: when to try the next working-set copy
        self.chunk = CHUNK_MIN
        self.background = False
        self.fingerprint = ""
        # The working set's copies by task, as (address, source, length), and which file they came from.
        self._plans: dict[int, list[tuple[int, int, int]]] | None = None
        self._set_identity: tuple | None = None

    # -- start-up: everything that can be done before a restore comes ---------------------------------

    def prepare(self) -> None:
        self.checkpoint = load_checkpoint(self.images)
        if self.working_set_path:
            files = sorted({task.pages.path for task in self.checkpoint.values()})
            self.fingerprint = ws.fingerprint(self.images, list(self.checkpoint), files)
            self._load_working_set()
        # Bound under a temporary name and renamed once listening: whoever sees the socket can connect.
        temporary = f".{SOCKET_NAME}.{os.getpid()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        listener.bind(temporary)
        listener.listen(1)
        os.rename(temporary, SOCKET_NAME)
        listener.setblocking(False)
        self.listener = listener
        self.epoll.register(listener.fileno(), select.EPOLLIN)
        self.log(f"ready: {len(self.checkpoint)} task(s), "
                 f"{sum(t.ranges.pages for t in self.checkpoint.values())} lazy pages in {self.images}")

    # -- the loop --------------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            timeout = self._timeout()
            for fd, _mask in self.epoll.poll(timeout):
                self._dispatch(fd)
            if self.finished_at is None:
                if self._queued < len(self.queue) and time.monotonic() >= self._early_retry:
                    self._copy_working_set(early=True)
                continue
            if self.recording is not None and self._recording_over():
                self._save_recording()
            if self._queued < len(self.queue):
                self._copy_working_set()
            elif self.background:
                self._copy_background()
            if self._done():
                return

    def _timeout(self) -> float:
        if self.finished_at is None:
            if self._queued < len(self.queue):  # a working set waits for its VMAs: look again soon
                return max(0.0, self._early_retry - time.monotonic())
            return -1
        if self._queued < len(self.queue) or self.background:
            return 0
        if self.recording is not None:
            return max(0.0, self._recording_ends() - time.monotonic())
        return 0

    def _done(self) -> bool:
        if self.recording is not None or self._queued < len(self.queue):
            return False
        return all(task.exited or not len(task.ranges) for task in self.tasks.values())

    def _dispatch(self, fd: int) -> None:
        if self.listener is not None and fd == self.listener.fileno():
            self._accept()
        elif self.client is not None and fd == self.client.fileno():
            self._read_restore()
        elif fd in self.tasks:
            self._read_events(self.tasks[fd])

    # -- the restore's side: pids and userfaultfds, then "finished" ----------------------------------

    def _accept(self) -> None:
        try:
            client, _address = self.listener.accept()
        except BlockingIOError:
            return
        # One restore per server, as CRIU's: nobody else gets in after it.
        self.epoll.unregister(self.listener.fileno())
        self.listener.close()
        self.listener = None
        client.setblocking(False)
        self.client = client
        self.connected_at = time.monotonic()
        self.epoll.register(client.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self._load_working_set()

    def _read_restore(self) -> None:
        try:
            data, ancillary, flags, _address = self.client.recvmsg(
                4096, socket.CMSG_SPACE(_MAX_FDS_PER_READ * 4))
        except BlockingIOError:
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self._fds.extend(struct.unpack(f"={len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("the restore sent more file descriptors at once than a restore does")
        if not data:
            self._restore_closed()
            return
        self._stream += data
        self._parse_restore()

    def _parse_restore(self) -> None:
        while True:
            if self._announced < len(self.checkpoint):
                if len(self._stream) < _PID.size:
                    return
                (pid,) = _PID.unpack_from(self._stream)
                if pid < 0:  # a zombie: nothing to serve
                    self._take_task(-pid, None)
                    self._stream = self._stream[_PID.size:]
                    continue
                if len(self._stream) < _PID.size + 1:
                    return
                if not self._fds:
                    raise ProtocolError(f"task {pid}'s pid came without its userfaultfd")
                self._stream = self._stream[_PID.size + 1:]
                self._take_task(pid, self._fds.pop(0))
                continue
            if self._fds:
                raise ProtocolError(f"the restore sent {len(self._fds)} file descriptor(s) more than it has tasks")
            if self.finished_at is None:
                if len(self._stream) < _FINISHED.size:
                    return
                (word,) = _FINISHED.unpack_from(self._stream)
                if word != RESTORE_FINISHED:
                    raise ProtocolError(f"expected the restore's 'finished' ({RESTORE_FINISHED:#x}), got {word:#x}")
                self._stream = self._stream[_FINISHED.size:]
                self._restore_finished()
                continue
            if self._stream:
                raise ProtocolError(f"{len(self._stream)} unexpected bytes after the restore finished")
            return

    def _take_task(self, pid: int, fd: int | None) -> None:
        self._announced += 1
        image = self.checkpoint.get(pid)
        if image is None or any(task.pid == pid and not task.child for task in self.tasks.values()):
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"the restore sent pid {pid}, which is {'not a task of this checkpoint' if image is None else 'a task sent twice'}")
        if fd is None:
            self.log(f"task {pid} is a zombie: no pages")
            return
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = "?"
        if kind != "anon_inode:[userfaultfd]":
            os.close(fd)
            raise ProtocolError(f"the restore sent a {kind} for task {pid}, not a userfaultfd")
        os.set_blocking(fd, False)
        task = Task(pid, image, PageFiller(fd), image.ranges.copy())
        self._add_task(task)
        self.queue.extend((task, *copy) for copy in (self._plans or {}).get(pid, ()))
        self.stats.tasks += 1
        self.log(f"task {pid}: userfaultfd {fd}, {image.ranges.pages} lazy pages")

    def _add_task(self, task: Task) -> None:
        self.tasks[task.filler.fd] = task
        self.epoll.register(task.filler.fd, select.EPOLLIN)

    def _restore_finished(self) -> None:
        self.finished_at = time.monotonic()
        self.stats.seconds_to_finished = round(self.finished_at - self.connected_at, 4)
        self.log(f"the restore finished ({self._announced} task(s))")
        if self._queued < len(self.queue):
            self.log(f"copying the working set first: {len(self.queue) - self._queued} copies left")
        if self.recording is None:
            self._start_background()

    def _restore_closed(self) -> None:
        self.epoll.unregister(self.client.fileno())
        self.client.close()
        self.client = None
        if self.finished_at is None:
            raise ProtocolError("the restore closed the connection before it finished (it failed, or was killed)")
        if self._stream:
            raise ProtocolError("the restore closed the connection in the middle of a message")

    # -- working sets ---------------------------------------------------------------------------------

    def _load_working_set(self) -> None:
        """Read the working set and work out its copies: once as a spare (off the restore's path), and again
        at the restore's connect only if the file changed meanwhile (a spare may be older than the set it
        should use, or the set may have been forgotten)."""
        if not self.working_set_path:
            return
        try:
            identity = _identity(os.stat(self.working_set_path))
        except OSError:
            identity = None
        if self._plans is not None and identity == self._set_identity:
            return
        self._set_identity, self._plans, self.recording = identity, {}, None
        self.stats.working_set, self.stats.working_set_reason, self.stats.working_set_pages = "none", None, 0
        try:
            found = ws.read(self.working_set_path) if identity is not None else None
        except (OSError, WorkingSetError) as error:
            self.stats.working_set, self.stats.working_set_reason = "ignored", str(error)
            self.log(f"working set ignored, recording anew: {error}")
            found = None
        if found is not None and found.fingerprint != self.fingerprint:
            self.stats.working_set = "ignored"
            self.stats.working_set_reason = "recorded from other images of this checkpoint"
            self.log("working set ignored, recording anew: it was recorded from other images")
            found = None
        if found is None:
            self.recording = []
            if self.stats.working_set == "none":
                self.stats.working_set = "recording"
            return
        self.stats.working_set = "used"
        self.stats.working_set_pages = len(found.pages)
        for pid, addresses in found.by_task().items():
            if pid in self.checkpoint:
                self._plans[pid] = _plan(self.checkpoint[pid], addresses)
        self.log(f"working set of {len(found.pages)} pages: {sum(map(len, self._plans.values()))} copies planned")

    def _copy_working_set(self, early: bool = False) -> None:
        """The next batch of queued copies, as fast as the kernel takes them. The pages stay in their task's
        ranges until the batch is done (a fault meanwhile then copies one itself, and the batch finds it
        present); a copy that meets a pending event (EAGAIN) ends the batch, to go on once it is read.

        ``early``: the restore has not finished. CRIU's restorer registers each lazy VMA with the userfaultfd
        once it has moved the VMA to its final address (criu/pie/restorer.c, vma_remap), so a copy can land
        nowhere else than where the checkpoint puts that page; until the VMA is registered the copy fails
        with ENOENT, and the batch ends, to be tried again a moment later. Copying while CRIU still works
        (the network unlock, runc's hooks) takes the working set off the path of the container's first
        request."""
        done_copies = []
        index, end = self._queued, min(len(self.queue), self._queued + PUSH_BATCH)
        while index < end:
            task, address, source, length = self.queue[index]
            if task.exited:
                index += 1
                continue
            copied, err = task.filler.copy(address, source, length)
            copied -= copied % PAGE_SIZE
            if copied:
                done_copies.append((task, address, address + copied))
            if err == errno.EAGAIN or (early and err == errno.ENOENT):
                self.queue[index] = (task, address + copied, source + copied, length - copied)
                if err == errno.ENOENT:
                    self._early_retry = time.monotonic() + EARLY_RETRY
                break
            if err == errno.EEXIST and copied + PAGE_SIZE < length:
                skip = copied + PAGE_SIZE  # that page came on a fault meanwhile
                self.queue[index] = (task, address + skip, source + skip, length - skip)
                continue
            if err in (errno.ESRCH, errno.ENOSPC):
                self._exited(task)
            elif err not in (0, errno.EEXIST, errno.ENOENT):
                raise ProtocolError(f"task {task.pid}: UFFDIO_COPY of its working set at {address:#x}: "
                                    f"{os.strerror(err)}")
            index += 1
        self._queued = index
        for task, low, high in done_copies:
            if not task.exited:
                task.ranges.take(low, high)
                self.stats.pages_working_set += (high - low) // PAGE_SIZE
        if self._queued == len(self.queue):
            self.stats.seconds_working_set = round(time.monotonic() - self.connected_at, 4)
            self.log(f"working set copied: {self.stats.pages_working_set} pages"
                     f"{' before the restore finished' if early else ''}")

    def _recording_ends(self) -> float:
        """When recording stops: the container quiet for ``record_quiet`` after the restore, or ``record_limit``."""
        return min(self.finished_at + self.record_limit, max(self.last_fault, self.finished_at) + self.record_quiet)

    def _recording_over(self) -> bool:
        return time.monotonic() >= self._recording_ends()

    def _save_recording(self) -> None:
        pages, self.recording = self.recording, None
        self._start_background()
        seconds = round(time.monotonic() - self.started, 3)
        recorded = ws.WorkingSet(self.ref, self.fingerprint, ws.now(), seconds, tuple(pages))
        try:
            ws.write(self.working_set_path, recorded)
        except OSError as error:
            self.log(f"Error: cannot write the working set to {self.working_set_path}: {error}")
            return
        self.stats.working_set, self.stats.working_set_pages = "recorded", len(pages)
        self.log(f"working set recorded: {len(pages)} pages in {seconds:.3f} s")

    # -- the kernel's side: userfaultfd events ----------------------------------------------------------

    def _read_events(self, task: Task) -> None:
        while not task.exited:
            try:
                raw = os.read(task.filler.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as error:
                raise ProtocolError(f"task {task.pid}: cannot read its userfaultfd: {error.strerror}") from None
            if len(raw) % MESSAGE_SIZE:
                raise ProtocolError(f"task {task.pid}: a userfaultfd read of {len(raw)} bytes")
            for offset in range(0, len(raw), MESSAGE_SIZE):
                if raw[offset] == EVENT_PAGEFAULT:  # the common case, without a Message
                    self.stats.faults += 1
                    self._fault(task, _FAULT_ADDRESS.unpack_from(raw, offset)[0] & ~(PAGE_SIZE - 1))
                    continue
                try:
                    message = parse_message(raw[offset:offset + MESSAGE_SIZE])
                except ValueError as error:
                    raise ProtocolError(f"task {task.pid}: {error}") from None
                self.stats.events[message.name] = self.stats.events.get(message.name, 0) + 1
                self._handle(task, message)
            if len(raw) < _READ_SIZE:
                return  # read all there was (level-triggered epoll says if more comes)

    def _handle(self, task: Task, message) -> None:
        if message.event == EVENT_FORK:
            child = Task(task.pid, task.image, PageFiller(message.fd), task.ranges.copy(), child=True)
            os.set_blocking(message.fd, False)
            self._add_task(child)
            self.stats.forks += 1
            self.log(f"task {task.pid} forked: {child.ranges.pages} pages still to serve to the child")
        elif message.event == EVENT_REMAP:
            self._forget_queued(task)
            task.ranges.move(message.source, message.start, message.end - message.start)
        elif message.event in (EVENT_REMOVE, EVENT_UNMAP):
            self._forget_queued(task)
            start, end = message.start & ~(PAGE_SIZE - 1), _page_up(message.end)
            # madvise(DONTNEED) keeps the VMA: unregistered, its next touch is an ordinary zero page, not ours.
            if message.event == EVENT_REMOVE and end > start:
                err = task.filler.unregister(start, end - start)
                if err == errno.ENOMEM:
                    self._exited(task)
                    return
                if err:
                    raise ProtocolError(f"task {task.pid}: cannot unregister {start:#x}-{end:#x}: {os.strerror(err)}")
            task.ranges.take(start, end)

    def _forget_queued(self, task: Task) -> None:
        """The task's address space changed: working-set copies not done yet may now name the wrong place. The
        pages they were for come on a fault or in the background instead."""
        left = [entry for entry in self.queue[self._queued:] if entry[0] is not task]
        if len(left) < len(self.queue) - self._queued:
            self.log(f"task {task.pid} changed its mappings: {len(self.queue) - self._queued - len(left)} working-set "
                     "copies left to faults")
            self.queue[self._queued:] = left

    def _fault(self, task: Task, address: int) -> None:
        self.last_fault = time.monotonic()
        self.chunk = CHUNK_MIN
        found = task.ranges.find(address)
        if found is None:
            # Not a lazy page of the checkpoint (a zero page), or copied since the fault was queued.
            done, err = task.filler.zero(address, PAGE_SIZE)
            if err == errno.EEXIST:
                task.filler.wake(address, PAGE_SIZE)
            elif err in (errno.ESRCH, errno.ENOSPC):
                self._exited(task)
            elif err not in (0, errno.ENOENT, errno.EAGAIN):
                raise ProtocolError(f"task {task.pid}: UFFDIO_ZEROPAGE at {address:#x}: {os.strerror(err)}")
            elif err == errno.EAGAIN:
                # The address space is changing: an event is pending; the thread faults again once woken.
                task.filler.wake(address, PAGE_SIZE)
            else:
                self.stats.zero_faults += 1
            return
        low, _high, image = found
        image_address = image + address - low
        if self.recording is not None and not task.child:
            self.recording.append((task.pid, image_address))
        self.stats.pages_on_fault += self._serve(task, address, address + PAGE_SIZE) // PAGE_SIZE

    def _serve(self, task: Task, start: int, end: int) -> int:
        """Copy whatever of ``[start, end)`` the task still lacks; the bytes copied.

        One range at a time, taken out only while it is copied: a fork reported meanwhile (the copy then
        fails with EAGAIN) must find every page the parent does not have yet still in its ranges."""
        copied = 0
        while not task.exited:
            found = task.ranges.next_within(start, end)
            if found is None:
                break
            low, high = found
            for piece in task.ranges.take(low, high):
                copied += self._copy(task, *piece)
            start = high
        return copied

    def _copy(self, task: Task, start: int, end: int, image: int) -> int:
        """Copy ``[start, end)`` (taken from ``task.ranges``) from the checkpoint; what the kernel did not take
        goes back, unless it never can (the process is gone, the VMA is gone). Returns the bytes copied."""
        copied = 0
        while start < end and not task.exited:
            source = task.image.source(image, end - start)
            if source is None:
                raise ProtocolError(f"task {task.pid}: no pages in the checkpoint for {image:#x}+{end - start:#x}")
            done, err = task.filler.copy(start, source, end - start)
            done -= done % PAGE_SIZE
            copied += done
            start, image = start + done, image + done
            if not err or start >= end:
                continue
            if err in (errno.ESRCH, errno.ENOSPC):
                self._exited(task)
            elif err == errno.EAGAIN:
                # A fork, mremap or munmap is pending on the userfaultfd: read it, then try the rest again.
                task.ranges.insert(start, end, image)
                self._read_events(task)
                return copied + self._serve(task, start, end)
            elif err == errno.EEXIST:
                start, image = start + PAGE_SIZE, image + PAGE_SIZE  # present already: not ours to overwrite
            elif err == errno.ENOENT:
                return copied  # no VMA there any more (an unmap is on its way)
            else:
                raise ProtocolError(f"task {task.pid}: UFFDIO_COPY at {start:#x}: {os.strerror(err)}")
        return copied

    def _start_background(self) -> None:
        """From here on the server copies what is left while the container runs: at a lower priority, so that
        on a busy host the container's own work comes first (a fault still gets the CPU the faulting process
        gave up while it waits)."""
        self.background = True
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)

    def _copy_background(self) -> None:
        budget = SLICE
        for task in list(self.tasks.values()):
            while budget > 0 and not task.exited and len(task.ranges):
                low, high, _image = task.ranges.first()
                high = min(high, low + self.chunk)
                self.stats.pages_background += self._serve(task, low, high) // PAGE_SIZE
                budget -= high - low
                self.chunk = min(CHUNK_MAX, self.chunk + CHUNK_MIN)

    def _exited(self, task: Task) -> None:
        if not task.exited:
            task.exited = True
            task.ranges = Ranges()
            self.epoll.unregister(task.filler.fd)
            self.log(f"task {task.pid}{' (a child)' if task.child else ''} has exited")

    # -- the end ----------------------------------------------------------------------------------------

    def write_stats(self) -> None:
        self.stats.seconds_total = round(time.monotonic() - self.started, 4)
        try:
            with open(f".{STATS_NAME}.tmp", "w") as file:
                json.dump(self.stats.__dict__, file)
            os.rename(f".{STATS_NAME}.tmp", STATS_NAME)
        except OSError as error:
            self.log(f"cannot write {STATS_NAME}: {error}")



def _plan(image: TaskImage, addresses: list[int]) -> list[tuple[int, int, int]]:
    """The copies that bring a task the recorded pages ``addresses`` (in the order they were first faulted),
    as ``(address, source, length)``, worked out on the task's address space as the checkpoint has it (so
    addresses at dump time are addresses now): runs of pages, within one range each, in the order the
    recorded restore first needed them, so that what the process asks for first comes first."""
    first_touch: dict[int, int] = {}
    for order, address in enumerate(addresses):
        if address % PAGE_SIZE == 0:  # not a page: a garbled set costs nothing but this entry
            first_touch.setdefault(address, order)
    runs: list[list[int]] = []  # [start, end, first touch of any page in it]
    for address in sorted(first_touch):
        if runs and address <= runs[-1][1] + GAP_PAGES * PAGE_SIZE:
            runs[-1][1] = address + PAGE_SIZE
            runs[-1][2] = min(runs[-1][2], first_touch[address])
        else:
            runs.append([address, address + PAGE_SIZE, first_touch[address]])
    runs.sort(key=lambda run: run[2])
    copies = []
    for start, end, _order in runs:
        while (found := image.ranges.next_within(start, end)) is not None:
            low, high = found
            source = image.source(low, high - low)
            if source is not None:  # None: beyond what the pages file holds for it; a fault will say so
                copies.append((low, source, high - low))
            start = high
    return copies


def _identity(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _page_up(value: int) -> int:
    return -(-value // PAGE_SIZE) * PAGE_SIZE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cer.lazy.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["lazy-pages"])
    parser.add_argument("-D", "--images-dir", required=True)
    parser.add_argument("-W", "--work-dir", required=True)
    parser.add_argument("-o", "--log-file", default="lazy-pages.log")
    parser.add_argument("--working-set", help="record the working set to this file, or serve it first if it exists")
    parser.add_argument("--ref", help="the checkpoint's name, kept in the working set")
    parser.add_argument("--record-quiet", type=float, default=1.0)
    parser.add_argument("--record-limit", type=float, default=10.0)
    args = parser.parse_args(argv)
    os.chdir(args.work_dir)  # the socket's name is relative, as CRIU's: no limit on the work directory's path
    log_file = open(args.log_file, "a", buffering=1)  # noqa: SIM115 (the process's whole life)
    started = time.monotonic()

    def log(text: str) -> None:
        log_file.write(f"({time.monotonic() - started:9.4f}) {text}\n")

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    server = LazyPagesServer(os.path.abspath(args.images_dir), args.working_set, args.ref,
                             args.record_quiet, args.record_limit, log)
    try:
        server.prepare()
        server.run()
    except (ProtocolError, ImageError, OSError) as error:
        log(f"Error: {error}")
        server.write_stats()
        return 1
    server.write_stats()
    log(f"done: {json.dumps(server.stats.__dict__)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
