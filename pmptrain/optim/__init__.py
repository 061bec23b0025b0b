"""The optimizers: one shell (:mod:`.shell`), per-module/per-parameter rules (:mod:`.affine`,
:mod:`.iterative`, :mod:`.elementwise`) and the configurations users build (:mod:`.emsa`,
:mod:`.discrete_msa`, :mod:`.baselines`)."""

from .baselines import TWN, BinaryConnect, Bop
from .discrete_config import DiscreteDiagnostics
from .discrete_msa import DiscreteMSA, GroupScheduler
from .emsa import EMSA, MSA, controlled_block
from .rule import Proposal, Rule, StepContext, Unit, Update
from .shell import PMPOptimizer, StepInfo, Unsupported

__all__ = [
    "EMSA", "MSA", "controlled_block", "DiscreteMSA", "GroupScheduler", "DiscreteDiagnostics", "BinaryConnect", "TWN", "Bop",
    "PMPOptimizer", "StepInfo", "Unsupported", "Rule", "Unit", "Update", "Proposal", "StepContext",
]
