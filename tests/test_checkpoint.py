"""Checkpoints: what pretraining writes loads with `torch.load(weights_only=True)`, rebuilds the
same model, and the encoder export loads into plain timm."""

from __future__ import annotations

import pytest
import timm
import torch
import yaml

from pemae.config.params import build_config
from pemae.engine import checkpoint
from pemae.engine.optim import param_groups
from pemae.models.encoder import TIMM_ARCH, build_encoder
from pemae.models.mae import MaskedAutoencoder, random_masking


def sample_images(n=4, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# The pretraining checkpoint
# --------------------------------------------------------------------------------------------
def test_pretrain_writes_every_output(tiny_run):
    for name in ("checkpoint.pt", "encoder.pt", "config.yaml", "log.csv", "summary.json"):
        assert (tiny_run.out_dir / name).is_file(), name
    assert not list(tiny_run.out_dir.glob(".*.tmp"))  # no temp file left behind


def test_checkpoint_loads_with_weights_only(tiny_run):
    blob = torch.load(tiny_run.out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(blob) >= {"model", "optimizer", "step", "config"}
    assert blob["step"] == tiny_run.summary["steps"] == 8
    assert blob["config"] == tiny_run.cfg.to_dict()
    assert yaml.safe_load((tiny_run.out_dir / "config.yaml").read_text()) == tiny_run.cfg.to_dict()


def rebuilt_model(tiny_run) -> MaskedAutoencoder:
    blob = torch.load(tiny_run.out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = build_config("default", blob["config"])
    assert cfg == tiny_run.cfg
    model = MaskedAutoencoder(cfg.model, cfg.data)
    model.load_state_dict(blob["model"], strict=True)
    return model.eval()


def test_checkpoint_rebuilds_the_trained_model_exactly(tiny_run):
    model = rebuilt_model(tiny_run)
    trained = tiny_run.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # the training moved the weights away from a fresh initialisation
    torch.manual_seed(tiny_run.cfg.pretrain.seed)
    fresh = MaskedAutoencoder(tiny_run.cfg.model, tiny_run.cfg.data).state_dict()
    assert not torch.equal(fresh["decoder_pred.weight"], trained["decoder_pred.weight"])


def test_rebuilt_model_gives_the_trained_models_outputs_for_the_same_masking(tiny_run):
    model, trained = rebuilt_model(tiny_run), tiny_run.model
    imgs = sample_images()
    torch.manual_seed(123)
    masking = random_masking(len(imgs), model.num_patches, model.mask_ratio)
    with torch.no_grad():
        outs = [m.decoder_pred(m.forward_decoder(m.forward_encoder(imgs, masking), masking))
                for m in (model, trained)]
        losses = [m.forward_loss(imgs, out, masking.mask) for m, out in zip((model, trained), outs)]
    assert outs[0].shape == (4, 49, 16)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(losses[0], losses[1])


def test_checkpoint_optimizer_state_resumes_into_a_fresh_optimizer(tiny_run):
    blob = checkpoint.load(tiny_run.out_dir / "checkpoint.pt")
    model = rebuilt_model(tiny_run)
    opt = torch.optim.AdamW(param_groups(model, tiny_run.cfg.pretrain.weight_decay), lr=0.0)
    opt.load_state_dict(blob["optimizer"])
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert steps == {8.0}
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0]


def test_load_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        checkpoint.load(tmp_path / "nothing.pt")


# --------------------------------------------------------------------------------------------
# The encoder export
# --------------------------------------------------------------------------------------------
def test_encoder_export_loads_into_plain_timm_strictly(tiny_run):
    blob = torch.load(tiny_run.out_dir / "encoder.pt", map_location="cpu", weights_only=True)
    assert blob["arch"] == TIMM_ARCH
    vit = timm.create_model(blob["arch"], pretrained=False, num_classes=0, **blob["kwargs"])
    vit.load_state_dict(blob["state_dict"], strict=True)
    vit.eval()
    assert len(vit.blocks) == tiny_run.cfg.model.depth
    assert vit.embed_dim == tiny_run.cfg.model.embed_dim
    imgs = sample_images()
    with torch.no_grad():
        ours = tiny_run.model.encoder.forward_features(imgs)
        theirs = vit.forward_features(imgs)
        assert torch.equal(ours, theirs)
        assert torch.equal(vit(imgs), tiny_run.model.encoder(imgs))  # pooled CLS features


def test_encoder_export_holds_the_trained_weights(tiny_run):
    state = checkpoint.load(tiny_run.out_dir / "encoder.pt")["state_dict"]
    trained = tiny_run.model.encoder.state_dict()
    assert set(state) == set(trained)
    for name, value in state.items():
        assert torch.equal(value, trained[name]), name


def test_load_encoder_matches_the_trained_encoder(tiny_run):
    vit = checkpoint.load_encoder(tiny_run.out_dir / "encoder.pt").eval()
    imgs = sample_images(seed=1)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(imgs), tiny_run.model.encoder.forward_features(imgs))


def test_export_encoder_round_trips_for_three_channels(tmp_path):
    cfg = build_config("tiny", {"data": {"in_chans": 3, "img_size": 32}, "model": {"patch_size": 8}})
    torch.manual_seed(0)
    enc = build_encoder(cfg.model, cfg.data).eval()
    checkpoint.export_encoder(enc, cfg, tmp_path / "enc.pt")
    vit = checkpoint.load_encoder(tmp_path / "enc.pt").eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(imgs), enc.forward_features(imgs))


# --------------------------------------------------------------------------------------------
# Atomic saving
# --------------------------------------------------------------------------------------------
def test_save_atomic_writes_the_file_and_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    checkpoint.save_atomic({"x": torch.arange(3), "name": "a"}, path)
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]
    blob = torch.load(path, weights_only=True)
    assert torch.equal(blob["x"], torch.arange(3)) and blob["name"] == "a"
    checkpoint.save_atomic({"x": torch.arange(5)}, path)  # overwrite
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(5))


def test_interrupted_save_leaves_the_existing_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"x": torch.arange(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as out:  # half a file, then the process "dies"
            out.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"x": torch.arange(100)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert not list(tmp_path.glob(".*.tmp"))  # the half-written temp file is cleaned up


# --------------------------------------------------------------------------------------------
# Damaged files, and the previous checkpoint kept beside the newest
# --------------------------------------------------------------------------------------------
def truncate(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def zero_fill(raw: bytes) -> bytes:
    return bytes(len(raw))


def flip_a_bit_in_the_tensor_data(raw: bytes) -> bytes:
    """One bit flipped in the middle of the file: inside the tensor data, which torch.load alone
    would read without complaint."""
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    return bytes(flipped)


DAMAGES = {
    "truncated": (truncate, "not a valid checkpoint archive"),
    "zero-filled": (zero_fill, "not a valid checkpoint archive"),
    "bit-flipped": (flip_a_bit_in_the_tensor_data, "fails its CRC-32 check"),
    "empty": (lambda raw: b"", "the file is empty (0 bytes)"),
}


def saved_weights(path, n=4096, seed=0) -> dict:
    blob = {"w": torch.randn(n, generator=torch.Generator().manual_seed(seed)), "step": seed}
    checkpoint.save_atomic(blob, path)
    return blob


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_checkpoint_is_named_with_the_reason(tmp_path, kind):
    path = tmp_path / "last.pt"
    saved_weights(path)
    damage, reason = DAMAGES[kind]
    path.write_bytes(damage(path.read_bytes()))
    assert checkpoint.damage(path) is not None
    with pytest.raises(checkpoint.DamagedCheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value).startswith(f"checkpoint {path} is unreadable: ") and reason in str(err.value)


def test_an_intact_checkpoint_has_no_damage(tmp_path):
    blob = saved_weights(tmp_path / "ck.pt")
    assert checkpoint.damage(tmp_path / "ck.pt") is None
    assert torch.equal(checkpoint.load(tmp_path / "ck.pt")["w"], blob["w"])


def test_saving_keeps_the_previous_good_checkpoint(tmp_path):
    last, prev = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    checkpoint.save_atomic({"step": 1}, last, prev)
    assert not prev.exists()  # nothing before the first
    checkpoint.save_atomic({"step": 2}, last, prev)
    checkpoint.save_atomic({"step": 3}, last, prev)
    assert checkpoint.load(last)["step"] == 3 and checkpoint.load(prev)["step"] == 2


def test_a_damaged_newest_checkpoint_is_not_kept_as_the_previous_one(tmp_path):
    last, prev = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    checkpoint.save_atomic({"step": 1}, last, prev)
    checkpoint.save_atomic({"step": 2}, last, prev)
    last.write_bytes(truncate(last.read_bytes()))
    checkpoint.save_atomic({"step": 3}, last, prev)
    assert checkpoint.load(last)["step"] == 3 and checkpoint.load(prev)["step"] == 1
