"""Fine-tuning by control: controls attached to a frozen pretrained network (docs/control.md).

* :func:`attach` — add controls by module names, globs, regexes or types and freeze the rest:
  ``kind="lora"`` (a linear control on a Linear's state, ``y = Wx + b + (α/r)BAx``),
  ``"parallel"`` (a state-based control spanning a residual block, ``x + f(x) + u(x)``),
  ``"nonlinear"`` (the ICML 2024 controller), ``"binary"`` / ``"ternary"`` (high-rank controls
  with codes on a grid, trained by :class:`~pmptrain.DiscreteMSA`);
* :func:`merge` — fold linear controls into the base weights (refuses state-based ones);
* :func:`export_controls` / :func:`load_controls` — only the adapters, in the ``.pmp`` packed format.

The controls are made of ``nn.Linear`` pieces, so :class:`~pmptrain.EMSA` solves each piece's
maximiser in closed form, and any torch optimizer trains them; the frozen base gets no optimizer
state and no captured statistics.
"""

from .attach import KINDS, attach, build_control, controls, freeze_base, merge, select_modules, trainable_parameters
from .io import base_fingerprint, export_controls, load_controls
from .memory import saved_tensor_bytes
from .modules import BinaryControl, ControlBase, LoRALinear, NonlinearControl, ParallelControl

__all__ = [
    "KINDS",
    "attach",
    "merge",
    "controls",
    "select_modules",
    "freeze_base",
    "build_control",
    "trainable_parameters",
    "export_controls",
    "load_controls",
    "base_fingerprint",
    "saved_tensor_bytes",
    "ControlBase",
    "LoRALinear",
    "ParallelControl",
    "NonlinearControl",
    "BinaryControl",
]
