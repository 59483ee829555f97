"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2022).

Reads top to bottom like the paper: patchify, random masking, a sparse encoder on the visible
patches, a light decoder that fills in mask tokens, and a loss on the masked patches only.
The encoder is a timm `VisionTransformer` (see `pemae.models.encoder`), the decoder timm `Block`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pemae.config.schema import DataConfig, ModelConfig
from pemae.models.encoder import build_encoder, encode_patches, gather_tokens
from pemae.models.pos_embed import sincos_2d


@dataclass
class Masking:
    """One random masking of a batch; N patches of which V are visible and M masked."""

    ids_keep: torch.Tensor  # [B, V] indices of visible patches
    ids_masked: torch.Tensor  # [B, M] indices of masked patches
    ids_restore: torch.Tensor  # [B, N] un-shuffles [visible, masked] back to patch order
    mask: torch.Tensor  # [B, N] 0 = visible, 1 = masked


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None,
                   noise: torch.Tensor | None = None) -> Masking:
    """Per-sample random permutation (argsort of uniform noise); keep the first V.

    `noise` [B, N] gives the uniform draws (pretraining draws them per image with the image's
    augmentation, see `pemae.engine.sampling`); None draws them here from the global RNG.
    """
    num_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)  # [B, N]
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    mask = torch.ones(batch, num_patches, device=device)  # [B, N]
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N]
    return Masking(ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore, mask)


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std (norm-pix): [B, N, P] -> [B, N, 1], [B, N, 1]."""
    mean = patches.mean(dim=-1, keepdim=True)  # [B, N, 1]
    std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5  # [B, N, 1]
    return mean, std


class MaskedAutoencoder(nn.Module):
    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.patch_size = model.patch_size
        self.in_chans = data.in_chans
        self.mask_ratio = model.mask_ratio
        self.norm_pix_loss = model.norm_pix_loss
        grid = data.img_size // model.patch_size
        self.num_patches = grid * grid

        # ---------------------------------------------------------------- encoder
        self.encoder = build_encoder(model, data)
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos

        # ---------------------------------------------------------------- decoder
        self.decoder_embed = nn.Linear(model.embed_dim, model.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_2d(model.decoder_dim, grid, cls_token=True)[None]
        )  # [1, 1+N, Dd]
        self.decoder_blocks = nn.Sequential(*[
            Block(dim=model.decoder_dim, num_heads=model.decoder_heads,
                  mlp_ratio=model.mlp_ratio, qkv_bias=True)
            for _ in range(model.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(model.decoder_dim)
        self.decoder_pred = nn.Linear(model.decoder_dim, model.patch_size**2 * data.in_chans)

        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (patch projection included)."""
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], patches row-major, pixels (row, col, channel)."""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)  # [B, C, h, p, w, p]
        x = torch.einsum("bchpwq->bhwpqc", x)  # [B, h, w, p, p, C]
        return x.reshape(b, (h // p) * (w // p), p * p * c)  # [B, N, p*p*C]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]; the inverse of `patchify`."""
        p, c = self.patch_size, self.in_chans
        b, n, _ = x.shape
        g = int(n**0.5)
        x = x.reshape(b, g, g, p, p, c)  # [B, h, w, p, p, C]
        x = torch.einsum("bhwpqc->bchpwq", x)  # [B, C, h, p, w, p]
        return x.reshape(b, c, g * p, g * p)  # [B, C, H, W]

    # ------------------------------------------------------------------------ encoder
    def forward_encoder(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encode [CLS] + the visible patches only: [B, C, H, W] -> [B, 1+V, D]."""
        x = encode_patches(self.encoder, imgs, masking.ids_keep)  # [B, 1+V, D]
        return self.encoder.norm(x)  # [B, 1+V, D]

    # ------------------------------------------------------------------------ decoder
    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Fill mask tokens in, un-shuffle, decode: [B, 1+V, D] -> [B, N, Dd] (no CLS)."""
        x = self.decoder_embed(latent)  # [B, 1+V, Dd]
        b, v1, dd = x.shape
        masks = self.mask_token.expand(b, self.num_patches + 1 - v1, -1)  # [B, M, Dd]
        x_ = torch.cat([x[:, 1:], masks], dim=1)  # [B, N, Dd] in shuffled order
        x_ = gather_tokens(x_, masking.ids_restore)  # [B, N, Dd] in patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [B, 1+N, Dd]
        x = self.decoder_norm(self.decoder_blocks(x))  # [B, 1+N, Dd]
        return x[:, 1:]  # [B, N, Dd]

    # ------------------------------------------------------------------------ loss
    def pixel_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch targets [B, N, p*p*C]: normalised by each patch's mean/var if norm_pix_loss."""
        target = self.patchify(imgs)  # [B, N, p*p*C]
        if self.norm_pix_loss:
            mean, std = patch_stats(target)  # [B, N, 1] each
            target = (target - mean) / std  # [B, N, p*p*C]
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        target = self.pixel_targets(imgs)  # [B, N, p*p*C]
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, N]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, step: int = 0, noise: torch.Tensor | None = None,
                monitor: bool = True, view2: None = None) -> dict[str, torch.Tensor]:
        """One MAE step: returns the loss plus the prediction and mask for figures (MAE has no
        monitors and takes one view: `monitor` and `view2` are there for the common signature)."""
        if view2 is not None:
            raise ValueError("MAE takes one view per image, got a second one (view2)")
        masking = random_masking(imgs.shape[0], self.num_patches, self.mask_ratio, imgs.device, noise)
        latent = self.forward_encoder(imgs, masking)  # [B, 1+V, D]
        pred = self.decoder_pred(self.forward_decoder(latent, masking))  # [B, N, p*p*C]
        loss = self.forward_loss(imgs, pred, masking.mask)
        return {"loss": loss, "loss_rec": loss.detach(), "pred": pred, "mask": masking.mask}

    # ------------------------------------------------------------------------ training hooks
    def after_backward(self, step: int) -> None:
        """Called between backward and the optimiser step (nothing to do for MAE)."""

    def after_step(self, step: int) -> None:
        """Called after the optimiser step (nothing to do for MAE: it has no teacher)."""
