"""Run logging across a resume: records after the resumed step leave metrics.jsonl and TensorBoard."""
import json
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.metrics import RunLogger


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
