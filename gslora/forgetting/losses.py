"""The GS-LoRA forgetting losses, usable on their own (METHOD.md, "The losses").

    L = L_retain + β · L_forget + α · L_structure  [+ GS-LoRA++ prototype terms]

* :func:`retain_loss` — CE on the replay batch of remaining classes.
* :func:`bounded_forget_loss` — ReLU(BND − CE) on the forget batch: push the forget CE up to
  BND, then stop (unbounded ascent destroys the model).
* :func:`default_bnd` — BND from the head's logit scale (see its docstring).
* :class:`PrototypeLoss` — GS-LoRA++ prototype regularization.
* The structure term α·Σ_g‖θ_g‖ comes from :class:`gslora.sparsity.GroupSparsity`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "retain_loss",
    "bounded_forget_loss",
    "default_bnd",
    "estimate_logit_scale",
    "embedding_fn",
    "compute_prototypes",
    "PrototypeLoss",
    "DEFAULT_BND_RATIO",
]

#: BND = DEFAULT_BND_RATIO · 2s. With the authors' CosFace scale s = 64 this gives 108.8, inside
#: their hand-picked 105–110.
DEFAULT_BND_RATIO = 0.85


def retain_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """CE(logits [B, C], labels [B]) averaged over the batch (scalar)."""
    return F.cross_entropy(logits, labels)


def bounded_forget_loss(logits: Tensor, labels: Tensor, bnd: float) -> Tensor:
    """ReLU(BND − CE) with CE averaged over the forget batch, as in the authors' code (scalar).

    Its gradient is −∂CE while CE < BND and exactly 0 once CE ≥ BND.
    """
    if not math.isfinite(bnd) or bnd <= 0:
        raise ValueError(f"bnd must be a finite number > 0, got {bnd!r}")
    return F.relu(bnd - F.cross_entropy(logits, labels))


def default_bnd(logit_scale: float, ratio: float = DEFAULT_BND_RATIO) -> float:
    """BND = ratio · 2s for logits bounded by s (|z_j| ≤ s).

    Why 2s: the largest CE a sample can reach is about 2s — its target logit at −s while
    another class sits at +s (CE = −z_y + log Σ exp z_j ≈ s + s). The bound must be large enough
    that a forgotten sample is confidently wrong, but below that ceiling or the loss never
    switches off. The authors' CosFace head (s = 64, ceiling 128) used BND 105–110, i.e.
    ratio ≈ 0.82–0.86; the default ratio 0.85 reproduces that. For an unbounded linear head,
    pass the typical logit magnitude of the pre-trained model (:func:`estimate_logit_scale`).
    """
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"bnd ratio must lie in (0, 1], got {ratio!r}")
    return ratio * 2.0 * logit_scale


@torch.no_grad()
def estimate_logit_scale(model: nn.Module, batches: Sequence[Tensor] | Callable) -> float:
    """Typical logit magnitude of ``model``: the mean over samples of max_j |z_j|.

    ``batches`` is an iterable of image tensors [B, ...]. Used as s in :func:`default_bnd` for
    linear heads, whose logits have no fixed bound.
    """
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x in batches:
        z = model(x)
        total += z.abs().amax(dim=1).sum().item()
        n += z.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("estimate_logit_scale needs at least one sample")
    return total / n


def embedding_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The embedding (input of the classifier head) of a model, [B, ...] → [B, D].

    Our :class:`gslora.models.ViT` and timm models: ``forward_head(forward_features(x),
    pre_logits=True)``. Torchvision's ``VisionTransformer``: the class token after the encoder.
    Anything else: pass your own function to the engine (``embed_fn=``).
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    if hasattr(model, "_process_input") and hasattr(model, "encoder") and hasattr(model, "class_token"):
        def tv_embed(x: Tensor) -> Tensor:
            x = model._process_input(x)
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return model.encoder(x)[:, 0]
        return tv_embed
    raise TypeError(f"cannot find the embedding of a {type(model).__name__}; pass embed_fn= "
                    "(a function images [B, ...] → embeddings [B, D])")


@torch.no_grad()
def compute_prototypes(embed: Callable[[Tensor], Tensor], batches, num_classes: int) -> Tensor:
    """Class prototypes [num_classes, D]: mean embedding per class over ``batches`` of
    (images, labels). Classes without samples get a zero row."""
    sums, counts = None, torch.zeros(num_classes)
    for x, y in batches:
        e = embed(x).float()
        if sums is None:
            sums = torch.zeros(num_classes, e.shape[1], device=e.device)
        sums.index_add_(0, y.to(e.device), e)
        counts += torch.bincount(y.cpu(), minlength=num_classes).float()
    if sums is None:
        raise ValueError("compute_prototypes needs at least one batch")
    return sums / counts.clamp(min=1).to(sums.device).unsqueeze(1)


class PrototypeLoss(nn.Module):
    """GS-LoRA++ prototype regularization (METHOD.md).

    p = softmax over embedding dimensions. For forget samples (label y):
    pro_f · ReLU(BND_pro − KL(p_proto[y] ‖ p_emb)) pushes embeddings away from their class
    prototype up to a bound; for retain samples pro_r · KL(p_proto[y] ‖ p_emb) keeps them near
    it (pro_r = 0 by default, as the authors). Prototypes [C, D] come from the frozen
    start-of-task model (:func:`compute_prototypes`).
    """

    def __init__(self, prototypes: Tensor, pro_f: float = 0.0, pro_r: float = 0.0,
                 bnd_pro: float = 1.0) -> None:
        super().__init__()
        if prototypes.dim() != 2:
            raise ValueError(f"prototypes must be [num_classes, D], got {tuple(prototypes.shape)}")
        for name, v in (("pro_f", pro_f), ("pro_r", pro_r), ("bnd_pro", bnd_pro)):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.register_buffer("log_p_proto", F.log_softmax(prototypes.detach().float(), dim=1))
        self.pro_f, self.pro_r, self.bnd_pro = float(pro_f), float(pro_r), float(bnd_pro)

    def _kl(self, emb: Tensor, labels: Tensor) -> Tensor:
        # KL(p_proto ‖ p_emb) = Σ p_proto (log p_proto − log p_emb), averaged over the batch.
        log_p = self.log_p_proto[labels]
        return F.kl_div(F.log_softmax(emb.float(), dim=1), log_p, log_target=True,
                        reduction="batchmean")

    def forward(self, emb_forget: Tensor | None, y_forget: Tensor | None,
                emb_retain: Tensor | None = None, y_retain: Tensor | None = None) -> Tensor:
        """Embeddings [B, D] and labels [B] for each side → scalar loss."""
        loss = self.log_p_proto.new_zeros(())
        if self.pro_f > 0 and emb_forget is not None:
            loss = loss + self.pro_f * F.relu(self.bnd_pro - self._kl(emb_forget, y_forget))
        if self.pro_r > 0 and emb_retain is not None:
            loss = loss + self.pro_r * self._kl(emb_retain, y_retain)
        return loss
