"""Watching a run: TensorBoard files readable by TensorBoard itself, progress lines, summary."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import pytest

from orchestrator.checkpoint.crc import masked_crc32c
from orchestrator.monitor.events import EventFileWriter, encode_event, frame_record
from orchestrator.monitor.progress import ProgressDisplay, ProgressState, RunSummary, format_progress, format_summary
from orchestrator.monitor.recovery import RecoveryRecord
from orchestrator.monitor.reporter import Reporter

event_file_loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")


class FakeClock:
    """Drives the reporter's notion of time: every tick advances by ``dt`` seconds."""

    def __init__(self, dt: float = 0.5):
        self.now, self.dt = 1000.0, dt

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.dt


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's loader sees them (simple_value migrated to scalar tensors)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                out.setdefault(value.tag, []).append((event.step, value.tensor.float_val[0]))
    return out


def _run_reporter(tmp_path: Path, steps=30, **kw) -> tuple[Reporter, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    reporter = Reporter(str(tmp_path / "run"), name="demo", total_steps=steps, global_batch_size=64,
                        log_every_steps=10, progress="plain", stream=stream, clock=clock, **kw)
    for step in range(1, steps + 1):
        clock.tick()
        reporter.on_step(step, {"loss": 3.0 / step, "accuracy": step / steps})
        if step % 10 == 0:
            reporter.on_checkpoint(step, 0.25, 4096 * step)
    reporter.on_eval(steps, {"loss": 0.2, "accuracy": 0.95})
    return reporter, stream, clock


def test_tensorboard_reads_the_loss_curve(tmp_path):
    reporter, _, _ = _run_reporter(tmp_path)
    reporter.close()
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    loss = scalars["loss"]
    assert [s for s, _ in loss] == list(range(1, 31))
    assert [v for _, v in loss] == pytest.approx([3.0 / s for s in range(1, 31)], rel=1e-6)
    assert [v for _, v in scalars["accuracy"]][-1] == pytest.approx(1.0)
    assert scalars["checkpoint_save_time"] == [(10, 0.25), (20, 0.25), (30, 0.25)]
    assert [v for _, v in scalars["checkpoint_bytes"]] == [40960.0, 81920.0, 122880.0]
    # 64 examples every 0.5 s of the fake clock
    assert [v for _, v in scalars["examples_per_sec"]] == pytest.approx([128.0] * 29)
    assert [v for _, v in scalars["step_time"]] == pytest.approx([0.5] * 29)
    assert scalars["eval/accuracy"] == [(30, pytest.approx(0.95))]


def test_event_file_records_are_valid_tfrecords(tmp_path):
    writer = EventFileWriter(str(tmp_path))
    writer.add_scalars(7, {"loss": 1.5})
    writer.close()
    events = list(event_file_loader.EventFileLoader(writer.path).Load())
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7 and events[1].summary.value[0].tag == "loss"
    data = Path(writer.path).read_bytes()
    payloads = _walk_records(data)
    assert payloads == list(event_file_loader.RawEventFileLoader(writer.path).Load())
    first = frame_record(encode_event(events[0].wall_time, step=0, file_version="brain.Event:2"))
    assert data.startswith(first)


def _walk_records(data: bytes) -> list[bytes]:
    """Split a TFRecord file, checking both masked CRCs of every record; must end exactly."""
    out, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        payload = data[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert len_crc == masked_crc32c(header) and data_crc == masked_crc32c(payload)
        out.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return out


def test_corrupt_event_file_is_detected_by_tensorboard(tmp_path):
    writer = EventFileWriter(str(tmp_path))
    writer.add_scalars(1, {"loss": 2.0})
    writer.close()
    raw = bytearray(Path(writer.path).read_bytes())
    raw[-6] ^= 0xFF  # flip a byte inside the last record's payload: its data CRC no longer matches
    Path(writer.path).write_bytes(bytes(raw))
    events = list(event_file_loader.RawEventFileLoader(writer.path).Load())
    assert len(events) == 1  # the reader stops at the record whose CRC fails


def test_step_numbers_reach_int64(tmp_path):
    writer = EventFileWriter(str(tmp_path))
    writer.add_scalars(2**40 + 3, {"loss": 0.5})
    writer.close()
    events = list(event_file_loader.EventFileLoader(writer.path).Load())
    assert events[-1].step == 2**40 + 3


def test_plain_progress_lines_every_log_interval(tmp_path):
    reporter, stream, _ = _run_reporter(tmp_path)
    lines = stream.getvalue().splitlines()
    progress = [l for l in lines if re.search(r"\d step \d+/30", l)]
    assert len(progress) == 3  # steps 10, 20, 30
    assert "step 20/30  66% | loss 0.1500 | acc 0.6667 | 128 ex/s | ckpt 10 (0.25 s)" in progress[1]
    assert any("checkpoint at step 30 saved in 0.25 s (120.0 KiB)" in l for l in lines)
    assert any("eval at step 30: accuracy 0.9500, loss 0.2000" in l for l in lines)
    assert "\r" not in stream.getvalue()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_line_on_a_terminal():
    stream, clock = TTY(), FakeClock(dt=1.0)
    display = ProgressDisplay(stream, "auto", clock=clock)
    assert display.mode == "bar"
    state = ProgressState(step=5, total_steps=10, loss=0.5)
    display.update(state)
    display.message("checkpoint at step 5 saved in 0.10 s (1.0 KB)")
    clock.tick()
    state.step = 10
    display.update(state)
    display.finish()
    out = stream.getvalue()
    assert out.startswith("\r[##########..........] step 5/10  50% | loss 0.5000")
    assert "\r\x1b[Kcheckpoint at step 5 saved" in out  # the message clears the live line first
    assert out.endswith("[####################] step 10/10 100% | loss 0.5000\x1b[K\n")


def test_live_line_redraws_at_most_ten_times_a_second():
    stream, clock = TTY(), FakeClock(dt=0.01)
    display = ProgressDisplay(stream, "bar", clock=clock)
    for step in range(1, 101):
        clock.tick()
        display.update(ProgressState(step=step, total_steps=1000))
    assert 1 <= stream.getvalue().count("\r") <= 11


def test_progress_none_prints_nothing(tmp_path):
    stream = io.StringIO()
    display = ProgressDisplay(stream, "none")
    display.update(ProgressState(step=10, total_steps=10, loss=1.0))
    display.message("hello")
    assert stream.getvalue() == ""


def test_format_progress_fields():
    state = ProgressState(step=120, total_steps=300, loss=0.43125, examples_per_sec=12345.6,
                          last_checkpoint_step=100, last_checkpoint_secs=0.4211)
    assert format_progress(state) == "step 120/300  40% | loss 0.4313 | 12,346 ex/s | ckpt 100 (0.42 s)"
    assert format_progress(ProgressState(step=0, total_steps=300)) == "step 0/300   0%"


def test_summary_counts_failures_and_is_written(tmp_path):
    reporter, stream, _ = _run_reporter(tmp_path)
    reporter.on_failure(RuntimeError("worker 1 died: ActorDiedError"), "worker_died")
    reporter.on_recovery(RecoveryRecord("worker_died", "peer_memory", failed_step=27, restored_step=20,
                                        detect_s=0.25, replace_s=1.5, restore_s=0.5, first_step_s=0.25))

    class Result:
        steps_completed, preempted, failures_recovered = 30, False, 1
        final_metrics = {"loss": 0.1, "accuracy": 0.97}
        checkpoints = ["ck/model.ckpt-20", "ck/model.ckpt-30"]
        last_checkpoint = "ck/model.ckpt-30"

    summary = reporter.close(Result())
    assert summary == reporter.close()  # idempotent
    assert (summary.status, summary.steps_completed, summary.failures, summary.failures_recovered) == (
        "completed", 30, 1, 1)
    text = stream.getvalue()
    assert "failure #1: worker 1 died" in text
    assert ("recovered in 2.50 s from peer memory (detect 0.25 s, replace 1.50 s, restore 0.50 s, "
            "first step 0.25 s; 7 steps lost)") in text
    assert "Run summary: demo (completed)" in text
    assert "checkpoints kept  2: ck/model.ckpt-20, ck/model.ckpt-30" in text
    assert "failures          1 (1 recovered, 2.5 s recovering)" in text
    assert ("recovery          median 2.50 s (detect 0.25, replace 1.50, restore 0.50, first step 0.25); "
            "7 steps lost; from peer_memory x1") in text
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["final_metrics"] == {"loss": 0.1, "accuracy": 0.97}
    assert written["last_checkpoint"] == "ck/model.ckpt-30"
    [recovery] = written["recoveries"]
    assert (recovery["tier"], recovery["steps_lost"], recovery["total_s"]) == ("peer_memory", 7, 2.5)
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert scalars["recovery/total_s"][-1][1] == pytest.approx(2.5)
    assert scalars["recovery/steps_lost"][-1][1] == 7


def test_events_after_close_are_dropped_quietly(tmp_path):
    """A save that commits while the job shuts down reports after the summary: nothing breaks or changes."""
    reporter, stream, clock = _run_reporter(tmp_path)
    reporter.close()
    before = (stream.getvalue(), _scalars(tmp_path / "run" / "tensorboard"))
    clock.tick()
    reporter.on_step(31, {"loss": 0.01})
    reporter.on_checkpoint(31, 0.5, 1024)
    reporter.on_eval(31, {"loss": 0.02})
    reporter.on_failure("late failure")
    reporter.on_recovery(RecoveryRecord("worker_died", "storage", failed_step=31, restored_step=30))
    assert (stream.getvalue(), _scalars(tmp_path / "run" / "tensorboard")) == before


def test_summary_of_a_preempted_run():
    summary = RunSummary(name="j", status="preempted", steps_completed=42, total_steps=300, wall_time_s=3.0,
                         last_checkpoint="ck/model.ckpt-42")
    text = format_summary(summary)
    assert text.splitlines()[0] == "Run summary: j (preempted)"
    assert "steps             42 / 300" in text and "last checkpoint   ck/model.ckpt-42" in text


def test_tensorboard_off_writes_no_event_files(tmp_path):
    reporter, _, _ = _run_reporter(tmp_path, tensorboard=False)
    reporter.close()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "summary.json").exists()


def test_every_displayed_line_also_goes_to_the_run_log(tmp_path, caplog):
    """train.log gets what stdout shows: progress every interval, checkpoints, eval, failures, the summary."""
    with caplog.at_level("INFO", logger="orchestrator.run"):
        reporter, _, _ = _run_reporter(tmp_path)
        reporter.on_failure("worker rank 1 died")
        reporter.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "orchestrator.run"]
    assert [m.split(" | ")[0] for m in logged if m.startswith("step ")] == [
        "step 10/30  33%", "step 20/30  66%", "step 30/30 100%"]
    assert [m for m in logged if m.startswith("checkpoint at step")] == [
        f"checkpoint at step {s} saved in 0.25 s ({k} KiB)" for s, k in ((10, "40.0"), (20, "80.0"), (30, "120.0"))]
    assert "eval at step 30: accuracy 0.9500, loss 0.2000" in logged
    assert "failure #1: worker rank 1 died" in logged
    assert logged[-1].startswith("Run summary: demo (")


def test_recovery_metrics_reach_rays_prometheus_endpoint(ray_session, tmp_path):
    import time
    import urllib.request

    reporter, _, _ = _run_reporter(tmp_path)
    reporter.name = "metrics-probe"
    reporter._ray_metrics.job = "metrics-probe"
    reporter.on_failure("worker 1 died", "worker_died")
    reporter.on_recovery(RecoveryRecord("worker_died", "peer_memory", failed_step=12, restored_step=10,
                                        detect_s=0.05, replace_s=0.4, restore_s=0.02, first_step_s=0.1))
    port = ray_session._private.worker._global_node.metrics_export_port
    missing = ray_session._private.utils.get_dashboard_dependency_error()
    if missing is not None:  # plain `ray`: no metrics agent, so nothing serves /metrics (port -1)
        pytest.skip(f"Ray runs without its metrics agent (ray[default] not installed: {missing})")
    assert port > 0, f"ray[default] is installed but Ray exports no metrics (port {port})"
    wanted = ('ray_orchestrator_recovery_seconds_count', 'ray_orchestrator_failures_total',
              'ray_orchestrator_recovery_steps_lost_count')
    deadline, found = time.monotonic() + 30, {}
    while time.monotonic() < deadline and len(found) < len(wanted):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = {line.split("{")[0]: line for line in text.splitlines()
                 if 'job="metrics-probe"' in line and line.split("{")[0] in wanted}
        time.sleep(0.2)
    assert sorted(found) == sorted(wanted)
    assert 'phase="total"' in text and 'tier="peer_memory"' in text
    assert found["ray_orchestrator_failures_total"].endswith(" 1.0")
    assert found["ray_orchestrator_recovery_steps_lost_count"].endswith(" 1.0")
