"""GPTQ against an independent transcription of the IST-DASLab reference (``GPTQ.fasterquant`` with its own
min-max ``Quantizer``, torch, ``W[N, K]`` as the reference holds it): the issue-20 diagnosis of the W2 gap.

The reference shares nothing with lowbit's code: not its group parameters, not its Cholesky form (the
reference inverts H and factors the inverse; lowbit solves a reversed factor), not its row layout. On the
same W and H both must give the same weights, up to the rounding ties that float32 against float64 H moves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.passes.quant.adadim import relative_output_error
from lowbit.passes.quant.gptq import quantize_gptq
from lowbit.passes.quant.scheme import QuantScheme
from tests.quant.test_gptq import correlated_layer


def _find_params(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference quantizer's per-row asymmetric min-max parameters (``find_params(weight=True)``)."""
    zeros = torch.zeros(x.shape[0], dtype=x.dtype)
    xmin, xmax = torch.minimum(x.min(1).values, zeros), torch.maximum(x.max(1).values, zeros)
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1, 1
    scale = (xmax - xmin) / maxq
    return scale[:, None], torch.round(-xmin / scale)[:, None]


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def reference_fasterquant(weight_kn, hessian, bits, groupsize, *, actorder, blocksize=128, percdamp=0.01):
    """``GPTQ.fasterquant`` of IST-DASLab/gptq (``static_groups`` with act-order, as lowbit's per-OC groups);
    takes and returns lowbit's ``B[K, N]``."""
    W = torch.from_numpy(np.ascontiguousarray(weight_kn.T)).float()
    H = torch.from_numpy(hessian).float()
    maxq, columns = 2**bits - 1, W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [_find_params(W[:, i : i + groupsize], maxq) for i in range(0, columns, groupsize)]
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(columns)
    W, H = W[:, perm], H[perm][:, perm]
    H[range(columns), range(columns)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    params = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if actorder:
                params = groups[int(perm[i1 + i]) // groupsize]  # static groups
            elif (i1 + i) % groupsize == 0:
                params = _find_params(W[:, i1 + i : i1 + i + groupsize], maxq)
            q = _quantize(w[:, None], *params, maxq).flatten()
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].numpy().T


@pytest.mark.parametrize("actorder", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_per_oc_gptq_equals_the_reference(bits, actorder):
    weight, hessian = correlated_layer(bits, 320, 96, tokens=1024)  # 320 rows: groups of 128 and a ragged 64
    scheme = QuantScheme(bits=bits, group_size=128, group_axis="oc", method="gptq")
    ours = quantize_gptq(weight, hessian, scheme, act_order=actorder).dequantize()
    reference = reference_fasterquant(weight, hessian, bits, 128, actorder=actorder)
    # Rounding ties only (float32 against float64 H); a group's scale may differ in its last bits.
    assert np.mean(~np.isclose(ours, reference, rtol=1e-4, atol=1e-6)) < 1e-3
    ours_error = relative_output_error(weight, ours, hessian)
    assert ours_error == pytest.approx(relative_output_error(weight, reference, hessian), rel=1e-2)
