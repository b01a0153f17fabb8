"""Numba kernels: the hot loops of the decoder, on raw arrays.

Every kernel is `@njit(cache=True)` (those holding ISA-specific code: `cache=ISA_CACHE`),
named after its math, and has a plain-numpy twin in `tests/test_kernels.py`. Kernels do not check bounds: callers (`linear.py`, `model.py`)
validate shapes and indices first. This module imports only numpy, numba and llvmlite.

Matrix products are one integer GEMM (`gemm_blocks`) over weights packed in row groups of 16
(layout at `gemm_blocks`'s section) and activations quantized per token to blocks of 32 int8
quants (8-bit, as llama.cpp does for its CPU dot products) or to two int8 planes holding a
15-bit quant (near-f32 logits). Its inner tile is written in LLVM IR for the CPU's instruction
set, chosen once at import (`ISA`: avx512vnni, avx2 or portable; the environment variable
LLAMACPU_ISA forces one), and has a portable twin (`tile_portable`).

Codegen notes, measured on this CPU:
- Indices are unsigned (uint64) so LLVM drops the negative-index wraparound, which
  otherwise blocks vectorization (about 5x slower).
- The GEMM tile reaches ~300 GMAC/s (4-bit) and ~240 (8-bit) per Zen 5 core from L1; the
  whole GEMM ~290 when each row group's weights meet 512 KB of activations per read.
- Parallel kernels take the thread count `nt` and split rows into `nt` chunks; calling
  `numba.get_num_threads()` inside would prevent caching.
- Numba has no float16 on the CPU: an f16 KV cache is passed as its uint16 view and
  converted with LLVM's half <-> float instructions (F16C), see `_h2f` / `_f2h`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

BLOCK = 32  # weights per quant block (ggml's QK8_0 / QK4_0 / QK4_1)


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
_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)


def _x86(builder, name, ret, args):
    """Declare (once per module) an x86 intrinsic of LLVM."""
    fn = builder.module.globals.get(name)
    return fn if fn is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _data(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val).data


RG = 16  # rows per group
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _lanes_of(isa):
    return 16 if isa == "avx512vnni" else 8


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(builder, s, n):
    v = builder.insert_element(ir.Constant(_vec(s.type, n), ir.Undefined), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [0] * n))


def _ptr(context, builder, ty, val, elem):
    return builder.bitcast(_data(context, builder, ty, val), elem.as_pointer())


class _TileArgs(NamedTuple):
    """A tile intrinsic's arguments as LLVM values: the indices as i64, C = nb * BLOCK, the
    arrays' data pointers and y's row stride (in floats)."""
    g: ir.Value
    t0: ir.Value
    nb: ir.Value
    C: ir.Value
    wp: ir.Value
    dp: ir.Value
    mp: ir.Value
    sp: ir.Value
    xqp: ir.Value
    xup: ir.Value
    xdp: ir.Value
    xsp: ir.Value
    yp: ir.Value
    ldy: ir.Value

    def store_y(self, builder, row, col, vec):
        """y[row, col : col + len(vec)] = vec (f32 lanes)."""
        off = builder.add(builder.mul(row, self.ldy), col)
        builder.store(vec, builder.bitcast(builder.gep(self.yp, [off]), vec.type.as_pointer()), align=4)


def _tile_args(context, builder, signature, args) -> _TileArgs:
    """The arguments (w, d, m, s, xq, xu, xd, xs, y, g, t0, nb) every tile intrinsic takes."""
    A = signature.args
    w, d, m, s, xq, xu, xd, xs, y, g, t0, nb = args
    g, t0, nb = (builder.sext(v, _I64) if v.type.width < 64 else v for v in (g, t0, nb))
    y_arr = context.make_array(A[8])(context, builder, y)
    i8, i16, f32 = ir.IntType(8), ir.IntType(16), ir.FloatType()
    return _TileArgs(g, t0, nb, builder.mul(nb, ir.Constant(_I64, BLOCK)),
                     _ptr(context, builder, A[0], w, i8), _ptr(context, builder, A[1], d, i16),
                     _ptr(context, builder, A[2], m, i16), _ptr(context, builder, A[3], s, i16),
                     _ptr(context, builder, A[4], xq, i8), _ptr(context, builder, A[5], xu, i8),
                     _ptr(context, builder, A[6], xd, f32), _ptr(context, builder, A[7], xs, f32),
                     builder.bitcast(y_arr.data, f32.as_pointer()), cgutils.unpack_tuple(builder, y_arr.shape, 2)[1])


def _tile_codegen(isa, bits, has_m, tb, planes):
    """IR of one tile: row group g (16 rows) x `tb` activation rows t0.. (tb/planes tokens),
    accumulated over all nb blocks, stored to y[t0/planes + i, 16g : 16g + 16]."""
    V = _lanes_of(isa)
    halves = RG // V
    gbytes = RG * BLOCK * bits // 8
    nkg = 8 if bits == 8 else 4  # vector loads per block and half
    f32v, i32v, i8v = _vec(ir.FloatType(), V), _vec(_I32, V), _vec(ir.IntType(8), 4 * V)
    i16v, halfv = _vec(ir.IntType(16), V), _vec(ir.HalfType(), V)

    def codegen(context, builder, signature, args):
        a = _tile_args(context, builder, signature, args)
        g, t0, nb, C = a.g, a.t0, a.nb, a.C
        wp, dp, mp, sp, xqp, xup, xdp, xsp = a.wp, a.dp, a.mp, a.sp, a.xqp, a.xup, a.xdp, a.xsp
        c = lambda v, t=_I64: ir.Constant(t, v)  # noqa: E731
        if isa == "avx512vnni":
            dpbusd = _x86(builder, "llvm.x86.avx512.vpdpbusd.512", i32v, [i32v, i32v, i32v])
        else:
            maddubs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
            maddwd = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
            psign = _x86(builder, "llvm.x86.avx2.psign.b", _I8x32, [_I8x32, _I8x32])
            ones = ir.Constant(_I16x16, [1] * 16)
        fma_fn = _x86(builder, f"llvm.fma.v{V}f32", f32v, [f32v, f32v, f32v])

        def fma(a, b_, c_):
            return builder.call(fma_fn, [a, b_, c_])
        zero_f = ir.Constant(f32v, [0.0] * V)
        zero_i = ir.Constant(i32v, [0] * V)
        acc = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(tb)] for _ in range(halves)]
        xrow0 = builder.mul(t0, C)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            blk = builder.add(builder.mul(g, nb), b)  # block index in the (G, nb) grid
            wbase = builder.gep(wp, [builder.mul(blk, c(gbytes))])
            sbase = builder.mul(blk, c(RG))  # index of the block's 16 scales
            xcol = builder.mul(b, c(BLOCK))
            # the activations of this block, shared by both halves: (tb, 8) int32 words
            xwords = []
            for t in range(tb):
                row = builder.add(xrow0, builder.add(builder.mul(c(t), C), xcol))
                src = xup if (bits == 8 and isa == "avx512vnni") else xqp
                p32 = builder.bitcast(builder.gep(src, [row]), _I32.as_pointer())
                xwords.append([builder.load(builder.gep(p32, [c(k)]), align=1) for k in range(8)])
            for h in range(halves):
                sb = builder.add(sbase, c(h * V))
                dv = builder.fpext(builder.load(builder.bitcast(builder.gep(dp, [sb]), halfv.as_pointer()),
                                                align=2), f32v)
                mv = None
                if has_m:
                    mv = builder.fpext(builder.load(builder.bitcast(builder.gep(mp, [sb]), halfv.as_pointer()),
                                                    align=2), f32v)
                corr = None
                if bits == 8 and isa == "avx512vnni":  # sum (x+128) q = S + 128 sum q
                    sv = builder.load(builder.bitcast(builder.gep(sp, [sb]), i16v.as_pointer()), align=2)
                    corr = builder.shl(builder.sext(sv, i32v), ir.Constant(i32v, [7] * V))
                # the weights: per k-group, 4 quants of each of the V rows = one vector
                wq = []  # (k-group index within the block's 8, i8 vector)
                for kg in range(nkg):
                    p = builder.bitcast(builder.gep(wbase, [c(kg * 64 + h * 4 * V)]), i8v.as_pointer())
                    v = builder.load(p, align=1)
                    if bits == 8:
                        wq.append((kg, v))
                    else:
                        wq.append((kg, builder.and_(v, ir.Constant(i8v, [15] * (4 * V)))))
                        wq.append((kg + 4, builder.lshr(v, ir.Constant(i8v, [4] * (4 * V)))))
                for t in range(tb):
                    parts = [zero_i, zero_i]
                    for n, (kg, wv) in enumerate(wq):
                        xw = _splat(builder, xwords[t][kg], V)
                        if isa == "avx512vnni":
                            wi = builder.bitcast(wv, i32v)
                            a, bb = (xw, wi) if bits == 8 else (wi, xw)  # (unsigned, signed)
                            parts[n % 2] = builder.call(dpbusd, [parts[n % 2], a, bb])
                        else:
                            xb = builder.bitcast(xw, _I8x32)
                            if bits == 8:  # |q| times sign(q) x: the only u8 x s8 product x86 has
                                p16 = builder.call(maddubs, [builder.call(psign, [wv, wv]),
                                                             builder.call(psign, [xb, wv])])
                            else:
                                p16 = builder.call(maddubs, [wv, xb])
                            parts[n % 2] = builder.add(parts[n % 2], builder.call(maddwd, [p16, ones]))
                    S = builder.add(parts[0], parts[1])
                    if corr is not None:
                        S = builder.sub(S, corr)
                    sf = builder.sitofp(S, f32v)
                    xi = builder.add(builder.mul(builder.add(t0, c(t)), nb), b)
                    xd = _splat(builder, builder.load(builder.gep(xdp, [xi])), V)
                    a_ref = acc[h][t]
                    cur = builder.load(a_ref)
                    if bits == 4 and not has_m:  # d (xd S - 8 xs)
                        xs8 = _splat(builder, builder.fmul(builder.load(builder.gep(xsp, [xi])),
                                                           ir.Constant(ir.FloatType(), -8.0)), V)
                        new = fma(dv, fma(sf, xd, xs8), cur)
                    else:
                        new = fma(sf, builder.fmul(dv, xd), cur)
                        if has_m:
                            new = fma(mv, _splat(builder, builder.load(builder.gep(xsp, [xi])), V), new)
                    builder.store(new, a_ref)
        for h in range(halves):
            for i in range(tb // planes):
                total = builder.load(acc[h][i * planes])
                for p in range(1, planes):
                    total = builder.fadd(total, builder.load(acc[h][i * planes + p]))
                a.store_y(builder, builder.add(builder.sdiv(t0, c(planes)), c(i)),
                          builder.add(builder.mul(g, c(RG)), c(h * V)), total)
        return context.get_dummy_value()

    return codegen


def _tile_codegen_avx2_q15(has_m, tb):
    """IR of one AVX2 tile of 8-bit weights over 16-bit activations (planes 2, tb/2 tokens), as
    `_tile_codegen` computes it.

    The two-plane path costs AVX2 two sign-trick vpmaddubsw chains per token for 8-bit weights
    (it has no signed 8-bit product). Here each token's 15-bit quants are rebuilt once per block as
    int16 (q = 128 hi + lo: quantize_planes gives the hi row 128 times the lo row's scale), the
    weights are sign-extended to int16, and vpmaddwd multiplies 16 pairs at a time: 8 rows x 4
    quants in two vectors, whose adjacent int32 pairs are summed at the end of the block.
    |q| <= 127 * 128 + 127 and |w| <= 127, so a block's sum stays under 2^27. y gets d e S
    (+ m sum x), e the lo row's scale. Measured on Zen 3 (1 thread, 5632 x 2048 x 128): 28 GMAC/s,
    the 8-bit activations' speed, against 13 for two planes. 4-bit weights keep two planes: their
    nibbles are unsigned, vpmaddubsw's native case, and widening them costs what it saves."""
    V, halves, ntok = 8, 2, tb // 2
    gbytes = RG * BLOCK
    f32v, i32v, halfv = _vec(ir.FloatType(), V), _vec(_I32, V), _vec(ir.HalfType(), V)
    i8x32, i16x32 = _vec(ir.IntType(8), 32), _vec(ir.IntType(16), 32)

    def codegen(context, builder, signature, args):
        a = _tile_args(context, builder, signature, args)
        g, t0, nb, C = a.g, a.t0, a.nb, a.C
        wp, dp, mp, xqp, xdp, xsp = a.wp, a.dp, a.mp, a.xqp, a.xdp, a.xsp
        c = lambda v, t=_I64: ir.Constant(t, v)  # noqa: E731
        maddwd = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
        fma_fn = _x86(builder, "llvm.fma.v8f32", f32v, [f32v, f32v, f32v])
        zero_i = ir.Constant(i32v, [0] * V)
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(f32v, [0.0] * V)) for _ in range(ntok)]
               for _ in range(halves)]
        lanes = lambda idx: ir.Constant(_vec(_I32, len(idx)), list(idx))  # noqa: E731
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            blk = builder.add(builder.mul(g, nb), b)
            wbase = builder.gep(wp, [builder.mul(blk, c(gbytes))])
            sbase = builder.mul(blk, c(RG))
            xcol = builder.mul(b, c(BLOCK))
            q16 = []  # per token: its block's 32 quants, int16
            for i in range(ntok):
                hi_row = builder.add(builder.mul(builder.add(t0, c(2 * i)), C), xcol)
                lo_row = builder.add(hi_row, C)
                hi, lo = (builder.load(builder.bitcast(builder.gep(xqp, [r]), i8x32.as_pointer()), align=1)
                          for r in (hi_row, lo_row))
                q16.append(builder.add(builder.shl(builder.sext(hi, i16x32), ir.Constant(i16x32, [7] * 32)),
                                       builder.sext(lo, i16x32)))
            e, xsum = [], []  # per token: the lo row's scale, and the sum of its block's x (for m)
            for i in range(ntok):
                xi_hi = builder.add(builder.mul(builder.add(t0, c(2 * i)), nb), b)
                xi_lo = builder.add(xi_hi, nb)
                e.append(_splat(builder, builder.load(builder.gep(xdp, [xi_lo])), V))
                if has_m:
                    xsum.append(_splat(builder, builder.fadd(builder.load(builder.gep(xsp, [xi_hi])),
                                                             builder.load(builder.gep(xsp, [xi_lo]))), V))
            for h in range(halves):
                parts = [[zero_i, zero_i] for _ in range(ntok)]  # rows 0-3, rows 4-7 of the half: int32 pairs
                for kg in range(8):  # quants 4kg..4kg+3 of each of the half's 8 rows
                    v = builder.load(builder.bitcast(builder.gep(wbase, [c(kg * 64 + h * 32)]), i8x32.as_pointer()),
                                     align=1)
                    w16 = builder.sext(v, i16x32)
                    wlo = builder.shuffle_vector(w16, w16, lanes(range(16)))
                    whi = builder.shuffle_vector(w16, w16, lanes(range(16, 32)))
                    for i in range(ntok):
                        xw = builder.shuffle_vector(q16[i], q16[i], lanes([4 * kg + j for j in range(4)] * 4))
                        parts[i][0] = builder.add(parts[i][0], builder.call(maddwd, [wlo, xw]))
                        parts[i][1] = builder.add(parts[i][1], builder.call(maddwd, [whi, xw]))
                sb = builder.add(sbase, c(h * V))
                dv = builder.fpext(builder.load(builder.bitcast(builder.gep(dp, [sb]), halfv.as_pointer()), align=2),
                                   f32v)
                mv = None
                if has_m:
                    mv = builder.fpext(builder.load(builder.bitcast(builder.gep(mp, [sb]), halfv.as_pointer()),
                                                    align=2), f32v)
                for i in range(ntok):
                    pa, pb = parts[i]
                    S = builder.add(builder.shuffle_vector(pa, pb, lanes(range(0, 16, 2))),
                                    builder.shuffle_vector(pa, pb, lanes(range(1, 16, 2))))
                    new = builder.call(fma_fn, [builder.sitofp(S, f32v), builder.fmul(dv, e[i]),
                                                builder.load(acc[h][i])])
                    if has_m:
                        new = builder.call(fma_fn, [mv, xsum[i], new])
                    builder.store(new, acc[h][i])
        for h in range(halves):
            for i in range(ntok):
                a.store_y(builder, builder.add(builder.sdiv(t0, c(2)), c(i)),
                          builder.add(builder.mul(g, c(RG)), c(h * V)), builder.load(acc[h][i]))
        return context.get_dummy_value()

    return codegen


def _make_tile(isa, bits, has_m, tb, planes):
    gen = (_tile_codegen_avx2_q15(has_m, tb) if isa == "avx2" and planes == 2 and bits == 8
           else _tile_codegen(isa, bits, has_m, tb, planes))

    @intrinsic
    def tile(typingctx, w, d, m, s, xq, xu, xd, xs, y, g, t0, nb):
        return types.void(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb), gen
    return tile


@njit(cache=True)
def tile_portable(w, d, m, s, xq, xd, xs, y, g, t0, tb, planes, nb, bits):
    """The portable twin of the SIMD tiles: y[t0/planes + i, 16g + r] for i < tb/planes, r < 16.

    w (G, nb, 512 or 256) uint8, d, m (G, nb, 16 or 0) f16 bits, xq (T*planes, C) int8,
    xd, xs (T*planes, nb) f32, y (T, >= 16G) f32. With 2 planes, a token's rows are quantize_planes'
    hi and lo: the hi row's xd is 128 times the lo row's (AVX2's 8-bit tile relies on it)."""
    has_m = m.shape[2] > 0
    for i in range(tb // planes):
        for r in range(RG):
            total = np.float32(0.0)
            for p in range(planes):
                t = t0 + i * planes + p
                acc = np.float32(0.0)
                for b in range(nb):
                    blk = w[g, b]
                    S = np.int32(0)
                    if bits == 8:
                        for kg in range(8):
                            for j in range(4):
                                S += np.int32(np.int8(blk[kg * 64 + r * 4 + j])) * np.int32(xq[t, b * 32 + kg * 4 + j])
                    else:
                        for kg in range(4):
                            for j in range(4):
                                q = np.int32(blk[kg * 64 + r * 4 + j])
                                S += ((q & np.int32(15)) * np.int32(xq[t, b * 32 + kg * 4 + j])
                                      + (q >> np.int32(4)) * np.int32(xq[t, b * 32 + 16 + kg * 4 + j]))
                    db = _h2f(d[g, b, r])
                    if bits == 4 and not has_m:
                        acc += db * (xd[t, b] * np.float32(S) - np.float32(8.0) * xs[t, b])
                    else:
                        acc += db * xd[t, b] * np.float32(S)
                        if has_m:
                            acc += _h2f(m[g, b, r]) * xs[t, b]
                total += acc
            y[t0 // planes + i, g * RG + r] = total


ISAS = ("portable", "avx2", "avx512vnni")


def host_isas(features=None) -> tuple[str, ...]:
    """The kernel paths this CPU can run, from llvmlite's host feature flags."""
    f = llvm_binding.get_host_cpu_features() if features is None else features
    out = ["portable"]
    if f.get("avx2", False):
        out.append("avx2")
    if all(f.get(k, False) for k in ("avx512f", "avx512bw", "avx512vl", "avx512vnni")):
        out.append("avx512vnni")
    return tuple(out)


def _choose_isa() -> str:
    import os
    supported = host_isas()
    want = os.environ.get("LLAMACPU_ISA", "").strip().lower()
    if not want:
        return supported[-1]
    if want not in ISAS:
        raise ImportError(f"LLAMACPU_ISA must be one of {', '.join(ISAS)}, got {want!r}")
    if want not in supported:
        raise ImportError(f"LLAMACPU_ISA={want}: this CPU supports only {', '.join(supported)}")
    return want


ISA = _choose_isa()  # the kernels' instruction set, fixed for the process
# Numba's cache is keyed by the CPU, not by which path was compiled in: only the path a CPU
# picks by itself is cached, a forced one (LLAMACPU_ISA) always compiles afresh.
ISA_CACHE = ISA == host_isas()[-1]
TILE_TOKENS = 8 if ISA == "avx512vnni" else 4  # activation rows per tile (a multiple of 2 planes)
# Activations kept hot (in L2) while a thread walks its row groups: each group's weights are then
# read from memory once per this many bytes of activations. Measured on Zen 5 (1 thread, Q4,
# 5632 x 2048 x 512): 64 rows (128 KB) 110 GMAC/s, 256 rows (512 KB) 290 GMAC/s.
X_BLOCK_BYTES = 512 * 1024

_KINDS = ((8, False), (8, True), (4, False), (4, True))
if ISA == "portable":
    _T = {}
else:
    _T = {(bits, has_m, tb, planes): _make_tile(ISA, bits, has_m, tb, planes)
          for bits, has_m in _KINDS for planes in (1, 2) for tb in sorted({planes, TILE_TOKENS})}


def _tile_for(bits, has_m, tb, planes):
    return _T[(bits, has_m, tb, planes)]


def _make_tiles_dispatch():
    """A Numba function that runs one tile of any weight kind with the compiled-in ISA."""
    if ISA == "portable":
        @njit(inline="always")
        def run(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, bits):
            tile_portable(w, d, m, s, xq, xd, xs, y, g, t0, tb, planes, nb, bits)
        return run
    big = TILE_TOKENS
    k = {key: _tile_for(*key) for key in _T}
    t8_1, t8m_1, t40_1, t41_1 = (k[(8, False, 1, 1)], k[(8, True, 1, 1)], k[(4, False, 1, 1)], k[(4, True, 1, 1)])
    t8_2, t8m_2, t40_2, t41_2 = (k[(8, False, 2, 2)], k[(8, True, 2, 2)], k[(4, False, 2, 2)], k[(4, True, 2, 2)])
    b8_1, b8m_1, b40_1, b41_1 = (k[(8, False, big, 1)], k[(8, True, big, 1)], k[(4, False, big, 1)],
                                 k[(4, True, big, 1)])
    b8_2, b8m_2, b40_2, b41_2 = (k[(8, False, big, 2)], k[(8, True, big, 2)], k[(4, False, big, 2)],
                                 k[(4, True, big, 2)])

    @njit(inline="always")
    def run(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, bits):
        has_m = m.shape[2] > 0
        if tb == big:
            if planes == 1:
                if bits == 8:
                    if has_m:
                        b8m_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                    else:
                        b8_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                elif has_m:
                    b41_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                else:
                    b40_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            else:
                if bits == 8:
                    if has_m:
                        b8m_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                    else:
                        b8_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                elif has_m:
                    b41_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                else:
                    b40_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
        elif planes == 1:
            if bits == 8:
                if has_m:
                    t8m_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                else:
                    t8_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            elif has_m:
                t41_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            else:
                t40_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
        else:
            if bits == 8:
                if has_m:
                    t8m_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                else:
                    t8_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            elif has_m:
                t41_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            else:
                t40_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
    return run


_run_tile_32 = _make_tiles_dispatch()


# ---------------------------------------------------------------------------
# K-quant tiles (ggml's Q4_K, Q5_K, Q6_K, run as stored: no requantization).
#
# A K-quant super-block is 256 weights = 8 of our 32-weight blocks. Its scales are integers per
# sub-block times an f16 per super-block, so the tile multiplies the sub-scales into the int32
# dot products and applies the f16 super-scale in f32: the weights are used exactly (d sc is an
# f16 times a 6- or 8-bit integer, up to 19 significant bits, which an f16 per block could not hold).
# The weight tuple is (w, d, m, s, kind), `kind` in KQ_KINDS taking the place of `bits`:
#
#   w (G, nb, 256 | 320 | 384) uint8: per block, 16 rows' unsigned quants in planes: 256 bytes of
#       low nibbles exactly as the 4-bit layout (elements 0..15 low, 16..31 high), then for 5-bit
#       quants 64 bytes holding bit 4 (byte 4r + j, bit k: element 4k + j of row r), for 6-bit
#       quants 2 x 64 bytes holding bits 4-5 (plane p, byte 4r + j, bits 2i..2i+1: element
#       4 (4p + i) + j). Each 64-byte run is one vector of 16 rows x 4 quants, like the nibbles.
#   d (G, nsb, 16 | 32) f16 bits per super-block (nsb = nb / 8) and row: d, then dmin if the
#       kind has mins (nsb, 32).
#   s (G, nb, 16) int16 per block and row, two bytes: K_MIN: (sc, m) unsigned 6-bit;
#       K_CENTER, K_GENERAL: the int8 scales of the block's two halves of 16 (sc0, sc1).
#   m (G, nb, 16) uint16, K_GENERAL only (else (G, nb, 0)): int8 mins of the two halves (mn0, mn1).
#
# With S_h = sum over half h of q x (int32, q unsigned) and X_h = sum of x's quants over it:
#   K_MIN     (Q4_K, Q5_K)  w = d sc q - dmin m:       d xd sc (S_0 + S_1) - dmin m xs
#   K_CENTER  (Q6_K)        w = d sc_h (q - 32):       d xd sum_h sc_h (S_h - 32 X_h)
#   K_GENERAL (Q6_K fused with Q4_K/Q5_K rows; a Q6_K row has dmin = 32 d and mn_h = sc_h)
#                           w = d sc_h q - dmin mn_h:  xd (d sum_h sc_h S_h - dmin sum_h mn_h X_h)
# The integer sums are exact (|sc_h S_h| < 2^24 for K_CENTER; K_GENERAL's may pass 2^24 and
# then rounds once, like any f32 sum). Weights are the unsigned operand of the u8 x s8 products
# (vpdpbusd / vpmaddubsw: 63 * 127 * 2 fits int16), activations the signed one.

K_MIN, K_CENTER, K_GENERAL = 0, 1, 2
KQ_KINDS = {20: (4, K_MIN), 21: (5, K_MIN), 22: (6, K_CENTER), 23: (6, K_GENERAL)}  # kind → (quant bits, form)
KQ4, KQ5, KQ6, KQG = 20, 21, 22, 23
KQ_BYTES = {4: 256, 5: 320, 6: 384}  # w bytes per block and row group, by quant bits


def _ktile_codegen(isa, qbits, form, tb, planes):
    """IR of one K-quant tile: row group g x `tb` activation rows t0.. (see the section above)."""
    V = _lanes_of(isa)
    halves = RG // V
    gbytes = KQ_BYTES[qbits]
    dstride = 16 if form == K_CENTER else 32
    f32v, i32v, i8v = _vec(ir.FloatType(), V), _vec(_I32, V), _vec(ir.IntType(8), 4 * V)
    i16v, halfv = _vec(ir.IntType(16), V), _vec(ir.HalfType(), V)
    i8x16, i32x16 = _vec(ir.IntType(8), 16), _vec(_I32, 16)

    def codegen(context, builder, signature, args):
        a = _tile_args(context, builder, signature, args)
        g, t0, nb, C = a.g, a.t0, a.nb, a.C
        wp, dp, mp, sp, xqp, xdp, xsp = a.wp, a.dp, a.mp, a.sp, a.xqp, a.xdp, a.xsp
        nsb = builder.udiv(nb, ir.Constant(_I64, 8))
        c = lambda v, t=_I64: ir.Constant(t, v)  # noqa: E731
        if isa == "avx512vnni":
            dpbusd = _x86(builder, "llvm.x86.avx512.vpdpbusd.512", i32v, [i32v, i32v, i32v])
        else:
            maddubs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
            maddwd = _x86(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
            ones = ir.Constant(_I16x16, [1] * 16)
        fma_fn = _x86(builder, f"llvm.fma.v{V}f32", f32v, [f32v, f32v, f32v])
        reduce_add = _x86(builder, "llvm.vector.reduce.add.v16i32", _I32, [i32x16])

        def fma(a, b_, c_):
            return builder.call(fma_fn, [a, b_, c_])

        def i8const(v):
            return ir.Constant(i8v, [v] * (4 * V))

        def shift_to_bit4(v, bit):  # move bit `bit` of every byte to bit 4 (the others are masked after)
            if bit < 4:
                return builder.shl(v, i8const(4 - bit))
            return builder.lshr(v, i8const(bit - 4)) if bit > 4 else v

        def halfvec(ptr, idx):
            return builder.fpext(builder.load(builder.bitcast(builder.gep(ptr, [idx]), halfv.as_pointer()), align=2),
                                 f32v)

        def bytes_of(v16, signed):  # <V x i16> → (low byte, high byte) as <V x i32>
            lo = builder.trunc(v16, _vec(ir.IntType(8), V))
            hi = builder.trunc(builder.lshr(v16, ir.Constant(i16v, [8] * V)), _vec(ir.IntType(8), V))
            ext = builder.sext if signed else builder.zext
            return ext(lo, i32v), ext(hi, i32v)

        zero_f = ir.Constant(f32v, [0.0] * V)
        zero_i = ir.Constant(i32v, [0] * V)
        acc = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(tb)] for _ in range(halves)]
        xrow0 = builder.mul(t0, C)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            blk = builder.add(builder.mul(g, nb), b)  # block index in the (G, nb) grid
            wbase = builder.gep(wp, [builder.mul(blk, c(gbytes))])
            sbase = builder.mul(blk, c(RG))  # index of the block's 16 sub-scale pairs
            dbase = builder.mul(builder.add(builder.mul(g, nsb), builder.udiv(b, c(8))), c(dstride))
            xcol = builder.mul(b, c(BLOCK))
            xwords, xsums = [], []  # per token: 8 int32 words of 4 quants; (X_0, X_1) if needed
            for t in range(tb):
                row = builder.add(xrow0, builder.add(builder.mul(c(t), C), xcol))
                p32 = builder.bitcast(builder.gep(xqp, [row]), _I32.as_pointer())
                xwords.append([builder.load(builder.gep(p32, [c(k)]), align=1) for k in range(8)])
                if form != K_MIN and isa == "avx512vnni":
                    # X_h (32 X_h for K_CENTER) in every lane, as 4 products of its words with a
                    # vector of 1s (32s): cheaper than a horizontal sum and a broadcast per half
                    unit = ir.Constant(i32v, [0x20202020 if form == K_CENTER else 0x01010101] * V)
                    sums = []
                    for h2 in range(2):
                        acc_x = zero_i
                        for k in range(4 * h2, 4 * h2 + 4):
                            acc_x = builder.call(dpbusd, [acc_x, unit, _splat(builder, xwords[t][k], V)])
                        sums.append(acc_x)
                    xsums.append(sums)
                elif form != K_MIN:
                    sums = []
                    for h2 in range(2):
                        v = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(row, c(16 * h2))]),
                                                         i8x16.as_pointer()), align=1)
                        sums.append(builder.call(reduce_add, [builder.sext(v, i32x16)]))
                    xsums.append(sums)
            for h in range(halves):
                dv = halfvec(dp, builder.add(dbase, c(h * V)))
                sv = builder.load(builder.bitcast(builder.gep(sp, [builder.add(sbase, c(h * V))]),
                                                  i16v.as_pointer()), align=2)
                if form == K_MIN:
                    sc, mq = bytes_of(sv, False)
                    dminm = builder.fmul(halfvec(dp, builder.add(dbase, c(16 + h * V))), builder.uitofp(mq, f32v))
                else:
                    sc0, sc1 = bytes_of(sv, True)
                if form == K_GENERAL:
                    mv = builder.load(builder.bitcast(builder.gep(mp, [builder.add(sbase, c(h * V))]),
                                                      i16v.as_pointer()), align=2)
                    mn0, mn1 = bytes_of(mv, True)
                    dmin = halfvec(dp, builder.add(dbase, c(16 + h * V)))
                # the quants: per k-group kg (elements 4kg..4kg+3), 4 of each of the V rows = one vector
                wq = [None] * 8
                for kg in range(4):
                    v = builder.load(builder.bitcast(builder.gep(wbase, [c(kg * 64 + h * 4 * V)]), i8v.as_pointer()),
                                     align=1)
                    wq[kg] = builder.and_(v, i8const(15))
                    wq[kg + 4] = builder.lshr(v, i8const(4))
                if qbits == 5:
                    hb = builder.load(builder.bitcast(builder.gep(wbase, [c(256 + h * 4 * V)]), i8v.as_pointer()),
                                      align=1)
                    for kg in range(8):
                        wq[kg] = builder.or_(wq[kg], builder.and_(shift_to_bit4(hb, kg), i8const(0x10)))
                elif qbits == 6:
                    for p in range(2):
                        hb = builder.load(builder.bitcast(builder.gep(wbase, [c(256 + p * 64 + h * 4 * V)]),
                                                          i8v.as_pointer()), align=1)
                        for i in range(4):
                            kg = 4 * p + i
                            wq[kg] = builder.or_(wq[kg], builder.and_(shift_to_bit4(hb, 2 * i), i8const(0x30)))
                for t in range(tb):
                    parts = [zero_i, zero_i]  # elements 0..15, 16..31
                    for kg in range(8):
                        xw = _splat(builder, xwords[t][kg], V)
                        if isa == "avx512vnni":
                            parts[kg // 4] = builder.call(dpbusd, [parts[kg // 4], builder.bitcast(wq[kg], i32v), xw])
                        else:
                            p16 = builder.call(maddubs, [wq[kg], builder.bitcast(xw, _I8x32)])
                            parts[kg // 4] = builder.add(parts[kg // 4], builder.call(maddwd, [p16, ones]))
                    xi = builder.add(builder.mul(builder.add(t0, c(t)), nb), b)
                    xd = _splat(builder, builder.load(builder.gep(xdp, [xi])), V)
                    a_ref = acc[h][t]
                    cur = builder.load(a_ref)
                    if form == K_MIN:
                        S = builder.mul(builder.add(parts[0], parts[1]), sc)
                        new = fma(builder.sitofp(S, f32v), builder.fmul(dv, xd), cur)
                        xs_neg = _splat(builder, builder.fneg(builder.load(builder.gep(xsp, [xi]))), V)
                        new = fma(dminm, xs_neg, new)
                    elif form == K_CENTER:
                        x32 = (xsums[t] if isa == "avx512vnni" else
                               [_splat(builder, builder.mul(xsums[t][h2], c(32, _I32)), V) for h2 in range(2)])
                        S = builder.add(builder.mul(builder.sub(parts[0], x32[0]), sc0),
                                        builder.mul(builder.sub(parts[1], x32[1]), sc1))
                        new = fma(builder.sitofp(S, f32v), builder.fmul(dv, xd), cur)
                    else:
                        S = builder.add(builder.mul(parts[0], sc0), builder.mul(parts[1], sc1))
                        X = xsums[t] if isa == "avx512vnni" else [_splat(builder, v, V) for v in xsums[t]]
                        M = builder.add(builder.mul(X[0], mn0), builder.mul(X[1], mn1))
                        new = fma(builder.sitofp(S, f32v), builder.fmul(dv, xd), cur)
                        new = fma(builder.sitofp(M, f32v), builder.fneg(builder.fmul(dmin, xd)), new)
                    builder.store(new, a_ref)
        for h in range(halves):
            for i in range(tb // planes):
                total = builder.load(acc[h][i * planes])
                for p in range(1, planes):
                    total = builder.fadd(total, builder.load(acc[h][i * planes + p]))
                a.store_y(builder, builder.add(builder.sdiv(t0, c(planes)), c(i)),
                          builder.add(builder.mul(g, c(RG)), c(h * V)), total)
        return context.get_dummy_value()

    return codegen


def _make_ktile(isa, qbits, form, tb, planes):
    @intrinsic
    def tile(typingctx, w, d, m, s, xq, xu, xd, xs, y, g, t0, nb):
        return types.void(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb), _ktile_codegen(isa, qbits, form, tb, planes)
    return tile


@njit(cache=True)
def _kquant(blk, r, e, qbits):
    """The unsigned quant of element e (< 32) of row r (< 16) in one K-quant block's planes."""
    kg = e // 4
    j = e % 4
    byte = np.int32(blk[(kg % 4) * 64 + r * 4 + j])
    q = (byte & np.int32(15)) if kg < 4 else (byte >> np.int32(4))
    if qbits == 5:
        q |= ((np.int32(blk[256 + r * 4 + j]) >> np.int32(kg)) & np.int32(1)) << np.int32(4)
    elif qbits == 6:
        q |= ((np.int32(blk[256 + (kg // 4) * 64 + r * 4 + j]) >> np.int32(2 * (kg % 4))) & np.int32(3)) << np.int32(4)
    return q


@njit(cache=True)
def ktile_portable(w, d, m, s, xq, xd, xs, y, g, t0, tb, planes, nb, kind):
    """The portable twin of the K-quant tiles (same arguments as `tile_portable`, kind in KQ_KINDS)."""
    qbits = 4 if kind == KQ4 else (5 if kind == KQ5 else 6)
    for i in range(tb // planes):
        for r in range(RG):
            total = np.float32(0.0)
            for p in range(planes):
                t = t0 + i * planes + p
                acc = np.float32(0.0)
                for b in range(nb):
                    blk = w[g, b]
                    S0 = S1 = X0 = X1 = np.int32(0)  # sums over the halves of 16: q x, x
                    for e in range(16):
                        x0 = np.int32(xq[t, b * BLOCK + e])
                        x1 = np.int32(xq[t, b * BLOCK + 16 + e])
                        S0 += _kquant(blk, r, e, qbits) * x0
                        S1 += _kquant(blk, r, 16 + e, qbits) * x1
                        X0 += x0
                        X1 += x1
                    dd = _h2f(d[g, b // 8, r])
                    sv = np.int32(s[g, b, r]) & np.int32(0xFFFF)
                    lo, hi = sv & np.int32(255), sv >> np.int32(8)
                    if kind == KQ4 or kind == KQ5:
                        acc += dd * xd[t, b] * np.float32((S0 + S1) * lo)
                        acc -= _h2f(d[g, b // 8, 16 + r]) * np.float32(hi) * xs[t, b]
                    else:
                        sc0 = np.int32(np.int8(np.uint8(lo)))
                        sc1 = np.int32(np.int8(np.uint8(hi)))
                        if kind == KQ6:
                            acc += dd * xd[t, b] * np.float32(sc0 * (S0 - 32 * X0) + sc1 * (S1 - 32 * X1))
                        else:
                            mv = np.int32(m[g, b, r])
                            mn0 = np.int32(np.int8(np.uint8(mv & np.int32(255))))
                            mn1 = np.int32(np.int8(np.uint8(mv >> np.int32(8))))
                            acc += dd * xd[t, b] * np.float32(sc0 * S0 + sc1 * S1)
                            acc -= _h2f(d[g, b // 8, 16 + r]) * xd[t, b] * np.float32(mn0 * X0 + mn1 * X1)
                total += acc
            y[t0 // planes + i, g * RG + r] = total


def _make_ktiles_dispatch():
    """A Numba function that runs one K-quant tile of any kind with the compiled-in ISA."""
    if ISA == "portable":
        @njit(inline="always")
        def run(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, kind):
            ktile_portable(w, d, m, s, xq, xd, xs, y, g, t0, tb, planes, nb, kind)
        return run
    big = TILE_TOKENS
    k = {(kind, tb, planes): _make_ktile(ISA, *KQ_KINDS[kind], tb, planes)
         for kind in KQ_KINDS for planes in (1, 2) for tb in sorted({planes, big})}
    k4_1, k5_1, k6_1, kg_1 = (k[(KQ4, 1, 1)], k[(KQ5, 1, 1)], k[(KQ6, 1, 1)], k[(KQG, 1, 1)])
    k4_2, k5_2, k6_2, kg_2 = (k[(KQ4, 2, 2)], k[(KQ5, 2, 2)], k[(KQ6, 2, 2)], k[(KQG, 2, 2)])
    b4_1, b5_1, b6_1, bg_1 = (k[(KQ4, big, 1)], k[(KQ5, big, 1)], k[(KQ6, big, 1)], k[(KQG, big, 1)])
    b4_2, b5_2, b6_2, bg_2 = (k[(KQ4, big, 2)], k[(KQ5, big, 2)], k[(KQ6, big, 2)], k[(KQG, big, 2)])

    @njit(inline="always")
    def run(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, kind):
        if tb == big:
            if planes == 1:
                if kind == KQ4:
                    b4_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                elif kind == KQ5:
                    b5_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                elif kind == KQ6:
                    b6_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                else:
                    bg_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            else:
                if kind == KQ4:
                    b4_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                elif kind == KQ5:
                    b5_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                elif kind == KQ6:
                    b6_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
                else:
                    bg_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
        elif planes == 1:
            if kind == KQ4:
                k4_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            elif kind == KQ5:
                k5_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            elif kind == KQ6:
                k6_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            else:
                kg_1(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
        else:
            if kind == KQ4:
                k4_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            elif kind == KQ5:
                k5_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            elif kind == KQ6:
                k6_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
            else:
                kg_2(w, d, m, s, xq, xu, xd, xs, y, g, t0, nb)
    return run


_run_ktile = _make_ktiles_dispatch()


@njit(inline="always")
def run_tile(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, bits):
    """One tile of a weight of any kind: `bits` 8 or 4 (the 32-weight formats) or a KQ_KINDS code."""
    if bits >= KQ4:
        _run_ktile(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, bits)
    else:
        _run_tile_32(w, d, m, s, xq, xu, xd, xs, y, g, t0, tb, planes, nb, bits)


QMAX15 = 127 * 128 + 63  # the largest 15-bit activation quant whose hi part stays within +-127


@njit(cache=True)
def quantize_planes(x, xq, xu, xd, xs, planes):
    """x (C,) f32 → `planes` int8 rows: xq (planes, C), xu = xq + 128 (uint8), xd, xs (planes, C/32).

    planes 1: q = rint(x / xd), xd = amax/127 per block (ggml's Q8 activations).
    planes 2: a 15-bit q = rint(x / e), e = amax/QMAX15, split as q = 128 hi + lo with
    hi in [-127, 127] and lo in [-64, 63]: row 0 holds hi (scale 128 e), row 1 lo (scale e).
    xs = scale * sum of the row's block. No quant is -128, which AVX2's sign trick cannot negate."""
    C = np.uint64(x.shape[0])
    nb = C // np.uint64(BLOCK)
    qmax = np.float32(127.0) if planes == 1 else np.float32(QMAX15)
    for b in range(nb):
        base = b * np.uint64(BLOCK)
        amax = np.float32(0.0)
        for j in range(BLOCK):
            a = abs(x[base + j])
            if a > amax:
                amax = a
        e = amax / qmax
        inv = np.float32(1.0) / e if e > 0 else np.float32(0.0)
        if planes == 1:
            s = np.int32(0)
            for j in range(BLOCK):
                q = np.int32(np.rint(x[base + j] * inv))
                xq[0, base + j] = q
                xu[0, base + j] = np.uint8(q + 128)
                s += q
            xd[0, b] = e
            xs[0, b] = e * np.float32(s)
        else:
            sh = np.int32(0)
            sl = np.int32(0)
            for j in range(BLOCK):
                q = np.int32(np.rint(x[base + j] * inv))
                hi = (q + np.int32(64)) >> np.int32(7)
                lo = q - (hi << np.int32(7))
                xq[0, base + j] = hi
                xq[1, base + j] = lo
                xu[0, base + j] = np.uint8(hi + 128)
                xu[1, base + j] = np.uint8(lo + 128)
                sh += hi
                sl += lo
            xd[0, b] = e * np.float32(128.0)
            xs[0, b] = e * np.float32(128.0) * np.float32(sh)
            xd[1, b] = e
            xs[1, b] = e * np.float32(sl)


@njit(cache=True, parallel=True)
def quantize_rows(x, xq, xu, xd, xs, planes, nt):
    """Every row of x (T, C) f32 → planes rows each of xq, xu (T*planes, C), xd, xs (T*planes, C/32)."""
    T = x.shape[0]
    chunk = (T + nt - 1) // nt
    for c in prange(nt):
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            p0 = t * planes
            quantize_planes(x[t], xq[p0:p0 + planes], xu[p0:p0 + planes], xd[p0:p0 + planes],
                            xs[p0:p0 + planes], planes)


@njit(cache=ISA_CACHE, inline="always")
def gemm_groups(w, d, m, s, bits, xq, xu, xd, xs, planes, y, g0, g1):
    """Row groups g0..g1-1 of `gemm_blocks`, on the calling thread."""
    nb = w.shape[1]
    TP = xq.shape[0]
    big = TILE_TOKENS
    rows = max(big, X_BLOCK_BYTES // xq.shape[1] // big * big)  # activation rows per block
    for a0 in range(0, TP, rows):
        a1 = min(TP, a0 + rows)
        for g in range(g0, g1):
            t = a0
            while t + big <= a1:
                run_tile(w, d, m, s, xq, xu, xd, xs, y, g, t, big, planes, nb, bits)
                t += big
            while t < a1:
                run_tile(w, d, m, s, xq, xu, xd, xs, y, g, t, planes, planes, nb, bits)
                t += planes


@njit(cache=ISA_CACHE, parallel=True)
def gemm_blocks(w, d, m, s, bits, xq, xu, xd, xs, planes, y, nt):
    """y (T, 16G) = X W.T: W packed in row groups (see above), X quantized to `planes` int8 rows
    per token (xq, xu (T*planes, C), xd, xs (T*planes, C/32)).

    Row groups are split into `nt` chunks, one per thread. Each thread takes X_BLOCK_BYTES of
    activation rows at a time and runs them through its row groups, TILE_TOKENS per tile, so
    the block of activations stays in cache while each group's weights are read once per block."""
    G = w.shape[0]
    chunk = (G + nt - 1) // nt
    for c in prange(nt):
        gemm_groups(w, d, m, s, bits, xq, xu, xd, xs, planes, y, c * chunk, min(G, (c + 1) * chunk))


# A product smaller than this (multiply-adds of int8 rows) runs on the calling thread: a parallel
# region costs a few microseconds to start and join (more on a busy machine, where a sleeping
# worker waits for a core), which is what a 576 x 576 matrix-vector product takes on one thread.
PARALLEL_MIN_MACS = 1 << 20

# Decode attention reads the cache, which is cold (one layer's K and V at 512 positions of the 135M
# model are 885 KB of f32, evicted by the weights streamed in between), so it is memory-bound and
# worth a second thread much sooner than a hot matrix-vector product of the same size: from about
# 60 positions at SmolLM2's shape (2 * 576 * S multiply-adds).
ATTN_PARALLEL_MIN_MACS = 1 << 16


@njit(cache=ISA_CACHE)
def linear_blocks(x, wt, xq, xu, xd, xs, planes, y, nt):
    """y (T, 16G) = x (T, C) @ W.T for a packed weight wt = (w, d, m, s, bits): quantizes x to
    `planes` int8 rows per token in the scratch xq, xu, xd, xs (at least T*planes rows), then
    runs the integer GEMM (on `nt` threads, or on this one if it is small, see PARALLEL_MIN_MACS).
    xq, xu, xd, xs are flat: at least T*planes*C and T*planes*C/32."""
    T, C = x.shape
    nb = C // BLOCK
    n = T * planes
    q, u = xq[:n * C].reshape(n, C), xu[:n * C].reshape(n, C)  # flat scratch, exact shapes
    qd, qs = xd[:n * nb].reshape(n, nb), xs[:n * nb].reshape(n, nb)
    if T == 1:
        quantize_planes(x[0], q, u, qd, qs, planes)
    else:
        quantize_rows(x, q, u, qd, qs, planes, nt)
    G = wt[0].shape[0]
    if nt == 1 or G * RG * C * n < PARALLEL_MIN_MACS:
        gemm_groups(wt[0], wt[1], wt[2], wt[3], wt[4], q, u, qd, qs, planes, y, 0, G)
    else:
        gemm_blocks(wt[0], wt[1], wt[2], wt[3], wt[4], q, u, qd, qs, planes, y, nt)


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


@njit(cache=True, fastmath=True, error_model="numpy")
def swiglu(gu, out):
    """out (F,) = silu(gate) * up = gate / (1 + exp(-gate)) * up, for gu (>= 2F,) holding gate | up.

    With e = exp(-|g|) <= 1 (`exp_neg`, which vectorizes): sigmoid(g) = 1/(1+e) for g >= 0,
    e/(1+e) below. error_model="numpy" drops Python's division-by-zero check, whose branch kept
    the loop scalar (14x slower); whole rows are indexed, as slices of them vectorize no better."""
    F = out.shape[0]
    for i in range(F):
        gi = np.float32(gu[i])
        e = exp_neg(-abs(gi))
        sig = (np.float32(1.0) if gi >= 0 else e) / (np.float32(1.0) + e)
        out[i] = gi * sig * gu[F + i]


@njit(cache=True, parallel=True)
def swiglu_rows(gu, out, nt):
    """out (T, F) = silu(gate) * up for gu (T, >= 2F) holding gate | up per row (prefill)."""
    T = gu.shape[0]
    chunk = (T + nt - 1) // nt
    for c in prange(nt):
        for t in range(c * chunk, min(T, (c + 1) * chunk)):
            swiglu(gu[t], out[t])


# ---------------------------------------------------------------------------
# Attention over the KV cache.

NEG_BIG = np.float32(-1e30)  # "no score yet": finite, as fastmath assumes no infinities


@njit(cache=True, fastmath=True, inline="always")
def attend_head(q, k, v, S, out, h):
    """Query head h of `attention_decode`, on the calling thread."""
    hd = q.shape[1]
    g = h // (q.shape[0] // k.shape[1])
    scale = np.float32(1.0 / np.sqrt(np.float64(hd)))
    qh = q[h]  # (hd,)
    scores = np.empty(S, dtype=np.float32)  # (S,)
    mx = NEG_BIG
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


@njit(cache=True, parallel=True, fastmath=True)
def attention_decode(q, k, v, S, out, nt):
    """One query position attending to cached positions 0..S-1, grouped-query, heads in parallel.

    q (H, hd) f32; k, v (max_seq, Hkv, hd) f32 or uint16 (f16 bits); out (H, hd) f32.
    Query head h reads K/V head h // (H / Hkv), without repeating K/V. Softmax is
    stabilised by the maximum score (two passes: scores, then weighted values).
    fastmath lets LLVM reassociate the length-hd dot products into SIMD lanes."""
    for h in prange(q.shape[0]):
        attend_head(q, k, v, S, out, h)


@njit(cache=True, fastmath=True)
def attention_decode_serial(q, k, v, S, out):
    """`attention_decode` on the calling thread (no parallel region: for short contexts)."""
    for h in range(q.shape[0]):
        attend_head(q, k, v, S, out, h)


ATTN_ROWS = 32  # query rows (tokens x heads of a K/V group) per work item of attention_prefill
ATTN_KEYS = 64  # keys per block: the item's rows x keys scores and its K^T, V blocks stay in L1


@njit(cache=True, parallel=True, fastmath=True)
def attention_prefill(q, k, v, start, out, nt):
    """Causal grouped-query attention of T new tokens over one layer's cache (the prefill path).

    q (T, H, hd) f32 for positions start..start+T-1; k, v (>= start+T, Hkv, hd) f32 or uint16
    (f16 bits): the layer's cache, already holding the T new positions; out (T, H, hd) f32.
    Token t sees keys 0..start+t.

    Work items are (block of tokens, K/V head): the block's tokens x the rep = H/Hkv query heads
    reading that K/V head make ~ATTN_ROWS rows. Items are dealt round-robin to the `nt` threads
    (later blocks see more keys; round robin keeps the threads even). An item walks its visible
    keys in blocks of ATTN_KEYS with an online softmax (a running max and sum per row, Milakov &
    Gimelshein 2018), so its scratch is O(block) at any context length. The products run 4 rows
    at a time so that each K^T / V row loaded serves 4 rows (about 2x faster than row by row).
    Measured on the Zen 5, 1 thread, T=512 at SmolLM2's shape: ~1.3x faster than the numpy
    BLAS products it replaces (with OPENBLAS_CORETYPE=Haswell), and no second thread pool."""
    T, H, hd = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    KB = ATTN_KEYS
    QB = max(1, ATTN_ROWS // rep)  # tokens per item
    rows = (QB * rep + 3) // 4 * 4  # scratch rows, padded for the 4-row passes
    items = (T + QB - 1) // QB * Hkv
    scale = np.float32(1.0 / np.sqrt(np.float64(hd)))
    for c in prange(nt):
        kt = np.zeros((hd, KB), dtype=np.float32)  # (hd, keys): the block's keys, transposed
        vb = np.zeros((KB, hd), dtype=np.float32)  # (keys, hd)
        qs = np.zeros((rows, hd), dtype=np.float32)  # scaled queries, row = token * rep + head in group
        o = np.zeros((rows, hd), dtype=np.float32)  # unnormalised outputs
        sc = np.zeros((rows, KB), dtype=np.float32)  # scores, then exp(score - max)
        mx = np.empty(rows, dtype=np.float32)  # running max score per row
        tot = np.empty(rows, dtype=np.float32)  # running sum of exp(score - max) per row
        for it in range(c, items, nt):
            t0 = (it // Hkv) * QB
            g = it % Hkv
            t1 = min(T, t0 + QB)
            n_rows = (t1 - t0) * rep
            n_pad = (n_rows + 3) // 4 * 4  # rows past n_rows are computed and never written out
            for r in range(n_rows):
                t = t0 + r // rep
                h = g * rep + r % rep
                for i in range(hd):
                    qs[r, i] = q[t, h, i] * scale
            for r in range(n_pad):
                for i in range(hd):
                    o[r, i] = np.float32(0.0)
                mx[r] = NEG_BIG
                tot[r] = np.float32(0.0)
            end = start + t1  # keys seen by the item's last token
            for k0 in range(0, end, KB):
                n = min(KB, end - k0)
                for s in range(KB):
                    if s < n:
                        for i in range(hd):
                            kt[i, s] = load_f32(k[k0 + s, g, i])
                            vb[s, i] = load_f32(v[k0 + s, g, i])
                    else:  # past the visible keys: zeros, so the fixed-size passes below stay finite
                        for i in range(hd):
                            kt[i, s] = np.float32(0.0)
                            vb[s, i] = np.float32(0.0)
                # scores (rows, KB) = qs K^T, 4 rows per pass
                for r in range(0, n_pad, 4):
                    s0, s1, s2, s3 = sc[r], sc[r + 1], sc[r + 2], sc[r + 3]
                    for s in range(KB):
                        s0[s] = np.float32(0.0)
                        s1[s] = np.float32(0.0)
                        s2[s] = np.float32(0.0)
                        s3[s] = np.float32(0.0)
                    for i in range(hd):
                        a0, a1, a2, a3 = qs[r, i], qs[r + 1, i], qs[r + 2, i], qs[r + 3, i]
                        kr = kt[i]
                        for s in range(KB):
                            x = kr[s]
                            s0[s] += a0 * x
                            s1[s] += a1 * x
                            s2[s] += a2 * x
                            s3[s] += a3 * x
                # online softmax: rescale what was summed under the old max; masked keys weigh 0
                for r in range(n_pad):
                    row = sc[r]
                    vis = min(n, start + t0 + r // rep + 1 - k0) if r < n_rows else 0
                    if vis <= 0:
                        for s in range(KB):
                            row[s] = np.float32(0.0)
                        continue
                    m = mx[r]
                    for s in range(vis):
                        m = max(m, row[s])
                    alpha = exp_neg(mx[r] - m)
                    total = np.float32(0.0)
                    for s in range(vis):
                        e = exp_neg(row[s] - m)
                        row[s] = e
                        total += e
                    for s in range(vis, KB):
                        row[s] = np.float32(0.0)
                    tot[r] = tot[r] * alpha + total
                    mx[r] = m
                    for i in range(hd):
                        o[r, i] *= alpha
                # o += P V, 4 rows per pass
                for r in range(0, n_pad, 4):
                    o0, o1, o2, o3 = o[r], o[r + 1], o[r + 2], o[r + 3]
                    for s in range(KB):
                        p0, p1, p2, p3 = sc[r, s], sc[r + 1, s], sc[r + 2, s], sc[r + 3, s]
                        vr = vb[s]
                        for i in range(hd):
                            x = vr[i]
                            o0[i] += p0 * x
                            o1[i] += p1 * x
                            o2[i] += p2 * x
                            o3[i] += p3 * x
            for r in range(n_rows):
                t = t0 + r // rep
                h = g * rep + r % rep
                inv = np.float32(1.0) / tot[r]
                for i in range(hd):
                    out[t, h, i] = o[r, i] * inv


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
# The whole decode step: one call per step, so per-step Python overhead is one dispatch, and
# one GEMM of B rows per matrix, so each weight is read once for all B sequences of a batch.


def _at(wt, li):
    """Layer li of a stacked packed weight: (w, d, m, s, bits) of that layer."""


@overload(_at, inline="always")
def _at_impl(wt, li):
    if wt[0].ndim == 4:  # one kind for every layer: (w, d, m, s) stacked (L, G, ...), and bits
        return lambda wt, li: (wt[0][li], wt[1][li], wt[2][li], wt[3][li], wt[4])

    # Layers of different K-quant kinds (llama.cpp's mixtures give some layers' attn_v/ffn_down
    # Q6_K): flat w, d, m, s buffers and a table (L, LAYER_FIELDS) of each layer's kind, shapes
    # and offsets (see linear.PackedLayers).
    def ragged(wt, li):
        k = wt[4][li]
        kind, G, nb, wlast, dsb, dlast, mlast, w0, d0, m0, s0 = (k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7],
                                                                  k[8], k[9], k[10])
        w = wt[0][w0:w0 + G * nb * wlast].reshape((G, nb, wlast))
        d = wt[1][d0:d0 + G * dsb * dlast].reshape((G, dsb, dlast))
        m = wt[2][m0:m0 + G * nb * mlast].reshape((G, nb, mlast))
        s = wt[3][s0:s0 + G * nb * RG].reshape((G, nb, RG))
        return (w, d, m, s, kind)
    return ragged


LAYER_FIELDS = 11  # kind, G, nb, w bytes per block, d super-blocks, d per super-block, m per block, 4 offsets


@njit(cache=ISA_CACHE)
def decode_step(x, pos, slot, attn_norm, mlp_norm, norm, qkv, o, gate_up, down, head,
                cache_k, cache_v, cos, sin, n_heads, n_kv_heads, eps, planes, nt, logits):
    """Run B tokens, each the next of its own sequence, through every layer and the output head.

    x (B, D) f32: the tokens' embeddings, overwritten with the final residual streams.
    pos (B,) int64: each token's position; slot (B,) int64: its sequence's cache, cache_k/v
    (N, L, max_seq, Hkv, hd) [slot[b]], which receives its K/V at pos[b]. The caller checks
    that slots are distinct and in range, and pos[b] < max_seq.
    Each weight is a tuple (w, d, m, s, bits) in the row-group layout (see `gemm_blocks`),
    stacked per layer (L, G, nb, ...), or layers of different K-quant kinds in flat buffers
    with a per-layer table (see `_at`), rows fused and padded to a multiple of 16:
    qkv (H*hd + 2*Hkv*hd rows, in D), o (D, in H*hd), gate_up (2F with gate rows first, in D),
    down (D, in F); head (V, in D) unstacked. attn_norm, mlp_norm (L, D); norm (D,);
    cos, sin (max_pos, hd/2). logits (B, >= 16 G_head) f32 is written (the first V are the logits).
    planes: 1 for 8-bit activations, 2 for 15-bit (see `quantize_planes`).
    Rows do not interact: a row's logits are the same whatever its batch mates."""
    B = x.shape[0]
    L = attn_norm.shape[0]
    D = x.shape[1]
    hd = cos.shape[1] * 2
    qd = n_heads * hd
    kvd = n_kv_heads * hd
    F = _at(down, 0)[0].shape[1] * BLOCK
    width = max(D, F, qd)
    xq = np.empty(B * planes * width, dtype=np.int8)
    xu = np.empty(B * planes * width, dtype=np.uint8)
    xd = np.empty(B * planes * width // BLOCK, dtype=np.float32)
    xs = np.empty(B * planes * width // BLOCK, dtype=np.float32)
    h = np.empty((B, D), dtype=np.float32)
    qkv_y = np.empty((B, _at(qkv, 0)[0].shape[0] * RG), dtype=np.float32)
    att = np.empty((B, qd), dtype=np.float32)
    proj = np.empty((B, _at(o, 0)[0].shape[0] * RG), dtype=np.float32)
    gu = np.empty((B, _at(gate_up, 0)[0].shape[0] * RG), dtype=np.float32)
    act = np.empty((B, F), dtype=np.float32)
    for li in range(L):
        # attention block: x += Wo · attn(rope(Wq h), rope(Wk h), Wv h), h = norm(x)
        rms_norm(x, attn_norm[li], eps, h)
        linear_blocks(h, _at(qkv, li), xq, xu, xd, xs, planes, qkv_y, nt)
        for b in range(B):  # attention: each row over its own cache
            y = qkv_y[b]
            q = y[:qd].reshape(1, n_heads, hd)  # (1, H, hd)
            k = y[qd:qd + kvd].reshape(1, n_kv_heads, hd)  # (1, Hkv, hd)
            v = y[qd + kvd:qd + 2 * kvd].reshape(n_kv_heads, hd)  # (Hkv, hd)
            rope(q, cos, sin, pos[b])
            rope(k, cos, sin, pos[b])
            ck = cache_k[slot[b], li]  # (max_seq, Hkv, hd)
            cv = cache_v[slot[b], li]
            store_kv(ck, cv, pos[b], k[0], v)
            if nt > 1 and 2 * qd * (pos[b] + 1) >= ATTN_PARALLEL_MIN_MACS:
                attention_decode(q[0], ck, cv, pos[b] + 1, att[b].reshape(n_heads, hd), nt)
            else:
                attention_decode_serial(q[0], ck, cv, pos[b] + 1, att[b].reshape(n_heads, hd))
        linear_blocks(att, _at(o, li), xq, xu, xd, xs, planes, proj, nt)
        for b in range(B):
            for i in range(D):
                x[b, i] += proj[b, i]
        # MLP block: x += Wdown · (silu(Wgate h) * Wup h), h = norm(x)
        rms_norm(x, mlp_norm[li], eps, h)
        linear_blocks(h, _at(gate_up, li), xq, xu, xd, xs, planes, gu, nt)
        for b in range(B):
            swiglu(gu[b], act[b])
        linear_blocks(act, _at(down, li), xq, xu, xd, xs, planes, proj, nt)
        for b in range(B):
            for i in range(D):
                x[b, i] += proj[b, i]
    rms_norm(x, norm, eps, h)
    linear_blocks(h, head, xq, xu, xd, xs, planes, logits, nt)
