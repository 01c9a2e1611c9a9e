/* Channel-sparse SwiGLU FFN for one token (decode), CPU, fp32.
 *
 * Weights are channel-major, one record per intermediate channel i:  W[i][0][:] = gate row,
 * W[i][1][:] = up row, W[i][2][:] = down column (all H floats, contiguous: 3*H*4 bytes per
 * channel). Executing a channel set S reads only the records of S, in order, with no gather
 * copy: this is what makes channel granularity "hardware-aligned" for a batch-1 GEMV.
 *
 *     a_i = silu(gate_i . x) * (up_i . x)            for i in S
 *     resid += sum_{i in S} a_i * down_i             (the residual add is fused)
 *
 * Support prediction (the sensing step) also lives here so that one call per layer senses,
 * recovers and executes:  y = Phi x  (m measurements),  s = B y  (one score per channel,
 * a least-squares decoder fitted on calibration traces),  S = top-k(s).
 *
 * Loaded with ctypes (no Python C-API): every function takes raw pointers and sizes.
 * Threads: OpenMP, `nthreads` per call; each thread owns a contiguous slice of S and its own
 * partial output (scratch), reduced at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CS_ABI_VERSION 4

int cs_abi_version(void) { return CS_ABI_VERSION; }

static inline float dotf(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
    return s;
}

/* gate . x and up . x in one pass over x, with 4 independent accumulators per product so the
 * FMA latency chain does not bound a 576-long dot (H must be a multiple of 16 for the
 * vector path; a scalar tail handles the rest). */
static inline void dot2(const float *restrict a, const float *restrict b, const float *restrict x,
                        int64_t n, float *ga, float *ub, const float *next) {
    float sa[4][16] = {{0}}, sb[4][16] = {{0}};
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        if (next) { /* the next record's gate and up lines at the same offset: a scattered record
                     * set then streams like a contiguous one (the prefetcher cannot guess it) */
            for (int c = 0; c < 64; c += 16) {
                __builtin_prefetch(next + j + c);
                __builtin_prefetch(next + n + j + c);
            }
        }
        for (int q = 0; q < 4; ++q) {
#pragma omp simd
            for (int v = 0; v < 16; ++v) {
                sa[q][v] += a[j + 16 * q + v] * x[j + 16 * q + v];
                sb[q][v] += b[j + 16 * q + v] * x[j + 16 * q + v];
            }
        }
    }
    float ta = 0.0f, tb = 0.0f;
    for (; j < n; ++j) { ta += a[j] * x[j]; tb += b[j] * x[j]; }
    for (int q = 0; q < 4; ++q)
        for (int v = 0; v < 16; ++v) { ta += sa[q][v]; tb += sb[q][v]; }
    *ga = ta;
    *ub = tb;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* One thread's share of the FFN: records idx[lo..hi) into its partial output y[H]. */
static void ffn_f32_part(const float *restrict W, int64_t H, const float *restrict x,
                         const int32_t *restrict idx, int64_t lo, int64_t hi, float *restrict y,
                         float *restrict act) {
    for (int64_t r = lo; r < hi; ++r) {
        int64_t i = idx ? idx[r] : r;
        const float *rec = W + (size_t)i * 3 * (size_t)H;
        const float *next = r + 1 < hi ? W + (size_t)(idx ? idx[r + 1] : r + 1) * 3 * (size_t)H : NULL;
        float g, u;
        dot2(rec, rec + H, x, H, &g, &u, next);
        float a = silu(g) * u;
        if (act) act[r] = a;
        const float *d = rec + 2 * H;
        for (int64_t j = 0; j < H; j += 64) {
            if (next)
                for (int c = 0; c < 64 && j + c < H; c += 16) __builtin_prefetch(next + 2 * H + j + c);
            const int64_t e = j + 64 < H ? j + 64 : H;
#pragma omp simd
            for (int64_t jj = j; jj < e; ++jj) y[jj] += a * d[jj];
        }
    }
}

static void reduce_into(float *restrict resid, const float *restrict scratch, int64_t H, int nthreads) {
    for (int tt = 0; tt < nthreads; ++tt) {
        const float *y = scratch + (size_t)tt * (size_t)H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) resid[j] += y[j];
    }
}

/* ---- 8-bit records -------------------------------------------------------------------------
 * The same channel-major record with each of the three rows stored as int8 codes in blocks of
 * 32 along H, each block with a float (scale, offset): w = scale*q + offset. A row is
 * H bytes of codes followed by (H/32) (scale, offset) pairs; a record is 3 rows (gate, up,
 * down column). 3.2x fewer bytes than fp32 for a memory-bound kernel; Q4_1-dequantized
 * weights sit on a 16-level grid per block, which this asymmetric 256-level code reproduces
 * to within 1/510 of the block range. H must be a multiple of 32. */
#define QB 32

static inline int64_t q8_row_bytes(int64_t H) { return H + (H / QB) * 2 * (int64_t)sizeof(float); }

static inline float q8_dot(const int8_t *restrict q, const float *restrict x, const float *restrict xs,
                           int64_t H) {
    const float *sm = (const float *)(q + H);
    float acc[QB] = {0};
    float off = 0.0f;
    for (int64_t b = 0; b < H / QB; ++b) {
        const float sc = sm[2 * b];
        const int8_t *qb = q + b * QB;
        const float *xb = x + b * QB;
#pragma omp simd
        for (int j = 0; j < QB; ++j) acc[j] += sc * (float)qb[j] * xb[j];
        off += sm[2 * b + 1] * xs[b];
    }
    float t = off;
    for (int j = 0; j < QB; ++j) t += acc[j];
    return t;
}

static inline void q8_axpy(const int8_t *restrict q, float a, float *restrict y, int64_t H) {
    const float *sm = (const float *)(q + H);
    for (int64_t b = 0; b < H / QB; ++b) {
        const float as = a * sm[2 * b], ao = a * sm[2 * b + 1];
        const int8_t *qb = q + b * QB;
        float *yb = y + b * QB;
#pragma omp simd
        for (int j = 0; j < QB; ++j) yb[j] += as * (float)qb[j] + ao;
    }
}

static void q8_block_sums(const float *restrict x, int64_t H, float *restrict xs) {
    for (int64_t b = 0; b < H / QB; ++b) {
        float t = 0.0f;
        for (int j = 0; j < QB; ++j) t += x[b * QB + j];
        xs[b] = t;
    }
}

static void ffn_q8_part(const int8_t *restrict W8, int64_t H, const float *restrict x,
                        const float *restrict xs, const int32_t *restrict idx, int64_t lo, int64_t hi,
                        float *restrict y, float *restrict act) {
    const int64_t rb = q8_row_bytes(H), rec = 3 * rb;
    for (int64_t r = lo; r < hi; ++r) {
        int64_t i = idx ? idx[r] : r;
        const int8_t *g = W8 + (size_t)i * (size_t)rec;
        if (r + 1 < hi) __builtin_prefetch(W8 + (size_t)(idx ? idx[r + 1] : r + 1) * (size_t)rec);
        float gv = q8_dot(g, x, xs, H);
        float uv = q8_dot(g + rb, x, xs, H);
        float a = silu(gv) * uv;
        if (act) act[r] = a;
        q8_axpy(g + 2 * rb, a, y, H);
    }
}

/* One thread's share for either record format (fmt 0 = fp32, 1 = 8-bit). */
static void ffn_part(const void *W, int fmt, int64_t H, const float *restrict x, const float *restrict xs,
                     const int32_t *restrict idx, int64_t lo, int64_t hi, float *restrict y,
                     float *restrict act) {
    if (fmt == 1)
        ffn_q8_part((const int8_t *)W, H, x, xs, idx, lo, hi, y, act);
    else
        ffn_f32_part((const float *)W, H, x, idx, lo, hi, y, act);
}

static int bad_shape(const void *W, int fmt, int64_t H, int64_t I, int nthreads) {
    return !W || H <= 0 || I <= 0 || nthreads <= 0 || (fmt != 0 && fmt != 1) ||
           (fmt == 1 && (H % QB || H > 4096));
}

/* resid[H] += FFN restricted to channels idx[0..k) (idx == NULL: all I channels, k ignored).
 * act (optional, length k or I): the activations a_i of the executed channels, in order.
 * scratch: nthreads * H floats. Returns 0, or -1 on bad arguments. */
static int ffn_run(const void *W, int fmt, int64_t H, int64_t I, const float *restrict x,
                   const int32_t *restrict idx, int64_t k, float *restrict resid, float *restrict act,
                   float *restrict scratch, int nthreads) {
    if (bad_shape(W, fmt, H, I, nthreads) || !x || !resid || !scratch) return -1;
    if (!idx) k = I;
    if (k < 0 || k > I) return -1;
    float xs[4096 / QB];
    if (fmt == 1) q8_block_sums(x, H, xs);
    memset(scratch, 0, sizeof(float) * (size_t)H * (size_t)nthreads);
#pragma omp parallel num_threads(nthreads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        ffn_part(W, fmt, H, x, xs, idx, k * t / nt, k * (t + 1) / nt, scratch + (size_t)t * (size_t)H, act);
    }
    reduce_into(resid, scratch, H, nthreads);
    return 0;
}

int cs_ffn_f32(const float *W, int64_t H, int64_t I, const float *x, const int32_t *idx, int64_t k,
               float *resid, float *act, float *scratch, int nthreads) {
    return ffn_run(W, 0, H, I, x, idx, k, resid, act, scratch, nthreads);
}

/* As cs_ffn_f32 on 8-bit records (W8: I records of 3*q8_row_bytes(H) bytes). H <= 4096. */
int cs_ffn_q8(const int8_t *W8, int64_t H, int64_t I, const float *x, const int32_t *idx, int64_t k,
              float *resid, float *act, float *scratch, int nthreads) {
    return ffn_run(W8, 1, H, I, x, idx, k, resid, act, scratch, nthreads);
}

static int cmp_desc(const void *a, const void *b) {
    float fa = *(const float *)a, fb = *(const float *)b;
    return (fa < fb) - (fa > fb);
}

/* k-th largest value of s[0..n) (1 <= k <= n), by quickselect on a copy in tmp[n]. */
static float kth_largest(const float *s, int64_t n, int64_t k, float *tmp) {
    memcpy(tmp, s, sizeof(float) * (size_t)n);
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (hi - lo > 16) {
        float p = tmp[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (tmp[i] > p) ++i;
            while (tmp[j] < p) --j;
            if (i <= j) { float t = tmp[i]; tmp[i] = tmp[j]; tmp[j] = t; ++i; --j; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return tmp[want];
    }
    qsort(tmp + lo, (size_t)(hi - lo + 1), sizeof(float), cmp_desc);
    return tmp[want];
}

/* The k channels with the largest scores, written to idx in increasing channel order
 * (ties at the threshold taken in channel order). Returns k. */
int64_t cs_topk_sorted(const float *s, int64_t n, int64_t k, int32_t *idx, float *tmp) {
    if (k >= n) { for (int64_t i = 0; i < n; ++i) idx[i] = (int32_t)i; return n; }
    if (k <= 0) return 0;
    float t = kth_largest(s, n, k, tmp);
    int64_t above = 0;
    for (int64_t i = 0; i < n; ++i) above += s[i] > t;
    int64_t ties = k - above, c = 0;
    for (int64_t i = 0; i < n && c < k; ++i) {
        if (s[i] > t) idx[c++] = (int32_t)i;
        else if (s[i] == t && ties > 0) { idx[c++] = (int32_t)i; --ties; }
    }
    return c;
}

/* One layer's sense -> recover -> execute step.
 *   y = Phi[m,H] x ; s = B[I,m] y + bias ; S = top-k(s) ; resid += FFN_S(x)   (bias may be NULL)
 * When `hot` > 0, channels [0, hot) (a calibrated hot core, placed first by the permutation
 * pass) are always executed and the top-(k - hot) of the rest are added.
 * stats[0] (output): the recovery residual, || |a_S| - s_S || / || a_S ||, how far the
 * predicted scores were from the activations actually computed (a cheap fallback signal).
 * fmt: 0 = fp32 records, 1 = 8-bit records. idx_out[k]: the chosen channels. work: m + 2*I floats. Returns k executed, or -1. */
int64_t cs_sensed_ffn(const void *restrict W, int fmt, int64_t H, int64_t I, const float *restrict x,
                      const float *restrict Phi, const float *restrict B, const float *restrict bias,
                      int64_t m, int64_t k, int64_t hot, float *restrict resid, int32_t *restrict idx_out,
                      float *restrict act, float *restrict work, float *restrict scratch,
                      float *restrict stats, int nthreads) {
    if (bad_shape(W, fmt, H, I, nthreads) || !Phi || !B || !act || !x || !resid || !scratch || m <= 0 ||
        k <= 0 || k > I || hot < 0 || hot > k)
        return -1;
    float *y = work, *s = work + m, *tmp = work + m + I;
    float xs[4096 / QB];
    if (fmt == 1) q8_block_sums(x, H, xs);
    memset(scratch, 0, sizeof(float) * (size_t)H * (size_t)nthreads);
    int64_t kk = k;
    /* one team for sensing, selection and execution: every fork/join after an ORT segment
     * costs a wake-up of the sleeping worker */
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r) y[r] = dotf(Phi + (size_t)r * (size_t)H, x, H);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < I; ++i) s[i] = dotf(B + (size_t)i * (size_t)m, y, m) + (bias ? bias[i] : 0.0f);
#pragma omp single
        {
            for (int64_t i = 0; i < hot; ++i) idx_out[i] = (int32_t)i;
            int64_t got = cs_topk_sorted(s + hot, I - hot, k - hot, idx_out + hot, tmp);
            for (int64_t r = hot; r < hot + got; ++r) idx_out[r] += (int32_t)hot;
            kk = hot + got;
        } /* implicit barrier: kk and idx_out are visible to the team */
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        ffn_part(W, fmt, H, x, xs, idx_out, kk * t / nt, kk * (t + 1) / nt, scratch + (size_t)t * (size_t)H, act);
    }
    reduce_into(resid, scratch, H, nthreads);
    k = kk;
    if (stats) {
        double num = 0.0, den = 0.0;
        for (int64_t r = 0; r < k; ++r) {
            double d = fabs((double)act[r]) - (double)s[idx_out[r]];
            num += d * d;
            den += (double)act[r] * (double)act[r];
        }
        stats[0] = (float)(den > 0 ? sqrt(num / den) : 0.0);
    }
    return k;
}
