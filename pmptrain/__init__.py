"""pmptrain: neural-network training by Pontryagin's maximum principle.

Public API (everything else may change):

* :class:`EMSA`, :class:`MSA` — continuous E-MSA / basic MSA as ``torch.optim.Optimizer`` s.
"""

from .optim import EMSA, MSA, PMPOptimizer, StepInfo

__version__ = "0.1.0"

__all__ = ["EMSA", "MSA", "PMPOptimizer", "StepInfo", "__version__"]
