"""An independent attack library for cross-checks: the Adversarial Robustness Toolbox (ART).

Optional (the ``robust`` extra: ``pip install 'pmptrain[robust]'``, which installs
``adversarial-robustness-toolbox``). Everything here raises :class:`LibraryMissing` with the install
command when ART is absent. ART was chosen over torchattacks because torchattacks requires
torchvision. ART's AutoAttack is the reference implementation of Croce & Hein (ICML 2020) this
project uses; it is not re-implemented here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["LibraryMissing", "available", "art_classifier", "art_pgd", "art_autoattack"]

_NORM = {"linf": np.inf, "l2": 2}


class LibraryMissing(ImportError):
    """The optional attack library is not installed."""


def available() -> bool:
    """Whether ART can be imported."""
    try:
        import art  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def _require():
    try:
        import art  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        raise LibraryMissing("the Adversarial Robustness Toolbox is not installed: "
                             "pip install 'pmptrain[robust]' (adversarial-robustness-toolbox)") from e


def art_classifier(model: nn.Module, input_shape: Tuple[int, ...], num_classes: int,
                   bounds: Optional[Tuple[float, float]] = (0.0, 1.0)):
    """An ART ``PyTorchClassifier`` around ``model`` (cross-entropy loss, CPU, eval mode)."""
    _require()
    from art.estimators.classification import PyTorchClassifier

    model.eval()
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=num_classes, clip_values=bounds, device_type="cpu")


def _run(attack, x: Tensor, y: Tensor) -> Tensor:
    adv = attack.generate(x=x.detach().cpu().numpy().astype(np.float32), y=y.cpu().numpy())
    return torch.from_numpy(np.asarray(adv)).to(x.dtype)


def art_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, norm: str = "linf",
            restarts: int = 1, num_classes: int = 10, bounds=(0.0, 1.0), batch_size: int = 256) -> Tensor:
    """ART's ``ProjectedGradientDescentPyTorch`` (random start when ``restarts >= 1``)."""
    _require()
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    clf = art_classifier(model, tuple(x.shape[1:]), num_classes, bounds)
    att = ProjectedGradientDescentPyTorch(clf, norm=_NORM[norm], eps=eps, eps_step=alpha, max_iter=steps,
                                          num_random_init=restarts, batch_size=batch_size, verbose=False)
    return _run(att, x, y)


def art_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", num_classes: int = 10,
                   bounds=(0.0, 1.0), version: str = "fast", batch_size: int = 256) -> Tensor:
    """ART's ``AutoAttack``.

    ``version="standard"``: ART's default ensemble (APGD-CE and APGD-DLR, 100 iterations × 5
    restarts each, DeepFool, Square 5000 queries × 5 restarts). ``version="fast"`` (what the bench
    runs on a CPU): APGD-CE and APGD-DLR, 100 iterations, 1 restart each — the white-box part of
    the ensemble, which decides nearly all of AutoAttack's robust accuracy for non-obfuscated
    models (Croce & Hein 2020, Table 2)."""
    _require()
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent

    if version not in ("fast", "standard"):
        raise ValueError(f"version must be 'fast' or 'standard', got {version!r}")
    clf = art_classifier(model, tuple(x.shape[1:]), num_classes, bounds)
    attacks = None
    if version == "fast":
        attacks = [AutoProjectedGradientDescent(estimator=clf, norm=_NORM[norm], eps=eps, eps_step=2 * eps / 10,
                                                max_iter=100, targeted=False, nb_random_init=1,
                                                batch_size=batch_size, loss_type=lt, verbose=False)
                   for lt in ("cross_entropy", "difference_logits_ratio")]
    att = AutoAttack(clf, norm=_NORM[norm], eps=eps, eps_step=2 * eps / 10, attacks=attacks, batch_size=batch_size)
    return _run(att, x, y)
