"""Numba kernels: the hot loops of the decoder, on raw arrays.

Every kernel is `@njit(cache=True)`, named after its math, and has a plain-numpy twin in
`tests/test_kernels.py`. Kernels do not check bounds: callers (`linear.py`, `model.py`)
validate shapes and indices first. This module imports only numpy, numba and llvmlite.

Weight layout (built once at load by `linear.py`, see there): a matrix in 32-weight
blocks is split into
    w  (R, C) uint8    8-bit quants, read as int8            w = d * q (+ m)
       (R, C/2) uint8  4-bit quants in ggml nibble order      w = d * q + m, or d * (q - 8)
    d  (R, C/32)       block scales, f16 bits in uint16 (as ggml stores them)
    m  (R, C/32)       block offsets, f16 bits, or (R, 0) when there are none (Q8_0, Q4_0)

Activations are quantized to blocks of 32 integers, as llama.cpp does for its CPU dot products:
xq (C,) int8 or int16, xd (C/32,) scale, xs (C/32,) = xd * sum(xq in block), so that a block's
contribution is d * xd * sum(q * xq) + m * xs. The kernels specialize on xq's dtype. int8 is
ggml's Q8_0/Q8_1; its rounding moves SmolLM2's logits by up to ~1 (KL ~2e-3 per token) and
flips greedy near-ties. int16 matches f32 activations (logit error ~5e-3), for ~4% more time
per decode step: `model.py` uses int16 (see `tools/decode_quality.py`).

Codegen notes, measured on this CPU:
- int8 x int8 products are written `np.int32(...) * np.int32(...)` with the block length
  a runtime value; LLVM then emits vpmovsxbw + vpmaddwd instead of 64-bit multiplies.
- Indices are unsigned (uint64) so LLVM drops the negative-index wraparound, which
  otherwise blocks vectorization (about 5x slower).
- Parallel kernels take the thread count `nt` and split rows into `nt` chunks; calling
  `numba.get_num_threads()` inside would prevent caching.
- Numba has no float16 on the CPU: an f16 KV cache is passed as its uint16 view and
  converted with LLVM's half <-> float instructions (F16C), see `_h2f` / `_f2h`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

BLOCK = 32  # weights per quant block (ggml's QK8_0 / QK4_0 / QK4_1)
HAVE_AVX2 = bool(llvm_binding.get_host_cpu_features().get("avx2", False))

# ---------------------------------------------------------------------------
# float16 <-> float32 for the f16 KV cache (bits held in uint16).


@intrinsic
def _h2f(typingctx, bits):
    """uint16 holding IEEE half bits → float32 (exact)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f2h(typingctx, value):
    """float32 → uint16 half bits, rounded to nearest even (as numpy's astype)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def load_f32(v):
    """An element of a KV-cache array as float32 (float arrays, or uint16 half bits)."""


@overload(load_f32)
def _load_f32(v):
    if v == types.uint16:
        return lambda v: _h2f(v)
    if isinstance(v, types.Float):
        return lambda v: np.float32(v)
    return None


def store_as(v, like):
    """float32 `v` converted to the element type of an array whose element is `like`."""


@overload(store_as)
def _store_as(v, like):
    if like == types.uint16:
        return lambda v, like: _f2h(np.float32(v))
    if isinstance(like, types.Float):
        return lambda v, like: v  # the array store casts
    return None


@intrinsic
def _i32_as_f32(typingctx, bits):
    """Reinterpret int32 bits as float32 (for building 2**n in `exp_neg`)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, fastmath=True, inline="always")
def exp_neg(x):
    """exp(x) for float32 x <= 0 (softmax terms), within ~2 ulp, in vectorizable arithmetic.

    libm's expf is a call LLVM cannot vectorize and cost 2/3 of decode attention. Here
    x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (truncation
    < 2e-7 relative), and 2**n assembled from its exponent bits. Below -87 (where e^x
    nears the smallest normal float) the result is clamped to e^-87, negligible in a softmax."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # ln2 split in two
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _i32_as_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(cache=True)
def f16_to_f32(h, out):
    """h (n,) uint16 half bits → out (n,) float32."""
    for i in range(np.uint64(h.shape[0])):
        out[i] = _h2f(h[i])


@njit(cache=True)
def f32_to_f16(x, out):
    """x (n,) float32 → out (n,) uint16 half bits (round to nearest even)."""
    for i in range(np.uint64(x.shape[0])):
        out[i] = _f2h(np.float32(x[i]))


# ---------------------------------------------------------------------------
# Activation quantization and quantized matrix-vector products (decode).


def act_qmax(xq):
    """The largest quant of an activation array: 127 for int8, 32767 for int16."""


@overload(act_qmax)
def _act_qmax(xq):
    if xq.dtype == types.int8:
        return lambda xq: np.float32(127.0)
    if xq.dtype == types.int16:
        return lambda xq: np.float32(32767.0)
    return None


@njit(cache=True)
def quantize_act(x, xq, xd, xs):
    """x (C,) f32 → blocks of 32 quants: xq (C,) int8 or int16, xd (C/32,) scales,
    xs (C/32,) = xd * sum(xq in block).

    xd = amax / qmax per block (qmax 127 or 32767 by xq's dtype), quants rounded to nearest.
    int8 is ggml's Q8_0/Q8_1 activation format (ggml then stores xd as f16; here it stays f32).
    The rounding error is up to amax / (2 qmax) per element: ~1/254 of amax for int8, ~1/65534
    for int16."""
    nb = np.uint64(xd.shape[0])
    bs = np.uint64(x.shape[0]) // nb
    qmax = act_qmax(xq)
    for b in range(nb):
        base = b * bs
        amax = np.float32(0.0)
        for j in range(bs):
            a = abs(x[base + j])
            if a > amax:
                amax = a
        d = amax / qmax
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        s = np.int32(0)
        for j in range(bs):
            q = np.int32(np.rint(x[base + j] * inv))
            xq[base + j] = q
            s += q
        xd[b] = d
        xs[b] = d * np.float32(s)


# Row dot products. With AVX2 they are written in LLVM IR (ggml's method): per 32-weight block,
# vpmaddubsw multiplies unsigned by signed bytes into 16-bit pairs, vpmaddwd sums those into
# 8 int32 lanes, which are converted and accumulated in 8 f32 lanes scaled by the block's
# d * xd, so there is one horizontal sum per row instead of one per block (3-4x faster than
# what LLVM makes of the scalar loop). The portable versions below are the fallback.

_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I8x16 = ir.VectorType(ir.IntType(8), 16)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)


def _x86(builder, name, ret, args):
    fn = builder.module.globals.get(name)
    return fn if fn is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _data(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val).data


def _splat8(builder, s):
    v = builder.insert_element(ir.Constant(_F32x8, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))


def _hsum8(builder, v):
    total = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
    for i in range(1, 8):
        total = builder.fadd(total, builder.extract_element(v, ir.Constant(ir.IntType(32), i)))
    return total


def _f16_at(builder, ptr, index):
    """Load element `index` of an array of f16 bits (i16*) as a float."""
    return builder.fpext(builder.bitcast(builder.load(builder.gep(ptr, [index])), ir.HalfType()), ir.FloatType())


@intrinsic
def _dot_row_q8_avx2(typingctx, w, d, xq, xd, nb):
    """sum_b d[b] xd[b] sum_j int8(w[32b+j]) xq[32b+j]; w (nb*32,) uint8, xq int8 or int16, d (nb,) f16 bits, xd f32."""
    if xq.dtype == types.int16:
        return types.float32(w, d, xq, xd, nb), _x16_codegen("q8")

    def codegen(context, builder, signature, args):
        A = signature.args
        wp = builder.bitcast(_data(context, builder, A[0], args[0]), _I8x32.as_pointer())
        dp = _data(context, builder, A[1], args[1])
        xp = builder.bitcast(_data(context, builder, A[2], args[2]), _I8x32.as_pointer())
        xdp = _data(context, builder, A[3], args[3])
        psign = _x86(builder, "llvm.x86.avx2.psign.b", _I8x32, [_I8x32, _I8x32])
        maddubs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
        maddwd = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
        ones = ir.Constant(_I16x16, [1] * 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_F32x8, [0.0] * 8))
        with cgutils.for_range(builder, args[4]) as loop:
            b = loop.index
            wv = builder.load(builder.gep(wp, [b]), align=1)
            xv = builder.load(builder.gep(xp, [b]), align=1)
            # |w| (unsigned) times sign(w)*x (signed): the only u8 x s8 product x86 has
            p16 = builder.call(maddubs, [builder.call(psign, [wv, wv]), builder.call(psign, [xv, wv])])
            f = builder.sitofp(builder.call(maddwd, [p16, ones]), _F32x8)  # (8,) partial sums
            s = builder.fmul(_f16_at(builder, dp, b), builder.load(builder.gep(xdp, [b])))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(f, _splat8(builder, s))), acc)
        return _hsum8(builder, builder.load(acc))

    return types.float32(w, d, xq, xd, nb), codegen


def _q4_codegen(with_m: bool):
    """IR of a 4-bit row dot: sum_b d xd sum_j q_j xq_j, plus sum_b m xs (Q4_1) or - 8 sum_b d xs (Q4_0)."""
    def codegen(context, builder, signature, args):
        A = signature.args
        if with_m:
            w_a, d_a, m_a, xq_a, xd_a, xs_a, nb = args
            mp = _data(context, builder, A[2], m_a)
        else:
            w_a, d_a, xq_a, xd_a, xs_a, nb = args
        i = 2 if with_m else 1  # index of xq in the signature
        wp = builder.bitcast(_data(context, builder, A[0], w_a), _I8x16.as_pointer())
        dp = _data(context, builder, A[1], d_a)
        xp = builder.bitcast(_data(context, builder, A[i + 1], xq_a), _I8x32.as_pointer())
        xdp, xsp = _data(context, builder, A[i + 2], xd_a), _data(context, builder, A[i + 3], xs_a)
        maddubs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
        maddwd = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
        ones = ir.Constant(_I16x16, [1] * 16)
        low, four = ir.Constant(_I8x16, [15] * 16), ir.Constant(_I8x16, [4] * 16)
        concat = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32)))
        acc = cgutils.alloca_once_value(builder, ir.Constant(_F32x8, [0.0] * 8))
        macc = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            nib = builder.load(builder.gep(wp, [b]), align=1)
            q = builder.shuffle_vector(builder.and_(nib, low), builder.lshr(nib, four), concat)  # elements 0..31
            xv = builder.load(builder.gep(xp, [b]), align=1)
            f = builder.sitofp(builder.call(maddwd, [builder.call(maddubs, [q, xv]), ones]), _F32x8)
            db = _f16_at(builder, dp, b)
            s = builder.fmul(db, builder.load(builder.gep(xdp, [b])))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(f, _splat8(builder, s))), acc)
            mb = _f16_at(builder, mp, b) if with_m else db
            builder.store(builder.fadd(builder.load(macc), builder.fmul(mb, builder.load(builder.gep(xsp, [b])))),
                          macc)
        total = _hsum8(builder, builder.load(acc))
        offsets = builder.load(macc)
        if with_m:
            return builder.fadd(total, offsets)
        return builder.fsub(total, builder.fmul(ir.Constant(ir.FloatType(), 8.0), offsets))
    return codegen


def _x16_codegen(kind: str):
    """IR of a row dot with int16 activations, kind "q8", "q4_1" or "q4_0" (the same sums as the
    int8 versions). x86 has no 8-bit x 16-bit product, so each block's 32 weights are widened
    to two 16 x int16 vectors (sign-extended quants, or the zero-extended low and high nibbles,
    which are elements 0..15 and 16..31) and vpmaddwd multiplies them with the activations into
    8 int32 lanes (at most 4 * 127 * 32767 per lane: no overflow)."""
    def codegen(context, builder, signature, args):
        A = signature.args
        with_m = kind == "q4_1"
        i = 3 if with_m else 2  # index of xq in the signature
        dp = _data(context, builder, A[1], args[1])
        mp = _data(context, builder, A[2], args[2]) if with_m else None
        xp = builder.bitcast(_data(context, builder, A[i], args[i]), _I16x16.as_pointer())
        xdp = _data(context, builder, A[i + 1], args[i + 1])
        xsp = None if kind == "q8" else _data(context, builder, A[i + 2], args[i + 2])
        wp = builder.bitcast(_data(context, builder, A[0], args[0]),
                             (_I8x32 if kind == "q8" else _I8x16).as_pointer())
        maddwd = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
        low, four = ir.Constant(_I8x16, [15] * 16), ir.Constant(_I8x16, [4] * 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_F32x8, [0.0] * 8))
        macc = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
        with cgutils.for_range(builder, args[-1]) as loop:
            b = loop.index
            wv = builder.load(builder.gep(wp, [b]), align=1)
            if kind == "q8":
                half = [ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(k, k + 16))) for k in (0, 16)]
                lo, hi = (builder.sext(builder.shuffle_vector(wv, wv, h), _I16x16) for h in half)
            else:
                lo = builder.zext(builder.and_(wv, low), _I16x16)
                hi = builder.zext(builder.lshr(wv, four), _I16x16)
            b2 = builder.mul(b, ir.Constant(b.type, 2))
            x_lo = builder.load(builder.gep(xp, [b2]), align=2)
            x_hi = builder.load(builder.gep(xp, [builder.add(b2, ir.Constant(b.type, 1))]), align=2)
            p = builder.add(builder.call(maddwd, [lo, x_lo]), builder.call(maddwd, [hi, x_hi]))
            db = _f16_at(builder, dp, b)
            s = builder.fmul(db, builder.load(builder.gep(xdp, [b])))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(p, _F32x8), _splat8(builder, s))),
                          acc)
            if kind != "q8":
                mb = _f16_at(builder, mp, b) if with_m else db
                builder.store(builder.fadd(builder.load(macc), builder.fmul(mb, builder.load(builder.gep(xsp, [b])))),
                              macc)
        total = _hsum8(builder, builder.load(acc))
        if kind == "q8":
            return total
        offsets = builder.load(macc)
        if with_m:
            return builder.fadd(total, offsets)
        return builder.fsub(total, builder.fmul(ir.Constant(ir.FloatType(), 8.0), offsets))
    return codegen


@intrinsic
def _dot_row_q4_1_avx2(typingctx, w, d, m, xq, xd, xs, nb):
    """sum_b (d[b] xd[b] sum_j q_j xq_j + m[b] xs[b]); q_j from ggml nibbles, w (nb*16,) uint8, d, m f16 bits;
    xq int8 or int16."""
    sig = types.float32(w, d, m, xq, xd, xs, nb)
    return sig, (_x16_codegen("q4_1") if xq.dtype == types.int16 else _q4_codegen(True))


@intrinsic
def _dot_row_q4_0_avx2(typingctx, w, d, xq, xd, xs, nb):
    """sum_b d[b] (xd[b] sum_j q_j xq_j - 8 xs[b]): Q4_0's w = d (q - 8); xq int8 or int16."""
    sig = types.float32(w, d, xq, xd, xs, nb)
    return sig, (_x16_codegen("q4_0") if xq.dtype == types.int16 else _q4_codegen(False))


@njit(cache=True)
def _dot_row_q8_portable(w, d, xq, xd, nb):
    bs = np.uint64(BLOCK)
    acc = np.float32(0.0)
    for b in range(np.uint64(nb)):
        base = b * bs
        s = np.int32(0)
        for j in range(bs):
            s = np.int32(s + np.int32(np.int8(w[base + j])) * np.int32(xq[base + j]))
        acc += _h2f(d[b]) * xd[b] * np.float32(s)
    return acc


@njit(cache=True)
def _dot_q4_block(w, xq, b):
    hb = np.uint64(BLOCK // 2)
    wb = b * hb
    xb = b * np.uint64(BLOCK)
    s = np.int32(0)
    for j in range(hb):
        q = np.int32(w[wb + j])
        s = np.int32(s + (q & np.int32(15)) * np.int32(xq[xb + j])
                     + (q >> np.int32(4)) * np.int32(xq[xb + hb + j]))
    return np.float32(s)


@njit(cache=True)
def _dot_row_q4_1_portable(w, d, m, xq, xd, xs, nb):
    acc = np.float32(0.0)
    for b in range(np.uint64(nb)):
        acc += _h2f(d[b]) * xd[b] * _dot_q4_block(w, xq, b) + _h2f(m[b]) * xs[b]
    return acc


@njit(cache=True)
def _dot_row_q4_0_portable(w, d, xq, xd, xs, nb):
    acc = np.float32(0.0)
    for b in range(np.uint64(nb)):
        acc += _h2f(d[b]) * (xd[b] * _dot_q4_block(w, xq, b) - np.float32(8.0) * xs[b])
    return acc


dot_row_q8 = _dot_row_q8_avx2 if HAVE_AVX2 else _dot_row_q8_portable
dot_row_q4_1 = _dot_row_q4_1_avx2 if HAVE_AVX2 else _dot_row_q4_1_portable
dot_row_q4_0 = _dot_row_q4_0_avx2 if HAVE_AVX2 else _dot_row_q4_0_portable


@njit(cache=True, inline="always")
def dot_row_8bit(w, d, m, xq, xd, xs, nb):
    """One row of an 8-bit block matrix dotted with activation blocks: w = d q (+ m).
    m (nb,) f16 bits, or (0,) when the row has no offsets (4-bit weights widened to 8 bits
    keep theirs, applied through xs = xd * sum of the block's quants)."""
    acc = dot_row_q8(w, d, xq, xd, nb)
    for b in range(m.shape[0]):
        acc += _h2f(m[b]) * xs[b]
    return acc


@njit(cache=True, parallel=True)
def matvec_q8_0(w, d, m, xq, xd, xs, y, nt):
    """y (R,) = W x, W in 8-bit blocks: w (R, C) uint8 (int8 quants), d (R, nb) f16 bits,
    m (R, nb) f16 bits or (R, 0): w = d q (+ m).

    x is given as 8- or 16-bit blocks (see `quantize_act`). Rows are split into `nt` chunks."""
    R = w.shape[0]
    nb = d.shape[1]
    chunk = (R + nt - 1) // nt
    for t in prange(nt):
        for r in range(t * chunk, min(R, (t + 1) * chunk)):
            y[r] = dot_row_8bit(w[r], d[r], m[r], xq, xd, xs, nb)


@njit(cache=True, parallel=True)
def matvec_q4_1(w, d, m, xq, xd, xs, y, nt):
    """y (R,) = W x, W in 4-bit blocks: w (R, C/2) uint8 in ggml nibble order (byte j of a block:
    element j low, element j + 16 high), d, m (R, nb) f16 bits: w = d q + m."""
    R = w.shape[0]
    nb = d.shape[1]
    chunk = (R + nt - 1) // nt
    for t in prange(nt):
        for r in range(t * chunk, min(R, (t + 1) * chunk)):
            y[r] = dot_row_q4_1(w[r], d[r], m[r], xq, xd, xs, nb)


@njit(cache=True, parallel=True)
def matvec_q4_0(w, d, xq, xd, xs, y, nt):
    """y (R,) = W x, W in 4-bit blocks as `matvec_q4_1` but w = d (q - 8), no m."""
    R = w.shape[0]
    nb = d.shape[1]
    chunk = (R + nt - 1) // nt
    for t in prange(nt):
        for r in range(t * chunk, min(R, (t + 1) * chunk)):
            y[r] = dot_row_q4_0(w[r], d[r], xq, xd, xs, nb)


@njit(cache=True)
def matvec_blocks(w, d, m, bits, x, xq, xd, xs, y, nt):
    """y (R,) = W x for a packed block matrix of `bits` 8 or 4; quantizes x (C,) f32 first.

    xq (int8 or int16: the activations' quant width), xd, xs are scratch of at least C and
    C/32 entries."""
    n = x.shape[0]
    nb = n // BLOCK
    q, qd, qs = xq[:n], xd[:nb], xs[:nb]
    quantize_act(x, q, qd, qs)
    if bits == 8:
        matvec_q8_0(w, d, m, q, qd, qs, y, nt)
    elif m.shape[1] > 0:
        matvec_q4_1(w, d, m, q, qd, qs, y, nt)
    else:
        matvec_q4_0(w, d, q, qd, qs, y, nt)


@njit(cache=True, parallel=True)
def matmul_blocks(w, d, m, bits, xq, xd, xs, y, nt):
    """y (T, R) = X W.T for a few rows of activations already in blocks: xq (T, C) int8 or int16,
    xd, xs (T, C/32). Each weight row is read once and dotted with every x row while it sits
    in L1, so short prompts skip the prefill path's dequantization of every weight."""
    R = w.shape[0]
    T = xq.shape[0]
    nb = d.shape[1]
    has_m = m.shape[1] > 0
    chunk = (R + nt - 1) // nt
    for c in prange(nt):
        for r in range(c * chunk, min(R, (c + 1) * chunk)):
            wr, dr, mr = w[r], d[r], m[r]
            for t in range(T):
                if bits == 8:
                    acc = dot_row_8bit(wr, dr, mr, xq[t], xd[t], xs[t], nb)
                elif has_m:
                    acc = dot_row_q4_1(wr, dr, mr, xq[t], xd[t], xs[t], nb)
                else:
                    acc = dot_row_q4_0(wr, dr, xq[t], xd[t], xs[t], nb)
                y[t, r] = acc


@njit(cache=True, parallel=True)
def dequantize_blocks(w, d, m, bits, out, nt):
    """out (R, C) f32 = the packed block matrix (the prefill path hands it to BLAS)."""
    R = out.shape[0]
    C = np.uint64(out.shape[1])
    nb = np.uint64(d.shape[1])
    bs = C // nb
    hb = bs // np.uint64(2)
    has_m = m.shape[1] > 0
    chunk = (R + nt - 1) // nt
    for t in prange(nt):
        for r in range(t * chunk, min(R, (t + 1) * chunk)):
            for b in range(nb):
                db = _h2f(d[r, b])
                if has_m:
                    mb = _h2f(m[r, b])
                elif bits == 4:
                    mb = np.float32(-8.0) * db  # Q4_0
                else:
                    mb = np.float32(0.0)
                base = b * bs
                if bits == 8:
                    for j in range(bs):
                        out[r, base + j] = db * np.float32(np.int8(w[r, base + j])) + mb
                else:
                    wb = b * hb
                    for j in range(hb):
                        q = w[r, wb + j]
                        out[r, base + j] = db * np.float32(q & np.uint8(15)) + mb
                        out[r, base + hb + j] = db * np.float32(q >> np.uint8(4)) + mb


# ---------------------------------------------------------------------------
# Norm, RoPE, SwiGLU.


@njit(cache=True)
def rms_norm(x, weight, eps, out):
    """out (T, D) = x (T, D) / sqrt(mean(x^2) + eps) * weight (D,); accumulates in f64."""
    T = np.uint64(x.shape[0])
    D = np.uint64(x.shape[1])
    for t in range(T):
        ss = 0.0
        for i in range(D):
            v = np.float64(x[t, i])
            ss += v * v
        scale = np.float32(1.0 / np.sqrt(ss / np.float64(D) + eps))
        for i in range(D):
            out[t, i] = x[t, i] * scale * weight[i]


@njit(cache=True)
def rope(x, cos, sin, pos0):
    """Rotate adjacent pairs of x (T, heads, hd) in place; token t sits at position pos0 + t.

    cos, sin (max_pos, hd/2) f32 tables of position * inv_freq[i]."""
    T = np.uint64(x.shape[0])
    nh = np.uint64(x.shape[1])
    half = np.uint64(x.shape[2]) // np.uint64(2)
    for t in range(T):
        p = np.uint64(pos0) + t
        for h in range(nh):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                e = x[t, h, 2 * i]
                o = x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = e * c - o * s
                x[t, h, 2 * i + 1] = e * s + o * c


@njit(cache=True)
def swiglu(g, u, out):
    """out = silu(g) * u = g / (1 + exp(-g)) * u, elementwise over (n,) arrays."""
    for i in range(np.uint64(g.shape[0])):
        gi = g[i]
        out[i] = gi / (np.float32(1.0) + np.exp(-gi)) * u[i]


# ---------------------------------------------------------------------------
# Attention over the KV cache.


@njit(cache=True, parallel=True, fastmath=True)
def attention_decode(q, k, v, S, out, nt):
    """One query position attending to cached positions 0..S-1, grouped-query.

    q (H, hd) f32; k, v (max_seq, Hkv, hd) f32 or uint16 (f16 bits); out (H, hd) f32.
    Query head h reads K/V head h // (H / Hkv), without repeating K/V. Softmax is
    stabilised by the maximum score (two passes: scores, then weighted values).
    fastmath lets LLVM reassociate the length-hd dot products into SIMD lanes."""
    H = q.shape[0]
    hd = q.shape[1]
    rep = H // k.shape[1]
    scale = np.float32(1.0 / np.sqrt(np.float64(hd)))
    for h in prange(H):
        g = h // rep
        qh = q[h]  # (hd,)
        scores = np.empty(S, dtype=np.float32)  # (S,)
        mx = np.float32(-np.inf)
        for s in range(S):
            ks = k[s, g]  # (hd,)
            acc = np.float32(0.0)
            for i in range(hd):
                acc += qh[i] * load_f32(ks[i])
            acc *= scale
            scores[s] = acc
            mx = max(mx, acc)
        total = np.float32(0.0)
        for s in range(S):
            e = exp_neg(scores[s] - mx)
            scores[s] = e
            total += e
        o = np.zeros(hd, dtype=np.float32)  # (hd,) local, so the loop below has no aliasing
        for s in range(S):
            p = scores[s]
            vs = v[s, g]
            for i in range(hd):
                o[i] += p * load_f32(vs[i])
        inv = np.float32(1.0) / total
        for i in range(hd):
            out[h, i] = o[i] * inv


@njit(cache=True)
def store_kv(cache_k, cache_v, pos, k, v):
    """cache_k/v[pos] (Hkv, hd) = k/v (Hkv, hd), converting to the cache's element type."""
    Hkv = np.uint64(k.shape[0])
    hd = np.uint64(k.shape[1])
    p = np.uint64(pos)
    for g in range(Hkv):
        for i in range(hd):
            cache_k[p, g, i] = store_as(k[g, i], cache_k[p, g, i])
            cache_v[p, g, i] = store_as(v[g, i], cache_v[p, g, i])


# ---------------------------------------------------------------------------
# The whole decode step: one call per token, so per-token Python overhead is one dispatch.


@njit(cache=True)
def decode_step(x, pos, attn_norm, mlp_norm, norm,
                qkv_w, qkv_d, qkv_m, qkv_bits, o_w, o_d, o_m, o_bits,
                gu_w, gu_d, gu_m, gu_bits, dn_w, dn_d, dn_m, dn_bits,
                head_w, head_d, head_m, head_bits,
                cache_k, cache_v, cos, sin, n_heads, n_kv_heads, eps, nt, xq, logits):
    """Run one token through every layer and the output head.

    x (D,) f32: the token's embedding, overwritten with the final residual stream.
    pos: its position; cache_k/v (L, max_seq, Hkv, hd) receive its K/V at `pos`.
    Per layer l (stacked weights, rows fused): qkv (L, H*hd + 2*Hkv*hd, D),
    o (L, D, H*hd), gate_up (L, 2F, D) with gate rows first, down (L, D, F).
    attn_norm, mlp_norm (L, D); norm (D,); head (V, D); cos, sin (max_pos, hd/2).
    logits (V,) f32 is written. `*_bits` are 8 or 4 (see the module docstring).
    xq: scratch of at least max(D, F, H*hd) int8 or int16, the activations' quant width."""
    L = qkv_w.shape[0]
    D = x.shape[0]
    hd = cos.shape[1] * 2
    qd = n_heads * hd
    kvd = n_kv_heads * hd
    F = dn_w.shape[2] * (2 if dn_bits == 4 else 1)
    width = max(D, F, qd)
    xd = np.empty(width // BLOCK, dtype=np.float32)
    xs = np.empty(width // BLOCK, dtype=np.float32)
    h = np.empty((1, D), dtype=np.float32)
    x2 = x.reshape(1, D)
    qkv = np.empty(qd + 2 * kvd, dtype=np.float32)
    att = np.empty((n_heads, hd), dtype=np.float32)
    proj = np.empty(D, dtype=np.float32)
    gu = np.empty(2 * F, dtype=np.float32)
    act = np.empty(F, dtype=np.float32)
    for li in range(L):
        # attention block: x += Wo · attn(rope(Wq h), rope(Wk h), Wv h), h = norm(x)
        rms_norm(x2, attn_norm[li], eps, h)
        matvec_blocks(qkv_w[li], qkv_d[li], qkv_m[li], qkv_bits, h[0], xq, xd, xs, qkv, nt)
        q = qkv[:qd].reshape(1, n_heads, hd)  # (1, H, hd)
        k = qkv[qd:qd + kvd].reshape(1, n_kv_heads, hd)  # (1, Hkv, hd)
        v = qkv[qd + kvd:].reshape(n_kv_heads, hd)  # (Hkv, hd)
        rope(q, cos, sin, pos)
        rope(k, cos, sin, pos)
        store_kv(cache_k[li], cache_v[li], pos, k[0], v)
        attention_decode(q[0], cache_k[li], cache_v[li], pos + 1, att, nt)
        matvec_blocks(o_w[li], o_d[li], o_m[li], o_bits, att.reshape(qd), xq, xd, xs, proj, nt)
        for i in range(D):
            x[i] += proj[i]
        # MLP block: x += Wdown · (silu(Wgate h) * Wup h), h = norm(x)
        rms_norm(x2, mlp_norm[li], eps, h)
        matvec_blocks(gu_w[li], gu_d[li], gu_m[li], gu_bits, h[0], xq, xd, xs, gu, nt)
        swiglu(gu[:F], gu[F:], act)
        matvec_blocks(dn_w[li], dn_d[li], dn_m[li], dn_bits, act, xq, xd, xs, proj, nt)
        for i in range(D):
            x[i] += proj[i]
    rms_norm(x2, norm, eps, h)
    matvec_blocks(head_w, head_d, head_m, head_bits, h[0], xq, xd, xs, logits, nt)
