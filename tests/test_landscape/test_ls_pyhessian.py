"""Cross-check against PyHessian 0.1 on the same model, loss and (dict) batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ls_helpers import one_thread  # noqa: F401  (autouse fixture)
from ls_helpers import bert_batches, bert_loss, dense_hessian, mlp, mlp_batches, mlp_loss, tiny_bert

from landscape import HessianOperator, lanczos
from landscape.pyhessian_bridge import pyhessian_eigenvalues, pyhessian_trace

pytest.importorskip("pyhessian")


@pytest.mark.parametrize("n_batches", [1, 2])
def test_top_eigenvalue_equals_pyhessian_on_tiny_bert(n_batches):
    m, bs = tiny_bert(5), bert_batches(5)[:n_batches]
    m.train()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    ours = lanczos(HessianOperator(m, bert_loss, bs), k=1, tol=1e-8, which="LM")
    theirs = pyhessian_eigenvalues(m, bert_loss, bs, top_n=1, max_iter=500, tol=1e-7)
    assert ours.top == pytest.approx(theirs.top, rel=1e-3)
    assert theirs.settings.method == "pyhessian-power" and theirs.settings.n_batches == n_batches
    assert 2 <= theirs.convergence.n_matvecs < 500 and theirs.convergence.converged
    # same eigenvector up to sign
    assert abs(float(ours.eigenvectors[0] @ theirs.eigenvectors[0])) > 0.99
    # the bridge leaves the model as it found it
    assert m.training and {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(p.grad is None for p in m.parameters())
    assert torch.get_default_dtype() == torch.float32


def test_pyhessian_on_a_parameter_subset_and_trace():
    m, bs = mlp(1, dtype=torch.float32), mlp_batches(1, dtype=torch.float32)
    names = ["2.weight", "2.bias"]
    H = dense_hessian(m, mlp_loss, bs, names).double()
    ev = torch.linalg.eigvalsh(H).numpy()
    theirs = pyhessian_eigenvalues(m, mlp_loss, bs, params=names, max_iter=1000, tol=1e-7)
    assert theirs.top == pytest.approx(max(ev, key=abs), rel=1e-3)
    assert all(p.requires_grad for p in m.parameters())
    tr = pyhessian_trace(m, mlp_loss, bs, params=names, max_iter=200, tol=0.0)
    assert len(tr.samples) == 200 and abs(tr.trace - ev.sum()) < 5 * tr.std_error + 1e-6
    assert np.isfinite(tr.convergence.history[-1])
