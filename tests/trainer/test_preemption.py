"""Stop signals: a real SIGTERM / SIGUSR1 / SIGINT sets the decision, one rank's signal stops every rank with the
same exit code, a second Ctrl-C after the pause stops at once, and uninstall gives the process its previous
handlers back."""
import contextlib
import os
import signal

import pytest

from trainer import preemption
from trainer.preemption import CTRL_C_NOTICE, INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, PreemptionWatch


def _send_to_self(sig: signal.Signals, expected_handler) -> None:
    """Sends `sig` to this process once `expected_handler` (the watch's _handle, or the test's own) is in place: the
    default action would end the process, and a SIGINT nobody caught would stop the whole test session."""
    if signal.getsignal(sig) != expected_handler:
        raise AssertionError(f"{sig.name}: the watch's handler is not installed")
    os.kill(os.getpid(), sig)  # delivered before kill returns; Python runs the handler at the next bytecode


@contextlib.contextmanager
def installed(world_size: int = 1, **options):
    """A watch with its handlers in place for the block, and the previous ones back after it."""
    watch = PreemptionWatch(world_size, **options).install()
    try:
        yield watch
    finally:
        watch.uninstall()


@pytest.mark.parametrize("sig", PreemptionWatch.SIGNALS, ids=lambda s: s.name)
def test_a_real_signal_sets_the_decision(sig):
    watch = PreemptionWatch(world_size=1)
    previous = signal.getsignal(sig)
    watch.install()
    try:
        assert signal.getsignal(sig) != previous
        assert not watch.should_stop() and watch.signal_name == ""
        _send_to_self(sig, watch._handle)
        assert watch.should_stop() and watch.signal_name == sig.name
        assert watch.should_stop()  # the decision stays: the loop checks again after the checkpoint
    finally:
        watch.uninstall()


def test_uninstall_restores_the_previous_handlers():
    """After the run, a signal reaches whoever handled it before (here a recording handler), not the watch."""
    received = []

    def previous_handler(signum, frame):
        received.append(signum)

    originals = {sig: signal.signal(sig, previous_handler) for sig in PreemptionWatch.SIGNALS}
    try:
        watch = PreemptionWatch(world_size=1).install()
        assert all(signal.getsignal(sig) != previous_handler for sig in PreemptionWatch.SIGNALS)
        watch.uninstall()
        for sig in PreemptionWatch.SIGNALS:
            assert signal.getsignal(sig) == previous_handler, sig.name
            _send_to_self(sig, previous_handler)
        assert received == list(PreemptionWatch.SIGNALS)
        assert not watch.should_stop()  # the uninstalled watch saw none of them
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, PREEMPTED_EXIT_CODE), (signal.SIGUSR1, PREEMPTED_EXIT_CODE),
                                       (signal.SIGINT, INTERRUPTED_EXIT_CODE), (signal.SIGHUP, INTERRUPTED_EXIT_CODE)],
                         ids=lambda v: str(v))
def test_the_signal_decides_the_exit_code(sig, code):
    with installed() as watch:
        _send_to_self(sig, watch._handle)
        assert watch.should_stop() and watch.exit_code == code


@pytest.fixture
def clock(monkeypatch):
    """The watch's clock, moved by hand (a loaded machine cannot stretch the pause between two sends)."""
    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    return now


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_another_stop_signal_after_the_pause_stops_at_once(capfd, clock, second):
    """The first Ctrl-C asks for a checkpoint (and says so once); another stop signal within the pause is the same
    request (a key pressed twice); after it, one interrupts: a second Ctrl-C of a direct run, or the SIGTERM that
    torchrun sends its workers on a second Ctrl-C."""
    with installed(announce=True, abort_after_s=2.0) as watch:
        _send_to_self(signal.SIGINT, watch._handle)
        clock[0] += 1.9
        _send_to_self(second, watch._handle)  # within the pause: absorbed
        assert watch.should_stop() and watch.exit_code == INTERRUPTED_EXIT_CODE
        assert capfd.readouterr().err == CTRL_C_NOTICE.format(2.0)
        clock[0] += 0.1
        with pytest.raises(KeyboardInterrupt):
            _send_to_self(second, watch._handle)


def test_a_preemption_then_ctrl_c_is_the_users_stop(clock):
    with installed() as watch:
        _send_to_self(signal.SIGTERM, watch._handle)
        clock[0] += 10
        _send_to_self(signal.SIGINT, watch._handle)  # the first Ctrl-C: a request, never an abort
        assert watch.should_stop() and watch.exit_code == INTERRUPTED_EXIT_CODE


def test_a_hang_up_is_the_users_stop_with_no_abort_pause(clock, capfd):
    """Nobody is at the keyboard after a hang-up: a later SIGTERM (logind ending the session, torchrun's shutdown) is
    the same request, not the abort a second Ctrl-C is; and no Ctrl-C notice for a terminal that is gone."""
    with installed(announce=True, abort_after_s=2.0) as watch:
        _send_to_self(signal.SIGHUP, watch._handle)
        clock[0] += 10
        _send_to_self(signal.SIGTERM, watch._handle)
        assert watch.should_stop() and watch.exit_code == INTERRUPTED_EXIT_CODE
        assert capfd.readouterr().err == ""


def test_an_ignored_hang_up_stays_ignored():
    """nohup: the run is meant to outlive its terminal."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with installed() as watch:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not watch.should_stop()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_handlers_stay_after_a_stop_and_go_after_a_run_without_one():
    for stop in (False, True):
        with installed() as watch:
            if stop:
                _send_to_self(signal.SIGTERM, watch._handle)
            assert watch.should_stop() == stop
            watch.end_of_run()
            assert (signal.getsignal(signal.SIGTERM) == watch._handle) == stop


def test_only_the_announcing_rank_prints_the_notice(capfd):
    with installed() as watch:
        _send_to_self(signal.SIGINT, watch._handle)
        assert watch.should_stop() and capfd.readouterr().err == ""


def _decisions(rank, world_size, signals):
    """Two rounds of the per-step check on every rank; between them rank r gets signals[r] (None: nothing)."""
    with installed(world_size) as watch:
        before = watch.should_stop()
        if signals[rank] is not None:
            _send_to_self(signal.Signals[signals[rank]], watch._handle)
        after = watch.should_stop()  # collective: the signalled rank's flag reaches the other one here
        return before, after, watch.signal_name, watch.exit_code


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_one_ranks_signal_stops_every_rank(distributed_run, signalled_rank):
    """Whichever rank the scheduler signals, both stop after the same step (a rank going on alone would hang in
    the next step's all-reduce)."""
    signals = ["SIGUSR1" if rank == signalled_rank else None for rank in range(2)]
    results = distributed_run(_decisions, 2, signals)
    assert [r[:2] for r in results] == [(False, True), (False, True)]
    assert [r[2] for r in results] == [name or "" for name in signals]
    assert [r[3] for r in results] == [PREEMPTED_EXIT_CODE] * 2


def test_a_ctrl_c_on_one_rank_is_every_ranks_stop(distributed_run):
    """A Ctrl-C reaches one node's ranks, a preemption another's: every rank exits 130, the user's stop (torchrun
    itself restarts failed workers whatever their code: launch/README.md says what that means on several nodes)."""
    results = distributed_run(_decisions, 2, ["SIGINT", "SIGTERM"])
    assert [r[1:] for r in results] == [(True, "SIGINT", 130), (True, "SIGTERM", 130)]
    results = distributed_run(_decisions, 2, [None, "SIGINT"])
    assert [r[3] for r in results] == [INTERRUPTED_EXIT_CODE] * 2
