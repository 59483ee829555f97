"""PEMAE: MAE with token reconstruction and pseudo labels from decoupled EMA teachers.

Nandam et al., "Pseudo Labelling for Enhanced Masked Autoencoders", BMVC 2024. One step
(docs/method.md, shapes for B images, N patches, V visible, M masked, D width, K prototypes):

1. mask, encode the visible patches (student)                 z_cls [B, D], z_vis [B, V, D]
2. decode; a linear head predicts a token at every masked spot  y [B, M, D]
3. reconstruction teacher (EMA encoder, full image) -> targets  t = LN(its tokens at M) [B, M, D]
4. labelling teacher (EMA encoder + head H) -> pseudo labels    q_cls [B, K], q_tok [B, M, K]
5. loss = λ_rec·|y - t|² + λ_cls·CE(q_cls, H(z_cls)) + λ_tok·CE(q_tok, H(y))
6. after the optimiser step, each teacher follows the student by EMA with its own momentum, and
   the centres move towards the mean teacher logits of the step (all micro-batches, all processes).

`teachers: single` uses one EMA teacher (one forward pass) for both targets and pseudo labels.
`views: 2` (ours, iBOT / DINO): the labelling teacher also sees a second augmented view of each
image, and the student's CLS logits are trained against that view's pseudo label (cross-view);
token targets and token pseudo labels stay on the student's own view (same patch positions).

`PEMAE.step_pieces` returns the tensors of steps 1-4 (`StepPieces`); `PEMAE.forward` turns them
into the loss (step 5). notebooks/00_walkthrough.ipynb goes through one step piece by piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pemae.config.schema import Config
from pemae.engine.schedules import ema_momentum
from pemae.engine.schedules import teacher_temperature
from pemae.models.encoder import encode_patches, gather_tokens
from pemae.models.heads import LabellingHead
from pemae.models.losses import (centered_probs, entropy, pseudo_label_loss, sinkhorn_knopp,
                                 token_reconstruction_loss, update_center)
from pemae.models.mae import Masking, MaskedAutoencoder, random_masking
from pemae.models.monitors import target_monitors
from pemae.models.teachers import EMATeacher


def teacher_features(encoder: nn.Module, imgs: torch.Tensor, masking: Masking, view: str,
                     folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's CLS feature (final norm) [B, D] and LayerNorm-ed tokens at the masked spots [B, M, D].

    view 'full': one pass over the whole image. view 'multifold' (SdAE): only the masked patches
    are seen, split into `folds` groups with a pass each; the CLS features are averaged.
    """
    if view == "full":
        x = encode_patches(encoder, imgs)  # [B, 1+N, D]
        cls, tokens = x[:, 0], gather_tokens(x[:, 1:], masking.ids_masked)  # [B, D], [B, M, D]
    else:
        outs = [encode_patches(encoder, imgs, ids) for ids in masking.ids_masked.chunk(folds, dim=1)]
        cls = torch.stack([o[:, 0] for o in outs]).mean(0)  # [B, D]
        tokens = torch.cat([o[:, 1:] for o in outs], dim=1)  # [B, M, D] in ids_masked order
    tokens = F.layer_norm(tokens.float(), tokens.shape[-1:])  # [B, M, D], no affine
    return encoder.norm(cls), tokens


def teacher_cls(encoder: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """A teacher's CLS feature (final norm) of whole images: [B, C, H, W] -> [B, D]."""
    return encoder.norm(encode_patches(encoder, imgs)[:, 0])


@dataclass
class StepPieces:
    """The tensors of one PEMAE step before its loss (`PEMAE.step_pieces`), named as in docs/method.md.

    Shapes for B images, N patches, V visible, M masked, D encoder width, Dd decoder width,
    K prototypes. `PEMAE.forward` computes every loss term from these and nothing else; a piece
    the configuration does not use is None.
    """

    masking: Masking  # the random mask (ids_keep [B, V], ids_masked [B, M], mask [B, N])
    latent: torch.Tensor  # [B, 1+V, D] student encoder on [CLS] + visible patches: z_cls, z_vis
    decoded: torch.Tensor  # [B, N, Dd] decoder output at every patch position
    y: torch.Tensor  # token target: [B, M, D] predicted tokens at M; pixel: [B, N, p*p*C]
    targets: torch.Tensor | None  # [B, M, D] reconstruction teacher's LayerNorm-ed tokens at M
    teacher_temp: torch.Tensor  # [] τ_t of this step
    q_cls: torch.Tensor | None  # [B, K] labelling teacher's CLS pseudo labels (view2's if any)
    s_cls: torch.Tensor | None  # [B, K] student CLS logits H(z_cls)
    q_tok: torch.Tensor | None  # [B, M, K] labelling teacher's pseudo labels of the masked tokens
    s_tok: torch.Tensor | None  # [B, M, K] student token logits H(y)


class PEMAE(nn.Module):
    def __init__(self, cfg: Config, total_steps: int, steps_per_epoch: int):
        super().__init__()
        m = cfg.method
        self.method = m
        self.total_steps = max(1, total_steps)
        self.freeze_last_layer_steps = round(m.freeze_last_layer_epochs * steps_per_epoch)
        self.student = MaskedAutoencoder(cfg.model, cfg.data)
        self.token_target = m.recon_target == "token"
        if self.token_target:  # the pixel head is never used: frozen, so DDP sees no unused weight
            self.student.decoder_pred.requires_grad_(False)
        self.use_cls = m.lambda_cls > 0
        self.use_tok = m.lambda_tok > 0
        self.views = num_views(cfg)

        # ---------------------------------------------------------------- student heads
        self.token_head = (nn.Linear(cfg.model.decoder_dim, cfg.model.embed_dim)
                           if self.token_target else None)
        self.label_head = (LabellingHead(cfg.model.embed_dim, m.num_prototypes, m.head_hidden_dim,
                                         m.head_bottleneck_dim, m.head_layers)
                           if self.use_cls or self.use_tok else None)

        # ---------------------------------------------------------------- teachers
        # single: one teacher ("shared") for targets and pseudo labels, one forward pass;
        # dual: a reconstruction teacher ("rec", token targets only) and a labelling teacher ("lab")
        encoder = self.student.encoder
        head = {"head": self.label_head} if self.label_head is not None else {}
        self.teacher_set = nn.ModuleDict()
        if m.teachers == "single":
            self.teacher_set["shared"] = EMATeacher(encoder=encoder, **head)
        else:
            if self.token_target:
                self.teacher_set["rec"] = EMATeacher(encoder=encoder)
            if self.label_head is not None:
                self.teacher_set["lab"] = EMATeacher(encoder=encoder, **head)
        self.register_buffer("center_cls", torch.zeros(1, m.num_prototypes))
        self.register_buffer("center_tok", torch.zeros(1, m.num_prototypes))
        # mean teacher logits of each micro-batch of the current step, consumed by `after_step`
        self._step_logit_means: dict[str, list[torch.Tensor]] = {"cls": [], "tok": []}

    # ------------------------------------------------------------------------ helpers
    @property
    def encoder(self) -> nn.Module:
        """The student encoder (what is exported and evaluated)."""
        return self.student.encoder

    def _teacher_key(self, role: str) -> str | None:
        """Which teacher plays `role` ("rec" or "lab"): the shared one, else its own, else none."""
        return next((key for key in ("shared", role) if key in self.teacher_set), None)

    def _teacher(self, role: str) -> EMATeacher | None:
        key = self._teacher_key(role)
        return None if key is None else self.teacher_set[key]

    @property
    def rec_teacher(self) -> EMATeacher | None:
        """The teacher giving token targets (the shared one under `teachers: single`)."""
        return self._teacher("rec")

    @property
    def lab_teacher(self) -> EMATeacher | None:
        """The teacher giving pseudo labels (the shared one under `teachers: single`)."""
        return self._teacher("lab")

    def momentum_knob(self, name: str) -> str:
        """The momentum a teacher follows; a shared teacher with a head follows the labelling one."""
        if name == "rec" or (name == "shared" and self.label_head is None):
            return "momentum_rec"
        return "momentum_lab"

    def momentum(self, name: str, step: int) -> float:
        return ema_momentum(step, self.total_steps, getattr(self.method, self.momentum_knob(name)))

    def pseudo_labels(self, teacher_logits: torch.Tensor, kind: str, temp: torch.Tensor) -> torch.Tensor:
        """Teacher probabilities [..., K] for `kind` ("cls" or "tok"): centred softmax or Sinkhorn-Knopp.

        In training the batch's mean logits are kept for the centre update after the step, so every
        micro-batch of a step is centred alike (accumulation = one big batch).
        """
        m = self.method
        if m.balancing == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, temp, m.sinkhorn_iterations)
        probs = centered_probs(teacher_logits, getattr(self, f"center_{kind}"), temp)
        if self.training:
            k = teacher_logits.shape[-1]
            self._step_logit_means[kind].append(teacher_logits.float().reshape(-1, k).mean(0))  # [K]
        return probs

    # ------------------------------------------------------------------------ one step
    def step_pieces(self, imgs: torch.Tensor, step: int = 0, noise: torch.Tensor | None = None,
                    view2: torch.Tensor | None = None) -> StepPieces:
        """Everything one step computes before its loss: mask, student, teachers, pseudo labels.

        `forward` calls it and turns the pieces into the loss. In training mode the teachers'
        mean logits are recorded for the centre update after the step (as `forward` does); call it
        in eval mode to look at a step without touching the centres.
        """
        m, student = self.method, self.student
        if (view2 is not None) != (self.views == 2):
            raise ValueError(f"this model takes {self.views} view(s) per image (method.views = "
                             f"{m.views}, lambda_cls = {m.lambda_cls}), got "
                             f"{1 if view2 is None else 2}")
        masking = random_masking(imgs.shape[0], student.num_patches, student.mask_ratio, imgs.device,
                                 noise)
        latent = student.forward_encoder(imgs, masking)  # [B, 1+V, D]
        decoded = student.forward_decoder(latent, masking)  # [B, N, Dd]

        # ---------------------------------------------------------------- teacher targets
        rec_key, lab_key = self._teacher_key("rec"), self._teacher_key("lab")
        on_view1 = {rec_key} if self.token_target else set()  # teachers that see the student's view
        if self.use_tok or (self.use_cls and view2 is None):
            on_view1.add(lab_key)
        with torch.no_grad():  # one pass per teacher and view: (CLS [B, D], tokens at M [B, M, D])
            seen = {name: teacher_features(self.teacher_set[name]["encoder"], imgs, masking,
                                           m.teacher_view, m.folds)
                    for name in self.teacher_set if name in on_view1}
            _, rec_tokens = seen.get(rec_key, (None, None))
            lab_cls, lab_tokens = seen.get(lab_key, (None, None))
            if view2 is not None:  # cross-view: the CLS pseudo label of the other view
                lab_cls = teacher_cls(self.lab_teacher["encoder"], view2)  # [B, D]

        # ---------------------------------------------------------------- predictions
        if self.token_target:
            y = self.token_head(gather_tokens(decoded, masking.ids_masked))  # [B, M, D]
        else:
            y = student.decoder_pred(decoded)  # [B, N, p*p*C]

        # ---------------------------------------------------------------- pseudo labels
        temp = self.step_scalars(step, imgs.device)["teacher_temp"]  # []
        q_cls = s_cls = q_tok = s_tok = None
        if self.use_cls:
            with torch.no_grad():
                q_cls = self.pseudo_labels(self.lab_teacher["head"](lab_cls), "cls", temp)  # [B, K]
            s_cls = self.label_head(latent[:, 0])  # [B, K]
        if self.use_tok:
            with torch.no_grad():
                q_tok = self.pseudo_labels(self.lab_teacher["head"](lab_tokens), "tok", temp)  # [B, M, K]
            s_tok = self.label_head(y)  # [B, M, K]
        return StepPieces(masking, latent, decoded, y, rec_tokens, temp, q_cls, s_cls, q_tok, s_tok)

    def forward(self, imgs: torch.Tensor, step: int = 0, noise: torch.Tensor | None = None,
                monitor: bool = True, view2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step's losses; `monitor=False` skips the collapse monitors (steps not logged).

        `view2` [B, C, H, W]: the second view of each image, needed exactly when `self.views == 2`.
        The one place the loss is computed, from the pieces of `step_pieces`.
        """
        m = self.method
        p = self.step_pieces(imgs, step, noise, view2)
        out: dict[str, torch.Tensor] = {"mask": p.masking.mask}

        # ---------------------------------------------------------------- reconstruction
        if self.token_target:
            loss_rec = token_reconstruction_loss(p.y, p.targets, m.recon_loss)
            if monitor:
                out.update(target_monitors(p.targets))
        else:
            loss_rec = self.student.forward_loss(imgs, p.y, p.masking.mask)
        loss = m.lambda_rec * loss_rec
        out["loss_rec"] = loss_rec.detach()

        # ---------------------------------------------------------------- pseudo labels
        if self.use_cls:
            loss_cls = pseudo_label_loss(p.s_cls, p.q_cls, m.student_temp)
            loss = loss + m.lambda_cls * loss_cls
            out["loss_cls"] = loss_cls.detach()
            if monitor:
                out.update(self.monitors("cls", p.q_cls, self.center_cls))
        if self.use_tok:
            loss_tok = pseudo_label_loss(p.s_tok, p.q_tok, m.student_temp)
            loss = loss + m.lambda_tok * loss_tok
            out["loss_tok"] = loss_tok.detach()
            if monitor:
                out.update(self.monitors("tok", p.q_tok, self.center_tok))

        out["loss"] = loss
        out.update(self.step_scalars(step, imgs.device))  # τ_t and the teachers' momenta, logged
        return out

    @torch.compiler.disable
    def step_scalars(self, step: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The step's schedule values as 0-d tensors on `device`: τ_t ("teacher_temp") and each
        teacher's EMA momentum ("momentum_<name>"). Computed outside `torch.compile`, so that a
        compiled forward takes them as inputs instead of constants it would recompile for at
        every step; filled on the device, with no host-to-device copy."""
        m = self.method
        temp = teacher_temperature(step, self.total_steps, m.teacher_temp_start, m.teacher_temp,
                                   m.teacher_temp_warmup)
        scalars = {"teacher_temp": torch.full((), temp, device=device)}
        for name in self.teacher_set:
            scalars[f"momentum_{name}"] = torch.full((), self.momentum(name, step), device=device)
        return scalars

    def monitors(self, kind: str, probs: torch.Tensor, center: torch.Tensor) -> dict[str, torch.Tensor]:
        """Collapse monitors of one kind of pseudo label (all detached scalars).

        entropy: mean per-sample entropy of q (→ 0: confident, → log K: uniform collapse);
        perplexity: exp(entropy of the batch-mean q), the effective number of clusters in use
        (→ 1: everything in one cluster);
        information: entropy of the batch-mean q minus the mean per-sample entropy, in nats: the
        mutual information between an image (or token) and its pseudo label over the batch. It is
        0 in both collapses (every label the same, uniform or one-hot) and at most log K (confident
        labels spread evenly over the K clusters): how much the labels say about the image.
        """
        probs = probs.reshape(-1, probs.shape[-1]).detach()  # [S, K]
        per_sample, of_mean = entropy(probs).mean(), entropy(probs.mean(0))  # [], []
        return {
            f"{kind}_entropy": per_sample,
            f"{kind}_perplexity": of_mean.exp(),
            f"{kind}_information": of_mean - per_sample,
            f"{kind}_center_norm": center.norm(),
        }

    # ------------------------------------------------------------------------ training hooks
    def after_backward(self, step: int) -> None:
        """Freeze the prototypes for the first epoch(s) (DINO): drop their gradient."""
        if self.label_head is not None and step < self.freeze_last_layer_steps:
            for p in self.label_head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA-update each teacher with its own momentum schedule; move the centres."""
        for name, teacher in self.teacher_set.items():
            parts = {"encoder": self.student.encoder}
            if "head" in teacher.parts:
                parts["head"] = self.label_head
            teacher.update(self.momentum(name, step), **parts)
        for kind, means in self._step_logit_means.items():
            if means:  # equal-sized micro-batches: the mean of their means is the step's mean
                update_center(getattr(self, f"center_{kind}"), torch.stack(means), self.method.center_momentum)
                means.clear()


def num_views(cfg: Config) -> int:
    """Augmented views per image a pretraining step takes: 2 only for PEMAE's cross-view CLS
    pseudo labels (`method.views: 2` with `lambda_cls > 0`); MAE and the rest take one."""
    m = cfg.method
    return 2 if m.name == "pemae" and m.views == 2 and m.lambda_cls > 0 else 1


def stand_in_view2(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor | None:
    """For a fixed batch (benchmarks, FLOP counts): the second view a two-view model needs, here
    the images flipped left-right [B, C, H, W]; None for a one-view model."""
    return imgs.flip(-1) if getattr(model, "views", 1) == 2 else None


def build_pretrain_model(cfg: Config, total_steps: int, steps_per_epoch: int) -> nn.Module:
    """The pretraining model of `cfg.method`."""
    if cfg.method.name == "mae":
        return MaskedAutoencoder(cfg.model, cfg.data)
    return PEMAE(cfg, total_steps, steps_per_epoch)
