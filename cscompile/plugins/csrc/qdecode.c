/* Native decode step for a Llama-family decoder whose weights are block-quantized (GGUF grids).
 *
 * Why (measured, ../../../BENCHMARKS.md "Native decode step"): SmolLM2 comes as Q4_1
 * (w = d*q + m per block of 32).  ONNX Runtime's fast 4-bit kernel has integer zero points only,
 * so the exact grid costs four extra ops per projection input (block sums of the input times the
 * offsets) -- about 1.6 ms of a 6.2 ms token.  This file computes the exact grid natively:
 *
 *     y[n] = sum_b d[n,b] * (q[n,b,:] . x_b)  +  m[n,b] * S_b,      S_b = sum of x over block b
 *
 * with the activations quantized to int16 per block of 32 (x_b ~= dx_b * xq_b, relative error
 * ~1.5e-5: the fp32 model's quality, where int8 activations lose ~0.4% perplexity), so the
 * dot products run on integer multiply-adds (AVX-512 VPDPWSSD / VPMADDWD).  S_b is the exact
 * fp32 sum.  Q8_0 tensors (w = d*q, the tied LM head and embedding) use the same kernel.
 *
 * Weight layout ("row groups"): rows are taken 16 at a time so that one 512-bit lane holds one
 * output row; per group and block of 32 inputs,
 *   Q4_1: 8 x 32 bytes; byte [t][2r+i] = q[16g+r, 32b+4t+i] | q[16g+r, 32b+4t+2+i] << 4
 *   Q8_0: 16 x 32 bytes; byte [j][2r+i] = q[16g+r, 32b+2j+i]          (int8)
 *   d (and m for Q4_1): 16 fp16 per group and block.
 * (cscompile/plugins/native.py packs them; N is padded to a multiple of 16.)
 *
 * One decode step is one OpenMP parallel region: matrix rows are split across threads, the
 * small serial parts (norms, RoPE, activation quantization) run in `omp single` sections.
 * Loaded with ctypes; no Python C-API.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CS_AVX512 1
#endif

#define CS_DEC_ABI 1
#define QB 32

int cs_dec_abi_version(void) { return CS_DEC_ABI; }

int cs_dec_simd(void) {
#if defined(CS_AVX512) && defined(__AVX512VNNI__)
    return 2;
#elif defined(CS_AVX512)
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    const uint8_t *codes;
    const uint16_t *d; /* fp16 */
    const uint16_t *m; /* fp16, NULL for Q8_0 */
    int32_t n;         /* padded to a multiple of 16 */
    int32_t k;
    int32_t bits; /* 4 (Q4_1) or 8 (Q8_0) */
    int32_t pad;
} cs_qmat;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab, max_ctx, nthreads, pad;
    float eps;
    float pad2;
    const float *attn_norm;  /* [L][H] */
    const float *ffn_norm;   /* [L][H] */
    const float *final_norm; /* [H] */
    const cs_qmat *qkv;      /* [L], rows: q (heads*hd), k (kv*hd), v (kv*hd) */
    const cs_qmat *o;        /* [L] */
    const cs_qmat *gu;       /* [L], rows: gate (inter), up (inter) */
    const cs_qmat *down;     /* [L] */
    const cs_qmat *head;     /* LM head [vocab(padded), H] */
    const cs_qmat *emb;      /* embedding table in the same format (often == head) */
    const float *rope_cos;   /* [max_ctx][hd/2] */
    const float *rope_sin;
    float *kc, *vc; /* [L][kv][max_ctx][hd] */
    float *work;    /* scratch, cs_dec_work_floats() floats */
} cs_model;

static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, f = h & 0x3ff, u;
    if (e == 0) {
        if (f == 0) {
            u = s;
        } else { /* subnormal */
            e = 127 - 15 + 1;
            while (!(f & 0x400)) {
                f <<= 1;
                --e;
            }
            u = s | (e << 23) | ((f & 0x3ff) << 13);
        }
    } else if (e == 31) {
        u = s | 0x7f800000 | (f << 13);
    } else {
        u = s | ((e + 112) << 23) | (f << 13);
    }
    float out;
    memcpy(&out, &u, 4);
    return out;
}

/* x[k] -> xq (int16 per block of 32), dx[b] (scale), S[b] (exact block sums) */
static void quantize_act(const float *x, int k, int16_t *xq, float *dx, float *S) {
    for (int b = 0; b < k / QB; ++b) {
        float amax = 0.0f, s = 0.0f;
        for (int i = 0; i < QB; ++i) {
            float v = x[b * QB + i];
            s += v;
            amax = fmaxf(amax, fabsf(v));
        }
        float sc = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        dx[b] = sc;
        S[b] = s;
        for (int i = 0; i < QB; ++i) xq[b * QB + i] = (int16_t)lrintf(x[b * QB + i] * inv);
    }
}

#ifdef CS_AVX512
#ifdef __AVX512VNNI__
#define DPW(acc, a, b) _mm512_dpwssd_epi32((acc), (a), (b))
#else
#define DPW(acc, a, b) _mm512_add_epi32((acc), _mm512_madd_epi16((a), (b)))
#endif
#endif

/* y[16g .. 16g+15] (=, or += when acc) for groups g in [g0, g1) */
static void qgemv(const cs_qmat *w, const int16_t *xq, const float *dx, const float *S, float *y, int g0,
                  int g1, int acc) {
    const int nb = w->k / QB;
    const int gbytes = w->bits == 4 ? 256 : 512;
    for (int g = g0; g < g1; ++g) {
        const uint8_t *c = w->codes + (size_t)g * nb * gbytes;
        const uint16_t *dd = w->d + (size_t)g * nb * 16;
        const uint16_t *mm = w->m ? w->m + (size_t)g * nb * 16 : NULL;
#ifdef CS_AVX512
        __m512 a = _mm512_setzero_ps();
        const __m512i lowmask = _mm512_set1_epi16(0x000F);
        for (int b = 0; b < nb; ++b, c += gbytes) {
            const int32_t *xp = (const int32_t *)(xq + b * QB);
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            if (w->bits == 4) {
                for (int t = 0; t < 8; t += 2) {
                    __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * t)));
                    __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * t + 32)));
                    s0 = DPW(s0, _mm512_and_si512(w0, lowmask), _mm512_set1_epi32(xp[2 * t]));
                    s1 = DPW(s1, _mm512_srli_epi16(w0, 4), _mm512_set1_epi32(xp[2 * t + 1]));
                    s0 = DPW(s0, _mm512_and_si512(w1, lowmask), _mm512_set1_epi32(xp[2 * t + 2]));
                    s1 = DPW(s1, _mm512_srli_epi16(w1, 4), _mm512_set1_epi32(xp[2 * t + 3]));
                }
            } else {
                for (int j = 0; j < 16; j += 2) {
                    __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * j)));
                    __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * j + 32)));
                    s0 = DPW(s0, w0, _mm512_set1_epi32(xp[j]));
                    s1 = DPW(s1, w1, _mm512_set1_epi32(xp[j + 1]));
                }
            }
            __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dd + 16 * b)));
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                                _mm512_mul_ps(dv, _mm512_set1_ps(dx[b])), a);
            if (mm) {
                __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mm + 16 * b)));
                a = _mm512_fmadd_ps(mv, _mm512_set1_ps(S[b]), a);
            }
        }
        float *yo = y + 16 * g;
        if (acc) a = _mm512_add_ps(a, _mm512_loadu_ps(yo));
        _mm512_storeu_ps(yo, a);
#else
        float a[16] = {0};
        for (int b = 0; b < nb; ++b, c += gbytes) {
            const int16_t *xb = xq + b * QB;
            for (int r = 0; r < 16; ++r) {
                int32_t s = 0;
                if (w->bits == 4) {
                    for (int t = 0; t < 8; ++t)
                        for (int i = 0; i < 2; ++i) {
                            uint8_t v = c[32 * t + 2 * r + i];
                            s += (v & 0x0F) * xb[4 * t + i] + (v >> 4) * xb[4 * t + 2 + i];
                        }
                } else {
                    for (int j = 0; j < 16; ++j)
                        for (int i = 0; i < 2; ++i) s += (int8_t)c[32 * j + 2 * r + i] * xb[2 * j + i];
                }
                a[r] += (float)s * h2f(dd[16 * b + r]) * dx[b];
                if (mm) a[r] += h2f(mm[16 * b + r]) * S[b];
            }
        }
        float *yo = y + 16 * g;
        for (int r = 0; r < 16; ++r) yo[r] = acc ? yo[r] + a[r] : a[r];
#endif
    }
}

/* one row of a quantized matrix, dequantized (the embedding lookup) */
static void qrow(const cs_qmat *w, int n, float *out) {
    const int nb = w->k / QB, g = n / 16, r = n % 16;
    const int gbytes = w->bits == 4 ? 256 : 512;
    for (int b = 0; b < nb; ++b) {
        const uint8_t *c = w->codes + ((size_t)g * nb + b) * gbytes;
        float d = h2f(w->d[((size_t)g * nb + b) * 16 + r]);
        float m = w->m ? h2f(w->m[((size_t)g * nb + b) * 16 + r]) : 0.0f;
        for (int kk = 0; kk < QB; ++kk) {
            int q;
            if (w->bits == 4) {
                int t = kk / 4, i = kk % 2, hi = (kk % 4) >= 2;
                uint8_t v = c[32 * t + 2 * r + i];
                q = hi ? v >> 4 : v & 0x0F;
            } else {
                q = (int8_t)c[32 * (kk / 2) + 2 * r + kk % 2];
            }
            out[b * QB + kk] = d * (float)q + m;
        }
    }
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

static void rope(float *v, const float *cs, const float *sn, int hd) {
    int h = hd / 2;
    for (int i = 0; i < h; ++i) {
        float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i] + a * sn[i];
    }
}

static inline int groups(const cs_qmat *w) { return w->n / 16; }

/* floats of scratch the step needs */
int64_t cs_dec_work_floats(const cs_model *M) {
    int64_t H = M->hidden, I = M->inter, q = (int64_t)M->n_heads * M->head_dim;
    int64_t qkv = q + 2 * (int64_t)M->n_kv * M->head_dim + 16;
    int64_t kmax = H > I ? H : I;
    /* h, xn, qkv, att, gu (2I+16), act, xq (kmax int16 -> kmax/2 floats + 16), dx, S, scores */
    return H + H + qkv + q + 2 * I + 16 + I + kmax / 2 + 16 + kmax / QB + kmax / QB +
           (int64_t)M->n_heads * M->max_ctx + 64;
}

/* One token at position pos: writes K/V at pos and the logits (vocab floats, or the last hidden
 * state when logits == NULL and hidden_out != NULL). Returns 0, or -1 if pos is out of range. */
int cs_dec_step(const cs_model *M, int32_t token, int32_t pos, float *logits) {
    if (pos < 0 || pos >= M->max_ctx || token < 0 || token >= M->vocab) return -1;
    const int H = M->hidden, I = M->inter, hd = M->head_dim, nh = M->n_heads, nkv = M->n_kv;
    const int qd = nh * hd, kvd = nkv * hd, rep = nh / nkv, T = pos + 1;
    const int kmax = H > I ? H : I;
    float *h = M->work, *xn = h + H, *qkv = xn + H, *att = qkv + qd + 2 * kvd + 16, *gu = att + qd,
          *act = gu + 2 * I + 16;
    int16_t *xq = (int16_t *)(act + I);
    float *dx = act + I + kmax / 2 + 16, *S = dx + kmax / QB, *scores = S + kmax / QB;
    const float *cs = M->rope_cos + (size_t)pos * (hd / 2), *sn = M->rope_sin + (size_t)pos * (hd / 2);
    const float scale = 1.0f / sqrtf((float)hd);
    qrow(M->emb, token, h);
#pragma omp parallel num_threads(M->nthreads)
    {
        for (int l = 0; l < M->n_layers; ++l) {
            float *kc = M->kc + (size_t)l * nkv * M->max_ctx * hd, *vc = M->vc + (size_t)l * nkv * M->max_ctx * hd;
#pragma omp single
            {
                rmsnorm(h, M->attn_norm + (size_t)l * H, H, M->eps, xn);
                quantize_act(xn, H, xq, dx, S);
            }
#pragma omp for schedule(static)
            for (int g = 0; g < groups(&M->qkv[l]); ++g) qgemv(&M->qkv[l], xq, dx, S, qkv, g, g + 1, 0);
#pragma omp single
            {
                for (int j = 0; j < nh; ++j) rope(qkv + j * hd, cs, sn, hd);
                for (int j = 0; j < nkv; ++j) {
                    float *k = qkv + qd + j * hd;
                    rope(k, cs, sn, hd);
                    memcpy(kc + ((size_t)j * M->max_ctx + pos) * hd, k, sizeof(float) * hd);
                    memcpy(vc + ((size_t)j * M->max_ctx + pos) * hd, qkv + qd + kvd + j * hd, sizeof(float) * hd);
                }
            }
#pragma omp for schedule(static)
            for (int j = 0; j < nh; ++j) {
                const float *q = qkv + j * hd;
                const float *K = kc + (size_t)(j / rep) * M->max_ctx * hd, *V = vc + (size_t)(j / rep) * M->max_ctx * hd;
                float *sc = scores + (size_t)j * M->max_ctx, mx = -INFINITY, den = 0.0f;
                for (int t = 0; t < T; ++t) {
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int i = 0; i < hd; ++i) s += q[i] * K[(size_t)t * hd + i];
                    sc[t] = s * scale;
                    mx = fmaxf(mx, sc[t]);
                }
                for (int t = 0; t < T; ++t) {
                    sc[t] = expf(sc[t] - mx);
                    den += sc[t];
                }
                float *o = att + j * hd;
                for (int i = 0; i < hd; ++i) o[i] = 0.0f;
                for (int t = 0; t < T; ++t) {
                    float p = sc[t] / den;
#pragma omp simd
                    for (int i = 0; i < hd; ++i) o[i] += p * V[(size_t)t * hd + i];
                }
            }
#pragma omp single
            quantize_act(att, qd, xq, dx, S);
#pragma omp for schedule(static)
            for (int g = 0; g < groups(&M->o[l]); ++g) qgemv(&M->o[l], xq, dx, S, h, g, g + 1, 1);
#pragma omp single
            {
                rmsnorm(h, M->ffn_norm + (size_t)l * H, H, M->eps, xn);
                quantize_act(xn, H, xq, dx, S);
            }
#pragma omp for schedule(static)
            for (int g = 0; g < groups(&M->gu[l]); ++g) qgemv(&M->gu[l], xq, dx, S, gu, g, g + 1, 0);
#pragma omp single
            {
                for (int i = 0; i < I; ++i) {
                    float a = gu[i];
                    act[i] = a / (1.0f + expf(-a)) * gu[I + i];
                }
                quantize_act(act, I, xq, dx, S);
            }
#pragma omp for schedule(static)
            for (int g = 0; g < groups(&M->down[l]); ++g) qgemv(&M->down[l], xq, dx, S, h, g, g + 1, 1);
        }
#pragma omp single
        {
            rmsnorm(h, M->final_norm, H, M->eps, xn);
            quantize_act(xn, H, xq, dx, S);
        }
        if (logits) {
#pragma omp for schedule(static)
            for (int g = 0; g < groups(M->head); ++g) qgemv(M->head, xq, dx, S, logits, g, g + 1, 0);
        }
    }
    return 0;
}

/* the quantized matrix-vector product alone (tests and the kernel benchmark): y = W x */
void cs_dec_gemv(const cs_qmat *w, const float *x, float *y, int nthreads, float *work) {
    int16_t *xq = (int16_t *)work;
    float *dx = work + w->k / 2 + 16, *S = dx + w->k / QB;
    quantize_act(x, w->k, xq, dx, S);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int g = 0; g < groups(w); ++g) qgemv(w, xq, dx, S, y, g, g + 1, 0);
}
