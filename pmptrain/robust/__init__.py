"""Adversarial robustness by the maximum principle (docs/robust.md).

* trainers over any torch optimizer (``pmptrain.EMSA`` included): :class:`YOPO` and
  :class:`TradesYOPO` (Zhang et al., NeurIPS 2019), and the baselines :class:`PGDAT` (Madry et al.
  2018), :class:`FreeAT` (Shafahi et al. 2019), :class:`FastAT` (Wong et al. 2020), :class:`TRADES`
  (Zhang et al. 2019), :class:`Standard`;
* :class:`ClosedLoopController` — per-input controls at inference, solved by MSA (Chen, Li & Zhang,
  ICLR 2021 / JMLR 2022);
* :mod:`.attacks` — FGSM, PGD-k with restarts (ℓ∞, ℓ2); :mod:`.library` — the Adversarial
  Robustness Toolbox's PGD and AutoAttack for cross-checks (optional extra ``robust``).
"""

from . import attacks
from .attacks import fgsm, pgd, accuracy, robust_accuracy
from .closed_loop import ClosedLoopController, PCAManifold
from .costate import FirstLayerCostate, find_first_layer
from .trainers import (TRAINERS, AdversarialTrainer, FastAT, FreeAT, PGDAT, Standard, TRADES, TradesYOPO,
                       YOPO, trades_kl)

__all__ = ["attacks", "fgsm", "pgd", "accuracy", "robust_accuracy", "ClosedLoopController", "PCAManifold",
           "FirstLayerCostate", "find_first_layer", "TRAINERS", "AdversarialTrainer", "Standard", "PGDAT",
           "FreeAT", "FastAT", "TRADES", "YOPO", "TradesYOPO", "trades_kl"]
