"""The benchmark's peers: MAE from transformers, and MAE and a two-teacher PEMAE assembled from
lightly's modules, each with its own whole training step; and the table of implementations the
benchmark times (`IMPLEMENTATIONS`)."""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pemae.config.schema import Config
from pemae.engine.runtime import autocast
from pemae.models.encoder import encoder_kwargs
from pemae.perf.memory import Contender, StepFn
from pemae.perf.step_cost import COST_VARIANTS, STEPS_PER_EPOCH, TOTAL_STEPS, adamw, pemae_contender


MISSING: dict[str, str] = {}  # peer library -> why it cannot be imported (its rows are skipped)
try:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
except ImportError as err:
    MISSING["transformers"] = str(err)
try:
    from lightly.loss import DINOLoss, IBOTPatchLoss
    from lightly.models import utils as lightly_utils
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule
except ImportError as err:
    MISSING["lightly"] = str(err)
PEER_FIRST_STEP = TOTAL_STEPS // 2  # steady state: past warm-ups and the prototype freeze


# --------------------------------------------------------------------------------------------
# The peers: a forward that returns the loss, and pemae's two training hooks
# --------------------------------------------------------------------------------------------
class Peer(nn.Module):
    """A peer implementation: `forward(imgs, step)` returns the loss; the hooks run around
    the optimiser step, as pemae's models' do."""

    def after_backward(self, step: int) -> None:
        """Between backward and the optimiser step."""

    def after_step(self, step: int) -> None:
        """After the optimiser step (EMA teachers)."""


def hf_config(cfg: Config) -> "ViTMAEConfig":
    """transformers' ViTMAEConfig with pemae's sizes, mask ratio and norm-pix loss."""
    m, d = cfg.model, cfg.data
    return ViTMAEConfig(
        image_size=d.img_size, patch_size=m.patch_size, num_channels=d.in_chans,
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio),
        decoder_hidden_size=m.decoder_dim, decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_heads,
        decoder_intermediate_size=int(m.decoder_dim * m.mlp_ratio),
        mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
        qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-6,  # timm's LayerNorm eps
    )


class HFMAE(Peer):
    """transformers' ViTMAEForPreTraining (masking, norm-pix MSE on masked patches built in)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.net = ViTMAEForPreTraining(hf_config(cfg))

    def forward(self, imgs: torch.Tensor, step: int) -> torch.Tensor:
        return self.net(pixel_values=imgs).loss


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence the FutureWarnings of MAEDecoderTIMM and torch's old `weight_norm` (lightly's
    DINO head) while building: the modules still compute what they always did."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class LightlyMAE(Peer):
    """MAE as lightly's example assembles it, at pemae's sizes and with norm-pix targets."""

    def __init__(self, cfg: Config):
        super().__init__()
        m, d = cfg.model, cfg.data
        self.mask_ratio, self.patch_size, self.norm_pix = m.mask_ratio, m.patch_size, m.norm_pix_loss
        self.grid = d.img_size // m.patch_size
        vit = VisionTransformer(**encoder_kwargs(m, d), num_classes=0)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)  # MAE init, fixed sin-cos positions
        self.sequence_length = self.backbone.sequence_length  # 1 + N
        with quiet_deprecations():
            self.decoder = MAEDecoderTIMM(
                num_patches=self.grid**2, patch_size=m.patch_size, in_chans=d.in_chans,
                embed_dim=m.embed_dim, decoder_embed_dim=m.decoder_dim,
                decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads,
                mlp_ratio=m.mlp_ratio)

    def random_mask(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into [CLS] + patches: kept [B, 1+V] (CLS always kept), masked [B, M]."""
        return lightly_utils.random_token_mask((batch, self.sequence_length), self.mask_ratio,
                                               device=device)

    def decode(self, latent: torch.Tensor, idx_keep: torch.Tensor) -> torch.Tensor:
        """Mask tokens everywhere but at idx_keep, then the decoder: [B, 1+V, D] -> [B, 1+N, Dd]."""
        x = self.decoder.embed(latent)  # [B, 1+V, Dd]
        tokens = lightly_utils.repeat_token(self.decoder.mask_token,
                                            (len(x), self.sequence_length))  # [B, 1+N, Dd]
        tokens = lightly_utils.set_at_index(tokens, idx_keep, x.type_as(tokens))  # [B, 1+N, Dd]
        return self.decoder.decode(tokens)  # [B, 1+N, Dd]

    def forward(self, imgs: torch.Tensor, step: int) -> torch.Tensor:
        idx_keep, idx_mask = self.random_mask(len(imgs), imgs.device)  # [B, 1+V], [B, M]
        latent = self.backbone.encode(imgs, idx_keep=idx_keep)  # [B, 1+V, D]
        decoded = lightly_utils.get_at_index(self.decode(latent, idx_keep), idx_mask)  # [B, M, Dd]
        pred = self.decoder.predict(decoded)  # [B, M, p*p*C]
        patches = lightly_utils.patchify(imgs, self.patch_size)  # [B, N, p*p*C]
        target = lightly_utils.get_at_index(patches, idx_mask - 1)  # [B, M, p*p*C], no CLS
        if self.norm_pix:
            target = lightly_utils.normalize_mean_var(target)  # [B, M, p*p*C], per patch
        return F.mse_loss(pred.float(), target.float())


def dino_head(cfg: Config) -> "DINOProjectionHead":
    """lightly's DINO head with the labelling head's sizes (3 layers, weight-normed prototypes)."""
    m = cfg.method
    if m.head_layers != 3:
        raise ValueError(f"lightly's DINOProjectionHead has 3 layers, method.head_layers = {m.head_layers}")
    with quiet_deprecations():
        return DINOProjectionHead(input_dim=cfg.model.embed_dim, hidden_dim=m.head_hidden_dim,
                                  bottleneck_dim=m.head_bottleneck_dim, output_dim=m.num_prototypes,
                                  freeze_last_layer=m.freeze_last_layer_epochs)


def frozen(module: nn.Module) -> nn.Module:
    """`module` as an EMA teacher: no gradients (lightly's `deactivate_requires_grad`)."""
    lightly_utils.deactivate_requires_grad(module)
    return module


def masked_grid(idx_mask: torch.Tensor, sequence_length: int, grid: int) -> torch.Tensor:
    """The masked patches as a boolean grid [B, h, w], from sequence indices [B, M] (CLS = 0)."""
    mask = torch.zeros(len(idx_mask), sequence_length, dtype=torch.bool,
                       device=idx_mask.device)  # [B, 1+N]
    mask.scatter_(1, idx_mask, True)
    return mask[:, 1:].reshape(-1, grid, grid)  # [B, h, w]


def teacher_features(backbone: nn.Module, imgs: torch.Tensor,
                     idx_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher on the full image: CLS [B, D] and LayerNorm-ed tokens at the masked spots [B, M, D]."""
    x = backbone.encode(imgs)  # [B, 1+N, D], after the final norm
    tokens = lightly_utils.get_at_index(x, idx_mask)  # [B, M, D]
    return x[:, 0], F.layer_norm(tokens.float(), tokens.shape[-1:])  # [B, D], [B, M, D]


class LightlyPEMAE(LightlyMAE):
    """PEMAE (dual teachers, token target, CLS + token pseudo labels) from lightly's modules."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.method
        self.method = m
        self.decoder.decoder_pred.requires_grad_(False)  # token target: the pixel head is unused
        self.token_head = nn.Linear(cfg.model.decoder_dim, cfg.model.embed_dim)
        self.head = dino_head(cfg)
        teacher_head = dino_head(cfg)
        teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_set = nn.ModuleDict({
            "rec": frozen(copy.deepcopy(self.backbone)),  # reconstruction teacher
            "lab": frozen(copy.deepcopy(self.backbone)),  # labelling teacher ...
            "lab_head": frozen(teacher_head),  # ... and its head
        })
        self.dino_loss = DINOLoss(output_dim=m.num_prototypes, teacher_temp=m.teacher_temp,
                                  student_temp=m.student_temp, center_momentum=m.center_momentum)
        self.ibot_loss = IBOTPatchLoss(output_dim=m.num_prototypes, teacher_temp=m.teacher_temp,
                                       student_temp=m.student_temp,
                                       center_momentum=m.center_momentum)

    def teacher_temp(self, step: int) -> float:
        m = self.method
        return linear_warmup_schedule(step, int(m.teacher_temp_warmup * TOTAL_STEPS),
                                      m.teacher_temp_start, m.teacher_temp)

    def forward(self, imgs: torch.Tensor, step: int) -> torch.Tensor:
        m, teachers = self.method, self.teacher_set
        idx_keep, idx_mask = self.random_mask(len(imgs), imgs.device)  # [B, 1+V], [B, M]
        latent = self.backbone.encode(imgs, idx_keep=idx_keep)  # [B, 1+V, D]
        decoded = lightly_utils.get_at_index(self.decode(latent, idx_keep), idx_mask)  # [B, M, Dd]
        y = self.token_head(decoded)  # [B, M, D]

        with torch.no_grad():  # both teachers see the full image
            _, targets = teacher_features(teachers["rec"], imgs, idx_mask)  # [B, M, D]
            lab_cls, lab_tokens = teacher_features(teachers["lab"], imgs, idx_mask)  # [B, D], [B, M, D]
            t_cls = teachers["lab_head"](lab_cls)  # [B, K]
            t_tok = teachers["lab_head"](lab_tokens)  # [B, M, K]
        s_cls = self.head(latent[:, 0])  # [B, K]
        s_tok = self.head(y)  # [B, M, K]

        temp = self.teacher_temp(step)
        loss_rec = F.mse_loss(y.float(), targets)
        loss_cls = self.dino_loss([t_cls, t_cls], [s_cls, s_cls], teacher_temp=temp)  # same view
        mask = masked_grid(idx_mask, self.sequence_length, self.grid)  # [B, h, w]
        loss_tok = self.ibot_loss(t_tok.flatten(0, 1), s_tok.flatten(0, 1), mask,
                                  teacher_temp=temp)  # [B*M, K] each
        return m.lambda_rec * loss_rec + m.lambda_cls * loss_cls + m.lambda_tok * loss_tok

    def after_backward(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(step // STEPS_PER_EPOCH)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m, teachers = self.method, self.teacher_set
        progress = min(step, TOTAL_STEPS)  # lightly's schedule warns past its end
        m_rec = cosine_schedule(progress, TOTAL_STEPS, m.momentum_rec, 1.0)
        m_lab = cosine_schedule(progress, TOTAL_STEPS, m.momentum_lab, 1.0)
        lightly_utils.update_momentum(self.backbone, teachers["rec"], m_rec)
        lightly_utils.update_momentum(self.backbone, teachers["lab"], m_lab)
        lightly_utils.update_momentum(self.head, teachers["lab_head"], m_lab)


def peer_steps(model: Peer, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
               device: torch.device, amp: str, first_step: int) -> StepFn:
    """A peer's training step on `imgs`, shaped like pemae's `train_step`."""
    steps = itertools.count(first_step)

    def run_step() -> torch.Tensor:
        step = next(steps)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = model(imgs, step)
        loss.float().backward()
        model.after_backward(step)
        optimizer.step()
        model.after_step(step)
        return loss.detach()

    return run_step


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------
Builder = Callable[[Config, torch.Tensor, torch.device, str, int], Contender]


@dataclass(frozen=True)
class Implementation:
    name: str
    library: str  # the package it comes from: pemae, transformers or lightly
    build: Builder  # (cfg, imgs, device, amp, seed) -> Contender


def pemae_builder(method_overrides: dict) -> Builder:
    return lambda cfg, imgs, device, amp, seed: pemae_contender(cfg, method_overrides, imgs,
                                                                device, seed, amp)


def peer_builder(peer: type[Peer]) -> Builder:
    def build(cfg: Config, imgs: torch.Tensor, device: torch.device, amp: str,
              seed: int) -> Contender:
        torch.manual_seed(seed)
        model = peer(cfg).to(device).train()
        optimizer = adamw(model, cfg.pretrain, len(imgs))
        return Contender(model, optimizer,
                         peer_steps(model, optimizer, imgs, device, amp, PEER_FIRST_STEP))
    return build


IMPLEMENTATIONS = (
    Implementation("pemae_mae", "pemae", pemae_builder(COST_VARIANTS["mae"])),
    Implementation("hf_mae", "transformers", peer_builder(HFMAE)),
    Implementation("lightly_mae", "lightly", peer_builder(LightlyMAE)),
    Implementation("pemae_single", "pemae", pemae_builder(COST_VARIANTS["pemae_single"])),
    Implementation("pemae_dual", "pemae", pemae_builder(COST_VARIANTS["pemae_dual"])),
    Implementation("lightly_pemae", "lightly", peer_builder(LightlyPEMAE)),
)
RATIOS = (("pemae_mae", "hf_mae"), ("pemae_mae", "lightly_mae"),
          ("pemae_dual", "lightly_pemae"), ("pemae_dual", "pemae_single"))


def library_version(library: str) -> str:
    try:
        return f"{library} {importlib.metadata.version(library)}"
    except importlib.metadata.PackageNotFoundError:
        return library


def available(verbose: bool = True) -> tuple[list[Implementation], list[dict]]:
    """The implementations whose library imports, and a note for each one skipped."""
    kept, skipped = [], []
    for impl in IMPLEMENTATIONS:
        if impl.library in MISSING:
            note = (f"skipped {impl.name}: {impl.library} cannot be imported "
                    f"({MISSING[impl.library]}); pip install -e '.[bench]'")
            skipped.append({"implementation": impl.name, "library": impl.library, "note": note})
            if verbose:
                print(note)
        else:
            kept.append(impl)
    return kept, skipped
