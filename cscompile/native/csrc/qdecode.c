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
 * (cscompile/native/engine.py packs them; N is padded to a multiple of 16.)
 *
 * One decode step is one OpenMP parallel region: matrix rows are split across threads, the
 * per-token parts (norms, RoPE, activation quantization, SwiGLU) split the tokens across threads.
 * Loaded with ctypes; no Python C-API.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CS_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CS_AVX2 1 /* 256-bit path: a row group is two halves of 8 rows */
#endif

#define CS_DEC_ABI 12
#define QB 32
/* the most threads an OpenMP region is asked for (cscompile/limits.py MAX_THREADS) */
#define CS_MAX_THREADS 1024

int cs_dec_abi_version(void) { return CS_DEC_ABI; }

/* 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI */
int cs_dec_simd(void) {
#if defined(CS_AVX512) && defined(__AVX512VNNI__)
    return 3;
#elif defined(CS_AVX512)
    return 2;
#elif defined(CS_AVX2)
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
    /* fmt 0: d, m fp16 [G][nb][16] (a GGUF's own d/m); 1: d, m fp32 [G][nb][16] (a K-quant's exact
     * d·sc and -dmin·m, not fp16 values); 2: d fp32 [G][nb][2][16], a scale per 16 codes (Q6_K), 8-bit
     * codes, m (optional) fp32 [G][nb][16].  fmt 1 and 2 run the same integer sums (fmt 2 split in halves) with fp32 scales. */
    int32_t fmt;
    int64_t codes_len, d_len, m_len; /* elements the three buffers hold (checked before any use) */
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
    /* per-layer width (NULL: every layer full).  layer_heads[l] query heads kept (0: attention
     * dropped), head_kv[l*n_heads + j] the KV head kept query head j reads; layer_inter[l] FFN
     * channels kept (0: FFN dropped, else a multiple of 32).  K/V stay whole, so every width
     * shares one cache layout; the matrices of layer l have the kept shapes. */
    const int32_t *layer_heads;
    const int32_t *head_kv;
    const int32_t *layer_inter;
    /* elements each buffer above holds, from the arrays themselves: every size is checked
     * against them (model_error) before a forward touches memory */
    int64_t attn_norm_len, ffn_norm_len, final_norm_len, mats_len, rope_len, kv_len, work_len;
    int64_t width_len, head_kv_len; /* layer_heads and layer_inter; head_kv */
    /* Family features (docs/design.md "Native decode step", Families); zero / NULL everywhere is
     * Llama.  q_norm, k_norm [L][hd]: per-head RMSNorm of every query and key head after the
     * projection, before RoPE (QK-norm).  attn_out_norm, ffn_out_norm [L][H]: RMSNorm of the
     * O-projection and down outputs before their residual adds (Gemma's post-norms).
     * layer_window [L]: keys in the last layer_window[l] positions only (0: all; sliding-window
     * layers).  layer_rope [L]: which of the n_rope RoPE tables a layer rotates with (rope_cos and
     * rope_sin are [n_rope][rows][hd/2], rows = rope_len / (n_rope * hd/2) >= max_ctx; n_rope 0
     * counts as 1).  act: 0 SiLU (SwiGLU), 1 the
     * tanh approximation of GELU (GeGLU).  emb_scale: the embedding rows' factor (0: none);
     * attn_scale: the scores' factor (0: 1/sqrt(head_dim)). */
    const float *q_norm, *k_norm, *attn_out_norm, *ffn_out_norm;
    const int32_t *layer_window, *layer_rope;
    int64_t q_norm_len, k_norm_len, attn_out_norm_len, ffn_out_norm_len, layer_window_len, layer_rope_len;
    int32_t act, n_rope;
    float emb_scale, attn_scale;
    /* qkv_bias [L][(n_heads + 2 n_kv) hd] (NULL: none): added to layer l's Q/K/V rows after the
     * projection, before QK-norm and RoPE (Qwen2); a narrowed layer's kept rows first. */
    const float *qkv_bias;
    int64_t qkv_bias_len;
    /* soft-caps c of c tanh(x / c) (0: none): attn_softcap on the scaled scores before the mask
     * and softmax (a layer with it takes attend_capped, per token), logit_softcap on the LM head's
     * logits (Gemma 2).  The sensed head's rule runs on the logits before the cap (monotone). */
    float attn_softcap, logit_softcap;
    /* OLMo2: no_pre_norm, the attention and the FFN read the residual stream itself (attn_norm and
     * ffn_norm unused; their branch outputs are normed: attn_out_norm, ffn_out_norm);
     * qk_norm_full, q_norm [L][n_heads hd] and k_norm [L][n_kv hd] normalize the whole Q (every
     * head, so no layer may narrow its heads) and the whole K, not each head. */
    int32_t no_pre_norm, qk_norm_full;
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

/* element i of a matrix's scale or offset array: fp16 (fmt 0) or fp32 (fmt 1, 2) */
static inline float sval(const uint16_t *p, int f32, size_t i) {
    return f32 ? ((const float *)(const void *)p)[i] : h2f(p[i]);
}

/* x[k] -> xq (int16 per block of 32), dx[b] (scale), S[b] (block sums; the vector builds add in a
 * tree).  xq and dx are the same numbers in every build: the block's |max| and lrintf's rounding
 * (to nearest even, as the vector conversions). */
static void quantize_act(const float *x, int k, int16_t *xq, float *dx, float *S) {
    for (int b = 0; b < k / QB; ++b) {
        const float *xb = x + b * QB;
        int16_t *qb = xq + b * QB;
#if defined(CS_AVX512)
        const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        dx[b] = amax / 32767.0f;
        S[b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        const __m512 iv = _mm512_set1_ps(inv);
        _mm256_storeu_si256((__m256i *)qb, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v0, iv))));
        _mm256_storeu_si256((__m256i *)(qb + 16), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v1, iv))));
#elif defined(CS_AVX2)
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], m = _mm256_setzero_ps();
        for (int c = 0; c < 4; ++c) {
            v[c] = _mm256_loadu_ps(xb + 8 * c);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[c]));
        }
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
        float pm[8], ps[8];
        _mm256_storeu_ps(pm, m);
        _mm256_storeu_ps(ps, sum);
        float amax = 0.0f;
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, pm[i]);
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        dx[b] = amax / 32767.0f;
        S[b] = ((ps[0] + ps[4]) + (ps[1] + ps[5])) + ((ps[2] + ps[6]) + (ps[3] + ps[7]));
        const __m256 iv = _mm256_set1_ps(inv);
        for (int c = 0; c < 4; c += 2) { /* packs interleaves 128-bit lanes: permute them back */
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], iv)), d = _mm256_cvtps_epi32(_mm256_mul_ps(v[c + 1], iv));
            _mm256_storeu_si256((__m256i *)(qb + 8 * c), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, d), 0xD8));
        }
#else
        float amax = 0.0f, s = 0.0f;
        for (int i = 0; i < QB; ++i) {
            s += xb[i];
            amax = fmaxf(amax, fabsf(xb[i]));
        }
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        dx[b] = amax / 32767.0f;
        S[b] = s;
        for (int i = 0; i < QB; ++i) qb[i] = (int16_t)lrintf(xb[i] * inv);
#endif
    }
}

#ifdef CS_AVX512
#ifdef __AVX512VNNI__
#define DPW(acc, a, b) _mm512_dpwssd_epi32((acc), (a), (b))
#else
#define DPW(acc, a, b) _mm512_add_epi32((acc), _mm512_madd_epi16((a), (b)))
#endif
static inline __m512 sv16(const uint16_t *p, int f32, size_t i) {
    return f32 ? _mm512_loadu_ps((const float *)(const void *)p + i)
               : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + i)));
}
#endif
#ifdef CS_AVX2
static inline __m256 sv8(const uint16_t *p, int f32, size_t i) {
    return f32 ? _mm256_loadu_ps((const float *)(const void *)p + i)
               : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + i)));
}
#endif

/* Bit planes of a Q8_0 head (bits == CS_PLANES; docs/design.md "Sensed vocabulary head"): each
 * int8 code c = 16 h + l, h = c >> 4 in [-8, 7], l = c & 15 in [0, 15], stored as two nibble
 * planes in the Q4_1 byte order (byte [t][2r+i] = v[16g+r, 32b+4t+i] | v[16g+r, 32b+4t+2+i] << 4):
 * the high plane (h, 4-bit two's complement) of every group and block first, then the low plane
 * (l); codes_len and d as the Q8_0 matrix's, no m.  The preview reads the high plane alone,
 * p = sum_b d (16 h.x + 7.5 S_b) (the centre of the codes that share h); the exact product reads
 * both and forms 16 h.x + l.x = c.x in int32 -- the Q8_0 kernel's integer -- then the same float
 * operations as qgemv's Q8_0 path: its logits bit for bit.  A head-only layout (engine.py). */
#define CS_PLANES 48

static void qgemv_planes(const cs_qmat *w, const int16_t *xq, const float *dx, const float *S, float *y, int g0,
                         int g1, int acc, int preview) {
    const int nb = w->k / QB;
    const size_t plane = (size_t)(w->n / 16) * nb * 256;
    for (int g = g0; g < g1; ++g) {
        const uint8_t *ch = w->codes + (size_t)g * nb * 256, *cl = ch + plane;
        const uint16_t *dd = w->d + (size_t)g * nb * 16;
#ifdef CS_AVX512
        __m512 a = _mm512_setzero_ps();
        const __m512i lowmask = _mm512_set1_epi16(0x000F);
        for (int b = 0; b < nb; ++b, ch += 256, cl += 256) {
            const int32_t *xp = (const int32_t *)(xq + b * QB);
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int t = 0; t < 8; t += 2) { /* high plane: signed nibbles */
                __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(ch + 32 * t)));
                __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(ch + 32 * t + 32)));
                s0 = DPW(s0, _mm512_srai_epi16(_mm512_slli_epi16(w0, 12), 12), _mm512_set1_epi32(xp[2 * t]));
                s1 = DPW(s1, _mm512_srai_epi16(w0, 4), _mm512_set1_epi32(xp[2 * t + 1]));
                s0 = DPW(s0, _mm512_srai_epi16(_mm512_slli_epi16(w1, 12), 12), _mm512_set1_epi32(xp[2 * t + 2]));
                s1 = DPW(s1, _mm512_srai_epi16(w1, 4), _mm512_set1_epi32(xp[2 * t + 3]));
            }
            const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dd + 16 * b)));
            if (preview) {
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                                    _mm512_mul_ps(dv, _mm512_set1_ps(16.0f * dx[b])), a);
                a = _mm512_fmadd_ps(dv, _mm512_set1_ps(7.5f * S[b]), a);
                continue;
            }
            __m512i l0 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
            for (int t = 0; t < 8; t += 2) { /* low plane: unsigned nibbles */
                __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(cl + 32 * t)));
                __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(cl + 32 * t + 32)));
                l0 = DPW(l0, _mm512_and_si512(w0, lowmask), _mm512_set1_epi32(xp[2 * t]));
                l1 = DPW(l1, _mm512_srli_epi16(w0, 4), _mm512_set1_epi32(xp[2 * t + 1]));
                l0 = DPW(l0, _mm512_and_si512(w1, lowmask), _mm512_set1_epi32(xp[2 * t + 2]));
                l1 = DPW(l1, _mm512_srli_epi16(w1, 4), _mm512_set1_epi32(xp[2 * t + 3]));
            }
            const __m512i s =
                _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(s0, s1), 4), _mm512_add_epi32(l0, l1));
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx[b])), a);
        }
        float *yo = y + 16 * g;
        if (acc) a = _mm512_add_ps(a, _mm512_loadu_ps(yo));
        _mm512_storeu_ps(yo, a);
#elif defined(CS_AVX2)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(); /* rows 0-7, rows 8-15 */
        const __m256i lowmask = _mm256_set1_epi16(0x000F);
        for (int b = 0; b < nb; ++b, ch += 256, cl += 256) {
            const int32_t *xp = (const int32_t *)(xq + b * QB);
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
            __m256i l0 = _mm256_setzero_si256(), l1 = _mm256_setzero_si256();
            for (int t = 0; t < 8; ++t) {
                const __m256i xl = _mm256_set1_epi32(xp[2 * t]), xh = _mm256_set1_epi32(xp[2 * t + 1]);
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ch + 32 * t)));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ch + 32 * t + 16)));
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_srai_epi16(_mm256_slli_epi16(w0, 12), 12), xl));
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_srai_epi16(w0, 4), xh));
                s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_srai_epi16(_mm256_slli_epi16(w1, 12), 12), xl));
                s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_srai_epi16(w1, 4), xh));
                if (preview) continue;
                const __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cl + 32 * t)));
                const __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cl + 32 * t + 16)));
                l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(_mm256_and_si256(v0, lowmask), xl));
                l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(_mm256_srli_epi16(v0, 4), xh));
                l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(_mm256_and_si256(v1, lowmask), xl));
                l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(_mm256_srli_epi16(v1, 4), xh));
            }
            const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dd + 16 * b)));
            const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dd + 16 * b + 8)));
            if (preview) {
                const __m256 sx = _mm256_set1_ps(16.0f * dx[b]), sb = _mm256_set1_ps(7.5f * S[b]);
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, sx), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d1, sx), a1);
                a0 = _mm256_fmadd_ps(d0, sb, a0);
                a1 = _mm256_fmadd_ps(d1, sb, a1);
                continue;
            }
            s0 = _mm256_add_epi32(_mm256_slli_epi32(s0, 4), l0);
            s1 = _mm256_add_epi32(_mm256_slli_epi32(s1, 4), l1);
            const __m256 sx = _mm256_set1_ps(dx[b]);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, sx), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d1, sx), a1);
        }
        float *yo = y + 16 * g;
        if (acc) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(yo));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(yo + 8));
        }
        _mm256_storeu_ps(yo, a0);
        _mm256_storeu_ps(yo + 8, a1);
#else
        float a[16] = {0};
        for (int b = 0; b < nb; ++b, ch += 256, cl += 256) {
            const int16_t *xb = xq + b * QB;
            for (int r = 0; r < 16; ++r) {
                int32_t sh = 0, sl = 0;
                for (int t = 0; t < 8; ++t)
                    for (int i = 0; i < 2; ++i) {
                        const int8_t v = (int8_t)ch[32 * t + 2 * r + i];
                        const uint8_t u = cl[32 * t + 2 * r + i];
                        sh += (((v & 0x0F) ^ 8) - 8) * xb[4 * t + i] + (v >> 4) * xb[4 * t + 2 + i];
                        sl += (u & 0x0F) * xb[4 * t + i] + (u >> 4) * xb[4 * t + 2 + i];
                    }
                if (preview) {
                    a[r] += (float)sh * h2f(dd[16 * b + r]) * (16.0f * dx[b]);
                    a[r] += h2f(dd[16 * b + r]) * (7.5f * S[b]);
                } else {
                    const int32_t s = 16 * sh + sl;
                    a[r] += (float)s * h2f(dd[16 * b + r]) * dx[b];
                }
            }
        }
        float *yo = y + 16 * g;
        for (int r = 0; r < 16; ++r) yo[r] = acc ? yo[r] + a[r] : a[r];
#endif
    }
}

/* one row of a bit-plane matrix, dequantized (d * c, as qrow's Q8_0 path) */
static void qrow_planes(const cs_qmat *w, int n, float *out) {
    const int nb = w->k / QB, g = n / 16, r = n % 16;
    const size_t plane = (size_t)(w->n / 16) * nb * 256;
    for (int b = 0; b < nb; ++b) {
        const uint8_t *ch = w->codes + ((size_t)g * nb + b) * 256, *cl = ch + plane;
        const float d = h2f(w->d[((size_t)g * nb + b) * 16 + r]);
        for (int kk = 0; kk < QB; ++kk) {
            const int t = kk / 4, i = kk % 2, hi = (kk % 4) >= 2;
            const int8_t v = (int8_t)ch[32 * t + 2 * r + i];
            const uint8_t u = cl[32 * t + 2 * r + i];
            const int q = 16 * (hi ? v >> 4 : ((v & 0x0F) ^ 8) - 8) + (hi ? u >> 4 : u & 0x0F);
            out[b * QB + kk] = d * (float)q + 0.0f;
        }
    }
}

/* y[16g .. 16g+15] (=, or += when acc) for groups g in [g0, g1); fmt a constant after inlining
 * (qgemv below), so the fp16 path compiles to what it was before fmt 1 and 2 existed */
static inline __attribute__((always_inline)) void qgemv_fmt(const cs_qmat *w, const int16_t *xq, const float *dx,
                                                            const float *S, float *y, int g0, int g1, int acc,
                                                            const int fmt) {
    const int nb = w->k / QB;
    const int gbytes = w->bits == 4 ? 256 : 512;
    const int f32 = fmt != 0, half = fmt == 2;
    for (int g = g0; g < g1; ++g) {
        const uint8_t *c = w->codes + (size_t)g * nb * gbytes;
        const size_t si = (size_t)g * nb * 16; /* first scale / offset of the group (fmt 0, 1) */
        const float *dq = half ? (const float *)(const void *)w->d + 2 * si : NULL; /* fmt 2 */
        const uint16_t *mm = w->m;
#ifdef CS_AVX512
        __m512 a = _mm512_setzero_ps();
        const __m512i lowmask = _mm512_set1_epi16(0x000F);
        for (int b = 0; b < nb; ++b, c += gbytes) {
            const int32_t *xp = (const int32_t *)(xq + b * QB);
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            if (half) { /* codes 0..15 and 16..31 of the block have their own scales */
                for (int h = 0; h < 2; ++h) {
                    __m512i s = _mm512_setzero_si512();
                    for (int j = 8 * h; j < 8 * h + 8; ++j)
                        s = DPW(s, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * j))),
                                _mm512_set1_epi32(xp[j]));
                    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                        _mm512_mul_ps(_mm512_loadu_ps(dq + 32 * b + 16 * h), _mm512_set1_ps(dx[b])), a);
                }
                if (mm) a = _mm512_fmadd_ps(sv16(mm, 1, si + 16 * b), _mm512_set1_ps(S[b]), a);
                continue;
            }
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
            __m512 dv = sv16(w->d, f32, si + 16 * b);
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                                _mm512_mul_ps(dv, _mm512_set1_ps(dx[b])), a);
            if (mm) {
                __m512 mv = sv16(mm, f32, si + 16 * b);
                a = _mm512_fmadd_ps(mv, _mm512_set1_ps(S[b]), a);
            }
        }
        float *yo = y + 16 * g;
        if (acc) a = _mm512_add_ps(a, _mm512_loadu_ps(yo));
        _mm512_storeu_ps(yo, a);
#elif defined(CS_AVX2)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(); /* rows 0-7, rows 8-15 */
        const __m256i lowmask = _mm256_set1_epi16(0x000F);
        for (int b = 0; b < nb; ++b, c += gbytes) {
            const int32_t *xp = (const int32_t *)(xq + b * QB);
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
            if (half) { /* codes 0..15 and 16..31 of the block have their own scales */
                const __m256 sx = _mm256_set1_ps(dx[b]);
                for (int h = 0; h < 2; ++h) {
                    __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
                    for (int j = 8 * h; j < 8 * h + 8; ++j) {
                        const __m256i xv = _mm256_set1_epi32(xp[j]);
                        t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * j))), xv));
                        t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * j + 16))), xv));
                    }
                    const float *dh = dq + 32 * b + 16 * h;
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_mul_ps(_mm256_loadu_ps(dh), sx), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_mul_ps(_mm256_loadu_ps(dh + 8), sx), a1);
                }
                if (mm) {
                    const __m256 sb = _mm256_set1_ps(S[b]);
                    a0 = _mm256_fmadd_ps(sv8(mm, 1, si + 16 * b), sb, a0);
                    a1 = _mm256_fmadd_ps(sv8(mm, 1, si + 16 * b + 8), sb, a1);
                }
                continue;
            }
            if (w->bits == 4) {
                for (int t = 0; t < 8; ++t) {
                    const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * t)));
                    const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * t + 16)));
                    const __m256i xl = _mm256_set1_epi32(xp[2 * t]), xh = _mm256_set1_epi32(xp[2 * t + 1]);
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_and_si256(w0, lowmask), xl));
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_srli_epi16(w0, 4), xh));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_and_si256(w1, lowmask), xl));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_srli_epi16(w1, 4), xh));
                }
            } else {
                for (int j = 0; j < 16; ++j) {
                    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * j)));
                    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * j + 16)));
                    const __m256i xv = _mm256_set1_epi32(xp[j]);
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, xv));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w1, xv));
                }
            }
            const __m256 sx = _mm256_set1_ps(dx[b]);
            const __m256 d0 = sv8(w->d, f32, si + 16 * b);
            const __m256 d1 = sv8(w->d, f32, si + 16 * b + 8);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(d0, sx), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(d1, sx), a1);
            if (mm) {
                const __m256 sb = _mm256_set1_ps(S[b]);
                a0 = _mm256_fmadd_ps(sv8(mm, f32, si + 16 * b), sb, a0);
                a1 = _mm256_fmadd_ps(sv8(mm, f32, si + 16 * b + 8), sb, a1);
            }
        }
        float *yo = y + 16 * g;
        if (acc) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(yo));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(yo + 8));
        }
        _mm256_storeu_ps(yo, a0);
        _mm256_storeu_ps(yo + 8, a1);
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
                } else if (half) { /* codes 0..15 and 16..31 of the block have their own scales */
                    for (int h = 0; h < 2; ++h) {
                        int32_t sh = 0;
                        for (int j = 8 * h; j < 8 * h + 8; ++j)
                            for (int i = 0; i < 2; ++i) sh += (int8_t)c[32 * j + 2 * r + i] * xb[2 * j + i];
                        a[r] += (float)sh * (dq[32 * b + 16 * h + r] * dx[b]);
                    }
                    if (mm) a[r] += sval(mm, 1, si + 16 * b + r) * S[b];
                    continue;
                } else {
                    for (int j = 0; j < 16; ++j)
                        for (int i = 0; i < 2; ++i) s += (int8_t)c[32 * j + 2 * r + i] * xb[2 * j + i];
                }
                a[r] += (float)s * sval(w->d, f32, si + 16 * b + r) * dx[b];
                if (mm) a[r] += sval(mm, f32, si + 16 * b + r) * S[b];
            }
        }
        float *yo = y + 16 * g;
        for (int r = 0; r < 16; ++r) yo[r] = acc ? yo[r] + a[r] : a[r];
#endif
    }
}

static void qgemv(const cs_qmat *w, const int16_t *xq, const float *dx, const float *S, float *y, int g0,
                  int g1, int acc) {
    if (w->bits == CS_PLANES)
        qgemv_planes(w, xq, dx, S, y, g0, g1, acc, 0);
    else if (w->fmt == 0)
        qgemv_fmt(w, xq, dx, S, y, g0, g1, acc, 0);
    else if (w->fmt == 1)
        qgemv_fmt(w, xq, dx, S, y, g0, g1, acc, 1);
    else
        qgemv_fmt(w, xq, dx, S, y, g0, g1, acc, 2);
}

/* one row of a quantized matrix, dequantized (the embedding lookup) */
static void qrow(const cs_qmat *w, int n, float *out) {
    if (w->bits == CS_PLANES) {
        qrow_planes(w, n, out);
        return;
    }
    const int nb = w->k / QB, g = n / 16, r = n % 16;
    const int gbytes = w->bits == 4 ? 256 : 512;
    for (int b = 0; b < nb; ++b) {
        const uint8_t *c = w->codes + ((size_t)g * nb + b) * gbytes;
        const int f32 = w->fmt != 0, half = w->fmt == 2;
        const size_t si = ((size_t)g * nb + b) * 16 + r;
        float d = half ? 0.0f : sval(w->d, f32, si);
        float m = w->m ? sval(w->m, f32, si) : 0.0f;
        for (int kk = 0; kk < QB; ++kk) {
            int q;
            if (w->bits == 4) {
                int t = kk / 4, i = kk % 2, hi = (kk % 4) >= 2;
                uint8_t v = c[32 * t + 2 * r + i];
                q = hi ? v >> 4 : v & 0x0F;
            } else {
                q = (int8_t)c[32 * (kk / 2) + 2 * r + kk % 2];
            }
            if (half) d = sval(w->d, 1, ((size_t)g * nb + b) * 32 + 16 * (kk / 16) + r);
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

/* transformers' gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* h[t] += RMSNorm(y[t]) * w for tokens [0, nt) (y overwritten): a branch output normalized before
 * its residual add (Gemma's post-norms).  Inside a parallel region: tokens split across threads. */
static void add_normed(float *h, float *y, const float *w, int H, float eps, int nt) {
#pragma omp for schedule(static)
    for (int t = 0; t < nt; ++t) {
        float *yt = y + (size_t)t * H, *ht = h + (size_t)t * H;
        rmsnorm(yt, w, H, eps, yt);
        for (int i = 0; i < H; ++i) ht[i] += yt[i];
    }
}

/* the RoPE table offset (floats) of layer l at position pos (tables: cs_model's rope fields) */
static inline size_t rope_at(const cs_model *M, int l, int pos) {
    const int64_t half = M->head_dim / 2, rows = M->rope_len / ((M->n_rope > 0 ? M->n_rope : 1) * half);
    return ((size_t)(M->layer_rope ? M->layer_rope[l] : 0) * (size_t)rows + (size_t)pos) * (size_t)half;
}

/* the first key position layer l's query at position pos attends to (its sliding window) */
static inline int window_start(const cs_model *M, int l, int pos) {
    const int win = M->layer_window ? M->layer_window[l] : 0;
    return win > 0 && pos + 1 > win ? pos + 1 - win : 0;
}

static void rope(float *v, const float *cs, const float *sn, int hd) {
    int h = hd / 2;
    for (int i = 0; i < h; ++i) {
        float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i] + a * sn[i];
    }
}

#ifdef CS_AVX2
/* qgemm's AVX2 kernel: row group g, tokens t0 .. t0+tw-1 (tw constant after inlining), one half
 * (8 rows) of the group at a time so the tw integer accumulators stay in registers (16 ymm in
 * all); the halves read disjoint bytes, so each weight byte is loaded once per tw tokens.  The
 * same operations in the same order as qgemv: bit-identical to it. */
static inline __attribute__((always_inline)) void qgemm_avx2(const cs_qmat *w, const int16_t *xq, int xs,
                                                             const float *dx, const float *S, int ss, float *y,
                                                             int ys, int g, int t0, int acc, const int tw,
                                                             const int f32) {
    const int nb = w->k / QB;
    const int gbytes = w->bits == 8 ? 512 : 256;        /* bit planes: each plane's bytes */
    const size_t plane = (size_t)(w->n / 16) * nb * 256; /* the low plane's offset (planes) */
    const __m256i lowmask = _mm256_set1_epi16(0x000F);
    for (int hh = 0; hh < 2; ++hh) { /* rows 8hh .. 8hh+7 */
        __m256 a[8];
        for (int tt = 0; tt < tw; ++tt) a[tt] = _mm256_setzero_ps();
        const uint8_t *c = w->codes + (size_t)g * nb * gbytes + 16 * hh;
        const size_t si = (size_t)g * nb * 16 + 8 * hh; /* scales / offsets of the half (fmt 0, 1) */
        const uint16_t *dd = w->d + si, *mm = w->m ? w->m + si : NULL;                     /* fp16 */
        const float *df = (const float *)(const void *)w->d + si,                           /* fp32 */
            *mf = w->m ? (const float *)(const void *)w->m + si : NULL;
        for (int b = 0; b < nb; ++b, c += gbytes) {
            const int32_t *xp[8];
            for (int tt = 0; tt < tw; ++tt) xp[tt] = (const int32_t *)(xq + (size_t)(t0 + tt) * xs + b * QB);
            __m256i sacc[8];
            for (int tt = 0; tt < tw; ++tt) sacc[tt] = _mm256_setzero_si256();
            if (w->bits == 4) {
                for (int t = 0; t < 8; ++t) {
                    const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * t)));
                    const __m256i lo = _mm256_and_si256(x, lowmask), hi = _mm256_srli_epi16(x, 4);
#pragma GCC unroll 8
                    for (int tt = 0; tt < tw; ++tt) {
                        sacc[tt] = _mm256_add_epi32(sacc[tt], _mm256_madd_epi16(lo, _mm256_set1_epi32(xp[tt][2 * t])));
                        sacc[tt] =
                            _mm256_add_epi32(sacc[tt], _mm256_madd_epi16(hi, _mm256_set1_epi32(xp[tt][2 * t + 1])));
                    }
                }
            } else if (w->bits == CS_PLANES) { /* as qgemm512: c = 16 h + l in int16 lanes */
                for (int t = 0; t < 8; ++t) {
                    const __m256i hb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * t)));
                    const __m256i lb = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + plane + 32 * t)));
                    const __m256i lo =
                        _mm256_add_epi16(_mm256_slli_epi16(_mm256_srai_epi16(_mm256_slli_epi16(hb, 12), 12), 4),
                                         _mm256_and_si256(lb, lowmask));
                    const __m256i hi =
                        _mm256_add_epi16(_mm256_slli_epi16(_mm256_srai_epi16(hb, 4), 4), _mm256_srli_epi16(lb, 4));
#pragma GCC unroll 8
                    for (int tt = 0; tt < tw; ++tt) {
                        sacc[tt] = _mm256_add_epi32(sacc[tt], _mm256_madd_epi16(lo, _mm256_set1_epi32(xp[tt][2 * t])));
                        sacc[tt] =
                            _mm256_add_epi32(sacc[tt], _mm256_madd_epi16(hi, _mm256_set1_epi32(xp[tt][2 * t + 1])));
                    }
                }
            } else {
                for (int j = 0; j < 16; ++j) {
                    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 32 * j)));
#pragma GCC unroll 8
                    for (int tt = 0; tt < tw; ++tt)
                        sacc[tt] = _mm256_add_epi32(sacc[tt], _mm256_madd_epi16(x, _mm256_set1_epi32(xp[tt][j])));
                }
            }
            const __m256 dv =
                f32 ? _mm256_loadu_ps(df + 16 * b) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dd + 16 * b)));
            const __m256 mv = !mm   ? _mm256_setzero_ps()
                              : f32 ? _mm256_loadu_ps(mf + 16 * b)
                                    : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mm + 16 * b)));
#pragma GCC unroll 8
            for (int tt = 0; tt < tw; ++tt) {
                a[tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sacc[tt]),
                                        _mm256_mul_ps(dv, _mm256_set1_ps(dx[(size_t)(t0 + tt) * ss + b])), a[tt]);
                if (mm) a[tt] = _mm256_fmadd_ps(mv, _mm256_set1_ps(S[(size_t)(t0 + tt) * ss + b]), a[tt]);
            }
        }
        for (int tt = 0; tt < tw; ++tt) {
            float *yo = y + (size_t)(t0 + tt) * ys + 16 * g + 8 * hh;
            __m256 v = a[tt];
            if (acc) v = _mm256_add_ps(v, _mm256_loadu_ps(yo));
            _mm256_storeu_ps(yo, v);
        }
    }
}
#endif
/* per-token part after the QKV product: the Q/K/V bias, QK-norm of each kept query head and
 * every KV head, then RoPE (q: nhl heads, then nkv K heads at q + qdl, then nkv V heads) */
static void qk_norm_rope(const cs_model *M, int l, float *q, int nhl, int qdl, const float *cs, const float *sn) {
    const int hd = M->head_dim;
    if (M->qkv_bias) {
        const float *b = M->qkv_bias + (size_t)l * (size_t)(M->n_heads + 2 * M->n_kv) * (size_t)hd;
        for (int r = 0; r < qdl + 2 * M->n_kv * hd; ++r) q[r] += b[r];
    }
    const int full = M->qk_norm_full && M->q_norm; /* whole Q and K (features_error: nhl == n_heads) */
    if (full) {
        rmsnorm(q, M->q_norm + (size_t)l * qdl, qdl, M->eps, q);
        rmsnorm(q + qdl, M->k_norm + (size_t)l * M->n_kv * hd, M->n_kv * hd, M->eps, q + qdl);
    }
    for (int j = 0; j < nhl; ++j) {
        if (M->q_norm && !full) rmsnorm(q + j * hd, M->q_norm + (size_t)l * hd, hd, M->eps, q + j * hd);
        rope(q + j * hd, cs, sn, hd);
    }
    for (int j = 0; j < M->n_kv; ++j) {
        float *k = q + qdl + j * hd;
        if (M->k_norm && !full) rmsnorm(k, M->k_norm + (size_t)l * hd, hd, M->eps, k);
        rope(k, cs, sn, hd);
    }
}

/* Several tokens at once (prefill): each weight operand of a row group and block is expanded
 * once and multiplied with 8 tokens' activations (a partial last group repeats its first token
 * and drops the extra results).  xq/dx/S/y of token t start at t * xs / ss / ys. */
#define TW 8
#ifdef CS_AVX512
/* qgemm's AVX-512 kernel for groups [g0, g1); f32 (fp32 scales, fmt 1) a constant after inlining */
static inline __attribute__((always_inline)) void qgemm512(const cs_qmat *w, const int16_t *xq, int xs,
                                                           const float *dx, const float *S, int ss, float *y, int ys,
                                                           int nt, int g0, int g1, int acc, const int f32) {
    const int nb = w->k / QB;
    const int gbytes = w->bits == 8 ? 512 : 256;               /* bit planes: each plane's bytes */
    const size_t plane = (size_t)(w->n / 16) * nb * 256;        /* the low plane's offset (planes) */
    const __m512i lowmask = _mm512_set1_epi16(0x000F);
    for (int g = g0; g < g1; ++g) {
        for (int t0 = 0; t0 < nt; t0 += TW) {
            const int tn = nt - t0 < TW ? nt - t0 : TW;
            int tok[TW];
            for (int tt = 0; tt < TW; ++tt) tok[tt] = t0 + (tt < tn ? tt : 0);
            __m512 a[TW];
            for (int tt = 0; tt < TW; ++tt) a[tt] = _mm512_setzero_ps();
            const uint8_t *c = w->codes + (size_t)g * nb * gbytes;
            const size_t si = (size_t)g * nb * 16; /* the group's scales / offsets (fmt 0, 1) */
            const uint16_t *mm = w->m;
            for (int b = 0; b < nb; ++b, c += gbytes) {
                const int32_t *xp[TW];
                for (int tt = 0; tt < TW; ++tt) xp[tt] = (const int32_t *)(xq + (size_t)tok[tt] * xs + b * QB);
                __m512i sacc[TW];
                for (int tt = 0; tt < TW; ++tt) sacc[tt] = _mm512_setzero_si512();
                if (w->bits == 4) {
                    for (int t = 0; t < 8; ++t) {
                        const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * t)));
                        const __m512i lo = _mm512_and_si512(x, lowmask), hi = _mm512_srli_epi16(x, 4);
#pragma GCC unroll 8
                        for (int tt = 0; tt < TW; ++tt) {
                            sacc[tt] = DPW(sacc[tt], lo, _mm512_set1_epi32(xp[tt][2 * t]));
                            sacc[tt] = DPW(sacc[tt], hi, _mm512_set1_epi32(xp[tt][2 * t + 1]));
                        }
                    }
                } else if (w->bits == CS_PLANES) {
                    /* the head's bit planes: the int8 codes c = 16 h + l rebuilt in int16 lanes, in
                     * the Q4_1 byte order (low nibbles: inputs 4t+i, high: 4t+2+i), so each sum is
                     * the Q8_0 kernel's integer (qgemv_planes' 16 h.x + l.x): its numbers */
                    for (int t = 0; t < 8; ++t) {
                        const __m512i hb = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * t)));
                        const __m512i lb =
                            _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(c + plane + 32 * t)));
                        const __m512i lo = _mm512_add_epi16(
                            _mm512_slli_epi16(_mm512_srai_epi16(_mm512_slli_epi16(hb, 12), 12), 4),
                            _mm512_and_si512(lb, lowmask));
                        const __m512i hi = _mm512_add_epi16(_mm512_slli_epi16(_mm512_srai_epi16(hb, 4), 4),
                                                            _mm512_srli_epi16(lb, 4));
#pragma GCC unroll 8
                        for (int tt = 0; tt < TW; ++tt) {
                            sacc[tt] = DPW(sacc[tt], lo, _mm512_set1_epi32(xp[tt][2 * t]));
                            sacc[tt] = DPW(sacc[tt], hi, _mm512_set1_epi32(xp[tt][2 * t + 1]));
                        }
                    }
                } else {
                    for (int j = 0; j < 16; ++j) {
                        const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * j)));
#pragma GCC unroll 8
                        for (int tt = 0; tt < TW; ++tt) sacc[tt] = DPW(sacc[tt], x, _mm512_set1_epi32(xp[tt][j]));
                    }
                }
                const __m512 dv = sv16(w->d, f32, si + 16 * b);
                const __m512 mv = mm ? sv16(mm, f32, si + 16 * b) : _mm512_setzero_ps();
#pragma GCC unroll 8
                for (int tt = 0; tt < TW; ++tt) {
                    a[tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sacc[tt]),
                                            _mm512_mul_ps(dv, _mm512_set1_ps(dx[(size_t)tok[tt] * ss + b])), a[tt]);
                    a[tt] = _mm512_fmadd_ps(mv, _mm512_set1_ps(S[(size_t)tok[tt] * ss + b]), a[tt]);
                }
            }
            for (int tt = 0; tt < tn; ++tt) {
                float *yo = y + (size_t)(t0 + tt) * ys + 16 * g;
                __m512 v = a[tt];
                if (acc) v = _mm512_add_ps(v, _mm512_loadu_ps(yo));
                _mm512_storeu_ps(yo, v);
            }
        }
    }
}
#endif
#ifdef CS_AVX2
/* row groups [g0, g1): blocks of 8 tokens, then 4, 2, 1 for the rest (no padded tokens computed) */
static inline __attribute__((always_inline)) void qgemm_avx2_groups(const cs_qmat *w, const int16_t *xq, int xs,
                                                                    const float *dx, const float *S, int ss, float *y,
                                                                    int ys, int nt, int g0, int g1, int acc,
                                                                    const int f32) {
    for (int g = g0; g < g1; ++g) {
        int t0 = 0;
        for (; t0 + 8 <= nt; t0 += 8) qgemm_avx2(w, xq, xs, dx, S, ss, y, ys, g, t0, acc, 8, f32);
        if (nt - t0 >= 4) {
            qgemm_avx2(w, xq, xs, dx, S, ss, y, ys, g, t0, acc, 4, f32);
            t0 += 4;
        }
        if (nt - t0 >= 2) {
            qgemm_avx2(w, xq, xs, dx, S, ss, y, ys, g, t0, acc, 2, f32);
            t0 += 2;
        }
        if (nt - t0 >= 1) qgemm_avx2(w, xq, xs, dx, S, ss, y, ys, g, t0, acc, 1, f32);
    }
}
#endif
#ifdef CS_AVX2
/* fmt 1 out of line: qgemm's fp16 path stays the code it was */
static __attribute__((noinline)) void qgemm_avx2_f32(const cs_qmat *w, const int16_t *xq, int xs, const float *dx,
                                                     const float *S, int ss, float *y, int ys, int nt, int g0, int g1,
                                                     int acc) {
    qgemm_avx2_groups(w, xq, xs, dx, S, ss, y, ys, nt, g0, g1, acc, 1);
}
#endif
static void qgemm(const cs_qmat *w, const int16_t *xq, int xs, const float *dx, const float *S, int ss,
                  float *y, int ys, int nt, int g0, int g1, int acc) {
#if !defined(CS_AVX512) && !defined(CS_AVX2)
    if (w->bits == CS_PLANES) { /* the head's bit planes: token by token per group (its bytes stay in cache) */
        for (int g = g0; g < g1; ++g)
            for (int t = 0; t < nt; ++t)
                qgemv_planes(w, xq + (size_t)t * xs, dx + (size_t)t * ss, S + (size_t)t * ss, y + (size_t)t * ys, g,
                             g + 1, acc, 0);
        return;
    }
#endif
#if defined(CS_AVX512) || defined(CS_AVX2)
    if (w->fmt != 2) { /* fp16 (fmt 0) or fp32 (fmt 1) scales per block */
#ifdef CS_AVX512
        if (w->fmt)
            qgemm512(w, xq, xs, dx, S, ss, y, ys, nt, g0, g1, acc, 1);
        else
            qgemm512(w, xq, xs, dx, S, ss, y, ys, nt, g0, g1, acc, 0);
#else
        if (w->fmt)
            qgemm_avx2_f32(w, xq, xs, dx, S, ss, y, ys, nt, g0, g1, acc);
        else
            qgemm_avx2_groups(w, xq, xs, dx, S, ss, y, ys, nt, g0, g1, acc, 0);
#endif
        return;
    }
#endif
    /* a scale per 16 codes (Q6_K, fmt 2), or the scalar build: token by token through qgemv */
    for (int t = 0; t < nt; ++t)
        qgemv(w, xq + (size_t)t * xs, dx + (size_t)t * ss, S + (size_t)t * ss, y + (size_t)t * ys, g0, g1, acc);
}

#ifdef CS_AVX512
/* e^x for x <= ~88 (here x <= 0): n = round(x log2 e), r = x - n ln 2 (two-part), a degree-6
 * Taylor polynomial on |r| <= 0.35 (relative error < 2e-7), scaled by 2^n. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#ifdef CS_AVX2
/* exp512 at 256 bits (no scalef: 2^n goes into the exponent bits; n >= -126 here) */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* softmax(q K^T * scale) V over positions [0, T): o [hd] (sc: T floats of scratch) */
static void attend(const float *q, const float *K, const float *V, int T, int hd, float scale, float *sc, float *o) {
    float mx = -INFINITY, den = 0.0f;
#ifdef CS_AVX512
    if (hd % 16 == 0 && hd <= 256) {
        const int nv = hd / 16;
        __m512 qv[16], acc[16];
        for (int c = 0; c < nv; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
        for (int u = 0; u < T; ++u) {
            const float *k = K + (size_t)u * hd;
            __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
            for (int c = 1; c < nv; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), a);
            sc[u] = _mm512_reduce_add_ps(a);
            mx = fmaxf(mx, sc[u]);
        }
        __m512 dv = _mm512_setzero_ps();
        const __m512 mv = _mm512_set1_ps(mx);
        int u = 0;
        for (; u + 16 <= T; u += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + u), mv));
            _mm512_storeu_ps(sc + u, e);
            dv = _mm512_add_ps(dv, e);
        }
        if (u < T) {
            const __mmask16 m = (__mmask16)((1u << (T - u)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + u), mv));
            _mm512_mask_storeu_ps(sc + u, m, e);
            dv = _mm512_add_ps(dv, _mm512_maskz_mov_ps(m, e));
        }
        den = _mm512_reduce_add_ps(dv);
        for (int c = 0; c < nv; ++c) acc[c] = _mm512_setzero_ps();
        for (u = 0; u < T; ++u) {
            const __m512 pv = _mm512_set1_ps(sc[u]);
            const float *v = V + (size_t)u * hd;
            for (int c = 0; c < nv; ++c) acc[c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 16 * c), acc[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / den);
        for (int c = 0; c < nv; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], inv));
        return;
    }
#endif
    for (int u = 0; u < T; ++u) {
        float d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (int i = 0; i < hd; ++i) d += q[i] * K[(size_t)u * hd + i];
        sc[u] = d * scale;
        mx = fmaxf(mx, sc[u]);
    }
    int u0 = 0;
#ifdef CS_AVX2
    {
        const __m256 mv = _mm256_set1_ps(mx);
        __m256 dv = _mm256_setzero_ps();
        for (; u0 + 8 <= T; u0 += 8) {
            const __m256 q = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + u0), mv));
            _mm256_storeu_ps(sc + u0, q);
            dv = _mm256_add_ps(dv, q);
        }
        float part[8];
        _mm256_storeu_ps(part, dv);
        for (int i = 0; i < 8; ++i) den += part[i];
    }
#endif
    for (int u = u0; u < T; ++u) {
        sc[u] = expf(sc[u] - mx);
        den += sc[u];
    }
    for (int i = 0; i < hd; ++i) o[i] = 0.0f;
    for (int u = 0; u < T; ++u) {
        const float p = sc[u] / den;
#pragma omp simd
        for (int i = 0; i < hd; ++i) o[i] += p * V[(size_t)u * hd + i];
    }
}

/* attend() with the scores soft-capped, cap tanh(s / cap), before the softmax (Gemma 2); scalar:
 * only soft-capped layers take it */
static void attend_capped(const float *q, const float *K, const float *V, int T, int hd, float scale, float cap,
                          float *sc, float *o) {
    float mx = -INFINITY, den = 0.0f;
    for (int u = 0; u < T; ++u) {
        float a = 0.0f;
        for (int i = 0; i < hd; ++i) a += q[i] * K[(size_t)u * hd + i];
        sc[u] = cap * tanhf(a * scale / cap);
        mx = fmaxf(mx, sc[u]);
    }
    for (int u = 0; u < T; ++u) {
        sc[u] = expf(sc[u] - mx);
        den += sc[u];
    }
    for (int i = 0; i < hd; ++i) o[i] = 0.0f;
    for (int u = 0; u < T; ++u) {
        const float p = sc[u] / den;
        for (int i = 0; i < hd; ++i) o[i] += p * V[(size_t)u * hd + i];
    }
}

/* the logit soft-cap on rows [0, n) of logits (vpad floats each); inside a parallel region */
static void softcap_rows(const cs_model *M, float *logits, int n, int vpad) {
    if (!(M->logit_softcap > 0.0f)) return;
    const float c = M->logit_softcap;
#pragma omp for schedule(static)
    for (int r = 0; r < n; ++r)
        for (int i = 0; i < M->vocab; ++i) logits[(size_t)r * vpad + i] = c * tanhf(logits[(size_t)r * vpad + i] / c);
}

/* Causal attention of a prefill chunk (docs/design.md "Native engine", tiled attention).  attend()
 * streams one head's whole K and V per (token, head), so a chunk of 64 tokens re-read the cache
 * 64 x heads times per layer: long prompts were bound by memory.  Here the work is split into
 * units (a KV head x a block of the chunk's tokens): a unit takes every query that reads its KV
 * head (the block's tokens x the query heads mapped to it, head_kv or j / rep), walks K/V in
 * tiles of AT positions, and folds each tile into every query with an online softmax (running
 * max m and denominator l per query, the output rescaled by e^(m_old - m_new)), so a tile is
 * read from memory once per unit and then stays in L1/L2.  The tile of K is transposed (and
 * scaled) once, so the scores of one query are AT/width independent multiply-adds per
 * dimension.  Token t (position p0 + t) sees keys [0, p0 + t]. */
#if defined(CS_AVX512)
#define AV_W 16
typedef __m512 av_t;
#define av_load _mm512_loadu_ps
#define av_store _mm512_storeu_ps
#define av_set1 _mm512_set1_ps
#define av_zero _mm512_setzero_ps
#define av_fma _mm512_fmadd_ps
#define av_mul _mm512_mul_ps
#define av_max _mm512_max_ps
#define av_add _mm512_add_ps
#define av_sub _mm512_sub_ps
#define av_exp exp512
#define av_div _mm512_div_ps
#define av_negcap(x) _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), (x)), _mm512_set1_ps(88.0f))
#elif defined(CS_AVX2)
#define AV_W 8
typedef __m256 av_t;
#define av_load _mm256_loadu_ps
#define av_store _mm256_storeu_ps
#define av_set1 _mm256_set1_ps
#define av_zero _mm256_setzero_ps
#define av_fma _mm256_fmadd_ps
#define av_mul _mm256_mul_ps
#define av_max _mm256_max_ps
#define av_add _mm256_add_ps
#define av_sub _mm256_sub_ps
#define av_exp exp256
#define av_div _mm256_div_ps
#define av_negcap(x) _mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), (x)), _mm256_set1_ps(88.0f))
#endif
#ifdef AV_W
#define AT (8 * AV_W) /* keys per tile: 8 independent score accumulators */
#else
#define AT 64
#endif
#define AT_SLOT (AT + 16) /* a query's scratch: AT scores, then m and l */
#define AQ_MIN 8          /* the fewest tokens of a unit */

#ifdef AV_W
/* o[0 .. nc*AV_W) = alpha * o + sum_u p[u] V[u] (nc constant after inlining: registers) */
static inline __attribute__((always_inline)) void pv_cols(float *o, const float *V, int hd, const float *p, int nu,
                                                          float alpha, const int nc) {
    av_t acc[8];
    const av_t al = av_set1(alpha);
#pragma GCC unroll 8
    for (int c = 0; c < nc; ++c) acc[c] = av_mul(av_load(o + c * AV_W), al);
    for (int u = 0; u < nu; ++u) {
        const av_t pv = av_set1(p[u]);
        const float *v = V + (size_t)u * hd;
#pragma GCC unroll 8
        for (int c = 0; c < nc; ++c) acc[c] = av_fma(pv, av_load(v + c * AV_W), acc[c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < nc; ++c) av_store(o + c * AV_W, acc[c]);
}
#endif

#ifdef AV_W
/* a query's slot st holding its AT raw scores of the tile (nu visible): the online-softmax step --
 * the scores become e^(s - m_new) (0 past nu), m and l updated; returns alpha = e^(m_old - m_new) */
static inline float tile_softmax(float *st, int nu) {
    float *sc = st, mold = st[AT], mt = -INFINITY;
    for (int u = nu; u < AT; ++u) sc[u] = -INFINITY;
    {
        av_t mx = av_load(sc);
        for (int c = 1; c < 8; ++c) mx = av_max(mx, av_load(sc + c * AV_W));
        float part[AV_W];
        av_store(part, mx);
        for (int k = 0; k < AV_W; ++k) mt = fmaxf(mt, part[k]);
        const float mnew = fmaxf(mold, mt), alpha = expf(mold - mnew);
        const av_t mv = av_set1(mnew);
        av_t dv = av_zero();
        for (int c = 0; c < 8; ++c) {
            const av_t e = av_exp(av_sub(av_load(sc + c * AV_W), mv));
            av_store(sc + c * AV_W, e);
        }
        for (int u = nu; u < AT; ++u) sc[u] = 0.0f; /* exp clamps at e^-87: masked keys weigh 0 */
        for (int c = 0; c < 8; ++c) dv = av_add(dv, av_load(sc + c * AV_W));
        av_store(part, dv);
        float den = 0.0f;
        for (int k = 0; k < AV_W; ++k) den += part[k];
        st[AT] = mnew;
        st[AT + 1] = st[AT + 1] * alpha + den;
        return alpha;
    }
}
#endif

#ifdef AV_W
/* AQ: queries per attend_tiles call (AVX-512's 32 registers hold 4 queries x 4 accumulators, AVX2's 16 two) */
#ifdef CS_AVX512
#define AQ 4
#else
#define AQ 2
#endif
/* attend_tiles' P V: columns c0 .. c0 + AV_W nc of nq queries' outputs, o = alpha o + sum_u p[u] V[u] */
static inline __attribute__((always_inline)) void pv_tiles(float *const *o, int c0, const float *V, int hd,
                                                           float *const *p, const float *al, int nu, const int nq,
                                                           const int nc) {
    av_t a[AQ][4];
#pragma GCC unroll 4
    for (int qq = 0; qq < nq; ++qq)
#pragma GCC unroll 4
        for (int c = 0; c < nc; ++c) a[qq][c] = av_mul(av_load(o[qq] + c0 + AV_W * c), av_set1(al[qq]));
    for (int u = 0; u < nu; ++u) {
        const float *v = V + (size_t)u * hd + c0;
        av_t x[4];
#pragma GCC unroll 4
        for (int c = 0; c < nc; ++c) x[c] = av_load(v + AV_W * c);
#pragma GCC unroll 4
        for (int qq = 0; qq < nq; ++qq) {
            const av_t w = av_set1(p[qq][u]);
#pragma GCC unroll 4
            for (int c = 0; c < nc; ++c) a[qq][c] = av_fma(w, x[c], a[qq][c]);
        }
    }
#pragma GCC unroll 4
    for (int qq = 0; qq < nq; ++qq)
#pragma GCC unroll 4
        for (int c = 0; c < nc; ++c) av_store(o[qq] + c0 + AV_W * c, a[qq][c]);
}

/* attend_tile for nq <= AQ queries of one unit at once (nq constant after inlining; hd a multiple
 * of the vector width).  A query alone loads every K and V vector of the tile for one vector of
 * multiply-adds each, and the tile (K and V, 2 x hd x AT floats) does not fit L1: its reads came
 * from L2.  Here each vector loaded serves nq queries (the scores in two halves of 4 vectors of
 * keys, so AQ queries x 4 accumulators fit the registers).
 * Each query's numbers are attend_tile's: the same operations in the same order (a query's weights
 * past its own visible keys are 0, which leaves its sums unchanged). */
static inline __attribute__((always_inline)) void attend_tiles(const float *const *q, const float *kt,
                                                               const float *V, const int *nus, int hd,
                                                               float *const *st, float *const *o, const int nq) {
    for (int h = 0; h < 2; ++h) {
        av_t a[AQ][4];
#pragma GCC unroll 4
        for (int qq = 0; qq < nq; ++qq)
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) a[qq][c] = av_zero();
        for (int i = 0; i < hd; ++i) {
            const float *kr = kt + (size_t)i * AT + 4 * AV_W * h;
            av_t k[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) k[c] = av_load(kr + AV_W * c);
#pragma GCC unroll 4
            for (int qq = 0; qq < nq; ++qq) {
                const av_t x = av_set1(q[qq][i]);
#pragma GCC unroll 4
                for (int c = 0; c < 4; ++c) a[qq][c] = av_fma(x, k[c], a[qq][c]);
            }
        }
#pragma GCC unroll 4
        for (int qq = 0; qq < nq; ++qq)
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) av_store(st[qq] + 4 * AV_W * h + AV_W * c, a[qq][c]);
    }
    float al[AQ];
    int nu = 0;
    for (int qq = 0; qq < nq; ++qq) {
        al[qq] = tile_softmax(st[qq], nus[qq]);
        nu = nus[qq] > nu ? nus[qq] : nu;
    }
    int c0 = 0;
    for (; c0 + 4 * AV_W <= hd; c0 += 4 * AV_W) pv_tiles(o, c0, V, hd, st, al, nu, nq, 4);
    for (; c0 < hd; c0 += AV_W) pv_tiles(o, c0, V, hd, st, al, nu, nq, 1);
}
#endif

/* one query against one tile (kt: [hd][AT] keys transposed and scaled, V: the tile's first value
 * row, nu <= AT keys visible); st: its slot (scores, m, l); o: its output row (unnormalized) */
static void attend_tile(const float *q, const float *kt, const float *V, int nu, int hd, float *st, float *o) {
    float *sc = st, mold = st[AT], mt = -INFINITY;
#ifdef AV_W
    if (hd % AV_W == 0) {
        av_t acc[8];
        for (int c = 0; c < 8; ++c) acc[c] = av_zero();
        for (int i = 0; i < hd; ++i) {
            const av_t qi = av_set1(q[i]);
            const float *kr = kt + (size_t)i * AT;
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) acc[c] = av_fma(qi, av_load(kr + c * AV_W), acc[c]);
        }
        for (int c = 0; c < 8; ++c) av_store(sc + c * AV_W, acc[c]);
        const float alpha = tile_softmax(st, nu);
        int c0 = 0;
        for (; c0 + 64 <= hd; c0 += 64) pv_cols(o + c0, V + c0, hd, sc, nu, alpha, 64 / AV_W);
        for (; c0 < hd; c0 += AV_W) pv_cols(o + c0, V + c0, hd, sc, nu, alpha, 1);
        return;
    }
#endif
    for (int u = 0; u < nu; ++u) {
        float d = 0.0f;
        for (int i = 0; i < hd; ++i) d += q[i] * kt[(size_t)i * AT + u];
        sc[u] = d;
        mt = fmaxf(mt, d);
    }
    const float mnew = fmaxf(mold, mt), alpha = expf(mold - mnew);
    float den = 0.0f;
    for (int u = 0; u < nu; ++u) {
        sc[u] = expf(sc[u] - mnew);
        den += sc[u];
    }
    st[AT] = mnew;
    st[AT + 1] = st[AT + 1] * alpha + den;
    for (int i = 0; i < hd; ++i) o[i] *= alpha;
    for (int u = 0; u < nu; ++u) {
        const float p = sc[u];
#pragma omp simd
        for (int i = 0; i < hd; ++i) o[i] += p * V[(size_t)u * hd + i];
    }
}

static inline int groups(const cs_qmat *w) { return w->n / 16; }

#define CH 64 /* tokens per chunk of a multi-token forward (weights streamed once per chunk) */

typedef struct {
    int qkvd, xs, ss; /* row strides: qkv output, int16 activations, per-block scalars */
    float *h, *xn, *qkv, *att, *gu, *act, *dx, *S, *scores;
    float *slots, *kt; /* attend_chunk: AT_SLOT floats per (token, head); hd x AT per unit */
    int16_t *xq;
} cs_scratch;

static int64_t scratch_layout(const cs_model *M, cs_scratch *s) {
    const int64_t H = M->hidden, I = M->inter, qd = (int64_t)M->n_heads * M->head_dim;
    const int64_t qkvd = qd + 2 * (int64_t)M->n_kv * M->head_dim + 16;
    const int64_t kmax = H > I ? (H > qd ? H : qd) : (I > qd ? I : qd); /* widest matrix input */
    const int64_t xs_f = kmax / 2 + 16, ss = kmax / QB + 1; /* int16 row in floats; scalars */
    float *p = M->work;
    int64_t used = 0;
#define TAKE(ptr, count)                            \
    do {                                            \
        (ptr) = p ? p + used : NULL;                \
        used += (count) + (16 - (count) % 16) % 16; \
    } while (0)
    float *xq;
    cs_scratch tmp; /* counting only (s == NULL): the pointers land here */
    cs_scratch *o = s ? s : &tmp;
    TAKE(o->h, CH * H);
    TAKE(o->xn, CH * H);
    TAKE(o->qkv, CH * qkvd);
    TAKE(o->att, CH * qd);
    TAKE(o->gu, CH * (2 * I + 16));
    TAKE(o->act, CH * I);
    TAKE(xq, CH * xs_f);
    TAKE(o->dx, CH * ss);
    TAKE(o->S, CH * ss);
    TAKE(o->scores, (int64_t)CH * M->n_heads * M->max_ctx);
    TAKE(o->slots, (int64_t)CH * M->n_heads * AT_SLOT);
    TAKE(o->kt, (int64_t)M->n_kv * (CH / AQ_MIN) * M->head_dim * AT);
#undef TAKE
    o->xq = (int16_t *)xq;
    o->qkvd = (int)qkvd;
    o->xs = (int)(2 * xs_f);
    o->ss = (int)ss;
    return used + 64;
}

/* tokens t0..nt-1 of the residual stream RMS-normalized with weights w, then quantized into the
 * activation rows 0.. (row t - t0): the input of the next matrix product.  Inside a parallel
 * region: the tokens are split across threads. */
static void norm_quantize(const cs_scratch *s, const float *w, int H, float eps, int t0, int nt) {
#pragma omp for schedule(static)
    for (int t = t0; t < nt; ++t) {
        const size_t r = (size_t)(t - t0);
        if (w)
            rmsnorm(s->h + (size_t)t * H, w, H, eps, s->xn + (size_t)t * H);
        else /* no norm before the branch (cs_model.no_pre_norm) */
            memcpy(s->xn + (size_t)t * H, s->h + (size_t)t * H, sizeof(float) * H);
        quantize_act(s->xn + (size_t)t * H, H, s->xq + r * s->xs, s->dx + r * s->ss, s->S + r * s->ss);
    }
}

/* Why a forward would be unsafe: 0 when every size the step uses is consistent and fits the
 * buffers it was given.  Python checks the same (native.py validate / check_config) with a
 * message; this is the last line, so a struct that bypassed those checks cannot write out of
 * bounds.  Codes: CS_ERR_DIMS (the model's integers), CS_ERR_THREADS, CS_ERR_BUFFER (a buffer
 * smaller than the model needs), CS_ERR_MATRIX (a matrix whose shape or buffers do not match
 * its role), CS_ERR_WIDTH (a per-layer width out of range). */
enum { CS_ERR_DIMS = -2, CS_ERR_THREADS = -3, CS_ERR_BUFFER = -4, CS_ERR_MATRIX = -5, CS_ERR_WIDTH = -6 };
enum { CS_ERR_FEATURE = -8 }; /* a family feature (activation, scales, RoPE tables, windows, norms) */

/* the family features' fields (cs_model's last block): 0 or CS_ERR_FEATURE */
static int features_error(const cs_model *M) {
    const int64_t L = M->n_layers, H = M->hidden, hd = M->head_dim;
    if (M->act < 0 || M->act > 1 || M->n_rope < 0 || M->n_rope > L || !isfinite(M->emb_scale) ||
        !isfinite(M->attn_scale) || M->attn_scale < 0.0f)
        return CS_ERR_FEATURE;
    const int64_t R = M->n_rope > 0 ? M->n_rope : 1;
    if (M->rope_len / R < (int64_t)M->max_ctx * (hd / 2)) return CS_ERR_BUFFER;
    const int64_t qw = M->qk_norm_full ? M->n_heads * hd : hd, kw = M->qk_norm_full ? M->n_kv * hd : hd;
    if (M->no_pre_norm < 0 || M->no_pre_norm > 1 || M->qk_norm_full < 0 || M->qk_norm_full > 1 ||
        (M->qk_norm_full && (!M->q_norm || !M->k_norm)))
        return CS_ERR_FEATURE;
    if (M->qk_norm_full && M->layer_heads)
        for (int64_t l = 0; l < L; ++l)
            if (M->layer_heads[l] != 0 && M->layer_heads[l] != M->n_heads) return CS_ERR_FEATURE;
    if ((M->q_norm && M->q_norm_len / qw < L) || (M->k_norm && M->k_norm_len / kw < L) ||
        (M->attn_out_norm && M->attn_out_norm_len / H < L) || (M->ffn_out_norm && M->ffn_out_norm_len / H < L) ||
        (M->layer_window && M->layer_window_len < L) || (M->layer_rope && M->layer_rope_len < L) ||
        (M->qkv_bias && M->qkv_bias_len / ((M->n_heads + 2 * (int64_t)M->n_kv) * hd) < L))
        return CS_ERR_FEATURE;
    if (!isfinite(M->attn_softcap) || M->attn_softcap < 0.0f || !isfinite(M->logit_softcap) || M->logit_softcap < 0.0f)
        return CS_ERR_FEATURE;
    for (int64_t l = 0; l < L; ++l)
        if ((M->layer_window && M->layer_window[l] < 0) ||
            (M->layer_rope && (M->layer_rope[l] < 0 || M->layer_rope[l] >= R)))
            return CS_ERR_FEATURE;
    return 0;
}

static int dims_error(const cs_model *M) {
    const int64_t L = M->n_layers, H = M->hidden, nh = M->n_heads, nkv = M->n_kv, hd = M->head_dim;
    const int64_t I = M->inter, V = M->vocab, C = M->max_ctx;
    if (L < 1 || H < QB || H % QB || nh < 1 || nkv < 1 || nh % nkv || hd < 2 || hd % 2 || I < QB || I % QB ||
        V < 1 || C < 1)
        return CS_ERR_DIMS;
    /* the strides and counts the step keeps in int (each value is an int32, so no product overflows) */
    if ((nh + 2 * nkv) * hd + 16 > INT32_MAX || 2 * I + 16 > INT32_MAX || (V + 15) > INT32_MAX ||
        nh * C > INT64_MAX / (4 * CH) || L * H > INT64_MAX / 4)
        return CS_ERR_DIMS;
    return 0;
}

/* one matrix of ``rows`` x ``k`` (rows padded to 16): its fields and the lengths of its buffers */
static int qmat_ok(const cs_qmat *w, int64_t rows, int64_t k) {
    if (!w->codes || !w->d || (w->bits != 4 && w->bits != 8 && w->bits != CS_PLANES) || w->fmt < 0 || w->fmt > 2)
        return 0;
    if (w->fmt == 2 && w->bits != 8) return 0; /* a scale per 16: 8-bit codes */
    if (w->bits == CS_PLANES && (w->fmt != 0 || w->m)) return 0; /* bit planes: a Q8_0 head, fp16 scales */
    if (k < QB || k % QB || w->k != k || rows < 1 || w->n != (rows + 15) / 16 * 16) return 0;
    const int64_t blocks = (int64_t)(w->n / 16) * (k / QB);
    if (w->codes_len < blocks * (w->bits == 4 ? 256 : 512) || w->d_len < blocks * (w->fmt == 2 ? 32 : 16)) return 0;
    if (w->bits == 4 && !w->m) return 0; /* 4-bit codes are unsigned: offsets always */
    return !w->m || w->m_len >= blocks * 16;
}

static int model_error(const cs_model *M) {
    int e = dims_error(M);
    if (e) return e;
    if (M->nthreads < 1 || M->nthreads > CS_MAX_THREADS) return CS_ERR_THREADS;
    const int64_t L = M->n_layers, H = M->hidden, nh = M->n_heads, nkv = M->n_kv, hd = M->head_dim;
    const int64_t I = M->inter, V = M->vocab, C = M->max_ctx;
    if (!M->attn_norm || !M->ffn_norm || !M->final_norm || !M->qkv || !M->o || !M->gu || !M->down || !M->head ||
        !M->emb || !M->rope_cos || !M->rope_sin || !M->kc || !M->vc || !M->work)
        return CS_ERR_BUFFER;
    if (M->attn_norm_len < L * H || M->ffn_norm_len < L * H || M->final_norm_len < H || M->mats_len < L ||
        M->rope_len < C * (hd / 2) || M->kv_len / (nkv * hd) < L * C || M->work_len < scratch_layout(M, NULL))
        return CS_ERR_BUFFER;
    const int width = M->layer_heads != NULL;
    if (width != (M->head_kv != NULL) || width != (M->layer_inter != NULL)) return CS_ERR_WIDTH;
    if (width && (M->width_len < L || M->head_kv_len / nh < L)) return CS_ERR_WIDTH;
    for (int64_t l = 0; l < L; ++l) {
        const int64_t nhl = width ? M->layer_heads[l] : nh, Il = width ? M->layer_inter[l] : I;
        if (nhl < 0 || nhl > nh || Il < 0 || Il > I || Il % QB) return CS_ERR_WIDTH;
        for (int64_t j = 0; width && j < nhl; ++j)
            if (M->head_kv[l * nh + j] < 0 || M->head_kv[l * nh + j] >= nkv) return CS_ERR_WIDTH;
        if ((nhl > 0 || M->qkv[l].codes) && !qmat_ok(&M->qkv[l], (nhl + 2 * nkv) * hd, H)) return CS_ERR_MATRIX;
        if (nhl > 0 && !qmat_ok(&M->o[l], H, nhl * hd)) return CS_ERR_MATRIX;
        if (Il > 0 && (!qmat_ok(&M->gu[l], 2 * Il, H) || !qmat_ok(&M->down[l], H, Il))) return CS_ERR_MATRIX;
    }
    if (!qmat_ok(M->head, V, H) || !qmat_ok(M->emb, V, H)) return CS_ERR_MATRIX;
    return features_error(M);
}

/* floats of scratch a forward needs (depends on max_ctx: the attention scores); -2 for a model
 * whose integers are inconsistent (the count could overflow) */
int64_t cs_dec_work_floats(const cs_model *M) { return dims_error(M) ? CS_ERR_DIMS : scratch_layout(M, NULL); }

/* inside a parallel region: the attention of a chunk of nt > 1 tokens at layer l (see
 * attend_tile); units (KV head x block of tokens) split across threads, at least 2 per thread
 * where the chunk allows blocks of AQ_MIN tokens */
static void attend_chunk(const cs_model *M, const cs_scratch *s, int l, int nt, int p0, int nhl, const float *kc,
                         const float *vc, float scale) {
    const int nh = M->n_heads, nkv = M->n_kv, hd = M->head_dim, rep = nh / nkv, qd = nh * hd;
    const int most = (nt + AQ_MIN - 1) / AQ_MIN; /* <= CH / AQ_MIN: the units kt has room for */
    int nblk = (2 * M->nthreads + nkv - 1) / nkv;
    nblk = nblk < most ? nblk : most;
    const int bsz = (nt + nblk - 1) / nblk;
    nblk = (nt + bsz - 1) / bsz;
#pragma omp for schedule(dynamic, 1)
    for (int unit = 0; unit < nkv * nblk; ++unit) {
        const int kv = unit / nblk, t0 = unit % nblk * bsz, t1 = t0 + bsz < nt ? t0 + bsz : nt;
        const float *K = kc + (size_t)kv * M->max_ctx * hd, *V = vc + (size_t)kv * M->max_ctx * hd;
        float *kt = s->kt + (size_t)unit * hd * AT;
#define READS(j) ((M->head_kv ? M->head_kv[(size_t)l * nh + (j)] : (j) / rep) == kv)
        int any = 0;
        for (int j = 0; j < nhl; ++j) any |= READS(j);
        if (!any) continue;
        for (int t = t0; t < t1; ++t)
            for (int j = 0; j < nhl; ++j)
                if (READS(j)) {
                    float *st = s->slots + ((size_t)t * nh + j) * AT_SLOT;
                    st[AT] = -INFINITY;
                    st[AT + 1] = 0.0f;
                    memset(s->att + (size_t)t * qd + (size_t)j * hd, 0, sizeof(float) * hd);
                }
        const int T = p0 + t1; /* keys the block's last token sees */
        for (int u0 = 0; u0 < T; u0 += AT) {
            const int nu = T - u0 < AT ? T - u0 : AT;
            for (int u = 0; u < nu; ++u) {
                const float *k = K + (size_t)(u0 + u) * hd;
                for (int i = 0; i < hd; ++i) kt[(size_t)i * AT + u] = k[i] * scale;
            }
            for (int i = 0; nu < AT && i < hd; ++i) memset(kt + (size_t)i * AT + nu, 0, sizeof(float) * (AT - nu));
#ifdef AV_W
            int np = 0; /* queries waiting for the next call (up to AQ at once) */
            const float *qs[AQ];
            float *sts[AQ], *os[AQ];
            int nus[AQ];
#endif
            for (int t = t0; t < t1; ++t) {
                const int vis = p0 + t + 1 - u0; /* causal: keys up to its own position */
                if (vis <= 0) continue;
                for (int j = 0; j < nhl; ++j)
                    if (READS(j)) {
                        const float *qh = s->qkv + (size_t)t * s->qkvd + (size_t)j * hd;
                        float *st = s->slots + ((size_t)t * nh + j) * AT_SLOT, *o = s->att + (size_t)t * qd + (size_t)j * hd;
#ifdef AV_W
                        if (hd % AV_W == 0) {
                            qs[np] = qh;
                            sts[np] = st;
                            os[np] = o;
                            nus[np++] = vis < nu ? vis : nu;
                            if (np == AQ) {
                                attend_tiles(qs, kt, V + (size_t)u0 * hd, nus, hd, sts, os, AQ);
                                np = 0;
                            }
                            continue;
                        }
#endif
                        attend_tile(qh, kt, V + (size_t)u0 * hd, vis < nu ? vis : nu, hd, st, o);
                    }
            }
#ifdef AV_W
            if (np >= 2) attend_tiles(qs, kt, V + (size_t)u0 * hd, nus, hd, sts, os, 2);
            for (int r = np >= 2 ? 2 : 0; r < np; ++r) attend_tile(qs[r], kt, V + (size_t)u0 * hd, nus[r], hd, sts[r], os[r]);
#endif
        }
        for (int t = t0; t < t1; ++t)
            for (int j = 0; j < nhl; ++j)
                if (READS(j)) {
                    const float inv = 1.0f / s->slots[((size_t)t * nh + j) * AT_SLOT + AT + 1];
                    float *o = s->att + (size_t)t * qd + (size_t)j * hd;
                    for (int i = 0; i < hd; ++i) o[i] *= inv;
                }
#undef READS
    }
}

static void mm_rows(const cs_qmat *w, const cs_scratch *s, float *y, int ys, int nt, int acc) {
    /* inside a parallel region: rows split across threads */
    if (nt == 1) {
#pragma omp for schedule(static)
        for (int g = 0; g < groups(w); ++g) qgemv(w, s->xq, s->dx, s->S, y, g, g + 1, acc);
    } else {
#pragma omp for schedule(static)
        for (int g = 0; g < groups(w); ++g) qgemm(w, s->xq, s->xs, s->dx, s->S, s->ss, y, ys, nt, g, g + 1, acc);
    }
}

/* a branch's output matrix (O or down) added to the residual stream h, RMS-normalized first when
 * the model has that post-norm (norm != NULL; xn is free scratch here).  Inside a parallel region. */
static void branch_out(const cs_qmat *w, const cs_scratch *s, const float *norm, float eps, int H, int nt) {
    if (norm) {
        mm_rows(w, s, s->xn, H, nt, 0);
        add_normed(s->h, s->xn, norm, H, eps, nt);
    } else {
        mm_rows(w, s, s->h, H, nt, 1);
    }
}

/* the gated FFN's activation: a[i] = act(gate[i]) * up[i], act SiLU or tanh-GELU (M->act) */
static void gated_act(const cs_model *M, const float *g, float *a, int Il) {
    if (M->act == 1)
        for (int i = 0; i < Il; ++i) a[i] = gelu_tanh(g[i]) * g[Il + i];
    else {
        int i = 0;
        /* SiLU g / (1 + e^-g) with the attention's exp (relative error < 2e-7; e^-g capped at e^88) */
#if defined(AV_W)
        for (; i + AV_W <= Il; i += AV_W) {
            const av_t x = av_load(g + i);
            const av_t e = av_exp(av_negcap(x));
            av_store(a + i, av_mul(av_div(x, av_add(av_set1(1.0f), e)), av_load(g + Il + i)));
        }
#endif
        for (; i < Il; ++i) a[i] = g[i] / (1.0f + expf(-g[i])) * g[Il + i];
    }
}

#ifdef CS_PROF
static double cs_prof_t[16], cs_prof_last;
void cs_dec_prof(double *out) { for (int i = 0; i < 16; ++i) { out[i] = cs_prof_t[i]; cs_prof_t[i] = 0; } }
#define PROF(i) do { _Pragma("omp master") { double _t = omp_get_wtime(); cs_prof_t[i] += _t - cs_prof_last; cs_prof_last = _t; } } while (0)
#define PROF0() do { _Pragma("omp master") cs_prof_last = omp_get_wtime(); } while (0)
#else
#define PROF(i) do { } while (0)
#define PROF0() do { } while (0)
#endif
/* n tokens at positions pos0.. (one at a time in decode, up to CH per chunk in prefill); writes
 * their K/V; logits: [n][vocab_padded] if all_logits, else [vocab_padded] of the last token.
 * Returns 0, -1 for a position or token out of range, or a CS_ERR_* code (model_error). */
static void forward_impl(const cs_model *M, const int32_t *tokens, int32_t n, int32_t pos0, float *logits,
                         int32_t all_logits, int head);

int cs_dec_forward(const cs_model *M, const int32_t *tokens, int32_t n, int32_t pos0, float *logits,
                   int64_t logits_len, int32_t all_logits) {
    const int e = model_error(M);
    if (e) return e;
    if (!tokens || !logits || n < 1 || pos0 < 0 || (int64_t)pos0 + n > M->max_ctx) return -1;
    if (logits_len < (all_logits ? (int64_t)n : 1) * M->head->n) return CS_ERR_BUFFER;
    for (int i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= M->vocab) return -1;
    forward_impl(M, tokens, n, pos0, logits, all_logits, 1);
    return 0;
}

/* the forward, checked by the caller; head == 0: stop after the last token's final norm (its
 * normalized state in scratch xn row 0 when n == 1, quantized in activation row 0) */
static void forward_impl(const cs_model *M, const int32_t *tokens, int32_t n, int32_t pos0, float *logits,
                         int32_t all_logits, int head) {
    cs_scratch s;
    scratch_layout(M, &s);
    const int H = M->hidden, I = M->inter, hd = M->head_dim, nh = M->n_heads, nkv = M->n_kv;
    const int qd = nh * hd, kvd = nkv * hd, rep = nh / nkv;
    const float scale = M->attn_scale > 0.0f ? M->attn_scale : 1.0f / sqrtf((float)hd);
    const int vpad = M->head->n;
    for (int c0 = 0; c0 < n; c0 += CH) {
        const int nt = n - c0 < CH ? n - c0 : CH;
        const int p0 = pos0 + c0;
        for (int t = 0; t < nt; ++t) {
            float *ht = s.h + (size_t)t * H;
            qrow(M->emb, tokens[c0 + t], ht);
            if (M->emb_scale != 0.0f)
                for (int i = 0; i < H; ++i) ht[i] *= M->emb_scale;
        }
#pragma omp parallel num_threads(M->nthreads)
        {
            PROF0();
            for (int l = 0; l < M->n_layers; ++l) {
                const int nhl = M->layer_heads ? M->layer_heads[l] : nh;
                const int Il = M->layer_inter ? M->layer_inter[l] : I;
                const int qdl = nhl * hd;
                float *kc = M->kc + (size_t)l * nkv * M->max_ctx * hd;
                float *vc = M->vc + (size_t)l * nkv * M->max_ctx * hd;
                /* a layer whose heads are all dropped may still write its K/V (kept rows: k, v), so
                 * a motif that skips the attention for one token leaves the cache whole for the next */
                if (nhl > 0 || M->qkv[l].codes) {
                    norm_quantize(&s, M->no_pre_norm ? NULL : M->attn_norm + (size_t)l * H, H, M->eps, 0, nt);
                    PROF(0);
                    mm_rows(&M->qkv[l], &s, s.qkv, s.qkvd, nt, 0);
                    PROF(1);
#pragma omp for schedule(static)
                    for (int t = 0; t < nt; ++t) {
                        float *q = s.qkv + (size_t)t * s.qkvd;
                        const int pos = p0 + t;
                        const size_t at = rope_at(M, l, pos);
                        qk_norm_rope(M, l, q, nhl, qdl, M->rope_cos + at, M->rope_sin + at);
                        for (int j = 0; j < nkv; ++j) {
                            float *k = q + qdl + j * hd;
                            memcpy(kc + ((size_t)j * M->max_ctx + pos) * hd, k, sizeof(float) * hd);
                            memcpy(vc + ((size_t)j * M->max_ctx + pos) * hd, q + qdl + kvd + j * hd,
                                   sizeof(float) * hd);
                        }
                    }
                }
                if (nhl > 0) {
                    /* prefill: each K/V tile read once per chunk and KV head (a sliding-window layer
                     * takes the per-token path: the tiles have no window start) */
                    if (nt > 1 && !(M->layer_window && M->layer_window[l] > 0) && !(M->attn_softcap > 0.0f)) {
                        PROF(2);
                        attend_chunk(M, &s, l, nt, p0, nhl, kc, vc, scale);
                        PROF(3);
                    } else {
#pragma omp for schedule(static)
                        for (int tj = 0; tj < nt * nhl; ++tj) {
                            const int t = tj / nhl, j = tj % nhl; /* causal: up to its own position */
                            const int kv = M->head_kv ? M->head_kv[(size_t)l * nh + j] : j / rep;
                            /* a sliding window: the last `win` positions only, [T - win, T) */
                            const int T = p0 + t + 1, lo = window_start(M, l, p0 + t);
                            const float *qh = s.qkv + (size_t)t * s.qkvd + j * hd;
                            const float *Kh = kc + ((size_t)kv * M->max_ctx + lo) * hd;
                            const float *Vh = vc + ((size_t)kv * M->max_ctx + lo) * hd;
                            if (M->attn_softcap > 0.0f)
                                attend_capped(qh, Kh, Vh, T - lo, hd, scale, M->attn_softcap,
                                              s.scores + (size_t)tj * M->max_ctx, s.att + (size_t)t * qd + j * hd);
                            else
                                attend(qh, Kh, Vh, T - lo, hd, scale, s.scores + (size_t)tj * M->max_ctx,
                                       s.att + (size_t)t * qd + j * hd);
                        }
                    }
#pragma omp for schedule(static)
                    for (int t = 0; t < nt; ++t)
                        quantize_act(s.att + (size_t)t * qd, qdl, s.xq + (size_t)t * s.xs, s.dx + (size_t)t * s.ss,
                                     s.S + (size_t)t * s.ss);
                    PROF(2);
                    branch_out(&M->o[l], &s, M->attn_out_norm ? M->attn_out_norm + (size_t)l * H : NULL, M->eps, H, nt);
                    PROF(4);
                }
                if (Il > 0) {
                    norm_quantize(&s, M->no_pre_norm ? NULL : M->ffn_norm + (size_t)l * H, H, M->eps, 0, nt);
                    PROF(0);
                    mm_rows(&M->gu[l], &s, s.gu, 2 * I + 16, nt, 0);
                    PROF(5);
#pragma omp for schedule(static)
                    for (int t = 0; t < nt; ++t) {
                        const float *g = s.gu + (size_t)t * (2 * I + 16);
                        float *a = s.act + (size_t)t * I;
                        gated_act(M, g, a, Il);
                        quantize_act(a, Il, s.xq + (size_t)t * s.xs, s.dx + (size_t)t * s.ss, s.S + (size_t)t * s.ss);
                    }
                    PROF(2);
                    branch_out(&M->down[l], &s, M->ffn_out_norm ? M->ffn_out_norm + (size_t)l * H : NULL, M->eps, H, nt);
                    PROF(6);
                }
            }
            /* the head: every token's logits, or only the last token's */
            const int last = c0 + nt == n;
            const int first = all_logits ? 0 : nt - 1;
            if (all_logits || last) {
                norm_quantize(&s, M->final_norm, H, M->eps, first, nt);
                if (head) {
                    float *out = all_logits ? logits + (size_t)c0 * vpad : logits;
                    mm_rows(M->head, &s, out, vpad, nt - first, 0);
                    softcap_rows(M, out, nt - first, vpad);
                    PROF(7);
                }
            }
        }
    }
}

/* Continuous batching (docs/design.md "Serving"): one decode token for each of B sequences, each
 * with its own KV cache, capacity and position, in one parallel region.  The matrix products run
 * once for all B tokens (mm_rows with nt = B: each weight block expanded once per 8 tokens where
 * qgemm is vectorized); the embedding, RoPE, the cache writes and the attention are per sequence,
 * against its own cache and length.  The per-token operations are forward_impl's for n == 1 (and
 * qgemm computes qgemv's numbers), so each row of logits equals that sequence's solo step.
 *
 * M supplies the weights, the RoPE tables (M->max_ctx positions) and the scratch (sized for
 * M->max_ctx, which bounds every position); M's own kc/vc are not read.  Sequence b: token
 * tokens[b] at position positions[b], cache kcaches[b] / vcaches[b] laid out [L][kv][C_b][hd]
 * with C_b = capacities[b] positions, holding kv_lens[b] floats each.  logits: [B][vocab padded].
 * Returns 0, -1 (a token or position out of range), CS_ERR_BATCH (B outside [1, CS_MAX_BATCH], or
 * two caches that overlap), CS_ERR_BUFFER, or model_error's codes. */
enum { CS_ERR_BATCH = -9 };
#define CS_MAX_BATCH CH /* the scratch holds CH tokens */

int cs_dec_max_batch(void) { return CS_MAX_BATCH; }

/* The fields this function reads are cs_model's up to qk_norm_full (the family features: QK-norm,
 * post-norms, windows, RoPE tables, activation, scales, Q/K/V bias, soft-caps, OLMo2's missing
 * pre-norms and full-width QK-norm, as forward_impl).  A field added after it
 * must be handled below, or refused, before this assertion is updated: computing a step without
 * a model's feature would be silently wrong. */
_Static_assert(sizeof(cs_model) == offsetof(cs_model, qk_norm_full) + sizeof(int32_t),
               "cs_model has new fields: make cs_dec_forward_batch handle or refuse them");

/* head == 0: stop after the final norm (row b's normalized state in scratch xn row b, quantized in
 * activation row b: cs_dec_forward_batch_sensed's head reads them) */
static void forward_batch_impl(const cs_model *M, int32_t B, const int32_t *tokens, const int32_t *positions,
                               float *const *kcaches, float *const *vcaches, const int32_t *capacities,
                               float *logits, int head);

/* cs_dec_forward_batch's checks of the batch (every argument but the logits) */
static int batch_error(const cs_model *M, int32_t B, const int32_t *tokens, const int32_t *positions,
                       float *const *kcaches, float *const *vcaches, const int32_t *capacities,
                       const int64_t *kv_lens) {
    if (!M) return CS_ERR_BUFFER;
    if (B < 1 || B > CS_MAX_BATCH) return CS_ERR_BATCH;
    if (!tokens || !positions || !kcaches || !vcaches || !capacities || !kv_lens) return CS_ERR_BUFFER;
    for (int b = 0; b < B; ++b)
        if (!kcaches[b] || !vcaches[b]) return CS_ERR_BUFFER;
    /* every check model_error makes but its cache's (M's own cache is not used; each sequence's
     * is checked below) */
    cs_model m = *M;
    m.kc = kcaches[0];
    m.vc = vcaches[0];
    m.kv_len = INT64_MAX;
    const int e = model_error(&m);
    if (e) return e;
    const int64_t L = M->n_layers, row = (int64_t)M->n_kv * M->head_dim; /* floats per layer and position */
    for (int b = 0; b < B; ++b) {
        if (tokens[b] < 0 || tokens[b] >= M->vocab) return -1;
        if (capacities[b] < 1 || kv_lens[b] < 0 || kv_lens[b] / row / L < capacities[b]) return CS_ERR_BUFFER;
        if (positions[b] < 0 || positions[b] >= capacities[b] || positions[b] >= M->max_ctx) return -1;
    }
    /* each sequence writes its own cache: no two of the 2B buffers may overlap */
    for (int i = 0; i < 2 * B; ++i) {
        const uintptr_t a0 = (uintptr_t)(i < B ? kcaches[i] : vcaches[i - B]);
        const uintptr_t a1 = a0 + (uintptr_t)(L * capacities[i % B] * row) * sizeof(float);
        for (int j = i + 1; j < 2 * B; ++j) {
            const uintptr_t b0 = (uintptr_t)(j < B ? kcaches[j] : vcaches[j - B]);
            const uintptr_t b1 = b0 + (uintptr_t)(L * capacities[j % B] * row) * sizeof(float);
            if (a0 < b1 && b0 < a1) return CS_ERR_BATCH;
        }
    }
    return 0;
}

int cs_dec_forward_batch(const cs_model *M, int32_t B, const int32_t *tokens, const int32_t *positions,
                         float *const *kcaches, float *const *vcaches, const int32_t *capacities,
                         const int64_t *kv_lens, float *logits, int64_t logits_len) {
    const int e = batch_error(M, B, tokens, positions, kcaches, vcaches, capacities, kv_lens);
    if (e) return e;
    if (!logits || logits_len / B < M->head->n) return CS_ERR_BUFFER;
    forward_batch_impl(M, B, tokens, positions, kcaches, vcaches, capacities, logits, 1);
    return 0;
}

static void forward_batch_impl(const cs_model *M, int32_t B, const int32_t *tokens, const int32_t *positions,
                               float *const *kcaches, float *const *vcaches, const int32_t *capacities,
                               float *logits, int head) {
    cs_scratch s;
    scratch_layout(M, &s);
    const int H = M->hidden, I = M->inter, hd = M->head_dim, nh = M->n_heads, nkv = M->n_kv;
    const int qd = nh * hd, kvd = nkv * hd, rep = nh / nkv;
    const float scale = M->attn_scale > 0.0f ? M->attn_scale : 1.0f / sqrtf((float)hd);
    const int vpad = M->head->n;
    for (int t = 0; t < B; ++t) {
        float *ht = s.h + (size_t)t * H;
        qrow(M->emb, tokens[t], ht);
        if (M->emb_scale != 0.0f)
            for (int i = 0; i < H; ++i) ht[i] *= M->emb_scale;
    }
#pragma omp parallel num_threads(M->nthreads)
    {
        for (int l = 0; l < M->n_layers; ++l) {
            const int nhl = M->layer_heads ? M->layer_heads[l] : nh;
            const int Il = M->layer_inter ? M->layer_inter[l] : I;
            const int qdl = nhl * hd;
            if (nhl > 0 || M->qkv[l].codes) {
                norm_quantize(&s, M->no_pre_norm ? NULL : M->attn_norm + (size_t)l * H, H, M->eps, 0, B);
                mm_rows(&M->qkv[l], &s, s.qkv, s.qkvd, B, 0);
#pragma omp for schedule(static)
                for (int t = 0; t < B; ++t) {
                    float *q = s.qkv + (size_t)t * s.qkvd;
                    const int pos = positions[t];
                    const size_t C = (size_t)capacities[t];
                    float *kc = kcaches[t] + (size_t)l * nkv * C * hd, *vc = vcaches[t] + (size_t)l * nkv * C * hd;
                    const size_t at = rope_at(M, l, pos);
                    qk_norm_rope(M, l, q, nhl, qdl, M->rope_cos + at, M->rope_sin + at);
                    for (int j = 0; j < nkv; ++j) {
                        float *k = q + qdl + j * hd;
                        memcpy(kc + ((size_t)j * C + pos) * hd, k, sizeof(float) * hd);
                        memcpy(vc + ((size_t)j * C + pos) * hd, q + qdl + kvd + j * hd, sizeof(float) * hd);
                    }
                }
            }
            if (nhl > 0) {
#pragma omp for schedule(static)
                for (int tj = 0; tj < B * nhl; ++tj) {
                    const int t = tj / nhl, j = tj % nhl; /* its own cache, up to its own position */
                    const int kv = M->head_kv ? M->head_kv[(size_t)l * nh + j] : j / rep;
                    const int lo = window_start(M, l, positions[t]); /* its sliding window */
                    const size_t C = (size_t)capacities[t], at = (((size_t)l * nkv + kv) * C + lo) * hd;
                    if (M->attn_softcap > 0.0f)
                        attend_capped(s.qkv + (size_t)t * s.qkvd + j * hd, kcaches[t] + at, vcaches[t] + at,
                                      positions[t] + 1 - lo, hd, scale, M->attn_softcap,
                                      s.scores + (size_t)tj * M->max_ctx, s.att + (size_t)t * qd + j * hd);
                    else
                        attend(s.qkv + (size_t)t * s.qkvd + j * hd, kcaches[t] + at, vcaches[t] + at,
                               positions[t] + 1 - lo, hd, scale, s.scores + (size_t)tj * M->max_ctx,
                               s.att + (size_t)t * qd + j * hd);
                }
#pragma omp for schedule(static)
                for (int t = 0; t < B; ++t)
                    quantize_act(s.att + (size_t)t * qd, qdl, s.xq + (size_t)t * s.xs, s.dx + (size_t)t * s.ss,
                                 s.S + (size_t)t * s.ss);
                branch_out(&M->o[l], &s, M->attn_out_norm ? M->attn_out_norm + (size_t)l * H : NULL, M->eps, H, B);
            }
            if (Il > 0) {
                norm_quantize(&s, M->no_pre_norm ? NULL : M->ffn_norm + (size_t)l * H, H, M->eps, 0, B);
                mm_rows(&M->gu[l], &s, s.gu, 2 * I + 16, B, 0);
#pragma omp for schedule(static)
                for (int t = 0; t < B; ++t) {
                    const float *g = s.gu + (size_t)t * (2 * I + 16);
                    float *a = s.act + (size_t)t * I;
                    gated_act(M, g, a, Il);
                    quantize_act(a, Il, s.xq + (size_t)t * s.xs, s.dx + (size_t)t * s.ss, s.S + (size_t)t * s.ss);
                }
                branch_out(&M->down[l], &s, M->ffn_out_norm ? M->ffn_out_norm + (size_t)l * H : NULL, M->eps, H, B);
            }
        }
        norm_quantize(&s, M->final_norm, H, M->eps, 0, B);
        if (head) {
            mm_rows(M->head, &s, logits, vpad, B, 0);
            softcap_rows(M, logits, B, vpad);
        }
    }
}

/* Sensed vocabulary head (docs/design.md "Sensed vocabulary head"): one decode step whose head is
 *   1. a preview -> scores p[0..vpad): the high plane of the head's bit planes (P == NULL, the
 *      head stored as CS_PLANES: no extra bytes), or P, a low-bit copy of the head in the same
 *      row-group layout,
 *   2. the top K of p over the true vocabulary (a min-heap of K+1: its root p_(K+1) is the best
 *      score left out),
 *   3. the exact logits of the candidates' row groups from the head as stored (the full head's
 *      own qgemv, so they equal its logits bit for bit),
 *   4. the rule: the candidates are the top K of each row's upper bound u_n = p_n + tau e_n |x|
 *      (e_n = |W_n - P_n|, the row's preview error norm; |x| the 2-norm of the normalized hidden
 *      state; tau calibrated: the largest |z_n - p_n| / (e_n |x|) seen, with a safety factor),
 *      and z* (best exact candidate, lowest index on ties) must exceed u_(K+1), so that no
 *      left-out token can beat z*.  Otherwise (or with tau = +inf: the calibration probe, which
 *      keeps the plain preview scores) the full head runs and its argmax is returned.  K ==
 *      vocab: every token is a candidate and no rule is needed (the exact argmax, no fallback).
 * logits [>= vpad]: the candidates' groups (all rows on fallback); preview [>= vpad]; cand
 * [>= K+1]: the K candidates ascending (+ scratch); out [>= 2]: token, fell back (0/1);
 * rowerr [>= vocab]: e_n.  stats [>= 3]: z*, u_(K+1) (-inf when K == vocab), |x|.  Returns 0, -1 (token, position), a
 * CS_ERR_* code, or CS_ERR_SENSED for a preview, K or tau that does not fit. */
enum { CS_ERR_SENSED = -7 };

static inline int heap_less(const float *p, int32_t a, int32_t b) { return p[a] < p[b] || (p[a] == p[b] && a > b); }

static void heap_down(int32_t *h, int n, const float *p, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && heap_less(p, h[l], h[m])) m = l;
        if (r < n && heap_less(p, h[r], h[m])) m = r;
        if (m == i) return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

static int cmp_i32(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Steps 2 and 4's first half for one row: the preview scores p (preview[0..V)) turned into the
 * bounds u_n = p_n + tau e_n |x| (kept as they are for the probe, tau = inf), the top K of them in
 * cand[0..K) ascending (cand holds K+1); returns u_(K+1), the best bound left out (-inf: K == V). */
static float sensed_candidates(float *preview, const float *rowerr, int V, int K, float tau, float xnorm,
                               int32_t *cand) {
    if (!isinf(tau)) { /* each row's upper bound u_n = p_n + tau * e_n * |x| */
        const float tx = tau * xnorm;
        for (int i = 0; i < V; ++i) preview[i] += tx * rowerr[i];
    }
    /* top K+1 of the preview over the true vocabulary */
    const int keep = K < V ? K + 1 : K;
    for (int i = 0; i < keep; ++i) cand[i] = i;
    for (int i = keep / 2 - 1; i >= 0; --i) heap_down(cand, keep, preview, i);
    for (int i = keep; i < V; ++i)
        if (heap_less(preview, cand[0], i)) {
            cand[0] = i;
            heap_down(cand, keep, preview, 0);
        }
    float pout = -INFINITY;
    if (keep > K) { /* the root is the best score left out: drop it from the candidates */
        pout = preview[cand[0]];
        cand[0] = cand[K];
    }
    qsort(cand, (size_t)K, sizeof(int32_t), cmp_i32);
    return pout;
}

/* the best exact candidate (lowest index on ties): logits holds the candidates' rows */
static int sensed_best(const float *logits, const int32_t *cand, int K) {
    int best = cand[0];
    for (int i = 1; i < K; ++i)
        if (logits[cand[i]] > logits[best]) best = cand[i];
    return best;
}

static int argmax_row(const float *z, int V) {
    int best = 0;
    for (int i = 1; i < V; ++i)
        if (z[i] > z[best]) best = i;
    return best;
}

/* the sensed head's arguments (the preview, K, tau and the row errors) against the model */
static int sensed_error(const cs_model *M, const cs_qmat *P, const float *rowerr, int64_t rowerr_len, int32_t K,
                        float tau) {
    /* P == NULL: the head's own high bit plane (the head stored as CS_PLANES) */
    if ((P ? !qmat_ok(P, M->vocab, M->hidden) || P->n != M->head->n : M->head->bits != CS_PLANES) || K < 1 ||
        K > M->vocab || isnan(tau) || tau < 0.0f)
        return CS_ERR_SENSED;
    if (!rowerr || rowerr_len < M->vocab) return CS_ERR_BUFFER;
    return 0;
}

/* Step 1 for nt activation rows: P's product, or (P == NULL) the high plane of the head's bit
 * planes, each row group read once for all the rows. */
static void sensed_preview(const cs_model *M, const cs_qmat *P, const cs_scratch *s, float *preview, int nt) {
    const int vpad = M->head->n;
    if (P) {
#pragma omp parallel num_threads(M->nthreads)
        mm_rows(P, s, preview, vpad, nt, 0);
        return;
    }
#pragma omp parallel for num_threads(M->nthreads) schedule(static)
    for (int g = 0; g < vpad / 16; ++g)
        for (int t = 0; t < nt; ++t)
            qgemv_planes(M->head, s->xq + (size_t)t * s->xs, s->dx + (size_t)t * s->ss, s->S + (size_t)t * s->ss,
                         preview + (size_t)t * vpad, g, g + 1, 0, 1);
}

static float row_norm(const float *x, int n) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += (double)x[i] * x[i];
    return (float)sqrt(ss);
}

int cs_dec_forward_sensed(const cs_model *M, const cs_qmat *P, const float *rowerr, int64_t rowerr_len, int32_t token,
                          int32_t pos, int32_t K, float tau, float *logits, int64_t logits_len, float *preview,
                          int64_t preview_len, int32_t *cand, int64_t cand_len, int32_t *out, int64_t out_len,
                          float *stats, int64_t stats_len) {
    const int e = model_error(M);
    if (e) return e;
    if (pos < 0 || (int64_t)pos + 1 > M->max_ctx || token < 0 || token >= M->vocab) return -1;
    const int se = sensed_error(M, P, rowerr, rowerr_len, K, tau);
    if (se) return se;
    const int vpad = M->head->n, V = M->vocab;
    if (!logits || !preview || !cand || !out || !stats || logits_len < vpad || preview_len < vpad ||
        cand_len < (int64_t)K + 1 || out_len < 2 || stats_len < 3)
        return CS_ERR_BUFFER;
    forward_impl(M, &token, 1, pos, NULL, 0, 0);
    cs_scratch s;
    scratch_layout(M, &s);
    sensed_preview(M, P, &s, preview, 1);
    const float xnorm = row_norm(s.xn, M->hidden);
    /* tau = inf: the calibration probe (preview scores kept as they are, the full head runs) */
    const int probe = isinf(tau);
    const float pout = sensed_candidates(preview, rowerr, V, K, tau, xnorm, cand);
#pragma omp parallel for num_threads(M->nthreads) schedule(static)
    for (int i = 0; i < K; ++i)
        if (i == 0 || cand[i] / 16 != cand[i - 1] / 16) qgemv(M->head, s.xq, s.dx, s.S, logits, cand[i] / 16, cand[i] / 16 + 1, 0);
    int best = sensed_best(logits, cand, K);
    const float zbest = logits[best];
    stats[0] = zbest;
    stats[1] = pout;
    stats[2] = xnorm;
    const int pass = !probe && (K == V || zbest > pout);
    if (!pass) {
#pragma omp parallel num_threads(M->nthreads)
        mm_rows(M->head, &s, logits, vpad, 1, 0);
        best = argmax_row(logits, V);
    }
    out[0] = best;
    out[1] = !pass;
    return 0;
}

/* The sensed head after a batched step (the server's greedy sequences; docs/design.md "Serving"):
 * cs_dec_forward_batch's body, then for each row b with sensed[b] != 0 cs_dec_forward_sensed's
 * head on that row, and for the others the full head (their logits, for sampling).  The head's
 * bytes are read as few times as the batch allows: the preview once for every row (one product
 * over its grid), each sensed row's candidate groups, and the full head once for all the rows that
 * need it (the sampled rows and the sensed rows whose rule failed).  Every row's numbers are those
 * of its solo step (the batched products compute the single-token ones), so a sensed row's token
 * and fallback are what cs_dec_forward_sensed gives that sequence alone.
 *
 * Arguments as cs_dec_forward_batch's, then the sensed head's (P, rowerr, K, tau as
 * cs_dec_forward_sensed's) and per row b: sensed[b] (1: the sensed head, 0: the full head),
 * logits row b [vpad] (the full head's logits for a full row or a failed rule, else the
 * candidates' groups), preview row b [vpad] (scratch), cand row b [K+1] (the K candidates
 * ascending), out row b [2] (token: the greedy token (a full row: the argmax), fell back 0/1 (a
 * full row: 1)), stats row b [3] (z*, u_(K+1), |x|; a full row: 0s).  Returns as
 * cs_dec_forward_batch, or CS_ERR_SENSED. */
int cs_dec_forward_batch_sensed(const cs_model *M, int32_t B, const int32_t *tokens, const int32_t *positions,
                                float *const *kcaches, float *const *vcaches, const int32_t *capacities,
                                const int64_t *kv_lens, const cs_qmat *P, const float *rowerr, int64_t rowerr_len,
                                int32_t K, float tau, const int32_t *sensed, float *logits, int64_t logits_len,
                                float *preview, int64_t preview_len, int32_t *cand, int64_t cand_len, int32_t *out,
                                int64_t out_len, float *stats, int64_t stats_len) {
    const int e = batch_error(M, B, tokens, positions, kcaches, vcaches, capacities, kv_lens);
    if (e) return e;
    const int se = sensed_error(M, P, rowerr, rowerr_len, K, tau);
    if (se) return se;
    const int vpad = M->head->n, V = M->vocab, H = M->hidden;
    if (!sensed || !logits || !preview || !cand || !out || !stats || logits_len / B < vpad ||
        preview_len / B < vpad || cand_len / B < (int64_t)K + 1 || out_len / B < 2 || stats_len / B < 3)
        return CS_ERR_BUFFER;
    forward_batch_impl(M, B, tokens, positions, kcaches, vcaches, capacities, NULL, 0);
    cs_scratch s;
    scratch_layout(M, &s);
    const int probe = isinf(tau);
    int rows[CS_MAX_BATCH], ns = 0; /* the sensed rows */
    for (int b = 0; b < B; ++b) {
        float *st = stats + (size_t)b * 3;
        st[0] = st[1] = st[2] = 0.0f;
        out[2 * b] = 0;
        out[2 * b + 1] = 1;
        if (sensed[b]) rows[ns++] = b;
    }
    if (ns > 0) {
        /* the preview of every row in one pass over its grid (rows that are not sensed included:
         * their share of a product that reads the grid once anyway) */
        sensed_preview(M, P, &s, preview, B);
#pragma omp parallel for num_threads(M->nthreads) schedule(static)
        for (int r = 0; r < ns; ++r) {
            const int b = rows[r];
            float *st = stats + (size_t)b * 3;
            st[2] = row_norm(s.xn + (size_t)b * H, H);
            st[1] = sensed_candidates(preview + (size_t)b * vpad, rowerr, V, K, tau, st[2], cand + (size_t)b * (K + 1));
        }
        /* the candidates' exact row groups, (row, candidate) pairs split across threads */
#pragma omp parallel for num_threads(M->nthreads) schedule(static)
        for (int ri = 0; ri < ns * K; ++ri) {
            const int b = rows[ri / K], i = ri % K;
            const int32_t *c = cand + (size_t)b * (K + 1);
            if (i == 0 || c[i] / 16 != c[i - 1] / 16)
                qgemv(M->head, s.xq + (size_t)b * s.xs, s.dx + (size_t)b * s.ss, s.S + (size_t)b * s.ss,
                      logits + (size_t)b * vpad, c[i] / 16, c[i] / 16 + 1, 0);
        }
        for (int r = 0; r < ns; ++r) {
            const int b = rows[r];
            const int best = sensed_best(logits + (size_t)b * vpad, cand + (size_t)b * (K + 1), K);
            float *st = stats + (size_t)b * 3;
            st[0] = logits[(size_t)b * vpad + best];
            const int pass = !probe && (K == V || st[0] > st[1]);
            out[2 * b] = best;
            out[2 * b + 1] = !pass;
        }
    }
    /* the full head for every row that needs it, in one pass: their activation rows moved to the
     * front (row b to row j <= b, in order: a row is moved before its place is taken), the logits
     * computed in the preview buffer (free now) and copied to their rows */
    int full[CS_MAX_BATCH], nf = 0;
    for (int b = 0; b < B; ++b)
        if (out[2 * b + 1]) full[nf++] = b;
    if (nf == 0) return 0;
    for (int j = 0; j < nf; ++j)
        if (full[j] != j) {
            memcpy(s.xq + (size_t)j * s.xs, s.xq + (size_t)full[j] * s.xs, sizeof(int16_t) * (size_t)s.xs);
            memcpy(s.dx + (size_t)j * s.ss, s.dx + (size_t)full[j] * s.ss, sizeof(float) * (size_t)s.ss);
            memcpy(s.S + (size_t)j * s.ss, s.S + (size_t)full[j] * s.ss, sizeof(float) * (size_t)s.ss);
        }
#pragma omp parallel num_threads(M->nthreads)
    mm_rows(M->head, &s, preview, vpad, nf, 0);
    for (int j = 0; j < nf; ++j) /* before the soft-cap, as cs_dec_forward_sensed's fallback */
        out[2 * full[j]] = argmax_row(preview + (size_t)j * vpad, V);
#pragma omp parallel num_threads(M->nthreads)
    softcap_rows(M, preview, nf, vpad); /* the logits cs_dec_forward_batch gives */
    for (int j = 0; j < nf; ++j)
        memcpy(logits + (size_t)full[j] * vpad, preview + (size_t)j * vpad, sizeof(float) * (size_t)vpad);
    return 0;
}

/* the entropy (nats) of softmax(z) over n logits: H = log S - sum(e_i (z_i - m)) / S, with
 * e_i = exp(z_i - m), m = max z, S = sum e_i; one vectorized pass after the max.  The switching
 * runtime's controller reads it every step (with numpy's entropy the controller's step cost ~4%
 * of a SmolLM2 step, half that with this; BENCHMARKS.md "Native motifs switched per token"). */
float cs_dec_entropy(const float *z, int32_t n) {
    if (n < 1) return 0.0f;
    float m = z[0];
    int i = 0;
#ifdef CS_AVX512
    {
        __m512 mx = _mm512_set1_ps(z[0]);
        for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(z + i));
        m = _mm512_reduce_max_ps(mx);
    }
#endif
    for (; i < n; ++i) m = fmaxf(m, z[i]);
    double S = 0.0, D = 0.0;
    i = 0;
#ifdef CS_AVX512
    {
        const __m512 mv = _mm512_set1_ps(m);
        __m512 sv = _mm512_setzero_ps(), dv = _mm512_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(z + i), mv);
            const __m512 e = exp512(x);
            sv = _mm512_add_ps(sv, e);
            dv = _mm512_fmadd_ps(e, x, dv);
        }
        S = _mm512_reduce_add_ps(sv);
        D = _mm512_reduce_add_ps(dv);
    }
#elif defined(CS_AVX2)
    {
        const __m256 mv = _mm256_set1_ps(m);
        __m256 sv = _mm256_setzero_ps(), dv = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(z + i), mv);
            const __m256 e = exp256(x);
            sv = _mm256_add_ps(sv, e);
            dv = _mm256_fmadd_ps(e, x, dv);
        }
        float ps[8], pd[8];
        _mm256_storeu_ps(ps, sv);
        _mm256_storeu_ps(pd, dv);
        for (int k = 0; k < 8; ++k) {
            S += ps[k];
            D += pd[k];
        }
    }
#endif
    for (; i < n; ++i) {
        const float x = z[i] - m, e = expf(x);
        S += e;
        D += (double)e * x;
    }
    return (float)(log(S) - D / S);
}

/* the quantized matrix-vector product alone (tests and the kernel benchmark): y = W x; 0, or
 * CS_ERR_* for a matrix, buffer or thread count that does not fit (x_len, y_len, work_len: floats) */
int cs_dec_gemv(const cs_qmat *w, const float *x, int64_t x_len, float *y, int64_t y_len, int nthreads,
                float *work, int64_t work_len) {
    if (!qmat_ok(w, w->n, w->k)) return CS_ERR_MATRIX;
    if (nthreads < 1 || nthreads > CS_MAX_THREADS) return CS_ERR_THREADS;
    if (!x || !y || !work || x_len < w->k || y_len < w->n || work_len < w->k / 2 + 16 + 2 * (w->k / QB))
        return CS_ERR_BUFFER;
    int16_t *xq = (int16_t *)work;
    float *dx = work + w->k / 2 + 16, *S = dx + w->k / QB;
    quantize_act(x, w->k, xq, dx, S);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int g = 0; g < groups(w); ++g) qgemv(w, xq, dx, S, y, g, g + 1, 0);
    return 0;
}

/* the multi-token product (tests): Y[t] = W X[t], X [nt][k], Y [nt][n]; 0 or CS_ERR_* as gemv */
int cs_dec_gemm(const cs_qmat *w, const float *x, int64_t x_len, int nt, float *y, int64_t y_len, int nthreads,
                float *work, int64_t work_len) {
    if (!qmat_ok(w, w->n, w->k)) return CS_ERR_MATRIX;
    if (nthreads < 1 || nthreads > CS_MAX_THREADS) return CS_ERR_THREADS;
    const int64_t xs = w->k + 32, ss = w->k / QB + 1;
    if (nt < 1 || !x || !y || !work || x_len / w->k < nt || y_len / w->n < nt ||
        work_len < nt * xs / 2 + 16 + 2 * nt * ss)
        return CS_ERR_BUFFER;
    int16_t *xq = (int16_t *)work;
    float *dx = work + (size_t)nt * xs / 2 + 16, *S = dx + (size_t)nt * ss;
    for (int t = 0; t < nt; ++t)
        quantize_act(x + (size_t)t * w->k, w->k, xq + (size_t)t * xs, dx + (size_t)t * ss, S + (size_t)t * ss);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int g = 0; g < groups(w); ++g) qgemm(w, xq, (int)xs, dx, S, (int)ss, y, w->n, nt, g, g + 1, 0);
    return 0;
}
