"""Run logging across a resume (records after the resumed step leave metrics.jsonl and TensorBoard), and the
interval meter's sums and first non-finite step."""
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.metrics import RunLogger, StepMeter


def test_resume_drops_the_records_it_will_write_again(tmp_path):
    log = RunLogger(str(tmp_path), enabled=True)
    for step in range(1, 6):
        log.log(step, {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn by a crash mid-write
    # a resume is a later process: TensorBoard orders event files by name, whose first field is the second it was
    # made (in one process within one second the name's counter decides, and "10" sorts before "9")
    time.sleep(1.1)
    log = RunLogger(str(tmp_path), enabled=True)
    log.resumed(3)  # the checkpoint was at step 3; steps 4 and 5 are trained (and logged) again
    log.log(4, {"loss": 40.0})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # one per logger, no empty extras


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(str(tmp_path / "run"), enabled=False)
    log.resumed(3)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_step_meter_sums_an_interval_and_keeps_the_first_non_finite_step():
    """The engine logs sums[:2] / steps as the interval's loss and top-1, and stops naming first_bad_step when
    the non-finite count is not zero: a later bad step must not move the first one."""
    meter = StepMeter(torch.device("cpu"))
    for step, loss, top1 in [(1, 2.0, 0.5), (2, 4.0, 0.25)]:
        meter.add(step, torch.tensor(loss), torch.tensor(top1))
    assert meter.sums.tolist() == [6.0, 0.75, 0.0] and meter.timer.steps == 2
    assert meter.first_bad_step.item() == -1
    meter.reset()
    assert meter.sums.tolist() == [0.0, 0.0, 0.0] and meter.timer.steps == 0
    for step, loss in [(3, 1.0), (4, float("nan")), (5, float("inf")), (6, 1.0)]:
        meter.add(step, torch.tensor(loss), torch.tensor(1.0))
    assert meter.first_bad_step.item() == 4 and meter.sums[1:].tolist() == [4.0, 2.0]


def test_a_closed_console_stream_is_skipped(monkeypatch, capsys):
    import io

    from trainer.metrics import write_console

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    write_console("a line for nobody")  # ValueError inside print: dropped
    monkeypatch.undo()
    write_console("the next one")
    assert capsys.readouterr().out == "the next one\n"


def test_a_console_that_went_away_does_not_end_the_process(tmp_path):
    """A print to a terminal that hung up (EIO) or into a pipe whose reader ended (EPIPE: `... | tee log` after the tee
    was stopped) raised OSError and ended the run; now the line is dropped, the descriptor goes to /dev/null, and the
    process carries on and exits normally (not with Python's 120 for an unflushable stdout)."""
    go, after = tmp_path / "go", tmp_path / "after"
    code = (f"import pathlib, time\nfrom trainer.metrics import write_console\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            f"for i in range(3):\n    write_console(f'step {{i}} ' * 2000)\n    write_console('warning', stderr=True)\n"
            f"pathlib.Path({str(after)!r}).write_text('carried on')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the readers are gone before the first line
    proc.stderr.close()
    go.touch()
    assert proc.wait(timeout=60) == 0
    assert after.read_text() == "carried on"
