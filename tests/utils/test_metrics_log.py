"""metrics.jsonl, samples.jsonl and TensorBoard events, and what a resume forgets of them."""
import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sophiavl.utils.metrics_log import MetricsLogger, drop_steps_after

SAMPLES = [{"outcome": 1.0, "thinking": 0.25, "reward": 1.25, "completion": "<answer>é</answer>"}]


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tensorboard(output_dir):
    events = EventAccumulator(os.path.join(output_dir, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_drop_steps_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    drop_steps_after(str(path), 3)  # no file yet: nothing to do, nothing created
    assert not path.exists()
    path.write_text('{"step": 1, "a": 1}\n{"step": 2}\n\n{"note": "no step"}\n{"step": 3}\n{"step": 4}\n')
    drop_steps_after(str(path), 2)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2}\n{"note": "no step"}\n'


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path), enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.log_samples(1, "Q", SAMPLES)
    logger.close()
    assert os.listdir(tmp_path) == []


def test_log_writes_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(str(tmp_path), enabled=True)
    logger.log(1, {"loss": 0.5, "reward": 2, "variant": "full"})
    logger.log(2, {"loss": 0.25})
    logger.log_samples(2, "Which?", SAMPLES)
    logger.close()
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "reward": 2, "variant": "full"},
                                                {"step": 2, "loss": 0.25}]
    assert '"completion": "<answer>é</answer>"' in (tmp_path / "samples.jsonl").read_text(encoding="utf-8")
    assert rows(tmp_path / "samples.jsonl") == [{"step": 2, "prompt": "Which?", "samples": SAMPLES}]

    events = tensorboard(tmp_path)
    assert sorted(events.Tags()["scalars"]) == ["loss", "reward"]  # the string metric is not a scalar
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    [text] = events.Tensors("samples/text_summary")
    assert text.step == 2
    assert text.tensor_proto.string_val[0].decode() == "Which?\n\nR^o=1.00 R^t=0.25 R=1.25\n<answer>é</answer>"


def test_resume_forgets_the_steps_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(str(tmp_path), enabled=True)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": float(step)})
        logger.log_samples(step, f"Q{step}", SAMPLES)
    logger.close()

    resumed = MetricsLogger(str(tmp_path), enabled=True, resume_step=2)
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in rows(tmp_path / "samples.jsonl")] == [1, 2]
    resumed.tensorboard.flush()
    assert [e.step for e in tensorboard(tmp_path).Scalars("loss")] == [1, 2]  # purged before anything is redone

    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                                {"step": 3, "loss": 30.0}]
    assert [(e.step, e.value) for e in tensorboard(tmp_path).Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
