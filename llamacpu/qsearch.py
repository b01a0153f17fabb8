"""The per-block scale searches behind `quant.quantize`, compiled with Numba.

Every search minimises the *weighted* squared error sum_i a_i (x_i - x̂_i)^2 of a block, where
a_i is the importance of element i (see `quant.py`). Per block they try a few dozen candidate
roundings over 16-256 weights: in numpy every candidate would be a pass over the whole tensor;
compiled, a block stays in registers.

- `search_symmetric`: w = d q, q in [lo, hi] (Q4_0, Q5_0; Q6_K's sub-blocks);
- `search_affine`: w = d q + m, q in [0, nmax] (Q4_1, Q5_1; Q4_K/Q5_K's sub-blocks);
- `search_k_affine` (Q4_K, Q5_K) and `search_q6_k`: the K-quants' two levels. Each sub-block's
  float scale (and min) is found as above; the super-block then stores them as small integers
  times one f16 `d` (and `dmin`): 6-bit sc/m for Q4_K/Q5_K, int8 scales for Q6_K. Rounding those
  integers independently (llama.cpp's rule without an imatrix) throws away a sub-block's own
  fit, so the integers and the f16 super-scales are searched jointly: each sub-block's integer
  scale (and min) is tried at its rounded value and one step either side, with its quants
  re-rounded and the weighted error measured; then d (and dmin) are refitted by least squares
  to the chosen integers and quants, rounded to f16, and kept only if the error drops. Two
  such rounds. That is the spirit of llama.cpp's make_qkx2_quants / make_qx_quants, with our
  importance weights in every error it compares.

Shapes: x, a (n, weights) float32, one block per row; outputs are per block.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# reassoc lets LLVM vectorize the block sums; the order of a 16-256 term sum doesn't matter here.
_jit = njit(cache=True, fastmath={"reassoc", "contract"})
F16_MAX = 65504.0


@njit(cache=True)
def f16_round(v):
    """The float16 nearest to v (ties to even, as numpy's cast), clipped to f16's finite range,
    as float32: the value a block will actually store."""
    a = abs(v)
    if a == 0.0:
        return np.float32(0.0)
    if a >= F16_MAX:
        return np.float32(math.copysign(F16_MAX, v))
    _, e = math.frexp(a)  # a = f 2^e, 0.5 <= f < 1: 11 significant bits below 2^e, none below 2^-24
    quantum = math.ldexp(1.0, max(e - 11, -24))
    return np.float32(math.copysign(min(np.rint(a / quantum) * quantum, F16_MAX), v))


# ---- one block: w = d q ---------------------------------------------------------------------

@_jit
def fit_symmetric(x, a, lo, hi, steps):
    """x, a (k,) → the least-squares scale d of the best candidate rounding.

    Candidate s maps the block's signed extreme x_max to s (negative s: to the lo side), i.e.
    proposes q = clip(rint(x s / x_max), lo, hi); its least-squares scale d = Σ a x q / Σ a q²
    lowers the error by (Σ a x q)² / Σ a q², and the largest drop wins."""
    xmax = np.float32(0.0)
    for i in range(len(x)):
        if abs(x[i]) > abs(xmax):
            xmax = x[i]
    best_gain = np.float32(-1.0)
    best_d = np.float32(0.0)
    if xmax == 0:
        return best_d
    for k in steps:
        s = k / xmax
        sxq = np.float32(0.0)
        sqq = np.float32(0.0)
        for i in range(len(x)):  # branch-free, so LLVM vectorizes it
            t = np.rint(x[i] * s)
            t = lo if t < lo else t
            t = hi if t > hi else t
            at = a[i] * t
            sxq += at * x[i]
            sqq += at * t
        if sqq > 0 and sxq * sxq / sqq > best_gain:
            best_gain = sxq * sxq / sqq
            best_d = sxq / sqq
    return best_d


@_jit
def symmetric_error(x, a, d, lo, hi):
    """Weighted error of x (k,) stored as d · clip(rint(x / d), lo, hi)."""
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    err = np.float32(0.0)
    for i in range(len(x)):
        t = min(max(np.rint(x[i] * inv), lo), hi)
        r = x[i] - d * t
        err += a[i] * r * r
    return err


@_jit
def search_symmetric(x, a, lo, hi, steps, d_out):
    """x, a (n, k); lo, hi float32; steps (c,) → d_out (n,): each block's `fit_symmetric` scale
    (before f16)."""
    for b in range(x.shape[0]):
        d_out[b] = fit_symmetric(x[b], a[b], lo, hi, steps)


# ---- one block: w = d q + m -----------------------------------------------------------------

@_jit
def fit_affine(x, a, nmax, spans, nonpositive_min):
    """x, a (k,); spans (c,) → (d, m): the affine grid m + d·[0, nmax] of least weighted error.

    Each candidate spans [min, max] of the block with `spans[c]` steps (nmax is the min/max
    rule, more steps clip the ends), centred on the block; (d, m) are then refitted by weighted
    least squares to the rounding they give, twice. nonpositive_min: keep m <= 0 (Q4_K/Q5_K
    store the min as -dmin·m with m unsigned)."""
    lo = x[0]
    hi = x[0]
    for i in range(len(x)):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
    if nonpositive_min:
        lo = min(lo, np.float32(0.0))
    best_err = np.inf
    best_d = np.float32(0.0)
    best_m = lo
    for steps in spans:
        d = (hi - lo) / steps
        m = lo + (hi - lo - nmax * d) / 2  # the nmax + 1 levels centred on [lo, hi]
        for _ in range(3):  # evaluate, then refit (d, m) to that rounding; twice
            if nonpositive_min and m > 0:
                m = np.float32(0.0)
            inv = 1 / d if d != 0 else np.float32(0.0)
            sa = sq = sx = sqq = sqx = err = np.float32(0.0)
            for i in range(len(x)):
                q = min(max(np.rint((x[i] - m) * inv), np.float32(0.0)), nmax)
                r = x[i] - (d * q + m)
                w = a[i]
                err += w * r * r
                sa += w
                sq += w * q
                sx += w * x[i]
                sqq += w * q * q
                sqx += w * q * x[i]
            if err < best_err:
                best_err, best_d, best_m = err, d, m
            det = sa * sqq - sq * sq
            if det <= 0:
                break
            d = (sa * sqx - sq * sx) / det
            m = (sx - d * sq) / sa
    return best_d, best_m


@_jit
def affine_error(x, a, d, m, nmax):
    """Weighted error of x (k,) stored as d · clip(rint((x - m) / d), 0, nmax) + m."""
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    err = np.float32(0.0)
    for i in range(len(x)):
        q = min(max(np.rint((x[i] - m) * inv), np.float32(0.0)), nmax)
        r = x[i] - (d * q + m)
        err += a[i] * r * r
    return err


@_jit
def search_affine(x, a, nmax, spans, d_out, m_out):
    """x, a (n, k); nmax float32; spans (c,) → d_out, m_out (n,): each block's `fit_affine` grid
    (before f16)."""
    for b in range(x.shape[0]):
        d_out[b], m_out[b] = fit_affine(x[b], a[b], nmax, spans, False)


# ---- Q4_K / Q5_K: 8 sub-blocks of 32, w = d sc q - dmin m ---------------------------------

@_jit
def _k_affine_total(x, a, sub, d, dmin, sc, m, nmax):
    err = np.float32(0.0)
    for j in range(len(sc)):
        s = slice(j * sub, (j + 1) * sub)
        err += affine_error(x[s], a[s], d * sc[j], -dmin * m[j], nmax)
    return err


@_jit
def search_k_affine(x, a, nmax, spans, sub, q_out, sc_out, m_out, d_out, dmin_out):
    """x, a (n, 256); nmax float32 → q_out (n, 256) uint8 in [0, nmax], sc_out, m_out (n, 256/sub) uint8 in
    [0, 63], d_out, dmin_out (n,) float32 (exact f16 values)."""
    n, w = x.shape
    ns = w // sub
    s = np.zeros(ns, np.float32)  # each sub-block's float scale
    mn = np.zeros(ns, np.float32)  # and its min, negated (>= 0)
    sc = np.zeros(ns, np.float32)
    m = np.zeros(ns, np.float32)
    for b in range(n):
        xb, ab = x[b], a[b]
        for j in range(ns):
            dj, mj = fit_affine(xb[j * sub:(j + 1) * sub], ab[j * sub:(j + 1) * sub], nmax, spans, True)
            s[j] = max(dj, np.float32(0.0))
            mn[j] = max(-mj, np.float32(0.0))
        d = f16_round(s.max() / 63)
        dmin = f16_round(mn.max() / 63)
        for j in range(ns):
            sc[j] = min(np.rint(s[j] / d), np.float32(63.0)) if d > 0 else np.float32(0.0)
            m[j] = min(np.rint(mn[j] / dmin), np.float32(63.0)) if dmin > 0 else np.float32(0.0)
        err = _k_affine_total(xb, ab, sub, d, dmin, sc, m, nmax)
        for _ in range(2):
            # Each sub-block's integers, one step either way, against its actual weighted error.
            for j in range(ns):
                xs, as_ = xb[j * sub:(j + 1) * sub], ab[j * sub:(j + 1) * sub]
                best = affine_error(xs, as_, d * sc[j], -dmin * m[j], nmax)
                c_sc, c_m = sc[j], m[j]
                for i_sc in range(-1, 2):
                    t_sc = c_sc + i_sc
                    if t_sc < 0 or t_sc > 63:
                        continue
                    for i_m in range(-1, 2):
                        t_m = c_m + i_m
                        if t_m < 0 or t_m > 63:
                            continue
                        e = affine_error(xs, as_, d * t_sc, -dmin * t_m, nmax)
                        if e < best:
                            best = e
                            sc[j] = t_sc
                            m[j] = t_m
            err = _k_affine_total(xb, ab, sub, d, dmin, sc, m, nmax)
            # (d, dmin) refitted to these integers and roundings: x ≈ d u - dmin v, u = sc q, v = m.
            suu = suv = svv = sxu = sxv = np.float32(0.0)
            for j in range(ns):
                D, M = d * sc[j], -dmin * m[j]
                inv = np.float32(1.0) / D if D != 0 else np.float32(0.0)
                for i in range(j * sub, (j + 1) * sub):
                    q = min(max(np.rint((xb[i] - M) * inv), np.float32(0.0)), nmax)
                    u, v, wt = sc[j] * q, m[j], ab[i]
                    suu += wt * u * u
                    suv += wt * u * v
                    svv += wt * v * v
                    sxu += wt * xb[i] * u
                    sxv += wt * xb[i] * v
            det = suu * svv - suv * suv
            if det > 0:
                d1 = f16_round((sxu * svv - sxv * suv) / det)
                dmin1 = f16_round((sxu * suv - sxv * suu) / det)
                if d1 >= 0 and dmin1 >= 0:
                    e1 = _k_affine_total(xb, ab, sub, d1, dmin1, sc, m, nmax)
                    if e1 < err:
                        d, dmin, err = d1, dmin1, e1
        d_out[b], dmin_out[b] = d, dmin
        for j in range(ns):
            sc_out[b, j], m_out[b, j] = np.uint8(sc[j]), np.uint8(m[j])
            D, M = d * sc[j], -dmin * m[j]
            inv = np.float32(1.0) / D if D != 0 else np.float32(0.0)
            for i in range(j * sub, (j + 1) * sub):
                q_out[b, i] = np.uint8(min(max(np.rint((xb[i] - M) * inv), np.float32(0.0)), nmax))


# ---- Q6_K: 16 sub-blocks of 16, w = d sc (q - 32), sc int8 ---------------------------------

@_jit
def _k_symmetric_total(x, a, sub, d, sc, lo, hi):
    err = np.float32(0.0)
    for j in range(len(sc)):
        s = slice(j * sub, (j + 1) * sub)
        err += symmetric_error(x[s], a[s], d * sc[j], lo, hi)
    return err


@_jit
def search_q6_k(x, a, steps, sub, q_out, sc_out, d_out):
    """x, a (n, 256) → q_out (n, 256) int8 in [-32, 31], sc_out (n, 256/sub) int8,
    d_out (n,) float32 (exact f16 values)."""
    lo, hi = np.float32(-32.0), np.float32(31.0)
    n, w = x.shape
    ns = w // sub
    s = np.zeros(ns, np.float32)
    sc = np.zeros(ns, np.float32)
    for b in range(n):
        xb, ab = x[b], a[b]
        smax = np.float32(0.0)
        for j in range(ns):
            s[j] = fit_symmetric(xb[j * sub:(j + 1) * sub], ab[j * sub:(j + 1) * sub], lo, hi, steps)
            smax = max(smax, abs(s[j]))
        d = f16_round(smax / 127)
        for j in range(ns):
            sc[j] = min(max(np.rint(s[j] / d), np.float32(-128.0)), np.float32(127.0)) if d > 0 else np.float32(0.0)
        for _ in range(2):
            for j in range(ns):
                xs, as_ = xb[j * sub:(j + 1) * sub], ab[j * sub:(j + 1) * sub]
                best = symmetric_error(xs, as_, d * sc[j], lo, hi)
                c = sc[j]
                for i_t in range(-1, 2, 2):
                    t = c + i_t
                    if -128 <= t <= 127:
                        e = symmetric_error(xs, as_, d * t, lo, hi)
                        if e < best:
                            best = e
                            sc[j] = t
            err = _k_symmetric_total(xb, ab, sub, d, sc, lo, hi)
            sxu = suu = np.float32(0.0)  # d refitted: x ≈ d u, u = sc q
            for j in range(ns):
                D = d * sc[j]
                inv = np.float32(1.0) / D if D != 0 else np.float32(0.0)
                for i in range(j * sub, (j + 1) * sub):
                    u = sc[j] * min(max(np.rint(xb[i] * inv), lo), hi)
                    sxu += ab[i] * xb[i] * u
                    suu += ab[i] * u * u
            if suu > 0:
                d1 = f16_round(sxu / suu)
                if d1 > 0:
                    e1 = _k_symmetric_total(xb, ab, sub, d1, sc, lo, hi)
                    if e1 < err:
                        d = d1
        d_out[b] = d
        for j in range(ns):
            sc_out[b, j] = np.int8(sc[j])
            D = d * sc[j]
            inv = np.float32(1.0) / D if D != 0 else np.float32(0.0)
            for i in range(j * sub, (j + 1) * sub):
                q_out[b, i] = np.int8(min(max(np.rint(xb[i] * inv), lo), hi))
