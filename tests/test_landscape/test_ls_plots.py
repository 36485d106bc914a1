"""Figures build and carry each model's label (plotly and matplotlib)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ls_helpers import one_thread  # noqa: E402,F401  (autouse fixture)
from ls_helpers import mlp, mlp_batches, mlp_loss  # noqa: E402

from landscape import (  # noqa: E402
    HessianOperator,
    LandscapeError,
    Surface,
    group_sharpness,
    group_spectrum,
    lanczos,
    slq_density,
)
from landscape import plots  # noqa: E402

A = "DP ε=3 · (ε, δ)-DP"
B = "non-private · none"


def _s2(label=None):
    x = np.linspace(-1, 1, 5)
    return Surface([x, x[:4]], np.add.outer(x**2, x[:4] ** 2), {"label": label, "directions": [{"kind": "random"}, {"kind": "random"}]})


def _s1(scale=1.0):
    x = np.linspace(-1, 1, 7)
    return Surface([x], scale * x**2, {"directions": [{"kind": "eigen"}]})


@pytest.fixture(scope="module")
def spectra():
    m, bs = mlp(0), mlp_batches(0)
    op = HessianOperator(m, mlp_loss, bs)
    return lanczos(op, k=3), slq_density(op, n_iter=20), group_spectrum(op, tol=1e-6), group_sharpness(m, mlp_loss, bs, n_random=1)


def _texts(fig):
    out = [fig.layout.title.text or ""]
    out += [a.text for a in fig.layout.annotations]
    out += [t.name or "" for t in fig.data]
    return " | ".join(out)


def test_plotly_figures_show_labels(spectra):
    eig, dens, grp, shp = spectra
    figs = [
        plots.plot_surface_3d({A: _s2(), B: _s2()}),
        plots.plot_contour([_s2(), _s2()], labels=[A, B]),
        plots.plot_1d({A: _s1(), B: _s1(2.0)}),
        plots.plot_density({A: dens, B: dens}),
        plots.plot_eigenvalues({A: eig, B: eig}),
        plots.plot_eigenvalues({A: grp, B: grp}, quantity="trace"),
        plots.plot_sharpness({A: shp, B: shp}),
    ]
    for f in figs:
        t = _texts(f)
        assert A in t and B in t, t
    assert len(figs[0].data) == 2 and figs[0].data[0].z.shape == (4, 5)  # plotly wants z[y][x]
    assert list(figs[4].data[0].x) == ["λ1", "λ2", "λ3"]
    assert list(figs[5].data[0].x) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "rho=0.05" in figs[6].layout.title.text


def test_single_model_label_goes_in_title():
    f = plots.plot_surface_3d(_s2(label=A))
    assert A in f.layout.title.text
    f = plots.plot_1d(_s1(), labels=A)
    assert f.data[0].name == A and A in f.layout.title.text
    with pytest.raises(LandscapeError):
        plots.plot_1d([_s1(), _s1()], labels=[A])
    with pytest.raises(LandscapeError):
        plots.plot_contour(_s1())


def test_static_figures_show_labels(spectra):
    eig, dens, grp, _ = spectra
    figs = [
        plots.static_surface({A: _s2(), B: _s2()}),
        plots.static_1d({A: _s1(), B: _s1(2.0)}),
        plots.static_density({A: dens, B: dens}),
        plots.static_eigenvalues({A: eig, B: eig}),
        plots.static_eigenvalues({A: grp, B: grp}, quantity="trace"),
    ]
    for f in figs:
        texts = [ax.get_title() for ax in f.axes]
        for ax in f.axes:
            leg = ax.get_legend()
            if leg is not None:
                texts += [t.get_text() for t in leg.get_texts()]
        joined = " | ".join(texts)
        assert A in joined and B in joined, joined
        plt.close(f)
    torch.manual_seed(0)


def test_sharpness_per_model_bars():
    m, bs = mlp(0), mlp_batches(0)
    from landscape import prefix_indicator

    s = prefix_indicator(m, mlp_loss, bs, rho=0.1, n_random=1)
    f = plots.plot_sharpness({A: s, B: s})
    assert {t.name for t in f.data} == {A, B} and "rho=0.1" in f.layout.title.text
