/* Ring sums of one channels-last (H, W, C) image for a strip of output rows, written side by side
 * as the (pixels, R * C) ring-major operand of the SRE-Conv mixing GEMM.
 *
 * Why C: in torch every ring is its own depthwise convolution over the strip (oneDNN, 2-10 Gadd/s
 * on these shapes, plus a copy into the GEMM operand); here each pixel's C-vector sums stay in
 * registers and land in place, so the ring sums cost a fraction of the GEMM instead of half the layer.
 * bf16 inputs are summed in float32 and rounded once (to nearest even), like oneDNN's depthwise
 * kernels: hard-ring sums of bf16 values are exact in float32, so any tap order gives the same bits.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

#define MAX_C 8192
/* Channels summed at once: 4 zmm registers of float32. */
#define CB 64

typedef struct {
    const void *x;
    int64_t h, w, c;
    void *out;
    int64_t y0, w_out, stride, pad;
    const int32_t *dy, *dx, *start;
    const float *wt;
    int64_t rings;
    int bf16;
    /* Offsets (in elements, from the pixel's top-left tap) of every tap, for pixels whose whole
     * kernel lies inside the image; border pixels compact their in-bounds taps per pixel. */
    const int64_t *off;
    int64_t reach_y, reach_x;
} job_t;

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One block of n <= CB channels of one ring: dst[k] = sum_t wt[t] * x[base + off[t] + k].
 * The sums are held in registers across the ring's taps, with two sets for even and odd taps so
 * that consecutive FMAs do not wait on each other (a C array accumulator was kept on the stack by
 * the compiler: a store-forwarding round trip per tap, 3x slower). */
#ifdef HAVE_AVX512
static inline __mmask16 lanes(int64_t n, int v) {
    const int64_t left = n - 16 * v;
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* Whole blocks (n == CB: every block but the last of a channel count that is no multiple of 64)
 * are compiled apart from the tails: on Zen 5 masked loads and stores in every block made the sums
 * up to 1.5x slower than plain ones. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE __m512 load_f32(const float *p, __mmask16 m, const int full) {
    return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

ALWAYS_INLINE void store_f32(float *p, __mmask16 m, __m512 v, const int full) {
    if (full) {
        _mm512_storeu_ps(p, v);
    } else {
        _mm512_mask_storeu_ps(p, m, v);
    }
}

/* A ring's taps in pairs, the even ones into A0-A3 and the odd ones into B0-B3, TAP(p, w, ...)
 * adding tap p with weight w into four accumulators. */
#define TAP_LOOP(TAP, A0, A1, A2, A3, B0, B1, B2, B3)                          \
    int64_t t = 0;                                                             \
    for (; t + 1 < taps; t += 2) {                                             \
        const __m512 u = _mm512_set1_ps(wt[t]), v = _mm512_set1_ps(wt[t + 1]); \
        TAP(x + (base + off[t]), u, A0, A1, A2, A3)                            \
        TAP(x + (base + off[t + 1]), v, B0, B1, B2, B3)                        \
    }                                                                          \
    if (t < taps) {                                                            \
        const __m512 u = _mm512_set1_ps(wt[t]);                                \
        TAP(x + (base + off[t]), u, A0, A1, A2, A3)                            \
    }

#define F32_TAP(P, W, A0, A1, A2, A3)                              \
    {                                                              \
        A0 = _mm512_fmadd_ps(W, load_f32((P), m0, full), A0);      \
        A1 = _mm512_fmadd_ps(W, load_f32((P) + 16, m1, full), A1); \
        A2 = _mm512_fmadd_ps(W, load_f32((P) + 32, m2, full), A2); \
        A3 = _mm512_fmadd_ps(W, load_f32((P) + 48, m3, full), A3); \
    }

ALWAYS_INLINE void sum_f32(const float *x, int64_t base, const int64_t *off, const float *wt, int64_t taps,
                           float *dst, int64_t n, const int full) {
    const __mmask16 m0 = lanes(n, 0), m1 = lanes(n, 1), m2 = lanes(n, 2), m3 = lanes(n, 3);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; /* even taps */
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                  /* odd taps */
    TAP_LOOP(F32_TAP, a0, a1, a2, a3, b0, b1, b2, b3)
    store_f32(dst, m0, _mm512_add_ps(a0, b0), full);
    store_f32(dst + 16, m1, _mm512_add_ps(a1, b1), full);
    store_f32(dst + 32, m2, _mm512_add_ps(a2, b2), full);
    store_f32(dst + 48, m3, _mm512_add_ps(a3, b3), full);
}

static void block_f32(const float *x, int64_t base, const int64_t *off, const float *wt, int64_t taps,
                      float *dst, int64_t n) {
    if (n == CB)
        sum_f32(x, base, off, wt, taps, dst, n, 1);
    else
        sum_f32(x, base, off, wt, taps, dst, n, 0);
}

/* bf16 blocks take 32 channels per 512-bit load and widen them with two integer ops, no shuffle:
 * a lane's high half is the odd channel's bf16, already a float32 once its low half is cleared,
 * and the even channel's becomes one shifted up. The sums stay split by parity, which is the
 * layout the packed result wants back (odd channel's bf16 high, even's low). Widening 16 lanes
 * at a time (vpmovzxwd, a shuffle) made bf16 sums slower than float32 ones on Zen 5. */
static inline __mmask32 lanes32(int64_t n, int v) {
    const int64_t left = n - 32 * v;
    return left >= 32 ? (__mmask32)0xffffffffu : left <= 0 ? (__mmask32)0 : (__mmask32)((1u << left) - 1);
}

ALWAYS_INLINE __m512i load_bf16(const uint16_t *p, __mmask32 m, const int full) {
    return full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
}

/* f32_to_bf16 on 16 lanes, the bf16 left in each lane's high half. */
static inline __m512i round_bf16_hi(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __m512i q = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_and_si512(_mm512_mask_blend_epi32(nan, r, q), _mm512_set1_epi32((int)0xffff0000u));
}

/* The packed bf16 of 32 channels: the odd ones' sums in `odd`, the even ones' in `even`. */
ALWAYS_INLINE void store_bf16(uint16_t *p, __mmask32 m, __m512 even, __m512 odd, const int full) {
    const __m512i v = _mm512_or_si512(round_bf16_hi(odd), _mm512_srli_epi32(round_bf16_hi(even), 16));
    if (full) {
        _mm512_storeu_si512(p, v);
    } else {
        _mm512_mask_storeu_epi16(p, m, v);
    }
}

#define BF16_TAP(P, W, E0, O0, E1, O1)                                                   \
    {                                                                                    \
        const __m512i v0 = load_bf16((P), m0, full), v1 = load_bf16((P) + 32, m1, full); \
        E0 = _mm512_fmadd_ps(W, _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), E0);    \
        O0 = _mm512_fmadd_ps(W, _mm512_castsi512_ps(_mm512_and_si512(v0, hi)), O0);      \
        E1 = _mm512_fmadd_ps(W, _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), E1);    \
        O1 = _mm512_fmadd_ps(W, _mm512_castsi512_ps(_mm512_and_si512(v1, hi)), O1);      \
    }

ALWAYS_INLINE void sum_bf16(const uint16_t *x, int64_t base, const int64_t *off, const float *wt,
                            int64_t taps, uint16_t *dst, int64_t n, const int full) {
    const __mmask32 m0 = lanes32(n, 0), m1 = lanes32(n, 1);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0; /* even taps */
    __m512 f0 = e0, p0 = e0, f1 = e0, p1 = e0;                  /* odd taps */
    TAP_LOOP(BF16_TAP, e0, o0, e1, o1, f0, p0, f1, p1)
    store_bf16(dst, m0, _mm512_add_ps(e0, f0), _mm512_add_ps(o0, p0), full);
    store_bf16(dst + 32, m1, _mm512_add_ps(e1, f1), _mm512_add_ps(o1, p1), full);
}

static void block_bf16(const uint16_t *x, int64_t base, const int64_t *off, const float *wt, int64_t taps,
                       uint16_t *dst, int64_t n) {
    if (n == CB)
        sum_bf16(x, base, off, wt, taps, dst, n, 1);
    else
        sum_bf16(x, base, off, wt, taps, dst, n, 0);
}
#else
static void block_f32(const float *x, int64_t base, const int64_t *off, const float *wt, int64_t taps,
                      float *dst, int64_t n) {
    float a[CB] = {0};
    for (int64_t t = 0; t < taps; t++)
        for (int64_t k = 0; k < n; k++) a[k] += wt[t] * x[base + off[t] + k];
    memcpy(dst, a, (size_t)n * sizeof(float));
}

static void block_bf16(const uint16_t *x, int64_t base, const int64_t *off, const float *wt, int64_t taps,
                       uint16_t *dst, int64_t n) {
    float a[CB] = {0};
    for (int64_t t = 0; t < taps; t++)
        for (int64_t k = 0; k < n; k++) a[k] += wt[t] * bf16_to_f32(x[base + off[t] + k]);
    for (int64_t k = 0; k < n; k++) dst[k] = f32_to_bf16(a[k]);
}
#endif

/* Pixels [p0, p1) of the strip; off2/wt2/start2 are this thread's room for a border pixel's taps. */
static void run(const job_t *j, int64_t p0, int64_t p1, int64_t *off2, float *wt2, int32_t *start2) {
    const int64_t c = j->c, ld = j->rings * c;
    for (int64_t p = p0; p < p1; p++) {
        const int64_t oy = j->y0 + p / j->w_out, ox = p % j->w_out;
        const int64_t iy0 = oy * j->stride - j->pad, ix0 = ox * j->stride - j->pad;
        const int64_t *off = j->off;
        const float *wt = j->wt;
        const int32_t *start = j->start;
        if (iy0 < 0 || ix0 < 0 || iy0 + j->reach_y > j->h || ix0 + j->reach_x > j->w) {
            int64_t k = 0;
            for (int64_t r = 0; r < j->rings; r++) {
                start2[r] = (int32_t)k;
                for (int32_t t = j->start[r]; t < j->start[r + 1]; t++) {
                    const int64_t iy = iy0 + j->dy[t], ix = ix0 + j->dx[t];
                    if (iy < 0 || iy >= j->h || ix < 0 || ix >= j->w) continue;
                    off2[k] = j->off[t], wt2[k] = j->wt[t], k++;
                }
            }
            start2[j->rings] = (int32_t)k;
            off = off2, wt = wt2, start = start2;
        }
        /* Tap offsets count from the kernel's top-left corner, which lies outside the image for
         * border pixels (base < 0); only in-bounds taps are read. */
        const int64_t base = (iy0 * j->w + ix0) * c;
        for (int64_t r = 0; r < j->rings; r++) {
            const int64_t s = start[r], taps = start[r + 1] - s;
            for (int64_t cb = 0; cb < c; cb += CB) {
                const int64_t n = c - cb < CB ? c - cb : CB;
                if (j->bf16) {
                    block_bf16((const uint16_t *)j->x, base + cb, off + s, wt + s, taps,
                               (uint16_t *)j->out + p * ld + r * c + cb, n);
                } else {
                    block_f32((const float *)j->x, base + cb, off + s, wt + s, taps,
                              (float *)j->out + p * ld + r * c + cb, n);
                }
            }
        }
    }
}

/* Returns 0, or -1 where the arguments are out of range or memory ran out (_ring_kernel.ring_sums
 * raises then; supports() keeps SREConv2d within MAX_C).
 * The pixels are split over an OpenMP team: loaded into a torch process this binds to torch's own
 * libgomp (same soname), so the team is torch's thread pool. Threads of a second runtime (pthreads,
 * tried first) ran no faster on 2 threads than on 1, because torch's workers spin after each GEMM
 * and hold the cores they would need. */
int equislide_ring_sums(const void *x, int64_t h, int64_t w, int64_t c, void *out, int64_t y0,
                        int64_t y1, int64_t w_out, int64_t stride, int64_t pad, const int32_t *dy,
                        const int32_t *dx, const float *wt, const int32_t *start, int64_t rings,
                        int bf16, int64_t threads) {
    if (c < 1 || c > MAX_C || y1 <= y0 || w_out < 1 || threads < 1 || rings < 1) return -1;
    const int64_t pixels = (y1 - y0) * w_out, taps = start[rings];
    if (threads > pixels) threads = pixels;
    int64_t *off = malloc((size_t)(taps > 0 ? taps : 1) * sizeof *off);
    if (off == NULL) return -1;
    int64_t reach_y = 1, reach_x = 1;
    for (int64_t t = 0; t < taps; t++) {
        off[t] = ((int64_t)dy[t] * w + dx[t]) * c;
        if (dy[t] + 1 > reach_y) reach_y = dy[t] + 1;
        if (dx[t] + 1 > reach_x) reach_x = dx[t] + 1;
    }
    const job_t j = {x, h, w, c, out, y0, w_out, stride, pad, dy, dx, start, wt, rings,
                     bf16, off, reach_y, reach_x};
    int failed = 0;
#pragma omp parallel num_threads((int)threads) reduction(| : failed)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        const size_t room = (size_t)(taps > 0 ? taps : 1);
        int64_t *off2 = malloc(room * sizeof *off2);
        float *wt2 = malloc(room * sizeof *wt2);
        int32_t *start2 = malloc((size_t)(rings + 1) * sizeof *start2);
        if (off2 && wt2 && start2) {
            run(&j, pixels * t / n, pixels * (t + 1) / n, off2, wt2, start2);
        } else {
            failed = 1;
        }
        free(off2), free(wt2), free(start2);
    }
    free(off);
    return failed ? -1 : 0;
}
