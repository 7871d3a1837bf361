"""Loading many inputs in worker processes (:func:`load_items`), for ``hevc-vit encode`` and its Ray decode stage.

A worker's life is bound to the process that started it:

* it dies with it, however that process ends (kill -9 included): ``PR_SET_PDEATHSIG`` (Linux) has the kernel
  send it SIGKILL, and every wait for work also checks its parent (other systems). A worker inherits the
  output folder's lock at fork, so one that outlived its run would keep ``--resume`` out;
* SIGINT and SIGTERM are its parent's to handle: the run stops, keeps what finished and closes the pool;
* one that spends longer than ``options.decode_timeout`` on an input (a decoder stuck in C code, a FIFO or a hung
  mount that never answers) is killed: that input fails with the reason and the run goes on, as after a crash;
* a loaded item comes back through the worker's pipe as bytes (its tensors pickled as numpy arrays), never as
  shared memory (``torch.multiprocessing`` would hold one file descriptor per tensor until it is freed): items
  waiting to be packed hold no descriptor, and a run's descriptors stay bounded (two per worker) whatever
  ``max_tokens`` and however small the inputs.
"""

from __future__ import annotations

import copyreg
import ctypes
import io
import os
import pickle
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for

import torch

from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.decode.load import load_item
from hevc_vit.encode.readers.spec import spec_path

PARENT_CHECK_SECONDS = 1.0  # a worker waiting for work checks this often that its parent is alive
JOIN_SECONDS = 5.0  # closing: how long a worker may take to finish its input before it is killed


def default_workers() -> int:
    """Decoding processes when none are asked for: up to 4, leaving a core to the model (per local rank)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, max(0, (os.cpu_count() or 1) // local_world - 1))


def load_items(
    work: Sequence[tuple[int, str]], options: LoadOptions, workers: int, prefetch: int = 4
) -> Iterator[LoadedItem]:
    """``load_item(index, path, options)`` for every ``(index, path)`` of ``work``, yielded in order.

    workers: processes that decode and preprocess (0: here, one at a time). Each gets up to ``prefetch`` inputs
    at a time, and at most ``workers * prefetch`` loaded items wait to be yielded. A worker that dies (killed
    for memory, a decoder that crashes the process) costs only the input it was loading: that input is yielded
    with the reason as its error, the inputs queued behind it go to the other workers, and a new worker takes
    its place. (A ``DataLoader`` ends the whole run instead, from whatever line the main process is on.) A worker
    still on one input after ``options.decode_timeout`` seconds is killed and treated the same way; with
    ``workers=0`` nothing bounds the load (it runs in this process).
    Closing the generator (or an exception in its caller) stops the workers within :data:`JOIN_SECONDS`.
    """
    if workers == 0:
        for index, path in work:
            yield load_item(index, path, options)
        return
    pool = _WorkerPool(options, workers, prefetch)
    try:
        yield from pool.run(list(work))
    finally:
        pool.close()


@dataclass
class _Worker:
    process: object
    conn: object  # the main process's end of a duplex pipe
    current: object  # shared int64: the position the worker is loading (-1: none)
    started: object  # shared double: time.monotonic() when it began loading ``current`` (one clock machine-wide)
    assigned: deque = field(default_factory=deque)  # positions sent, in order, not yet returned


class _WorkerPool:
    def __init__(self, options: LoadOptions, size: int, prefetch: int):
        self.ctx = torch.multiprocessing.get_context()
        self.options, self.prefetch = options, prefetch
        self.workers: list[_Worker] = []
        for _ in range(size):
            self.workers.append(self._start())

    def _start(self) -> _Worker:
        conn, child = self.ctx.Pipe(duplex=True)
        current = self.ctx.Value("q", -1, lock=False)
        started = self.ctx.Value("d", 0.0, lock=False)
        args = (child, self.options, current, started, os.getpid())
        process = self.ctx.Process(target=_worker_main, args=args, daemon=True)
        process.start()
        child.close()
        return _Worker(process, conn, current, started)

    def run(self, work: list[tuple[int, str]]) -> Iterator[LoadedItem]:
        todo = deque(range(len(work)))  # positions not yet sent; those of a dead worker go back to the front
        done: dict[int, LoadedItem] = {}
        next_out = 0
        deaths_without_progress = 0
        while next_out < len(work):
            if next_out in done:
                yield done.pop(next_out)
                next_out += 1
                deaths_without_progress = 0
                continue
            self._send(work, todo, next_out + len(self.workers) * self.prefetch)
            waited = [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]
            ready = set(wait_for(waited, timeout=PARENT_CHECK_SECONDS))
            for slot, worker in enumerate(self.workers):
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                alive = self._receive(worker, done)
                if alive and worker.process.sentinel not in ready:
                    continue
                if not self._replace(slot, work, todo, done):
                    deaths_without_progress += 1
                    if deaths_without_progress > 3 * len(self.workers):
                        raise RuntimeError(
                            f"decoding worker processes keep dying before they load anything (exit code "
                            f"{worker.process.exitcode}); run with workers=0 to see the error"
                        )
            self._end_overdue(work, todo, done)

    def _end_overdue(self, work: list[tuple[int, str]], todo: deque, done: dict[int, LoadedItem]) -> None:
        """Kill every worker that has been on one input for longer than ``decode_timeout``; that input fails with
        the reason, the others it held go back to ``todo`` and a new worker takes its place."""
        limit = self.options.decode_timeout
        if limit is None:
            return
        for slot, worker in enumerate(self.workers):
            pos = worker.current.value  # read before started: the worker writes started, then current
            if pos < 0 or time.monotonic() - worker.started.value <= limit:
                continue
            worker.process.kill()
            worker.process.join(timeout=JOIN_SECONDS)
            self._receive(worker, done)  # it may have sent that result (or others) just before it was killed
            reason = (
                f"TimeoutError: loading this input took longer than {limit:g} s (decode_timeout, --decode-timeout); "
                f"its decoding worker process was ended and the run went on"
            )
            self._replace(slot, work, todo, done, culprit=pos, reason=reason)

    def _send(self, work: list[tuple[int, str]], todo: deque, window_end: int) -> None:
        """Hand out inputs before ``window_end``, to the least busy workers, up to ``prefetch`` each."""
        while todo and todo[0] < window_end:
            worker = min(self.workers, key=lambda w: len(w.assigned))
            if len(worker.assigned) >= self.prefetch:
                return
            pos = todo.popleft()
            worker.assigned.append(pos)
            try:
                worker.conn.send((pos, *work[pos]))
            except OSError:  # it has just died: noticed by the caller, and pos goes to another worker
                return

    def _replace(
        self, slot: int, work, todo: deque, done: dict[int, LoadedItem], culprit: int | None = None, reason: str = ""
    ) -> bool:
        """The worker in ``slot`` is gone (whatever it sent is in): the input it was on (``culprit``, default the
        one it last began) fails with ``reason`` (default: how it died), the others it held go back to the front of
        ``todo``, a new worker takes its place. False when it was on none (one it had finished is not blamed)."""
        worker = self.workers[slot]
        worker.process.join(timeout=JOIN_SECONDS)
        culprit = worker.current.value if culprit is None else culprit
        blamed = culprit in worker.assigned
        if blamed:
            worker.assigned.remove(culprit)
            index, path = work[culprit]
            done[culprit] = LoadedItem(index, spec_path(path), error=reason or _death_reason(worker.process.exitcode))
        todo.extendleft(reversed(worker.assigned))
        worker.conn.close()
        self.workers[slot] = self._start()
        return blamed

    def _receive(self, worker: _Worker, done: dict[int, LoadedItem]) -> bool:
        """Take every result ``worker`` has sent; False when its pipe has closed (the worker is gone)."""
        try:
            while worker.conn.poll():
                pos, item = pickle.loads(worker.conn.recv_bytes())
                worker.assigned.remove(pos)
                done[pos] = item
        except (EOFError, OSError):
            return False
        return True

    def close(self) -> None:
        """Ask every worker to stop, and kill those that have not within :data:`JOIN_SECONDS` (a decoder busy
        on a large input): no worker outlives the pool."""
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self.workers:
            worker.process.join(timeout=JOIN_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()  # it ignores SIGTERM (its parent's to handle)
                worker.process.join(timeout=JOIN_SECONDS)
            worker.conn.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            how += " (often: out of memory)"
    else:
        how = f"exited with code {exitcode}"
    return f"the decoding worker process {how} while loading this input; it was skipped and the run went on"


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ``parent`` ends (Linux; elsewhere a no-op);
    exit now if it already has. Used by the decoding workers and by ranks under torchrun."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the callers' own checks remain
            pass
    if os.getppid() != parent:  # the parent went before the request above took effect
        os._exit(0)


def _worker_main(conn, options: LoadOptions, current, started, parent: int) -> None:
    """One worker: load the inputs it is sent until it is sent None, or its parent is gone."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are the main process's to handle:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it stops the run and closes the pool
    torch.set_num_threads(1)  # many workers decode side by side; the model has the cores
    while True:
        try:
            while not conn.poll(PARENT_CHECK_SECONDS):
                if os.getppid() != parent:
                    return
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        pos, index, path = task
        started.value = time.monotonic()
        current.value = pos
        item = load_item(index, path, options)
        conn.send_bytes(dumps_plain((pos, item)))
        current.value = -1


def dumps_plain(obj: object) -> bytes:
    """``obj`` pickled with its tensors as numpy arrays, by value: nothing in it refers to shared memory or to a
    file descriptor (``torch.multiprocessing``'s reductions are not used), so it can wait anywhere for free."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
    pickler.dump(obj)
    return buffer.getvalue()


def _reduce_tensor(tensor: torch.Tensor):
    tensor = tensor.detach().cpu()
    try:
        return torch.from_numpy, (tensor.contiguous().numpy(),)  # unpickled writable: from_numpy takes it as is
    except TypeError:  # a dtype numpy lacks (bfloat16): torch's own by-value pickling
        return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
