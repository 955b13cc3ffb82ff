"""Stop signals: a real SIGTERM / SIGUSR1 sets the decision, one rank's signal stops every rank, and uninstall
gives the process its previous handlers back."""
import os
import signal

import pytest

from trainer.preemption import PreemptionWatch


def _send_to_self(sig: signal.Signals, expected_handler) -> None:
    """Sends `sig` to this process once the watch's handler is in place (the default action would end the
    process, taking the test runner with it)."""
    if signal.getsignal(sig) != expected_handler:
        raise AssertionError(f"{sig.name}: the watch's handler is not installed")
    os.kill(os.getpid(), sig)  # delivered before kill returns; Python runs the handler at the next bytecode


@pytest.mark.parametrize("sig", PreemptionWatch.SIGNALS, ids=lambda s: s.name)
def test_a_real_signal_sets_the_decision(sig):
    watch = PreemptionWatch(world_size=1)
    previous = signal.getsignal(sig)
    watch.install()
    try:
        assert signal.getsignal(sig) != previous
        assert not watch.should_stop() and watch.signal_name == ""
        _send_to_self(sig, signal.getsignal(sig))
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


def _decisions(rank, world_size, signalled_rank):
    """Two rounds of the per-step check on every rank; between them only `signalled_rank` gets SIGUSR1."""
    watch = PreemptionWatch(world_size).install()
    try:
        before = watch.should_stop()
        if rank == signalled_rank:
            _send_to_self(signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        after = watch.should_stop()  # collective: the signalled rank's flag reaches the other one here
        return before, after, watch.signal_name
    finally:
        watch.uninstall()


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_one_ranks_signal_stops_every_rank(distributed_run, signalled_rank):
    """Whichever rank the scheduler signals, both stop after the same step (a rank going on alone would hang in
    the next step's all-reduce)."""
    results = distributed_run(_decisions, 2, signalled_rank)
    assert [r[:2] for r in results] == [(False, True), (False, True)]
    assert [r[2] for r in results] == ["SIGUSR1" if rank == signalled_rank else "" for rank in range(2)]
