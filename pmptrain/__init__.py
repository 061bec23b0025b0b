"""pmptrain: neural-network training by Pontryagin's maximum principle.

Public API (everything else may change):

* continuous optimizers: :class:`EMSA`, :class:`MSA` (``torch.optim.Optimizer`` s taking the model;
  ``EMSA.paper`` the reference code's configuration), :func:`controlled_block` (a whole block as one
  controlled function of the iterative solver);
* discrete-weight MSA: :class:`DiscreteMSA` (latent-free), :class:`GroupScheduler` (schedules any
  param-group key, e.g. ρ);
* low precision: :func:`discretize_`, :func:`discrete_parameters`, grids (:func:`make_grid`, …),
  activation quantisers (:func:`sign_ste`, :class:`SignActivation`, …), export
  (:func:`summary`, :func:`export_packed`, :func:`load_packed`);
* fine-tuning by control: :mod:`pmptrain.control` (``attach`` LoRA / parallel / nonlinear /
  binary controls to a frozen pretrained model, ``merge``, ``export_controls``, ``load_controls``);
* baselines for fair comparisons: :class:`BinaryConnect`, :class:`TWN`, :class:`Bop`;
* closed forms for your own module types: :func:`register_module_type` with one of the adapters
  (:class:`LinearAdapter`, :class:`TransposedLinearAdapter`, :class:`EmbeddingAdapter`,
  :class:`ConvAdapter`, :class:`LayerNormAdapter`, :class:`RMSNormAdapter`,
  :class:`BatchNormAdapter`, :class:`GroupNormAdapter`).
"""

from . import control
from .discrete import Grid, binary_grid, custom_grid, make_grid, ternary_grid, uniform_grid
from .export import PackedFileError, export_packed, load_packed, summary
from .modules import (
    BatchNormAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    GroupNormAdapter,
    LayerNormAdapter,
    LinearAdapter,
    RMSNormAdapter,
    TransposedLinearAdapter,
    register_module_type,
    unregister_module_type,
)
from .optim import (
    EMSA,
    MSA,
    TWN,
    BinaryConnect,
    Bop,
    DiscreteMSA,
    GroupScheduler,
    PMPOptimizer,
    StepInfo,
    controlled_block,
)
from .quant import (
    DiscreteTensor,
    QuantizedActivation,
    SignActivation,
    discrete_parameters,
    discretize_,
    is_discrete_module,
    sign_ste,
    uniform_quantize_ste,
)

__version__ = "0.1.0"

__all__ = [
    "EMSA",
    "MSA",
    "control",
    "controlled_block",
    "PMPOptimizer",
    "StepInfo",
    "DiscreteMSA",
    "GroupScheduler",
    "Grid",
    "make_grid",
    "binary_grid",
    "ternary_grid",
    "uniform_grid",
    "custom_grid",
    "discretize_",
    "discrete_parameters",
    "is_discrete_module",
    "DiscreteTensor",
    "sign_ste",
    "uniform_quantize_ste",
    "SignActivation",
    "QuantizedActivation",
    "summary",
    "export_packed",
    "load_packed",
    "PackedFileError",
    "BinaryConnect",
    "TWN",
    "Bop",
    "register_module_type",
    "unregister_module_type",
    "LinearAdapter",
    "TransposedLinearAdapter",
    "EmbeddingAdapter",
    "ConvAdapter",
    "LayerNormAdapter",
    "RMSNormAdapter",
    "BatchNormAdapter",
    "GroupNormAdapter",
    "__version__",
]
