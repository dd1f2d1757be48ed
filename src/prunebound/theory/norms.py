"""Operator-norm UPPER bounds of weight matrices and convolutions (docs/theory.md §7.2).

A certificate needs upper bounds: power iteration alone under-estimates. Derived for prunebound
in the setting of Qian & Klabjan (2021); the constants are ours.

- ``gram``: largest eigenvalue of the float64 Gram matrix plus a rounding margin (deterministic);
- ``lanczos``: Lanczos on A^T A from a random start with the Kuczynski-Wozniakowski (1992) bound
  (valid with probability >= 1 - fail_prob over the algorithm's own random start);
- ``frobenius`` and ``schur``: cheap deterministic fallbacks;
- convolutions: the min of the circular-embedding DFT bound (Sedghi, Gupta & Long 2019) and
  Lemma C of docs/theory.md §2 and §7.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from scipy.linalg import eigh_tridiagonal

from prunebound._check import Seed, as_generator, check_float, check_int, finite

NormMethod = Literal["auto", "gram", "lanczos", "frobenius", "schur"]
_U64 = 2.0**-53  # unit roundoff of float64
_KW_C = 1.648  # Kuczynski & Wozniakowski (1992), Thm 4.2(a), Lanczos


@dataclass(frozen=True)
class NormBound:
    """An upper bound `value` >= ||A||_2, how it was found, and its failure probability.

    `fail_prob` is 0 for deterministic methods; for ``lanczos`` the bound holds with probability
    >= 1 - fail_prob over the algorithm's random start (never over the weights).
    """

    value: float
    method: str
    fail_prob: float = 0.0
    lower: float = 0.0  # a certified-ish lower estimate (Rayleigh quotient), for tightness reports

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_matrix(a: torch.Tensor) -> torch.Tensor:
    if a.dim() != 2:
        raise ValueError(f"a must be a matrix (2-D), got shape {tuple(a.shape)}")
    a = a.detach().to(torch.float64)
    if not finite(a):
        raise ValueError("a must be finite, got a matrix containing NaN or Inf")
    return a.T if a.shape[0] < a.shape[1] else a  # tall: Gram is (min dim)^2


def spectral_norm(a: torch.Tensor) -> float:
    """Deterministic upper bound on ||A||_2 (float64 Gram eigenvalue + rounding margin).

    Exact up to a relative margin ~ (m + 10 n) u ||A||_F^2 / ||A||^2 (Higham: Gram product error
    <= gamma_m |A|^T|A|, symmetric eigensolver backward error <= c n u ||G||, c = 10 generous).
    Cost O(m n^2) with n = min dim; use `norm_bound` for large matrices.
    """
    a = _as_matrix(a)
    if a.numel() == 0:
        return 0.0
    m, n = a.shape
    lam = float(torch.linalg.eigvalsh(a.T @ a)[-1])
    fro2 = float((a * a).sum())
    gamma = m * _U64 / (1 - m * _U64)
    return math.sqrt(max(lam, 0.0) + (gamma + 10 * n * _U64) * fro2)


def frobenius(a: torch.Tensor) -> float:
    """||A||_F >= ||A||_2 (deterministic, O(mn)); relative rounding margin 1e-12."""
    return float(torch.linalg.vector_norm(a.detach().to(torch.float64))) * (1 + 1e-12)


def schur(a: torch.Tensor) -> float:
    """Schur test: ||A||_2 <= sqrt(max row abs-sum * max column abs-sum) (docs/theory.md §7.2)."""
    b = a.detach().to(torch.float64).abs()
    if b.numel() == 0:
        return 0.0
    return math.sqrt(float(b.sum(1).max()) * float(b.sum(0).max())) * (1 + 1e-12)


def kw_epsilon(n: int, steps: int, fail_prob: float) -> float:
    """Smallest eps with 1.648 sqrt(n) exp(-sqrt(eps)(2k - 1)) <= fail_prob (KW 1992, Lanczos)."""
    s = math.log(_KW_C * math.sqrt(n) / fail_prob) / (2 * steps - 1)
    return min(max(s, 0.0) ** 2, 1.0)


def lanczos_bound(
    a: torch.Tensor,
    *,
    steps: int = 100,
    fail_prob: float = 1e-9,
    seed: Seed = 0,
) -> NormBound:
    """Probabilistic upper bound on ||A||_2 by Lanczos on A^T A (docs/theory.md §7.2).

    For PSD G (n x n), a start uniform on the sphere and k Lanczos steps, the largest Ritz value
    theta_k satisfies P(theta_k < (1 - eps) lambda_1) <= 1.648 sqrt(n) exp(-sqrt(eps)(2k - 1))
    (Kuczynski & Wozniakowski 1992). So ||A||^2 <= theta_k / (1 - eps) with probability
    >= 1 - fail_prob. Full reorthogonalisation in float64; a 1e-10 relative margin covers rounding.
    `seed` (`_check.Seed`, default 0) draws the random start.
    """
    _check_lanczos(steps, fail_prob)
    a = _as_matrix(a)
    if a.numel() == 0:
        return NormBound(0.0, "lanczos", 0.0)
    return lanczos_operator(
        lambda q: torch.mv(a.T, torch.mv(a, q)),
        lambda v: torch.mv(a, v),
        a.shape[1],
        float(torch.linalg.vector_norm(a)) ** 2,
        steps=steps,
        fail_prob=fail_prob,
        seed=seed,
        device=a.device,
    )


def _check_lanczos(steps: int, fail_prob: float) -> None:
    check_float("fail_prob", fail_prob, 0.0, 1.0, closed="neither")
    check_int("steps", steps, 1)


def lanczos_operator(
    gram_mv: Callable[[torch.Tensor], torch.Tensor],
    apply: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    fro2: float,
    *,
    steps: int = 100,
    fail_prob: float = 1e-9,
    seed: Seed = 0,
    device: torch.device | str = "cpu",
) -> NormBound:
    """`lanczos_bound` for a matrix A given as functions: gram_mv(q) = A^T A q, apply(v) = A v
    (float64, q in R^n), and fro2 >= ||A||_F^2 (for the rounding margin). Lets sparse or
    implicit matrices (A = W - W~ as W q - W~ q) skip forming A (docs/theory.md §7.2)."""
    _check_lanczos(steps, fail_prob)
    if n == 0 or fro2 == 0:
        return NormBound(0.0, "lanczos", 0.0)
    k = min(steps, n)
    q = torch.randn(n, dtype=torch.float64, generator=as_generator(seed)).to(device)
    q /= torch.linalg.vector_norm(q)
    basis = torch.zeros((k, n), dtype=torch.float64, device=device)
    alpha = torch.zeros(k, dtype=torch.float64, device=device)
    beta = torch.zeros(k, dtype=torch.float64, device=device)
    used = k
    for j in range(k):
        basis[j] = q
        w = gram_mv(q)
        alpha[j] = q @ w
        w -= alpha[j] * q  # three-term recurrence, then full reorthogonalisation
        if j > 0:
            w -= beta[j - 1] * basis[j - 1]
        before = float(torch.linalg.vector_norm(w))
        w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(torch.linalg.vector_norm(w))
        if b < 0.7 * before:  # "twice is enough" (Kahan-Parlett): a second pass when needed
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            b = float(torch.linalg.vector_norm(w))
        if j == k - 1 or b <= 1e-14 * max(float(alpha[: j + 1].abs().max()), 1e-300):
            used = j + 1  # invariant subspace found: theta is an exact eigenvalue (w.p. 1 the max)
            break
        beta[j] = b
        q = w / b
    # largest eigenpair of the used x used tridiagonal T (LAPACK stebz/stein via scipy: ms)
    evals, evecs = eigh_tridiagonal(
        alpha[:used].cpu().numpy(),
        beta[: used - 1].cpu().numpy(),
        select="i",
        select_range=(used - 1, used - 1),
    )
    theta = max(float(evals[-1]), 0.0)
    top = torch.from_numpy(evecs[:, -1]).to(basis)
    ritz = basis[:used].T @ top
    lower = float(torch.linalg.vector_norm(apply(ritz)) / torch.linalg.vector_norm(ritz))
    exact_subspace = used < k or k == n  # Krylov space is invariant or the whole space
    # conservative reading of KW's k: one less than the Krylov dimension (matvec count convention)
    eps = 0.0 if exact_subspace else kw_epsilon(n, max(used - 1, 1), fail_prob)
    if eps >= 1:
        return NormBound(math.inf, "lanczos", fail_prob, lower)
    value = math.sqrt(theta / (1 - eps) * (1 + 1e-10) + 10 * n * _U64 * fro2)
    return NormBound(max(value, lower), "lanczos", 0.0 if exact_subspace else fail_prob, lower)


def norm_bound(
    a: torch.Tensor,
    *,
    method: NormMethod = "auto",
    exact_max: int = 1024,
    steps: int = 100,
    fail_prob: float = 1e-9,
    seed: Seed = 0,
) -> NormBound:
    """Upper bound on ||A||_2 with the chosen method (docs/theory.md §7.2).

    ``auto``: ``gram`` when min(A.shape) <= exact_max, else the min of ``lanczos``, Frobenius and
    Schur (the last two cost nothing and sometimes win for very sparse matrices).
    """
    mat = _as_matrix(a)
    if mat.numel() == 0 or not bool(mat.any()):
        return NormBound(0.0, "zero")
    if method == "gram" or (method == "auto" and mat.shape[1] <= exact_max):
        v = spectral_norm(mat)
        return NormBound(v, "gram", 0.0, v / (1 + 1e-9))
    if method == "frobenius":
        return NormBound(frobenius(mat), "frobenius")
    if method == "schur":
        return NormBound(schur(mat), "schur")
    if method not in ("auto", "lanczos"):
        raise ValueError(f"method must be one of auto/gram/lanczos/frobenius/schur, got {method!r}")
    lz = lanczos_bound(mat, steps=steps, fail_prob=fail_prob, seed=seed)
    if method == "lanczos":
        return lz
    cheap = min(frobenius(mat), schur(mat))
    return lz if lz.value <= cheap else NormBound(cheap, "frobenius/schur", 0.0, lz.lower)


def conv_norm(
    weight: torch.Tensor,
    in_size: Sequence[int],
    *,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
) -> float:
    """Upper bound on the l2 operator norm of a Conv1d/Conv2d (groups=1, zero padding) acting on
    inputs of spatial size `in_size` (docs/theory.md §7.2).

    min of (i) the circular bound: the padded linear conv is a compression of a circular conv on
    a torus of size n + 2p, whose norm is max over DFT frequencies w of ||K^(w)||_2, and striding
    is a coordinate restriction (norm <= 1); (ii) Lemma C with multiplicity
    prod_i min(k_i, ceil(ext_i / s_i)), ext_i = dilation_i (k_i - 1) + 1.
    """
    d = weight.dim() - 2
    if d not in (1, 2) or len(in_size) != d:
        raise ValueError(
            f"weight must be a Conv1d/Conv2d kernel matching in_size, got {tuple(weight.shape)} "
            f"and {tuple(in_size)}"
        )
    st, pad, dil = _expand(stride, d), _expand(padding, d), _expand(dilation, d)
    w = weight.detach().to(torch.float64)
    if not finite(w):
        raise ValueError("weight must be finite, got a kernel containing NaN or Inf")
    c_out, c_in = w.shape[:2]
    ext = [dil[i] * (w.shape[2 + i] - 1) + 1 for i in range(d)]
    size = [max(in_size[i] + 2 * pad[i], ext[i]) for i in range(d)]
    kd = torch.zeros((c_out, c_in, *ext), dtype=torch.float64, device=w.device)
    kd[(slice(None), slice(None), *[slice(None, None, dil[i]) for i in range(d)])] = w
    spec = torch.fft.fftn(kd, s=size, dim=tuple(range(2, 2 + d)))  # (c_out, c_in, *size)
    mats = spec.permute(*range(2, 2 + d), 0, 1).reshape(-1, c_out, c_in)
    # FFT rounding: |error| <= c log2(N) u ||k||_2 per entry, so <= 1e-12 ||K||_F overall (generous)
    circ = float(torch.linalg.matrix_norm(mats, ord=2).max()) + 1e-12 * math.prod(size) * float(
        torch.linalg.vector_norm(w)
    )
    mult = math.prod(min(w.shape[2 + i], math.ceil(ext[i] / st[i])) for i in range(d))
    lemma_c = math.sqrt(mult) * spectral_norm(w.reshape(c_out, -1))
    return min(circ, lemma_c)


def _expand(v: Sequence[int] | int, d: int) -> list[int]:
    if isinstance(v, int):
        return [v] * d
    out = [int(x) for x in v]
    return out * d if len(out) == 1 else out
