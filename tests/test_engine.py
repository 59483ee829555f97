"""The training engine: batches independent of processes and accumulation, gradient accumulation,
DDP under torchrun (gloo), exact resume after SIGKILL, the non-finite loss stop, config checks
on resume, mixed precision and the command line."""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fashion_mnist, tiny_config
from pemae.cli import main as cli_main, parse_sets
from pemae.config.params import config_differences
from pemae.config.schema import ConfigError
from pemae.engine import checkpoint
from pemae.engine.batching import micro_batch_size
from pemae.engine.pretrain import NonFiniteLossError, pretrain, train_step
from pemae.engine.runtime import MetricLog, amp_dtype, grad_scaler, read_log
from pemae.engine.sampling import GlobalBatchSampler, SeededViews
from pemae.models.mae import MaskedAutoencoder
from pemae.models.pemae import build_pretrain_model

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# PEMAE ablations, each a different set of trainable weights in use
METHODS = {
    "mae": {"name": "mae"},
    "pemae_dual": {"name": "pemae"},
    "pemae_single": {"name": "pemae", "teachers": "single"},
    "token_recon": {"name": "pemae", "lambda_cls": 0.0, "lambda_tok": 0.0},
    "cls_labels": {"name": "pemae", "recon_target": "pixel", "lambda_tok": 0.0},
    "multifold_sinkhorn": {"name": "pemae", "teacher_view": "multifold", "balancing": "sinkhorn"},
}


def run_dir_weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def without_key_biases(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` without the attention key biases (the middle third of a qkv bias).

    Softmax attention does not change when a key bias changes, so its gradient is exactly zero in
    theory and float noise in practice; Adam turns noise of either sign into a full +-lr step.
    Runs that sum their gradients in a different order (processes, micro-batches) therefore
    differ there and only there; bitwise-equal runs (resume) are compared in full.
    """
    if name.endswith("attn.qkv.bias"):
        third = t.shape[0] // 3
        return torch.cat([t[:third], t[2 * third:]])
    return t


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Bitwise equal (atol 0), or close everywhere but the attention key biases."""
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            x, y = without_key_biases(k, a[k]), without_key_biases(k, b[k])
            assert torch.allclose(x, y, rtol=1e-4, atol=atol), (k, (x - y).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# Batches: the same images, augmentations and masks whatever the processes and accumulation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (1, 4), (2, 2), (4, 1)])
def test_micro_batches_of_all_processes_make_the_global_batch(world, accum):
    n, batch, steps = 100, 16, 13  # 6 steps per epoch: crosses two epoch boundaries
    reference = list(GlobalBatchSampler(n, batch, steps, seed=3))
    assert len(reference) == steps and all(len(b) == batch for b in reference)
    per_rank = [list(GlobalBatchSampler(n, batch, steps, 3, world, r, accum)) for r in range(world)]
    for step in range(steps):
        seen = sorted(k for r in range(world) for k in sum(per_rank[r][step * accum:(step + 1) * accum], []))
        assert seen == sorted(reference[step])
    epochs = [{k // n for k in b} for b in reference]
    assert epochs[0] == {0} and epochs[6] == {1} and epochs[12] == {2}
    assert len(set(reference[0])) == batch  # no repeats within a step


def test_each_epoch_visits_distinct_images_in_a_new_order():
    sampler = GlobalBatchSampler(64, 16, 8, seed=0)
    batches = [[k % 64 for k in b] for b in sampler]
    assert sorted(sum(batches[:4], [])) == list(range(64))
    assert batches[:4] != batches[4:]


def test_resuming_the_sampler_continues_the_same_sequence():
    full = list(GlobalBatchSampler(100, 10, 25, seed=1, accum_steps=2))
    tail = list(GlobalBatchSampler(100, 10, 25, seed=1, accum_steps=2, start_step=13))
    assert tail == full[26:] and len(tail) == (25 - 13) * 2


def test_seeded_views_do_not_depend_on_the_global_rng():
    cfg = tiny_config()
    from pemae.data.transforms import pretrain_transform

    dataset = FakeImages(pretrain_transform(cfg.data))
    views = SeededViews(dataset, seed=0, num_patches=49)
    torch.manual_seed(1)
    a_img, a_noise = views[3 + 2 * len(dataset)]  # epoch 2, image 3
    torch.manual_seed(99)
    b_img, b_noise = views[3 + 2 * len(dataset)]
    assert torch.equal(a_img, b_img) and torch.equal(a_noise, b_noise)
    c_img, c_noise = views[3 + 3 * len(dataset)]  # the same image in another epoch
    assert not torch.equal(a_img, c_img) and not torch.equal(a_noise, c_noise)
    torch.manual_seed(99)
    expected = torch.get_rng_state()
    views[0]
    assert torch.equal(torch.get_rng_state(), expected)  # the caller's RNG is left alone


class FakeImages(torch.utils.data.Dataset):
    """Eight random 28x28 grayscale PIL images, transformed like the real data."""

    def __init__(self, transform):
        from PIL import Image

        gen = torch.Generator().manual_seed(0)
        self.images = [Image.fromarray(torch.randint(0, 256, (28, 28), generator=gen, dtype=torch.uint8).numpy())
                       for _ in range(8)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), 0


def test_micro_batch_size_names_the_keys():
    assert micro_batch_size(4096, 4, 8) == 128
    with pytest.raises(ConfigError, match="pretrain.batch_size = 100.*3 process.*accum_steps = 2"):
        micro_batch_size(100, 2, 3)
    with pytest.raises(ConfigError, match="accum_steps = 3 does not divide pretrain.batch_size = 64"):
        tiny_config(pretrain={"accum_steps": 3})


# --------------------------------------------------------------------------------------------
# Every trainable weight takes part in a step (DDP runs without find_unused_parameters)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_every_trainable_weight_gets_a_gradient(method):
    cfg = tiny_config(method={**METHODS[method], "num_prototypes": 32, "head_hidden_dim": 32,
                              "head_bottleneck_dim": 16})
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, 10, 5).train()
    model(torch.randn(4, 1, 28, 28), 0)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# --------------------------------------------------------------------------------------------
# Gradient accumulation and mixed precision
# --------------------------------------------------------------------------------------------
def one_step_config(method: dict, **pretrain_keys):
    """One step over 128 images: the first update is the whole run."""
    return tiny_config(data={"train_subset": 128}, method=method,
                       pretrain={"batch_size": 128, "warmup_epochs": 0.0, "checkpoint_every": 0,
                                 **pretrain_keys})


@needs_fashion_mnist
@pytest.mark.parametrize("method", ["mae", "pemae_dual"])
def test_accumulating_two_halves_equals_one_batch_on_the_first_update(method, tmp_path):
    whole, _ = pretrain(one_step_config(METHODS[method]), tmp_path / "whole", progress=False)
    halves, _ = pretrain(one_step_config(METHODS[method], accum_steps=2), tmp_path / "halves",
                         progress=False)
    a, b = whole.state_dict(), halves.state_dict()
    moved = [k for k in a if not torch.equal(a[k], build_reference(method)[k])]
    assert moved, "the step changed nothing"
    assert_same_weights(a, b, atol=1e-6)
    if method == "pemae_dual":
        assert whole.center_cls.any()
        assert torch.allclose(whole.center_cls, halves.center_cls, atol=1e-6)
    rows_a, rows_b = read_log(tmp_path / "whole/log.csv"), read_log(tmp_path / "halves/log.csv")
    assert rows_a["loss"] == pytest.approx(rows_b["loss"], rel=1e-5)


@needs_fashion_mnist
def test_a_compiled_run_matches_the_eager_one_and_reports_its_compile_time(tmp_path):
    """`pretrain.compile`: the same update as eager up to float rounding (Inductor fuses and
    reorders), a state dict with the same keys, and the compile time in the summary."""
    method = METHODS["pemae_dual"]
    eager, eager_summary = pretrain(one_step_config(method), tmp_path / "eager", progress=False)
    compiled, summary = pretrain(one_step_config(method, compile=True), tmp_path / "compiled",
                                 progress=False)
    assert "compile_seconds" not in eager_summary and summary["compile_seconds"] > 0
    assert_same_weights(eager.state_dict(), compiled.state_dict(), atol=1e-5)
    saved = checkpoint.load(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert saved.keys() == eager.state_dict().keys()  # loadable without torch.compile
    assert read_log(tmp_path / "compiled/log.csv")["loss"] == pytest.approx(
        read_log(tmp_path / "eager/log.csv")["loss"], rel=1e-4)


def build_reference(method: str) -> dict:
    """The initial weights of `one_step_config` (seed 0)."""
    torch.manual_seed(0)
    return build_pretrain_model(one_step_config(METHODS[method]), 1, 1).state_dict()


def test_amp_resolution(monkeypatch):
    assert amp_dtype("auto", CPU) is None and amp_dtype("off", CPU) is None
    assert amp_dtype("bf16", CPU) is torch.bfloat16 and amp_dtype("fp16", CPU) is torch.float16
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    for capability, auto in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 0), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert amp_dtype("auto", gpu) is auto, capability  # bf16 from Ampere on, fp16 before
    with pytest.raises(ConfigError, match=r"pretrain.amp = 'bf16' but Tesla V100 \(compute capability "
                                          r"7.0\) has no bf16 tensor cores"):
        amp_dtype("bf16", gpu)
    # loss scaling exactly for fp16
    assert [grad_scaler(CPU, amp).is_enabled() for amp in ("auto", "off", "bf16", "fp16")] == [
        False, False, False, True]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step_keeps_fp32_weights_and_a_finite_fp32_loss(amp):
    cfg = tiny_config(method=METHODS["pemae_dual"])
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, 10, 5).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.student.encoder.blocks[0].attn.qkv.weight.clone()
    terms = train_step(model, optimizer, torch.randn(4, 1, 28, 28), CPU, 0, amp=amp)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.center_cls.dtype == torch.float32
    assert not torch.equal(before, model.student.encoder.blocks[0].attn.qkv.weight)


# --------------------------------------------------------------------------------------------
# Non-finite loss, resume checks, the log
# --------------------------------------------------------------------------------------------
@needs_fashion_mnist
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    forward = MaskedAutoencoder.forward

    def poisoned(self, imgs, step=0, **kwargs):
        out = forward(self, imgs, step, **kwargs)
        if step == 5:  # the 6th step
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MaskedAutoencoder, "forward", poisoned)
    cfg = tiny_config(method=METHODS["mae"], pretrain={"checkpoint_every": 4, "log_every": 3})
    with pytest.raises(NonFiniteLossError, match=r"step 6: loss = nan, loss_rec = [\d.]+ "
                                                 r"\(non-finite: loss\).*last\.pt \(step 4\)"):
        pretrain(cfg, tmp_path, progress=False)
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "encoder.pt").exists()
    assert list(read_log(tmp_path / "log.csv")["step"]) == [3]  # nothing logged after the NaN


@needs_fashion_mnist
def test_a_diverged_run_ends_the_command_in_one_line(tmp_path, capsys):
    """`pretrain` with an lr that blows up: exit code 2 and one line on stderr naming the step,
    the non-finite terms and that no checkpoint was written; no traceback (that is --debug's)."""
    args = ["pretrain", "--preset", "tiny", "--out", str(tmp_path), "--no-progress",
            *[a for s in (*CLI_SETS, "pretrain.base_lr=1e6") for a in ("--set", s)]]
    with pytest.raises(SystemExit) as stop:
        cli_main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(r"error: non-finite loss at step \d+: .*\(non-finite: .*loss.*\)\. Training "
                     r"stopped; no checkpoint had been written yet", err[0]), err[0]
    with pytest.raises(NonFiniteLossError):
        cli_main([*args, "--debug"])


@needs_fashion_mnist
def test_resume_with_a_different_config_names_the_keys(tmp_path):
    cfg = tiny_config(method=METHODS["mae"])
    pretrain(cfg, tmp_path, progress=False)
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "last.pt")  # as if stopped at the end
    changed = tiny_config(method=METHODS["mae"], pretrain={"epochs": 2, "base_lr": 1e-3},
                          model={"mask_ratio": 0.5})
    with pytest.raises(ConfigError) as err:
        pretrain(changed, tmp_path, progress=False)
    text = str(err.value)
    assert "model.mask_ratio: 0.75 -> 0.5" in text and "pretrain.epochs: 1 -> 2" in text
    assert "pretrain.base_lr" in text and "pretrain.resume" in text
    assert "pretrain.seed" not in text
    # runtime keys may change: the same run resumes at its last step and finishes at once
    log_before = (tmp_path / "log.csv").read_text()
    _, summary = pretrain(tiny_config(method=METHODS["mae"], pretrain={"log_every": 5}), tmp_path,
                          progress=False)
    assert summary["steps"] == 8 and not (tmp_path / "last.pt").exists()
    assert (tmp_path / "log.csv").read_text() == log_before


def test_config_differences_lists_dotted_keys():
    a, b = tiny_config().to_dict(), tiny_config(model={"depth": 3}, pretrain={"log_every": 7}).to_dict()
    assert config_differences(a, b) == ["model.depth: 2 -> 3", "pretrain.log_every: 1 -> 7"]
    assert config_differences(a, b, ignore=("pretrain.log_every",)) == ["model.depth: 2 -> 3"]


def test_metric_log_continues_after_a_resume(tmp_path):
    log = MetricLog(tmp_path / "log.csv")
    for s in range(1, 6):
        log.append(step=s, loss=float(s))
    log.close()
    log = MetricLog(tmp_path / "log.csv", keep_until=3)  # rows 4 and 5 came after the checkpoint
    log.append(step=4, loss=40.0)
    log.close()
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss", "1,1", "2,2", "3,3", "4,40"]
    MetricLog(tmp_path / "log.csv").close()  # a fresh run starts a fresh log
    assert (tmp_path / "log.csv").read_text() == "step\n"


# --------------------------------------------------------------------------------------------
# The command line, torchrun, SIGKILL
# --------------------------------------------------------------------------------------------
def test_parse_sets():
    assert parse_sets(["pretrain.epochs=3", "data.root=/x", "model.mask_ratio=0.5"]) == {
        "pretrain": {"epochs": 3}, "data": {"root": "/x"}, "model": {"mask_ratio": 0.5}}
    for bad in ["epochs=3", "pretrain.epochs", "a.b.c=1"]:
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_sets([bad])


def test_cli_reports_a_bad_key_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["pretrain", "--preset", "tiny", "--set", "pretrain.epoch=2", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "pretrain.epoch: unknown key" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="pretrain.epoch: unknown key"):  # --debug: the exception
        cli_main(["pretrain", "--preset", "tiny", "--set", "pretrain.epoch=2", "--out", str(tmp_path),
                  "--debug"])


CLI_SETS = ["data.download=false", "pretrain.device=cpu", "method.num_prototypes=32",
            "method.head_hidden_dim=32", "method.head_bottleneck_dim=16"]


def cli_command(out: Path, *sets: str, launcher: list[str] | None = None) -> list[str]:
    args = ["pretrain", "--preset", "tiny", "--out", str(out), "--no-progress"]
    for s in (*CLI_SETS, *sets):
        args += ["--set", s]
    return (launcher or [sys.executable]) + ["-m", "pemae.cli", *args]


def cli_env() -> dict:
    """One thread (deterministic, and no contention between processes); gloo over loopback."""
    return {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_cli(out: Path, *sets: str, launcher: list[str] | None = None) -> None:
    result = subprocess.run(cli_command(out, *sets, launcher=launcher), env=cli_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@needs_fashion_mnist
def test_two_torchrun_processes_match_one_process_with_the_same_global_batch(tmp_path):
    sets = ["method.name=pemae", "pretrain.checkpoint_every=3"]
    run_cli(tmp_path / "one", *sets)
    run_cli(tmp_path / "two", *sets, launcher=[str(BIN / "torchrun"), "--standalone",
                                                  "--nproc_per_node", "2"])
    one, two = read_log(tmp_path / "one/log.csv"), read_log(tmp_path / "two/log.csv")
    assert list(one["step"]) == list(two["step"]) == list(range(1, 9))
    for term in ("loss", "loss_rec", "loss_cls", "loss_tok"):
        assert two[term] == pytest.approx(one[term], rel=1e-4), term
    a, b = run_dir_weights(tmp_path / "one/checkpoint.pt"), run_dir_weights(tmp_path / "two/checkpoint.pt")
    assert_same_weights(a, b, atol=1e-5)
    assert a["center_cls"].any() and a["center_tok"].any()  # the centres moved, and agree:
    assert torch.allclose(a["center_cls"], b["center_cls"], rtol=1e-4, atol=1e-6)
    assert torch.allclose(a["center_tok"], b["center_tok"], rtol=1e-4, atol=1e-6)
    summary = (tmp_path / "two/summary.json").read_text()
    assert '"world_size": 2' in summary


@needs_fashion_mnist
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path):
    sets = ["method.name=pemae", "pretrain.epochs=4", "pretrain.checkpoint_every=4"]  # 32 steps
    run_cli(tmp_path / "whole", *sets)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(killed, *sets), env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = checkpoint.load(killed / "last.pt")["step"]
    assert 0 < stopped_at < 32 and not (killed / "checkpoint.pt").exists()

    run_cli(killed, *sets)  # the same command again
    assert_same_weights(run_dir_weights(killed / "checkpoint.pt"), run_dir_weights(tmp_path / "whole/checkpoint.pt"))
    whole, resumed = read_log(tmp_path / "whole/log.csv"), read_log(killed / "log.csv")
    assert list(resumed["step"]) == list(range(1, 33))  # continued, not restarted or repeated
    for term in ("loss", "loss_rec", "loss_cls", "loss_tok", "lr"):
        assert list(resumed[term]) == list(whole[term]), term
    assert not (killed / "last.pt").exists()


@needs_fashion_mnist
def test_fp16_training_saves_its_grad_scaler(tmp_path):
    cfg = one_step_config(METHODS["pemae_dual"], amp="fp16", accum_steps=2)
    _, summary = pretrain(cfg, tmp_path, progress=False)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["scaler"]["scale"] > 0 and math.isfinite(summary["final_loss"])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_cli_resolves_a_params_run_with_sets_on_top(tmp_path):
    from pemae.cli import resolve

    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny\npretrain:\n  epochs: 3\nruns:\n  a:\n    model:\n      depth: 3\n")
    args = type("Args", (), {"preset": None, "run": "a", "params": params, "force": False,
                             "set": ["pretrain.seed=7", "model.mask_ratio=0.5"]})()
    cfg = resolve(args)
    assert (cfg.pretrain.epochs, cfg.model.depth, cfg.pretrain.seed, cfg.model.mask_ratio) == (3, 3, 7, 0.5)
    assert not cfg.pretrain.overwrite
    args.force = True  # --force sets pretrain.overwrite
    assert resolve(args).pretrain.overwrite
    args.run = "ghost"
    with pytest.raises(ConfigError, match="ghost"):
        resolve(args)


def test_guarded_collectives_across_two_processes_match_one_process():
    """tests/ddp_probe.py under torchrun: process means, the centre update, Sinkhorn-Knopp's
    balancing over both processes' rows, and the replica check catching a diverged copy."""
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                             str(REPO / "tests" / "ddp_probe.py")],
                            env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for check in ("mean_over_processes", "any_true", "update_center", "sinkhorn_knopp",
                  "check_replicas_agree"):
        assert result.stdout.count(f"ok {check}") == 2, (check, result.stdout)


@needs_fashion_mnist
def test_the_run_states_its_processes_batch_split_and_lr(tmp_path, capsys):
    pretrain(one_step_config(METHODS["mae"], accum_steps=4), tmp_path, progress=False)
    out = capsys.readouterr().out
    assert ("1 process(es) x 32 images x 4 accumulation step(s) = batch 128; "
            "base lr 0.0015 -> lr 0.00075; device cpu, float32") in out


@needs_fashion_mnist
def test_every_logged_row_has_the_collapse_monitors(tmp_path):
    cfg = tiny_config(method={**METHODS["pemae_dual"], "num_prototypes": 32, "head_hidden_dim": 32,
                              "head_bottleneck_dim": 16}, pretrain={"log_every": 3})
    pretrain(cfg, tmp_path, progress=False)
    log = read_log(tmp_path / "log.csv")
    assert list(log["step"]) == [3, 6, 8]
    for column in ("cls_entropy", "cls_perplexity", "tok_entropy", "tok_perplexity"):
        assert np.isfinite(log[column]).all() and (log[column] > 0).all(), column


# --------------------------------------------------------------------------------------------
# Small data sets: enough steps per epoch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, world, accum, expected", [
    (54000, 1, 1, 256),   # Fashion-MNIST: 210 steps an epoch, unchanged
    (1294, 1, 1, 64),     # 1.3k images: 5 -> 20 steps an epoch
    (1294, 2, 4, 64),     # still a multiple of world size x accumulation
    (100, 1, 1, 16),      # never under 16 images a step
    (1294, 1, 32, 64),    # 32 micro-batches of 2 images
    (1294, 1, 128, 128),  # the batch never splits into fewer images than micro-batches
])
def test_small_data_halves_the_batch_until_an_epoch_has_enough_steps(images, world, accum, expected):
    from pemae.config.params import build_config
    from pemae.engine.batching import batch_for_data

    cfg = build_config("default", {"pretrain": {"accum_steps": accum}})
    got = batch_for_data(cfg, images, world)
    assert got.pretrain.batch_size == expected
    assert got.pretrain.batch_size % (world * accum) == 0
    off = build_config("default", {"pretrain": {"min_steps_per_epoch": 0}})
    assert batch_for_data(off, 1294).pretrain.batch_size == 256  # 0 switches it off


@needs_fashion_mnist
def test_data_loader_workers_change_nothing_but_the_speed(tmp_path):
    """Every item is seeded by (seed, epoch, index) in its own RNG (`SeededViews`), so worker
    processes draw the same crops, flips and masks as the main process: the same run bit for bit."""
    runs = {}
    for workers in (0, 2):
        cfg = tiny_config(method={"name": "pemae", "views": 2}, data={"num_workers": workers})
        pretrain(cfg, tmp_path / f"workers{workers}", progress=False)
        runs[workers] = tmp_path / f"workers{workers}"
    assert_same_weights(run_dir_weights(runs[0] / "checkpoint.pt"), run_dir_weights(runs[2] / "checkpoint.pt"))
    assert list(read_log(runs[0] / "log.csv")["loss"]) == list(read_log(runs[2] / "log.csv")["loss"])


@needs_fashion_mnist
def test_keeping_freed_memory_changes_no_result(tmp_path, monkeypatch):
    """glibc's malloc set to keep freed memory (`keep_freed_memory`, called by every run) moves
    where tensors live, not what they hold: the same run with the OS defaults gives the same bits."""
    from pemae.engine import distributed, runtime

    if not runtime.keep_freed_memory():
        pytest.skip("not glibc: the allocator settings do not apply")
    cfg = one_step_config(METHODS["pemae_dual"])
    kept, _ = pretrain(cfg, tmp_path / "kept", progress=False)
    monkeypatch.setattr(distributed, "keep_freed_memory", lambda: False)
    for option in runtime.ALLOCATOR_SETTINGS:  # glibc's defaults again (128 kB each)
        ctypes.CDLL("libc.so.6").mallopt(option, 128 << 10)
    try:
        default, _ = pretrain(cfg, tmp_path / "default", progress=False)
    finally:
        runtime.keep_freed_memory()
    assert_same_weights(kept.state_dict(), default.state_dict())
