"""Fast CPU back end of the local step: one pass over memory, from a small C library.

Why C and not torch ops: a Lion step must read ``p, g, m`` and write ``p, m`` (20 bytes per fp32
element). The op-by-op torch path moves ~76 bytes (``lion_pytorch``) and the multi-tensor foreach
path ~60, because every op is a separate pass. ``torch.compile`` fuses, but costs tens of seconds
of compilation per distinct list of shapes, which a 2-core CI cannot afford. The C source below
has no torch headers, so it compiles with the system C compiler in well under a second, once per
machine, into a cache directory; it is called through ``ctypes`` (which releases the GIL) with
raw data pointers, and it threads with OpenMP (sharing the ``libgomp`` torch already loaded).

Exactness: the arithmetic mirrors :mod:`leo_dist.functional` and :mod:`leo_dist.local_step`
operation by operation — ``lerp`` as torch's CPU kernel computes it (one fused multiply-add on
machines where torch's vector kernels use FMA), float32 compute, one round-to-nearest-even cast to
bfloat16 — so packed bits, zero bitmaps and momentum are bitwise equal to the torch path, and
sign-rule parameters too. Leo's 2-D rule accumulates row/column sums of squares in float64 (a
different summation order from ``torch.linalg.vector_norm``) and multiplies by the reciprocals
``1/(r+eps)``, ``1/(k+eps)`` (computed once per row and column) instead of dividing per element, so
those parameters agree to float rounding (≤1e-6 relative), not bitwise; their momentum is bitwise.

Fallback: when no C compiler works (or ``LEO_DIST_CPU_EXT=0``), :func:`available` is False, a
``RuntimeWarning`` says so once, and callers use the torch path — same results, slower. Tensors
that are not CPU, not contiguous, or not float32/bfloat16 also take the torch path
(:func:`supports`).

Cache: ``$LEO_DIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/leo_dist``, else ``~/.cache/leo_dist``;
the file name hashes the source, flags and compiler, so stale builds are never reused.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "available", "supports", "lion_step_", "leo_step_", "sign_shard_step_", "apply_signs_", "build_info",
]

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

/* dtype codes: 0 = float32, 1 = bfloat16 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16; float f; memcpy(&f, &u, 4); return f;
}
/* Round to nearest even, NaN kept quiet: the rule of c10::BFloat16. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float ld(const void *p, int code, int64_t i) {
    return code ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, int code, int64_t i, float v) {
    if (code) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v;
}

/* torch.lerp(start, end, w) as torch's CPU kernel computes it. */
static inline float lerp(float start, float end, float w, float wm1, int small) {
#if LEO_USE_FMA
    return small ? fmaf(w, end - start, start) : fmaf(wm1, end - start, end);
#else
    return small ? start + w * (end - start) : end - (end - start) * (1.0f - w);
#endif
}

typedef struct {
    float b1, b1m1, w2, w2m1;
    int b1small, w2small;
} lerp_consts;

static inline lerp_consts make_consts(float beta1, float w2) {
    lerp_consts k;
    k.b1 = beta1; k.b1m1 = beta1 - 1.0f; k.b1small = fabsf(beta1) < 0.5f;
    k.w2 = w2; k.w2m1 = w2 - 1.0f; k.w2small = fabsf(w2) < 0.5f;
    return k;
}

/* Element range [lo, hi) of thread t among nt over n elements, aligned to `align`. */
static inline void split(int64_t n, int t, int nt, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t units = (n + align - 1) / align;
    int64_t a = units * t / nt, b = units * (t + 1) / nt;
    *lo = a * align < n ? a * align : n;
    *hi = b * align < n ? b * align : n;
}

#define LION_BODY(PC, GC, MC)                                                        \
    for (int64_t i = a; i < b; ++i) {                                               \
        float gf = ld(g, GC, i), mf = ld(m, MC, i);                                 \
        float c = lerp(gf, mf, k.b1, k.b1m1, k.b1small);                             \
        float s = (float)((c > 0.0f) - (c < 0.0f));                                 \
        float pf = ld(p, PC, i);                                                    \
        if (use_decay) pf = pf * decay;                                             \
        pf = pf + step * s;                                                         \
        st(p, PC, i, pf);                                                           \
        st(m, MC, i, lerp(mf, gf, k.w2, k.w2m1, k.w2small));                        \
    }

static void lion_range(void *p, const void *g, void *m, int pc, int gc, int mc, int64_t a, int64_t b,
                       lerp_consts k, int use_decay, float decay, float step) {
    /* Specialised loops for the common dtype mixes, so that the compiler vectorises them. */
    if (pc == 0 && gc == 0 && mc == 0) { LION_BODY(0, 0, 0) }
    else if (pc == 1 && gc == 1 && mc == 0) { LION_BODY(1, 1, 0) }
    else if (pc == 1 && gc == 1 && mc == 1) { LION_BODY(1, 1, 1) }
    else { LION_BODY(pc, gc, mc) }
}

/* Lion / sign-rule step over a list of tensors, split evenly over threads by total elements. */
void lion_multi(int64_t nt_, void **ps, void **gs, void **ms, const int64_t *ns, const int32_t *codes,
                float beta1, float w2, int use_decay, float decay, float step, int nthreads) {
    int64_t total = 0;
    for (int64_t j = 0; j < nt_; ++j) total += ns[j];
    lerp_consts k = make_consts(beta1, w2);
    int nth = total < 65536 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth)
    {
        int64_t lo, hi, base = 0;
        split(total, omp_get_thread_num(), omp_get_num_threads(), 64, &lo, &hi);
        for (int64_t j = 0; j < nt_ && base < hi; base += ns[j], ++j) {
            int64_t a = lo > base ? lo - base : 0, b = hi - base < ns[j] ? hi - base : ns[j];
            if (a >= b) continue;
            void *p = ps[j], *m = ms[j]; const void *g = gs[j];
            lion_range(p, g, m, codes[3 * j], codes[3 * j + 1], codes[3 * j + 2], a, b, k, use_decay, decay, step);
        }
    }
}

/* Sharded local step: momentum over all S elements; bits/zeros for the first n_valid. Returns 1
   when some valid c is exactly zero. S is a multiple of 8. */
static inline unsigned shard_byte(const void *g, void *m, int gc, int mc, int64_t j, int64_t n_valid,
                                  lerp_consts k, unsigned *zer_out) {
    unsigned pos = 0, zer = 0;
    for (int e = 0; e < 8; ++e) {
        int64_t i = j * 8 + e;
        float gf = ld(g, gc, i), mf = ld(m, mc, i);
        float c = lerp(gf, mf, k.b1, k.b1m1, k.b1small);
        unsigned valid = i < n_valid;
        pos |= (unsigned)((c > 0.0f) & valid) << e;
        zer |= (unsigned)((c == 0.0f) & valid) << e;
        st(m, mc, i, lerp(mf, gf, k.w2, k.w2m1, k.w2small));
    }
    *zer_out = zer;
    return pos;
}

#if defined(__AVX2__) && LEO_USE_FMA
#include <immintrin.h>
/* Eight float32 elements per byte: one compare + movemask gives the packed bits directly. */
static inline __m256 lerp8(__m256 start, __m256 end, __m256 w, __m256 wm1, int small) {
    __m256 d = _mm256_sub_ps(end, start);
    return small ? _mm256_fmadd_ps(w, d, start) : _mm256_fmadd_ps(wm1, d, end);
}
#endif

int sign_shard(const void *g, void *m, uint8_t *bits, uint8_t *zeros, int64_t S, int64_t n_valid,
               int gc, int mc, float beta1, float w2, int nthreads) {
    lerp_consts k = make_consts(beta1, w2);
    int any = 0;
    int64_t nbytes = S / 8;
    int nth = S < 65536 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth) reduction(|: any)
    {
        int64_t lo, hi;
        split(nbytes, omp_get_thread_num(), omp_get_num_threads(), 8, &lo, &hi);
        int64_t j = lo;
        unsigned zacc = 0;
#if defined(__AVX2__) && LEO_USE_FMA
        if (gc == 0 && mc == 0) {
            int64_t full = n_valid / 8 < hi ? n_valid / 8 : hi;
            __m256 b1 = _mm256_set1_ps(k.b1), b1m1 = _mm256_set1_ps(k.b1m1);
            __m256 vw2 = _mm256_set1_ps(k.w2), w2m1 = _mm256_set1_ps(k.w2m1), zero = _mm256_setzero_ps();
            const float *gp = (const float *)g; float *mp = (float *)m;
            for (; j < full; ++j) {
                __m256 gv = _mm256_loadu_ps(gp + 8 * j), mv = _mm256_loadu_ps(mp + 8 * j);
                __m256 c = lerp8(gv, mv, b1, b1m1, k.b1small);
                unsigned z = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(c, zero, _CMP_EQ_OQ));
                bits[j] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ));
                zeros[j] = (uint8_t)z;
                zacc |= z;
                _mm256_storeu_ps(mp + 8 * j, lerp8(mv, gv, vw2, w2m1, k.w2small));
            }
        }
#endif
        for (; j < hi; ++j) {
            unsigned z;
            bits[j] = (uint8_t)shard_byte(g, m, gc, mc, j, n_valid, k, &z);
            zeros[j] = (uint8_t)z;
            zacc |= z;
        }
        any |= zacc != 0;
    }
    return any;
}

/* p <- p*(1 - lr*wd) - lr*scale*sign, sign decoded from bits (+1 set, -1 clear, 0 where zeros).
   Works a byte (8 elements) at a time: sign = 2*bit - 1, times (1 - zero bit). */
static inline void apply_byte(void *p, int pc, int64_t i0, int64_t cnt, unsigned b, unsigned z,
                              int use_decay, float decay, float step) {
    for (int64_t e = 0; e < cnt; ++e) {
        float s = (float)(int)(((b >> e) & 1u) * 2u) - 1.0f;
        s = ((z >> e) & 1u) ? 0.0f : s;
        float pf = ld(p, pc, i0 + e);
        if (use_decay) pf = pf * decay;
        st(p, pc, i0 + e, pf + step * s);
    }
}

void apply_signs(void *p, const uint8_t *bits, const uint8_t *zeros, int64_t n, int pc,
                 int use_decay, float decay, float step, int nthreads) {
    int64_t nbytes = (n + 7) / 8;
    int nth = n < 65536 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth)
    {
        int64_t lo, hi;
        split(nbytes, omp_get_thread_num(), omp_get_num_threads(), 8, &lo, &hi);
        int64_t j = lo;
#if defined(__AVX2__) && LEO_USE_FMA
        if (pc == 0) {
            int64_t full = n / 8 < hi ? n / 8 : hi;
            float *pp = (float *)p;
            const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            const __m256 one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f), zero = _mm256_setzero_ps();
            const __m256 vdec = _mm256_set1_ps(decay), vstep = _mm256_set1_ps(step);
            for (; j < full; ++j) {
                __m256i bv = _mm256_and_si256(_mm256_set1_epi32(bits[j]), lanes);
                __m256 s = _mm256_blendv_ps(mone, one, _mm256_castsi256_ps(_mm256_cmpeq_epi32(bv, lanes)));
                if (zeros) {
                    __m256i zv = _mm256_and_si256(_mm256_set1_epi32(zeros[j]), lanes);
                    s = _mm256_blendv_ps(s, zero, _mm256_castsi256_ps(_mm256_cmpeq_epi32(zv, lanes)));
                }
                __m256 pv = _mm256_loadu_ps(pp + 8 * j);
                if (use_decay) pv = _mm256_mul_ps(pv, vdec);
                _mm256_storeu_ps(pp + 8 * j, _mm256_add_ps(pv, _mm256_mul_ps(vstep, s)));
            }
        }
#endif
        for (; j < hi; ++j) {
            int64_t cnt = n - 8 * j < 8 ? n - 8 * j : 8;
            apply_byte(p, pc, 8 * j, cnt, bits[j], zeros ? zeros[j] : 0u, use_decay, decay, step);
        }
    }
}

/* Leo 2-D passes walk a thread's flat range [lo, hi) row segment by row segment [j0, j1), so that
   the inner loop runs over contiguous columns with the row fixed. u = c/(r+eps) + c/(k+eps) is
   computed as c*ir[row] + c*ik[col] from reciprocals precomputed once per matrix (ir = 1/(r+eps),
   ik = 1/(k+eps)): no division per element. With AVX2+FMA the float32 case has explicit 8-wide
   loops; squares are summed in float64 (exact products of float32 values), per-thread column
   partials in float64 too; software prefetch LEO_PF floats ahead lifts the read-only passes from
   ~20 to ~28 GB/s on a 2-core Xeon (the hardware prefetcher alone keeps too few lines in flight).
   The sums and u are not bitwise equal to torch's (other order, a reciprocal instead of a
   division: float rounding, ≤1e-6 relative on the parameter); the momentum is, since it depends
   only on g and m. */
#if LEO_USE_FMA
#define LEO_U(c, irow, ikj) fmaf((c), (ikj), (c) * (irow))
#else
#define LEO_U(c, irow, ikj) ((c) * (irow) + (c) * (ikj))
#endif

/* Generic row-segment loops (any dtype mix, any build), always inlined so that calls with
   literal dtype codes compile to straight loops; the lerp branch is hoisted by hand. */
static inline __attribute__((always_inline)) double
sumsq_seg(const void *g, const void *m, int gc, int mc, int64_t base, int64_t j0, int64_t j1,
          lerp_consts k, double *restrict cols) {
    double rs = 0.0;
    if (k.b1small) {
        #pragma omp simd reduction(+: rs)
        for (int64_t j = j0; j < j1; ++j) {
            float c = lerp(ld(g, gc, base + j), ld(m, mc, base + j), k.b1, k.b1m1, 1);
            double c2 = (double)c * (double)c;
            rs += c2; cols[j] += c2;
        }
    } else {
        #pragma omp simd reduction(+: rs)
        for (int64_t j = j0; j < j1; ++j) {
            float c = lerp(ld(g, gc, base + j), ld(m, mc, base + j), k.b1, k.b1m1, 0);
            double c2 = (double)c * (double)c;
            rs += c2; cols[j] += c2;
        }
    }
    return rs;
}

static inline __attribute__((always_inline)) double
usq_seg(const void *g, const void *m, int gc, int mc, int64_t base, int64_t j0, int64_t j1,
        lerp_consts k, float irow, const float *restrict ik) {
    double s = 0.0;
    if (k.b1small) {
        #pragma omp simd reduction(+: s)
        for (int64_t j = j0; j < j1; ++j) {
            float c = lerp(ld(g, gc, base + j), ld(m, mc, base + j), k.b1, k.b1m1, 1);
            float u = LEO_U(c, irow, ik[j]);
            s += (double)u * (double)u;
        }
    } else {
        #pragma omp simd reduction(+: s)
        for (int64_t j = j0; j < j1; ++j) {
            float c = lerp(ld(g, gc, base + j), ld(m, mc, base + j), k.b1, k.b1m1, 0);
            float u = LEO_U(c, irow, ik[j]);
            s += (double)u * (double)u;
        }
    }
    return s;
}

static inline __attribute__((always_inline)) void
apply_seg(void *p, const void *g, void *m, int pc, int gc, int mc, int64_t base, int64_t j0, int64_t j1,
          lerp_consts k, float irow, const float *restrict ik, float s, int use_decay, float decay,
          float neg_lr) {
    for (int64_t j = j0; j < j1; ++j) {
        int64_t i = base + j;
        float gf = ld(g, gc, i), mf = ld(m, mc, i);
        float c = lerp(gf, mf, k.b1, k.b1m1, k.b1small);
        float u = LEO_U(c, irow, ik[j]) * s;
        float pf = ld(p, pc, i);
        if (use_decay) pf = pf * decay;
        st(p, pc, i, fmaf(neg_lr, u, pf));
        st(m, mc, i, lerp(mf, gf, k.w2, k.w2m1, k.w2small));
    }
}

#if defined(__AVX2__) && LEO_USE_FMA
#define LEO_AVX2_2D 1
#define LEO_PF 512
static inline double hsum_pd(__m256d v) {
    __m128d a = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(a, _mm_unpackhi_pd(a, a)));
}
/* c (8 floats) -> c^2 as two float64 vectors (low and high four lanes); exact. */
static inline void sq_pd(__m256 c, __m256d *lo, __m256d *hi) {
    __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(c)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1));
    *lo = _mm256_mul_pd(a, a); *hi = _mm256_mul_pd(b, b);
}

/* float32 row segment: g, m point at the row start. */
static double sumsq_seg_f32(const float *restrict g, const float *restrict m, int64_t j0, int64_t j1,
                            lerp_consts k, double *restrict cols) {
    const __m256 b1 = _mm256_set1_ps(k.b1), b1m1 = _mm256_set1_ps(k.b1m1);
    __m256d r0 = _mm256_setzero_pd(), r1 = _mm256_setzero_pd(), r2 = _mm256_setzero_pd(), r3 = _mm256_setzero_pd();
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
        _mm_prefetch((const char *)(g + j + LEO_PF), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + j + LEO_PF), _MM_HINT_T0);
        __m256 c0 = lerp8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(m + j), b1, b1m1, k.b1small);
        __m256 c1 = lerp8(_mm256_loadu_ps(g + j + 8), _mm256_loadu_ps(m + j + 8), b1, b1m1, k.b1small);
        __m256d a0, a1, a2, a3;
        sq_pd(c0, &a0, &a1); sq_pd(c1, &a2, &a3);
        r0 = _mm256_add_pd(r0, a0); r1 = _mm256_add_pd(r1, a1);
        r2 = _mm256_add_pd(r2, a2); r3 = _mm256_add_pd(r3, a3);
        _mm256_storeu_pd(cols + j, _mm256_add_pd(_mm256_loadu_pd(cols + j), a0));
        _mm256_storeu_pd(cols + j + 4, _mm256_add_pd(_mm256_loadu_pd(cols + j + 4), a1));
        _mm256_storeu_pd(cols + j + 8, _mm256_add_pd(_mm256_loadu_pd(cols + j + 8), a2));
        _mm256_storeu_pd(cols + j + 12, _mm256_add_pd(_mm256_loadu_pd(cols + j + 12), a3));
    }
    double rs = hsum_pd(_mm256_add_pd(_mm256_add_pd(r0, r1), _mm256_add_pd(r2, r3)));
    for (; j < j1; ++j) {
        float c = lerp(g[j], m[j], k.b1, k.b1m1, k.b1small);
        double c2 = (double)c * (double)c;
        rs += c2; cols[j] += c2;
    }
    return rs;
}

static double usq_seg_f32(const float *restrict g, const float *restrict m, int64_t j0, int64_t j1,
                          lerp_consts k, float irow, const float *restrict ik) {
    const __m256 b1 = _mm256_set1_ps(k.b1), b1m1 = _mm256_set1_ps(k.b1m1), ir = _mm256_set1_ps(irow);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
        _mm_prefetch((const char *)(g + j + LEO_PF), _MM_HINT_T0);
        _mm_prefetch((const char *)(m + j + LEO_PF), _MM_HINT_T0);
        __m256 c0 = lerp8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(m + j), b1, b1m1, k.b1small);
        __m256 c1 = lerp8(_mm256_loadu_ps(g + j + 8), _mm256_loadu_ps(m + j + 8), b1, b1m1, k.b1small);
        __m256 u0 = _mm256_fmadd_ps(c0, _mm256_loadu_ps(ik + j), _mm256_mul_ps(c0, ir));
        __m256 u1 = _mm256_fmadd_ps(c1, _mm256_loadu_ps(ik + j + 8), _mm256_mul_ps(c1, ir));
        __m256d a0, a1, a2, a3;
        sq_pd(u0, &a0, &a1); sq_pd(u1, &a2, &a3);
        s0 = _mm256_add_pd(s0, a0); s1 = _mm256_add_pd(s1, a1);
        s2 = _mm256_add_pd(s2, a2); s3 = _mm256_add_pd(s3, a3);
    }
    double s = hsum_pd(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
    for (; j < j1; ++j) {
        float c = lerp(g[j], m[j], k.b1, k.b1m1, k.b1small);
        float u = LEO_U(c, irow, ik[j]);
        s += (double)u * (double)u;
    }
    return s;
}

static void apply_seg_f32(float *restrict p, const float *restrict g, float *restrict m, int64_t j0, int64_t j1,
                          lerp_consts k, float irow, const float *restrict ik, float s, int use_decay,
                          float decay, float neg_lr) {
    const __m256 b1 = _mm256_set1_ps(k.b1), b1m1 = _mm256_set1_ps(k.b1m1), ir = _mm256_set1_ps(irow);
    const __m256 w2 = _mm256_set1_ps(k.w2), w2m1 = _mm256_set1_ps(k.w2m1);
    const __m256 sv = _mm256_set1_ps(s), dec = _mm256_set1_ps(decay), nlr = _mm256_set1_ps(neg_lr);
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        if (!(j & 15)) {
            _mm_prefetch((const char *)(g + j + LEO_PF), _MM_HINT_T0);
            _mm_prefetch((const char *)(m + j + LEO_PF), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + j + LEO_PF), _MM_HINT_T0);
        }
        __m256 gv = _mm256_loadu_ps(g + j), mv = _mm256_loadu_ps(m + j);
        __m256 c = lerp8(gv, mv, b1, b1m1, k.b1small);
        __m256 u = _mm256_mul_ps(_mm256_fmadd_ps(c, _mm256_loadu_ps(ik + j), _mm256_mul_ps(c, ir)), sv);
        __m256 pv = _mm256_loadu_ps(p + j);
        if (use_decay) pv = _mm256_mul_ps(pv, dec);
        _mm256_storeu_ps(p + j, _mm256_fmadd_ps(nlr, u, pv));
        _mm256_storeu_ps(m + j, lerp8(mv, gv, w2, w2m1, k.w2small));
    }
    for (; j < j1; ++j) {
        float gf = g[j], mf = m[j];
        float c = lerp(gf, mf, k.b1, k.b1m1, k.b1small);
        float u = LEO_U(c, irow, ik[j]) * s;
        float pf = p[j];
        if (use_decay) pf = pf * decay;
        p[j] = fmaf(neg_lr, u, pf);
        m[j] = lerp(mf, gf, k.w2, k.w2m1, k.w2small);
    }
}
#else
#define LEO_AVX2_2D 0
#endif

/* Pass 1: row and column sums of c^2 of an (R, C) matrix, float64, per-thread partials in
   acc[nthreads][R + C] (zeroed by the caller), summed into acc[0]. */
void leo2d_sumsq(const void *g, const void *m, int64_t R, int64_t C, int gc, int mc, float beta1,
                 double *acc, int nthreads) {
    lerp_consts k = make_consts(beta1, 0.0f);
    int64_t n = R * C;
    int nth = n < 65536 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth)
    {
        int t = omp_get_thread_num();
        double *rows = acc + (int64_t)t * (R + C), *cols = rows + R;
        int64_t lo, hi;
        split(n, t, omp_get_num_threads(), 64, &lo, &hi);
        for (int64_t r = lo / C, base = (lo / C) * C; base < hi; ++r, base += C) {
            int64_t j0 = lo > base ? lo - base : 0, j1 = hi - base < C ? hi - base : C;
            double rs;
#if LEO_AVX2_2D
            if (gc == 0 && mc == 0)
                rs = sumsq_seg_f32((const float *)g + base, (const float *)m + base, j0, j1, k, cols);
            else
#endif
            if (gc == 0 && mc == 0) rs = sumsq_seg(g, m, 0, 0, base, j0, j1, k, cols);
            else if (gc == 1 && mc == 0) rs = sumsq_seg(g, m, 1, 0, base, j0, j1, k, cols);
            else if (gc == 1 && mc == 1) rs = sumsq_seg(g, m, 1, 1, base, j0, j1, k, cols);
            else rs = sumsq_seg(g, m, gc, mc, base, j0, j1, k, cols);
            rows[r] += rs;
        }
    }
    for (int t = 1; t < nth; ++t)
        for (int64_t j = 0; j < R + C; ++j) acc[j] += acc[(int64_t)t * (R + C) + j];
}

/* Pass 2: sum of u^2, u = c*ir[row] + c*ik[col] (ir = 1/(r + eps), ik = 1/(k + eps)). */
double leo2d_usq(const void *g, const void *m, int64_t R, int64_t C, int gc, int mc, float beta1,
                 const float *ir, const float *ik, int nthreads) {
    lerp_consts k = make_consts(beta1, 0.0f);
    int64_t n = R * C;
    double total = 0.0;
    int nth = n < 65536 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth) reduction(+: total)
    {
        int64_t lo, hi;
        split(n, omp_get_thread_num(), omp_get_num_threads(), 64, &lo, &hi);
        for (int64_t r = lo / C, base = (lo / C) * C; base < hi; ++r, base += C) {
            int64_t j0 = lo > base ? lo - base : 0, j1 = hi - base < C ? hi - base : C;
#if LEO_AVX2_2D
            if (gc == 0 && mc == 0)
                total += usq_seg_f32((const float *)g + base, (const float *)m + base, j0, j1, k, ir[r], ik);
            else
#endif
            if (gc == 0 && mc == 0) total += usq_seg(g, m, 0, 0, base, j0, j1, k, ir[r], ik);
            else if (gc == 1 && mc == 0) total += usq_seg(g, m, 1, 0, base, j0, j1, k, ir[r], ik);
            else if (gc == 1 && mc == 1) total += usq_seg(g, m, 1, 1, base, j0, j1, k, ir[r], ik);
            else total += usq_seg(g, m, gc, mc, base, j0, j1, k, ir[r], ik);
        }
    }
    return total;
}

/* Pass 3: p <- p*(1 - lr*wd) - lr*(s*u); m <- lerp(m, g, 1 - beta2). */
void leo2d_apply(void *p, const void *g, void *m, int64_t R, int64_t C, int pc, int gc, int mc,
                 float beta1, float w2, const float *ir, const float *ik, float s,
                 int use_decay, float decay, float neg_lr, int nthreads) {
    lerp_consts k = make_consts(beta1, w2);
    int64_t n = R * C;
    int nth = n < 65536 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth)
    {
        int64_t lo, hi;
        split(n, omp_get_thread_num(), omp_get_num_threads(), 64, &lo, &hi);
        for (int64_t r = lo / C, base = (lo / C) * C; base < hi; ++r, base += C) {
            int64_t j0 = lo > base ? lo - base : 0, j1 = hi - base < C ? hi - base : C;
#if LEO_AVX2_2D
            if (pc == 0 && gc == 0 && mc == 0)
                apply_seg_f32((float *)p + base, (const float *)g + base, (float *)m + base, j0, j1, k, ir[r], ik,
                              s, use_decay, decay, neg_lr);
            else
#endif
            if (pc == 0 && gc == 0 && mc == 0)
                apply_seg(p, g, m, 0, 0, 0, base, j0, j1, k, ir[r], ik, s, use_decay, decay, neg_lr);
            else if (pc == 1 && gc == 1 && mc == 0)
                apply_seg(p, g, m, 1, 1, 0, base, j0, j1, k, ir[r], ik, s, use_decay, decay, neg_lr);
            else if (pc == 1 && gc == 1 && mc == 1)
                apply_seg(p, g, m, 1, 1, 1, base, j0, j1, k, ir[r], ik, s, use_decay, decay, neg_lr);
            else
                apply_seg(p, g, m, pc, gc, mc, base, j0, j1, k, ir[r], ik, s, use_decay, decay, neg_lr);
        }
    }
}
"""

_CODES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_info: dict[str, str] = {}


def _torch_uses_fma() -> bool:
    # torch's AVX2/AVX512 vector kernels compute lerp with fmadd; its baseline kernels do not.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cache_dir() -> str:
    d = os.environ.get("LEO_DIST_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "leo_dist")
    return d


def _compile() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    fma = _torch_uses_fma()
    # -ffp-contract=off: only the explicit fmaf calls may fuse, so results equal torch's bit for bit.
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
             f"-DLEO_USE_FMA={int(fma)}"]
    if fma:
        flags += ["-mavx2", "-mfma"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, version, *flags, sys.platform]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"leo_cpu_step_{key}.so")
    _info.update(compiler=cc, flags=" ".join(flags), path=path)
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = os.path.join(tmp, "leo_cpu_step.c")
            out = os.path.join(tmp, "leo_cpu_step.so")
            with open(src, "w") as f:
                f.write(_C_SOURCE)
            res = subprocess.run([cc, *flags, src, "-o", out, "-lm"], capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed:\n{res.stderr[-2000:]}")
            os.replace(out, path)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(path)
    vp, i64, i32, f32, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_int
    P = ctypes.POINTER
    lib.lion_multi.argtypes = [i64, P(vp), P(vp), P(vp), P(i64), P(i32), f32, f32, i, f32, f32, i]
    lib.lion_multi.restype = None
    lib.sign_shard.argtypes = [vp, vp, vp, vp, i64, i64, i, i, f32, f32, i]
    lib.sign_shard.restype = i
    lib.apply_signs.argtypes = [vp, vp, vp, i64, i, i, f32, f32, i]
    lib.apply_signs.restype = None
    lib.leo2d_sumsq.argtypes = [vp, vp, i64, i64, i, i, f32, vp, i]
    lib.leo2d_sumsq.restype = None
    lib.leo2d_usq.argtypes = [vp, vp, i64, i64, i, i, f32, vp, vp, i]
    lib.leo2d_usq.restype = ctypes.c_double
    lib.leo2d_apply.argtypes = [vp, vp, vp, i64, i64, i, i, i, f32, f32, vp, vp, f32, i, f32, f32, i]
    lib.leo2d_apply.restype = None
    return lib


def _need() -> ctypes.CDLL:
    lib = _get()
    if lib is None:
        raise RuntimeError(f"leo_dist.cpu_step is not available ({build_info()}); check available() first")
    return lib


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("LEO_DIST_CPU_EXT", "1") == "0":
                _info["disabled"] = "LEO_DIST_CPU_EXT=0"
            else:
                try:
                    _lib = _compile()
                except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                    _info["error"] = str(e)
                    warnings.warn(f"leo_dist: the fast CPU step could not be built ({e}); using the slower "
                                  "torch path (same results). Install a C compiler to enable it.",
                                  RuntimeWarning, stacklevel=3)
            _tried = True
    return _lib


def available() -> bool:
    """True when the C library is built and loaded (building it on first call, ~0.5 s)."""
    return _get() is not None


def build_info() -> dict[str, str]:
    """Compiler, flags and path of the built library, or the reason it is not available."""
    _get()
    return dict(_info)


def supports(*tensors: Tensor) -> bool:
    """True when every tensor is a contiguous CPU float32/bfloat16 tensor (what the C code reads)."""
    return all(t.device.type == "cpu" and t.dtype in _CODES and t.is_contiguous() for t in tensors)


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


def _decay(lr: float, weight_decay: float) -> tuple[int, float]:
    return (1, 1.0 - lr * weight_decay) if weight_decay != 0.0 else (0, 1.0)


def lion_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
               lr: float, beta1: float, beta2: float, weight_decay: float, sign_scale: float = 1.0) -> None:
    """One Lion (or Leo sign-rule, ``sign_scale=align``) step over paired lists, in one pass.

    Same contract as :func:`leo_dist.functional.lion_update`; ``params`` and ``exp_avgs`` are
    modified in place. Every tensor must satisfy :func:`supports`; call only when :func:`available`.
    """
    lib = _need()
    n = len(params)
    if n == 0:
        return
    if not (len(grads) == n == len(exp_avgs)):
        raise ValueError("params, grads and exp_avgs must have the same length")
    ptrs = (ctypes.c_void_p * n)
    ps, gs, ms = ptrs(*[t.data_ptr() for t in params]), ptrs(*[t.data_ptr() for t in grads]), \
        ptrs(*[t.data_ptr() for t in exp_avgs])
    sizes = (ctypes.c_int64 * n)(*[t.numel() for t in params])
    for p, g, m in zip(params, grads, exp_avgs):
        if g.numel() != p.numel() or m.numel() != p.numel():
            raise ValueError("each grad and exp_avg must have as many elements as its parameter")
    codes = (ctypes.c_int32 * (3 * n))(*[_CODES[t.dtype] for trio in zip(params, grads, exp_avgs) for t in trio])
    use_decay, decay = _decay(lr, weight_decay)
    lib.lion_multi(n, ps, gs, ms, sizes, codes, beta1, 1.0 - beta2, use_decay, decay, -lr * sign_scale, _nthreads())


def _leo2d_(p: Tensor, g: Tensor, m: Tensor, *, lr: float, beta1: float, beta2: float, weight_decay: float,
            align_const: float, eps: float) -> None:
    lib = _need()
    R, C = p.shape
    nt = _nthreads()
    gc, mc, pc = _CODES[g.dtype], _CODES[m.dtype], _CODES[p.dtype]
    acc = torch.zeros(nt, R + C, dtype=torch.float64)
    lib.leo2d_sumsq(g.data_ptr(), m.data_ptr(), R, C, gc, mc, beta1, acc.data_ptr(), nt)
    norms = acc[0].sqrt().float()
    # Reciprocals once per matrix, so that the passes multiply instead of dividing per element.
    inv = norms.add_(eps).reciprocal_()
    ir, ik = inv[:R], inv[R:]
    usq = lib.leo2d_usq(g.data_ptr(), m.data_ptr(), R, C, gc, mc, beta1, ir.data_ptr(), ik.data_ptr(), nt)
    # The scale in float32, as the reference computes it from a float32 sum.
    s = align_const / (torch.tensor(usq, dtype=torch.float32).div(R * C).add(eps).sqrt().add(eps))
    use_decay, decay = _decay(lr, weight_decay)
    lib.leo2d_apply(p.data_ptr(), g.data_ptr(), m.data_ptr(), R, C, pc, gc, mc, beta1, 1.0 - beta2,
                    ir.data_ptr(), ik.data_ptr(), float(s), use_decay, decay, -lr, nt)


def leo_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *,
              lr: float, beta1: float, beta2: float, weight_decay: float, align_const: float, eps: float,
              orthogonalize: bool = True) -> None:
    """One Leo step, same contract as :func:`leo_dist.functional.leo_update`, in place.

    Sign-rule parameters take one pass (20 B/element fp32); each 2-D parameter three passes over
    ``g, m`` (row/column sums of squares; Σu²; the update), 36 B/element, with no scratch matrix.
    """
    mat = [i for i, p in enumerate(params) if orthogonalize and p.ndim == 2 and p.numel() > 0]
    vec = [i for i, p in enumerate(params) if not (orthogonalize and p.ndim == 2)]
    if vec:
        lion_step_([params[i] for i in vec], [grads[i] for i in vec], [exp_avgs[i] for i in vec],
                   lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, sign_scale=align_const)
    for i in mat:
        _leo2d_(params[i], grads[i], exp_avgs[i], lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                align_const=align_const, eps=eps)


def sign_shard_step_(grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int,
                     beta1: float, beta2: float) -> Tensor:
    """C version of :func:`leo_dist.local_step.sign_shard_step_` (same contract, bitwise equal)."""
    lib = _need()
    S = check_shard_args(grad, exp_avg, bits, zeros, n_valid)
    any_zero = lib.sign_shard(grad.data_ptr(), exp_avg.data_ptr(), bits.data_ptr(), zeros.data_ptr(), S,
                              n_valid, _CODES[grad.dtype], _CODES[exp_avg.dtype], beta1, 1.0 - beta2, _nthreads())
    return torch.tensor(any_zero, dtype=torch.uint8)


def check_shard_args(grad: Tensor, exp_avg: Tensor, bits: Tensor, zeros: Tensor, n_valid: int) -> int:
    """Validate the arguments of a ``sign_shard_step_`` back end; returns the shard size ``S``."""
    S = grad.numel()
    if exp_avg.numel() != S or S % 8:
        raise ValueError(f"grad and exp_avg must have the same size, a multiple of 8; got {S} and {exp_avg.numel()}")
    for name, t in (("bits", bits), ("zeros", zeros)):
        if t.dtype != torch.uint8 or t.numel() != S // 8 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous uint8 tensor of {S // 8} bytes")
    if not 0 <= n_valid <= S:
        raise ValueError(f"n_valid must be in [0, {S}], got {n_valid}")
    return S


def check_apply_args(param: Tensor, bits: Tensor, zeros: Tensor | None) -> None:
    """Validate the arguments of an ``apply_signs_`` back end."""
    nb = (param.numel() + 7) // 8
    for name, t in (("bits", bits), ("zeros", zeros)):
        if t is not None and (t.dtype != torch.uint8 or t.numel() < nb or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous uint8 tensor of at least {nb} bytes")
    if not param.is_contiguous():
        raise ValueError("param must be contiguous")


def apply_signs_(param: Tensor, bits: Tensor, zeros: Tensor | None, lr: float, weight_decay: float,
                 scale: float) -> None:
    """C version of :func:`leo_dist.local_step.apply_signs_` (same contract)."""
    lib = _need()
    check_apply_args(param, bits, zeros)
    use_decay, decay = _decay(lr, weight_decay)
    lib.apply_signs(param.data_ptr(), bits.data_ptr(), zeros.data_ptr() if zeros is not None else None,
                    param.numel(), _CODES[param.dtype], use_decay, decay, -lr * scale, _nthreads())
