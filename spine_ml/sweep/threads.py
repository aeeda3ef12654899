"""Tail widening (`sweep.widen_tail`): the CPUs of finished trials go to the trials still running.

A sweep's last trials often run alone: 8 trials on 2 slots, and whichever one Optuna sampled last
(a slow backbone, or an ASHA survivor paying for its full CV) leaves the other slot idle. Once the
searcher has started its last trial and nothing waits for a slot, the driver says so to a small Ray
actor (the board); each CPU trial asks the board after every epoch how many torch threads it may
use and takes them. A trial's share on its node is the CPUs the sweep's trials held there at most,
split over the trials still running there, never below its own reservation: the sweep never uses
more CPUs than it held, and a trial on a GPU keeps its threads.

Ray's own ResourceChangingScheduler would move reservations too, but it pauses and restarts a
function trial from a checkpoint and cannot reuse workers (`sweep.reuse_workers`); torch's
intra-op threads can change between two epochs at no cost.
"""
from __future__ import annotations

import logging
import math
import time

from ray.tune import Callback

log = logging.getLogger(__name__)


_DRIVER_BOARD = None  # the driver's board handle, for TailSignal (callbacks are pickled: no handle in them)


def tail_shares(trials: dict[str, tuple[str, float]], peak: dict[str, float]) -> dict[str, int]:
    """Threads per running trial in the tail: `trials` maps trial id -> (node, CPUs reserved),
    `peak` maps node -> the most CPUs the sweep's trials held there at once."""
    running: dict[str, list[str]] = {}
    for trial_id, (node, _) in trials.items():
        running.setdefault(node, []).append(trial_id)
    shares = {}
    for node, ids in running.items():
        per_trial = math.floor(peak.get(node, 0.0) / len(ids))
        for trial_id in ids:
            shares[trial_id] = max(int(trials[trial_id][1]), per_trial, 1)
    return shares


class ThreadBoard:
    """Who runs where, and whether the sweep is in its tail. Runs as a Ray actor (0 CPUs)."""

    def __init__(self) -> None:
        self.trials: dict[str, tuple[str, float]] = {}
        self.peak: dict[str, float] = {}
        self.tail = False
        self.running: set[str] = set()  # what Tune runs: a trial still starting up is not registered yet

    def register(self, trial_id: str, node: str, cpus: float) -> None:
        self.trials[trial_id] = (node, cpus)
        held = sum(c for n, c in self.trials.values() if n == node)
        self.peak[node] = max(self.peak.get(node, 0.0), held)

    def unregister(self, trial_id: str) -> None:
        self.trials.pop(trial_id, None)

    def set_tail(self, tail: bool, running: list[str]) -> None:
        self.tail, self.running = tail, set(running)

    def threads(self, trial_id: str) -> int:
        if trial_id not in self.trials:
            return 0  # unknown: keep what you have
        own = max(1, int(self.trials[trial_id][1]))
        if not self.tail or not self.running <= set(self.trials):
            return own
        live = {t: self.trials[t] for t in self.running | {trial_id}}
        return tail_shares(live, self.peak)[trial_id]


def start_board() -> str:
    """Start this driver's board actor (it dies with the driver); returns its name for the trials."""
    import uuid

    import ray

    global _DRIVER_BOARD
    name = f"spine-ml-threads-{uuid.uuid4().hex[:12]}"
    _DRIVER_BOARD = ray.remote(ThreadBoard).options(name=name, num_cpus=0, max_concurrency=1).remote()
    return name


def stop_board() -> None:
    import ray

    global _DRIVER_BOARD
    board, _DRIVER_BOARD = _DRIVER_BOARD, None
    if board is not None:
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass


class TailSignal(Callback):
    """Driver side: tells the board when the sweep enters (or, after a retry, leaves) its tail."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.sent: tuple[bool, tuple[str, ...]] | None = None

    def setup(self, *args, **info):
        self.sent = None  # a resumed sweep pickled what it last sent; this driver's board knows nothing yet

    def on_step_end(self, iteration, trials, **info):
        from ray.tune.experiment import Trial

        waiting = any(t.status in (Trial.PENDING, Trial.PAUSED) for t in trials)
        tail = len(trials) >= self.num_samples and not waiting
        running = tuple(sorted(t.trial_id for t in trials if t.status == Trial.RUNNING))
        if (tail, running) != self.sent and _DRIVER_BOARD is not None:
            _DRIVER_BOARD.set_tail.remote(tail, list(running))
            self.sent = (tail, running)

    def _gone(self, trial) -> None:
        if _DRIVER_BOARD is not None:
            _DRIVER_BOARD.unregister.remote(trial.trial_id)  # a killed trial could not say so itself

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._gone(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._gone(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._gone(trial)


class TrialThreads:
    """Trial side: registers with the board and follows its share between epochs."""

    def __init__(self, board: str | None, trial_id: str, cpus: float):
        import torch

        from spine_ml.cpus import available_cpus

        self.trial_id, self.cpus = trial_id, cpus
        self.limit = available_cpus()  # this process's CPUs: no share goes above them
        self.most = torch.get_num_threads()
        self.extra_thread_seconds = 0.0  # threads above the reservation x seconds held: the tail's borrowed CPU time
        self._since = time.perf_counter()
        self.board = None
        if board is None:
            return
        import ray

        try:
            self.board = ray.get_actor(board)
            self.board.register.remote(trial_id, ray.get_runtime_context().get_node_id(), cpus)
        except Exception as error:  # noqa: BLE001 - no board (an old sweep's state): keep the reservation
            log.debug("no thread board: %s", error)
            self.board = None

    def follow(self) -> None:
        """Set torch's intra-op threads to the board's share (capped by this process's CPUs)."""
        if self.board is None:
            return
        import ray
        import torch

        try:
            share = ray.get(self.board.threads.remote(self.trial_id), timeout=10)
        except Exception as error:  # noqa: BLE001 - the board went away: keep the threads we have
            log.debug("thread board unreachable: %s", error)
            self.board = None
            return
        share = min(share, self.limit)
        if share >= 1 and share != torch.get_num_threads():
            self._account()
            torch.set_num_threads(share)
            self.most = max(self.most, share)

    def _account(self) -> None:
        import torch

        now = time.perf_counter()
        self.extra_thread_seconds += max(0.0, torch.get_num_threads() - max(1.0, self.cpus)) * (now - self._since)
        self._since = now

    def close(self) -> None:
        self._account()
        if self.board is not None:
            try:
                self.board.unregister.remote(self.trial_id)
            except Exception:  # noqa: BLE001
                pass
            self.board = None
