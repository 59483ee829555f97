"""Device mixing is caught on a machine without a GPU: every loop runs a few real steps under
`device_guard.TrainingDeviceIsNotTheDefault`, where a tensor that pemae's step, probe or log code
makes without its device lands on `meta` and fails at once, as it would on the first CUDA step."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_fashion_mnist, tiny_config
from device_guard import TrainingDeviceIsNotTheDefault
from pemae.engine import distributed

PRETRAIN_METHODS = {
    "mae": {"name": "mae"},
    "pemae_dual": {"name": "pemae"},
    "pemae_single": {"name": "pemae", "teachers": "single"},
    "pemae_two_views": {"name": "pemae", "views": 2},
    "pemae_sinkhorn": {"name": "pemae", "balancing": "sinkhorn"},
}

# a few steps, every one logged, a checkpoint in the middle
FEW_STEPS = {"data": {"train_subset": 128, "test_subset": 64},
             "pretrain": {"batch_size": 32, "log_every": 1, "checkpoint_every": 2}}


def guarded(run, *args, **kwargs):
    """`run(*args, **kwargs)` under the guard; fails naming what it redirected."""
    guard = TrainingDeviceIsNotTheDefault()
    try:
        with guard:
            return run(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as err:
        pytest.fail(f"device mixing: {err}\ntensors made without a device at {guard.redirected}")


def test_the_guard_catches_a_tensor_made_without_its_device():
    """The bug class itself: a logged scalar made with torch.tensor(float), stacked with the
    step's tensors (what `mean_over_processes` does), fails under the guard and not without it."""

    def log_row(loss: torch.Tensor) -> dict[str, float]:
        return distributed.mean_over_processes({"loss": loss, "temp": torch.tensor(0.04)})

    loss = torch.ones((), device="cpu")
    assert log_row(loss)["loss"] == 1.0  # unguarded, the CPU cannot tell
    import pemae.engine.distributed as module  # run it as pemae code: compile the helper into its file
    code = compile("def log_row(loss):\n    return mean_over_processes({'loss': loss, "
                   "'temp': torch.tensor(0.04)})\n", module.__file__, "exec")
    scope = {"mean_over_processes": module.mean_over_processes, "torch": torch}
    exec(code, scope)
    with pytest.raises((RuntimeError, NotImplementedError)):
        with TrainingDeviceIsNotTheDefault():
            scope["log_row"](loss)


@needs_fashion_mnist
@pytest.mark.parametrize("method", PRETRAIN_METHODS)
def test_pretraining_steps_make_no_tensor_off_the_device(method, tmp_path):
    from pemae.engine.pretrain import pretrain

    cfg = tiny_config(method=PRETRAIN_METHODS[method], **{k: dict(v) for k, v in FEW_STEPS.items()})
    _, summary = guarded(pretrain, cfg, tmp_path, progress=False)
    assert summary["steps"] == 4 and summary["final_loss"] > 0


@needs_fashion_mnist
def test_evaluation_fine_tuning_and_dense_probe_make_no_tensor_off_the_device(tiny_run, tmp_path):
    from pemae.eval.dense import dense_probe
    from pemae.eval.probes import evaluate_encoder
    from pemae.engine.finetune import finetune

    encoder = tiny_run.out_dir / "encoder.pt"
    cfg = tiny_config(method={"name": "mae"}, evaluation={"linear_epochs": 1},
                      finetune={"train_subset": 128, "batch_size": 32, "micro_batch_size": 16},
                      dense={"train_scenes": 16, "val_scenes": 8, "test_scenes": 8, "epochs": 1,
                             "batch_size": 8})
    scores = guarded(evaluate_encoder, cfg, encoder, progress=False)
    assert all(0 <= v <= 100 for k, v in scores.items() if k.endswith("top1") or "acc" in k)
    summary = guarded(finetune, cfg, encoder, tmp_path / "finetune", progress=False)
    assert 0 <= summary["test_top1"] <= 100
    run = guarded(dense_probe, cfg, encoder, progress=False)
    assert run is not None
