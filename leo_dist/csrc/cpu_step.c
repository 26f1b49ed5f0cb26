/* The one-pass CPU local step of leo_dist, loaded by leo_dist/cpu_step.py through ctypes.

   No torch headers: the system C compiler builds this file in well under a second, with the flags
   cpu_step.py chooses (-O3 -fopenmp -ffp-contract=off, and -mavx2 -mfma with LEO_USE_FMA=1 when
   torch's own CPU kernels use FMA). The arithmetic mirrors leo_dist/functional.py operation by
   operation, so that sign paths are bitwise equal to torch's; see docs/kernels.md.
   Must compile clean with -Wall -Wextra (tests/test_cpu_step.py checks it). */
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
    (void)wm1;
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

/* ---- The 1-bit gradient codec (leo_dist/onebit.py), one streamed block of all W rows. ----
   Row r of the block: x_r = x + r*xs (float32[c], the local gradient), e_r = err + r*es (float32[c],
   the error feedback, updated), nvalid[r] columns belong to parameters (the rest is padding, sent
   as 0 and kept at 0 in e). Out: bits at out + r*os + bits_off (c/8 bytes, bit k of byte i set
   where x+e > 0 for column 8i+k; x is overwritten with x+e), one float32 scale per run of 1024 columns at out + r*os +
   scales_off (unaligned: memcpy). scale = mean |x+e| over the run's valid columns (summed in
   double), 0 for a run with none; e <- (x+e) - (+-scale), except where that is not finite (e kept).
   c is a multiple of 8. One pass over memory: a run of 1024 floats stays in L1 between its two
   loops. */
#if defined(__AVX2__) && LEO_USE_FMA
/* 8 columns: v = x+e (0 past nv), written back to x; returns their |v| lanes. */
static inline __m256 ob_load(float *xr, const float *er, int64_t j, int64_t nv) {
    __m256 v = _mm256_add_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(er + j));
    if (j + 8 > nv) {
        const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(j - nv)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        v = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), idx)));
    }
    _mm256_storeu_ps(xr + j, v);
    return v;
}
#endif

void onebit_compress(float *x, int64_t xs, float *err, int64_t es, int64_t world, int64_t c,
                     const int64_t *nvalid, uint8_t *out, int64_t os, int64_t bits_off, int64_t scales_off,
                     int nt) {
    const int64_t runs = (c + 1023) / 1024;
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
    for (int64_t r = 0; r < world; r++) {
        for (int64_t q = 0; q < runs; q++) {
            float *xr = x + r * xs;
            float *er = err + r * es;
            const int64_t nv = nvalid[r], lo = q * 1024, hi = lo + 1024 < c ? lo + 1024 : c;
            const int64_t vhi = nv < lo ? lo : (nv < hi ? nv : hi);
            uint8_t *bits = out + r * os + bits_off;
            double sum = 0.0;
            int64_t i = lo;
#if defined(__AVX2__) && LEO_USE_FMA
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            __m256 acc = _mm256_setzero_ps();
            for (; i < hi; i += 8) acc = _mm256_add_ps(acc, _mm256_and_ps(ob_load(xr, er, i, nv), absmask));
            float lanes[8];
            _mm256_storeu_ps(lanes, acc);
            for (int k = 0; k < 8; k++) sum += lanes[k];
#else
            for (; i < hi; i++) {
                const float v = i < nv ? xr[i] + er[i] : 0.0f;
                xr[i] = v;
                sum += fabsf(v);
            }
#endif
            const float scale = vhi > lo ? (float)(sum / (double)(vhi - lo)) : 0.0f;
            memcpy(out + r * os + scales_off + 4 * q, &scale, 4);
            i = lo;
#if defined(__AVX2__) && LEO_USE_FMA
            const __m256 ps = _mm256_set1_ps(scale), ns = _mm256_set1_ps(-scale), zero = _mm256_setzero_ps();
            for (; i < hi; i += 8) {
                const __m256 v = _mm256_loadu_ps(xr + i);
                const __m256 pos = _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
                bits[i / 8] = (uint8_t)_mm256_movemask_ps(pos);
                const __m256 ne = _mm256_sub_ps(v, _mm256_blendv_ps(ns, ps, pos));
                /* finite iff ne - ne == 0; columns past nv take 0 */
                const __m256 fin = _mm256_cmp_ps(_mm256_sub_ps(ne, ne), zero, _CMP_EQ_OQ);
                __m256 e = _mm256_blendv_ps(_mm256_loadu_ps(er + i), ne, fin);
                if (i + 8 > nv) {
                    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(i - nv)),
                                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                    e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), idx)));
                }
                _mm256_storeu_ps(er + i, e);
            }
#else
            for (; i < hi; i += 8) {
                unsigned byte = 0;
                for (int k = 0; k < 8; k++) {
                    const int64_t j = i + k;
                    const float v = xr[j];
                    const unsigned pos = v > 0.0f;
                    byte |= pos << k;
                    const float ne = v - (pos ? scale : -scale);
                    if (j >= nv) er[j] = 0.0f;
                    else if (isfinite(ne)) er[j] = ne;
                }
                bits[i / 8] = (uint8_t)byte;
            }
#endif
        }
    }
}

/* The owner's side: out[j] = (sum over r = 0, 1, ... of +-scale_r(j)) / world, in float32 and in
   rank order (bitwise what unpack, multiply and leo_dist.collectives.sum_in_rank_order give).
   Message r: bits at recv + r*rs + bits_off (bit j of the block), its scales at scales + r*ss + k0
   (float32, one per run of 1024 columns of the shard; k0 = the block's first run). */
void onebit_decode(const uint8_t *recv, int64_t rs, int64_t bits_off, const float *scales, int64_t ss,
                   int64_t k0, int64_t world, int64_t c, float *out, int nt) {
    const float w = (float)world;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < c; i += 8) {
#if defined(__AVX2__) && LEO_USE_FMA
        const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t r = 0; r < world; r++) {
            const __m256i b = _mm256_set1_epi32(recv[r * rs + bits_off + i / 8]);
            const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
            const float sc = scales[r * ss + k0 + i / 1024];
            const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-sc), _mm256_set1_ps(sc), set);
            acc = r == 0 ? v : _mm256_add_ps(acc, v);
        }
        _mm256_storeu_ps(out + i, _mm256_div_ps(acc, _mm256_set1_ps(w)));
#else
        float acc[8] = {0};
        for (int64_t r = 0; r < world; r++) {
            const unsigned byte = recv[r * rs + bits_off + i / 8];
            const float sc = scales[r * ss + k0 + i / 1024];
            for (int k = 0; k < 8; k++) {
                const float v = (byte >> k) & 1u ? sc : -sc;
                acc[k] = r == 0 ? v : acc[k] + v;
            }
        }
        for (int k = 0; k < 8; k++) out[i + k] = acc[k] / w;
#endif
    }
}
