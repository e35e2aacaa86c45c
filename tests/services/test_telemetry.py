"""Training telemetry reaches Prometheus, TensorBoard and W&B (offline: no account, no network)."""

import struct

from prometheus_client import REGISTRY
from tensorboardX.proto import event_pb2

from services.telemetry import TrainTelemetry


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_reach_prometheus_tensorboard_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    telemetry = TrainTelemetry("telemetry-test", "base", tensorboard_dir=tmp_path / "tb", wandb_mode="offline",
                               wandb_project="nanochat-tests", config={"model": {"depth": 2}}, use_ray=False)
    for step, loss in [(1, 5.0), (2, 4.5), (3, 4.25)]:
        telemetry.log(step, {"loss": loss, "tokens_per_second": 1000.0 * step, "lr_multiplier": 1.0})
    telemetry.close()

    labels = {"run": "telemetry-test", "stage": "base"}
    assert REGISTRY.get_sample_value("nanochat:train_loss", labels) == 4.25
    assert REGISTRY.get_sample_value("nanochat:train_tokens_per_second", labels) == 3000.0
    assert REGISTRY.get_sample_value("nanochat:train_step", labels) == 3

    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 5.0), (2, 4.5), (3, 4.25)]

    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_non_finite_values_leave_gauges_unchanged(tmp_path):
    telemetry = TrainTelemetry("nan-test", "base", tensorboard_dir=None, use_ray=False)
    telemetry.log(1, {"loss": 3.0})
    telemetry.log(2, {"loss": float("nan")})
    assert REGISTRY.get_sample_value("nanochat:train_loss", {"run": "nan-test", "stage": "base"}) == 3.0
