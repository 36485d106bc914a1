"""Black-box DP-Flat: a soft prompt tuned from forward queries of a frozen model only.

Rooms: ``box.py`` (the frozen encoder, the projection z -> prompt, the prompt model),
``zo.py`` (SPSA / DPZero estimators and one step), ``loop.py`` (the training loop on
the shared ``session``, teachers), ``finished.py`` (a finished run, its sharpness).

The setting (Black-Box Tuning, Sun et al. 2022): the language model is an API that
returns outputs for inputs; no gradient, no weights. What we tune is a low-dimensional
vector z in R^d, mapped by a *fixed random* projection A to the embeddings of a soft
prompt, ``prompt = P0 + reshape(A z)`` (P0: embeddings of random vocabulary tokens,
as BBT initialises its prompt), prepended after the first ([CLS] / <s>) token. Every
call of the frozen encoder happens under ``torch.no_grad()`` (``BlackBox.encode``),
and its parameters never require grad.

The readout is fixed and queried forward too: logits are ``s * cos(e(x; z), e(t_k))``
where ``e`` is the encoder's pooled sentence embedding and ``t_k`` a label description
("a negative review", "a positive review"). Why this readout: the default backbone
(all-MiniLM-L6-v2) is a sentence embedder without an MLM head, so BBT's verbaliser
words are not available; embedding-similarity to label descriptions is the zero-shot
classifier such an embedding API offers (0.70 on SST-2 dev without any prompt), it
needs no data (so it costs no privacy), and it leaves z as the only tuned variable.

Zeroth-order gradient (SPSA): for a direction u ~ N(0, I_d) and each example i,
``delta_i = (l_i(z + mu u) - l_i(z - mu u)) / (2 mu)``; the estimate is
``mean_i(delta_i) * u``. With k directions per step the per-example vector
``(delta_i1..delta_ik)`` is formed from the same forward queries.

DP (DPZero, Zhang et al. 2023): each example's vector of k finite differences is
clipped to L2 norm C (for k = 1: to [-C, C]), summed over a Poisson-sampled batch
(rate q), and Gaussian noise N(0, sigma^2 C^2 I_k) is added; the sum is divided by
the expected batch size q N. Adding or removing one example changes the sum by at
most C in L2, so one step is the Gaussian mechanism with sensitivity C on a Poisson
subsample: exactly the sampled Gaussian mechanism of DP-SGD, only k-dimensional
instead of p-dimensional. The same accountant therefore applies unchanged: sigma is
found by ``engine.noise_for_target`` for (target ε, δ, q, steps) and ε is tracked
by an Opacus accountant of the configured kind. The directions u are drawn from a
seed independent of the data, and everything after the noisy sum (the multiplication
by u, the optimiser, the distillation pull) is post-processing.

Cross-model flattening: the update adds the gradient of ``λ ||z - z_teacher||`` (or
its square). That term is a known function of z and of the teacher prompt, computed
exactly without any query on private data, so it costs no privacy by itself; whether
the *run* is DP depends on where the teacher came from: tuned (non-privately, by the
same SPSA loop) on the public split in safe mode -> DP; on the private split in paper
mode -> an unaccounted read -> "not DP (paper mode)".

The ledger and the run folder work as in the white-box path: every read of the
private split goes through ``PrivateSplit``, the ledger's mechanism is recorded as
"dpzero" (one of ``privacy.SAMPLED_GAUSSIAN``: the ledger and the cross-check
accountants treat it as DP-SGD's mechanism), and a non-DP run claims no ε.
"""

from __future__ import annotations

from .box import BlackBox, Projection, PromptModel, build_prompt_model, evaluate_prompt, readout_texts
from .finished import LoadedPromptRun, load_prompt_run, prompt_batches, prompt_sharpness
from .loop import NONPRIVATE_WHO, PAPER_WHO, TRAIN_WHO, teacher_prompt, train
from .zo import (clip_rows, directions, distill_grad, dpzero_coefficients, finite_differences, fit_prompt, fit_prompt_cma,
                 prompt_loss, zo_step)

__all__ = [
    "NONPRIVATE_WHO",
    "PAPER_WHO",
    "TRAIN_WHO",
    "BlackBox",
    "LoadedPromptRun",
    "Projection",
    "PromptModel",
    "build_prompt_model",
    "clip_rows",
    "directions",
    "distill_grad",
    "dpzero_coefficients",
    "evaluate_prompt",
    "finite_differences",
    "fit_prompt",
    "fit_prompt_cma",
    "load_prompt_run",
    "prompt_batches",
    "prompt_loss",
    "prompt_sharpness",
    "readout_texts",
    "teacher_prompt",
    "train",
    "zo_step",
]
