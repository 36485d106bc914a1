"""landscape: Hessian spectra, loss surfaces and sharpness for any torch model.

Model-agnostic (never imports ``dpflat``): give it a module, a
``loss_fn(model, batch) -> mean loss`` and a fixed list of batches (HF dict batches
work), over a parameter subset (default: the parameters that require grad).

    >>> H = HessianOperator(model, loss_fn, batches)          # v -> H v
    >>> H @ v, H @ X, H.matmat(V)                              # (n,), (n, k) columns, (k, n) rows
    >>> scipy.sparse.linalg.eigsh(H.to_scipy(), k=3)           # any scipy solver
    >>> top_eigenvalues(H, k=3).eigenvalues                    # Lanczos
    >>> trace(H).trace, slq_density(H).density()               # Hutch++, SLQ
    >>> d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    >>> loss_surface_2d(model, loss_fn, batches, d1, d2, label="DP ε=3").save("out/s")
    >>> prefix_indicator(model, loss_fn, batches, rho=0.05).definition.formula

Dataset loss = example-weighted mean over the batches, in eval mode (see ``_params``).
The top level exports what a user calls; result and helper types live in their modules
(``landscape.results``, ``landscape.operators``, ``landscape.surface.Direction``,
``landscape._params.merge_batches``...). Results have ``to_dict``/``from_dict``.
"""

from . import plots, pyhessian_bridge  # noqa: F401  (lazy heavy imports inside)
from ._params import (
    LandscapeError,
    ParamSet,
    batch_size,
    dataset_loss,
    rebatch_by_length,
)
from .hvp import GaussNewtonOperator, HessianOperator, hvp
from .operators import DenseOperator, LinearOperator
from .sharpness import Sharpness, group_sharpness, prefix_indicator, sam_sharpness
from .spectrum import (
    Convergence,
    DensityResult,
    EigenResult,
    SpectrumSettings,
    exact_trace,
    group_spectrum,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq_density,
    top_eigenvalues,
    trace,
)
from .surface import (
    Surface,
    eigen_directions,
    interpolation_direction,
    loss_surface_1d,
    loss_surface_2d,
    random_direction,
)

__all__ = [
    "Convergence",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "GaussNewtonOperator",
    "HessianOperator",
    "LandscapeError",
    "LinearOperator",
    "ParamSet",
    "Sharpness",
    "SpectrumSettings",
    "Surface",
    "batch_size",
    "dataset_loss",
    "eigen_directions",
    "exact_trace",
    "group_sharpness",
    "group_spectrum",
    "hutchinson",
    "hutchpp",
    "hvp",
    "interpolation_direction",
    "lanczos",
    "loss_surface_1d",
    "loss_surface_2d",
    "power_iteration",
    "prefix_indicator",
    "random_direction",
    "rebatch_by_length",
    "sam_sharpness",
    "slq_density",
    "top_eigenvalues",
    "trace",
]
