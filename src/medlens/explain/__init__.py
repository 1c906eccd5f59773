"""Visual explanations: class activation maps, overlays, and checks that a map is faithful to the model.

    with GradCAM(model) as cam:          # a forward hook on model.cam_layer until the block ends
        maps = cam(x)                    # (B, *spatial) float in [0, 1], explaining the predicted class
    result = explain(model, x, "scorecam", target=1)   # maps + explained classes + their probabilities

``x`` is network input (``normalize_batch`` output), ``(B, C, H, W)`` or ``(B, C, D, H, W)``: nothing here
depends on the number of spatial dimensions. Maps come back at the input size (bilinear / trilinear), ReLU-ed
and min-max scaled to [0, 1] per image (a constant map becomes all zeros), detached, on ``x``'s device.

One base class, ``CAM``, does the plumbing: the hook on the target layer (released by ``close()`` or the
``with`` block), choosing the class, one forward pass (plus, for the gradient methods, a backward pass that
stops at the target layer: ``torch.autograd.grad`` w.r.t. the activations, so no parameter ``.grad`` is
touched and the layers below are not back-propagated), resizing and normalising. A method overrides
``weights(activations, gradients, x, targets)``, the per-channel weights of the map; ``Occlusion``, which
needs neither activations nor gradients, overrides ``raw_maps`` instead.

What is explained: the **logit** of one class per image, the predicted class (argmax) unless ``target`` is
given (an int for the whole batch, or one class per image). For the usual 2-logit (normal / pneumonia) head
that is the predicted class's own logit, not the logit difference, as in Selvaraju et al. and pytorch-grad-cam;
for a single-logit (sigmoid) head it is that logit whatever the prediction. The model is put in eval mode for
the call (dropout off, BatchNorm statistics untouched) and its modes restored afterwards.

Faithfulness (Petsiuk et al. 2018; Adebayo et al. 2018): ``deletion_insertion``, ``randomisation_check``,
``mask_energy_fraction``.
"""

from __future__ import annotations

from medlens.explain.cams import (
    CAM,
    METHODS,
    Explanation,
    GradCAM,
    GradCAMPlusPlus,
    MemberAverage,
    Occlusion,
    ScoreCAM,
    Target,
    explain,
    make_explainer,
    normalize_maps,
)
from medlens.explain.faithfulness import (
    deletion_insertion,
    mask_energy_fraction,
    randomisation_check,
    randomised_copy,
)
from medlens.explain.overlay import overlay, save_overlay

__all__ = [
    "CAM", "GradCAM", "GradCAMPlusPlus", "ScoreCAM", "Occlusion", "Explanation", "METHODS",
    "make_explainer", "explain", "MemberAverage", "Target", "normalize_maps", "overlay", "save_overlay",
    "deletion_insertion", "randomisation_check", "randomised_copy", "mask_energy_fraction",
]
