/* Ring sums of one channels-last (H, W, C) image for a strip of output rows, written side by side
 * as the (pixels, R * C) ring-major operand of the SRE-Conv mixing GEMM.
 *
 * Why C: in torch every ring is its own depthwise convolution over the strip (oneDNN, 2-10 Gadd/s
 * on these shapes, plus a copy into the GEMM operand); here each pixel's C-vector sums stay in L1 and
 * land in place, so the ring sums cost a fraction of the GEMM instead of half the layer.
 * bf16 inputs are summed in float32 and rounded once (to nearest even), like oneDNN's depthwise
 * kernels: hard-ring sums of bf16 values are exact in float32, so any tap order gives the same bits.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const void *x;
    int64_t h, w, c;
    void *out;
    int64_t y0, w_out, stride, pad;
    const int32_t *dy, *dx, *start;
    const float *wt;
    int64_t rings;
    int64_t p0, p1;
    int bf16;
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

static void run_f32(const job_t *j) {
    const float *x = (const float *)j->x;
    float *out = (float *)j->out;
    const int64_t c = j->c, ld = j->rings * c;
    for (int64_t p = j->p0; p < j->p1; p++) {
        const int64_t oy = j->y0 + p / j->w_out, ox = p % j->w_out;
        const int64_t iy0 = oy * j->stride - j->pad, ix0 = ox * j->stride - j->pad;
        for (int64_t r = 0; r < j->rings; r++) {
            float *restrict acc = out + p * ld + r * c;
            for (int64_t ch = 0; ch < c; ch++) acc[ch] = 0.0f;
            for (int32_t t = j->start[r]; t < j->start[r + 1]; t++) {
                const int64_t iy = iy0 + j->dy[t], ix = ix0 + j->dx[t];
                if (iy < 0 || iy >= j->h || ix < 0 || ix >= j->w) continue;
                const float *restrict src = x + (iy * j->w + ix) * c;
                const float wt = j->wt[t];
                for (int64_t ch = 0; ch < c; ch++) acc[ch] += wt * src[ch];
            }
        }
    }
}

static void run_bf16(const job_t *j, float *restrict acc) {
    const uint16_t *x = (const uint16_t *)j->x;
    uint16_t *out = (uint16_t *)j->out;
    const int64_t c = j->c, ld = j->rings * c;
    for (int64_t p = j->p0; p < j->p1; p++) {
        const int64_t oy = j->y0 + p / j->w_out, ox = p % j->w_out;
        const int64_t iy0 = oy * j->stride - j->pad, ix0 = ox * j->stride - j->pad;
        for (int64_t r = 0; r < j->rings; r++) {
            for (int64_t ch = 0; ch < c; ch++) acc[ch] = 0.0f;
            for (int32_t t = j->start[r]; t < j->start[r + 1]; t++) {
                const int64_t iy = iy0 + j->dy[t], ix = ix0 + j->dx[t];
                if (iy < 0 || iy >= j->h || ix < 0 || ix >= j->w) continue;
                const uint16_t *restrict src = x + (iy * j->w + ix) * c;
                const float wt = j->wt[t];
                for (int64_t ch = 0; ch < c; ch++) acc[ch] += wt * bf16_to_f32(src[ch]);
            }
            uint16_t *restrict dst = out + p * ld + r * c;
            for (int64_t ch = 0; ch < c; ch++) dst[ch] = f32_to_bf16(acc[ch]);
        }
    }
}

#define MAX_C 8192

static void run(const job_t *j) {
    if (j->bf16) {
        float acc[MAX_C];
        run_bf16(j, acc);
    } else {
        run_f32(j);
    }
}

/* Returns 0, or -1 where the arguments are out of range (_ring_kernel.ring_sums raises then;
 * supports() keeps SREConv2d within MAX_C).
 * The pixels are split over an OpenMP team: loaded into a torch process this binds to torch's own
 * libgomp (same soname), so the team is torch's thread pool. Threads of a second runtime (pthreads,
 * tried first) ran no faster on 2 threads than on 1, because torch's workers spin after each GEMM
 * and hold the cores they would need. */
int equislide_ring_sums(const void *x, int64_t h, int64_t w, int64_t c, void *out, int64_t y0,
                        int64_t y1, int64_t w_out, int64_t stride, int64_t pad, const int32_t *dy,
                        const int32_t *dx, const float *wt, const int32_t *start, int64_t rings,
                        int bf16, int64_t threads) {
    if (c < 1 || c > MAX_C || y1 <= y0 || w_out < 1 || threads < 1) return -1;
    const int64_t pixels = (y1 - y0) * w_out;
    if (threads > pixels) threads = pixels;
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        job_t j = {x, h, w, c, out, y0, w_out, stride, pad, dy, dx, start, wt, rings,
                   pixels * t / n, pixels * (t + 1) / n, bf16};
        run(&j);
    }
    return 0;
}
