/* Fused float32 CPU loops for the streamed merges (unmerge.methods.native builds and loads this file).
 *
 * Each function does, element by element, exactly the float32 operations of the torch code it replaces, in the same
 * order, so the results are bitwise identical (compiled with -ffp-contract=off: no fused multiply-adds, and no
 * -ffast-math: no reordering). What it saves is the memory traffic and dispatch of a dozen separate torch ops per
 * chunk: one pass reads the inputs once and writes the output once.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 256 /* elements per inner block: the per-model temporaries stay in L1 */
/* elements per block of the band scan, whose compaction pass runs only on blocks holding a band entry: with a
 * bracket of ~2% of the entries, 256 would put one in nearly every block; 64 measured fastest (16 pays the loop) */
#define SCAN_BLOCK 64

#if defined(__AVX512F__)
#include <immintrin.h>

/* The band scan of one model over [i, end), end - i a multiple of 16, 16 lanes at a time in one pass: the same
 * float operations and comparisons (ordered: NaN compares false) as the scalar loop, the band compacted with a
 * compress. Each compressed vector is stored whole: the band needs 16 floats of slack past its entries. */
static inline void scan_lanes(const float *m, const float *b, int64_t i, int64_t end, float lo, float hi,
                              float *band, int64_t *kept, int64_t *above, int *finite) {
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), vmax = _mm512_set1_ps(FLT_MAX);
    int64_t k = *kept, count = 0;
    __mmask16 ok = 0xFFFF;
    for (; i < end; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(m + i), _mm512_loadu_ps(b + i)));
        const __mmask16 over = _mm512_cmp_ps_mask(a, vhi, _CMP_GT_OQ);
        const __mmask16 in = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(a, vlo, _CMP_GT_OQ), a, vhi, _CMP_LE_OQ);
        ok &= _mm512_cmp_ps_mask(a, vmax, _CMP_LE_OQ);
        count += __builtin_popcount(over);
        _mm512_storeu_ps(band + k, _mm512_maskz_compress_ps(in, a));
        k += __builtin_popcount(in);
    }
    *kept = k;
    *above += count;
    *finite &= ok == 0xFFFF;
}
#define SCAN_SLACK 16
#else
#define SCAN_SLACK 0
#endif

/* Floats of slack each band of um_band_scan needs past n (16 where the AVX-512 loop stores whole vectors). */
int um_band_slack(void) { return SCAN_SLACK; }

/* For each model j, |m_j - b| over n elements (the models together, block by block: b is read from memory once):
 * above[j] = how many exceed high[j]; those in (low[j], high[j]] go to bands[j] (in position order, their number
 * to n_band[j]; bands[j] must hold n + um_band_slack() floats); finite[j] = 1 when every |m_j - b| is finite, which
 * proves m_j and b finite (NaN or Inf in either gives a NaN or Inf difference). */
void um_band_scan(const float *b, const float *const *ms, int n_models, int64_t n, const float *low,
                  const float *high, float *const *bands, int64_t *n_band, int64_t *above, int *finite) {
    for (int j = 0; j < n_models; j++) {
        above[j] = 0;
        n_band[j] = 0;
        finite[j] = 1;
    }
    int64_t start = 0;
#if defined(__AVX512F__)
    for (; start + BLOCK <= n; start += BLOCK)
        for (int j = 0; j < n_models; j++)
            scan_lanes(ms[j], b, start, start + BLOCK, low[j], high[j], bands[j], &n_band[j], &above[j], &finite[j]);
#else
    for (; start + SCAN_BLOCK <= n; start += SCAN_BLOCK) {
        const float *bb = b + start;
        for (int j = 0; j < n_models; j++) {
            const float *m = ms[j] + start;
            const float lo = low[j], hi = high[j];
            int count = 0, inside = 0, ok = 1;
            for (int i = 0; i < SCAN_BLOCK; i++) {
                float a = fabsf(m[i] - bb[i]);
                count += a > hi;
                inside |= (a > lo) & (a <= hi);
                ok &= a <= FLT_MAX;
            }
            above[j] += count;
            finite[j] &= ok;
            if (inside) {
                float *band = bands[j];
                int64_t kept = n_band[j];
                for (int i = 0; i < SCAN_BLOCK; i++) {
                    float a = fabsf(m[i] - bb[i]);
                    band[kept] = a;
                    kept += (a > lo) & (a <= hi);
                }
                n_band[j] = kept;
            }
        }
    }
#endif
    for (int j = 0; j < n_models; j++) {
        const float lo = low[j], hi = high[j];
        float *band = bands[j];
        for (int64_t i = start; i < n; i++) {
            float a = fabsf(ms[j][i] - b[i]);
            above[j] += a > hi;
            band[n_band[j]] = a;
            n_band[j] += (a > lo) & (a <= hi);
            finite[j] &= a <= FLT_MAX;
        }
    }
}

/* Trimmed task vectors of one block: s_j = hardshrink(m_j - b, t_j) * f_j (* w_j when weighted). torch's
 * hardshrink zeroes -t <= x <= t; t = -inf keeps everything, t = inf keeps nothing. Where quota[j] >= 0, of the
 * entries with |m_j - b| = tie[j] only the first quota[j] (counted down across the blocks of a call) are kept. */
static void trimmed(const float *const *ms, const float *b, int64_t start, int len, int n_models, const float *t,
                    const float *f, const float *w, int weighted, const float *tie, int64_t *quota,
                    float s[][BLOCK]) {
    for (int j = 0; j < n_models; j++) {
        const float *m = ms[j] + start;
        const float tj = t[j], fj = f[j], wj = weighted ? w[j] : 1.0f;
        float *sj = s[j];
        int tied = 0;
        if (quota[j] < 0) {
            for (int i = 0; i < len; i++) {
                float tau = m[i] - b[start + i];
                float y = (tau >= -tj && tau <= tj) ? 0.0f : tau;
                sj[i] = (y * fj) * wj;
            }
            continue;
        }
        const float tj_tie = tie[j];
        for (int i = 0; i < len; i++) {
            float tau = m[i] - b[start + i];
            float y = (tau >= -tj && tau <= tj) ? 0.0f : tau;
            tied |= fabsf(tau) == tj_tie;
            sj[i] = (y * fj) * wj;
        }
        if (tied) {
            for (int i = 0; i < len; i++) {
                if (fabsf(m[i] - b[start + i]) != tj_tie) continue;
                if (quota[j] > 0) quota[j]--;
                else sj[i] = 0.0f;
            }
        }
    }
}

/* 1 when every one of the n values is finite (|x| <= FLT_MAX is false for NaN and +-Inf). */
static int finite_block(const float *x, int64_t n) {
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= fabsf(x[i]) <= FLT_MAX;
    return ok;
}

/* Sparsified sum: out = b + lam * (sum_j w_j s_j [/ divisor]), s_j trimmed as above (t = -inf, f = 1: plain task
 * arithmetic). The sum runs over j in order, as the torch loop does. Returns 1 when every output is finite. */
int um_sum_combine(const float *b, const float *const *ms, int n_models, const float *t, const float *f,
                   const float *tie, int64_t *quota, const float *w, int normalize, float divisor, float lam,
                   float *out, int64_t n) {
    float s[n_models][BLOCK];
    float acc[BLOCK];
    int finite = 1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        trimmed(ms, b, start, len, n_models, t, f, w, 1, tie, quota, s);
        for (int i = 0; i < len; i++) acc[i] = s[0][i];
        for (int j = 1; j < n_models; j++)
            for (int i = 0; i < len; i++) acc[i] += s[j][i];
        float *o = out + start;
        const float *bb = b + start;
        if (normalize)
            for (int i = 0; i < len; i++) o[i] = bb[i] + (acc[i] / divisor) * lam;
        else
            for (int i = 0; i < len; i++) o[i] = bb[i] + acc[i] * lam;
        finite &= finite_block(o, len);
    }
    return finite;
}

/* TIES combine (see _combine_chunk in sparsify.py for the float formulation this reproduces):
 *   s_j = trimmed (weighted by w_j when weighted_sign), gamma = sgn(sum_j s_j), or zero_sign where the sum is 0,
 *   z_j = relu(gamma s_j), count = sum_j [z_j > 0] (* w_j when weighted_divisor), agree = sum_j z_j (* w_j when not
 *   weighted_sign), out = b + lam * gamma * agree [/ count clamped: to FLT_MIN, or 1 where 0 with one_if_zero].
 * With tie_break, returns sum_j sgn(sum) over the chunk and sets *tied to how many positions have sum 0 and
 * agree != 0 (the paper's tie-break needs both); without, returns 0 and sets *tied to 0: no reduction runs (a float
 * sum would be one serial chain through every element). *finite gets 1 when every output is finite. */
int64_t um_ties_combine(const float *b, const float *const *ms, int n_models, const float *t, const float *f,
                        const float *tie, int64_t *quota, const float *w, int weighted_sign, int weighted_divisor,
                        int normalize, int one_if_zero, int tie_break, float lam, float zero_sign, float *out,
                        int64_t n, int64_t *tied, int *finite) {
    float s[n_models][BLOCK];
    float total[BLOCK], gamma[BLOCK], agree[BLOCK], count[BLOCK];
    int64_t sign_sum = 0, tied_sum = 0;
    int ok = 1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        trimmed(ms, b, start, len, n_models, t, f, w, weighted_sign, tie, quota, s);
        for (int i = 0; i < len; i++) total[i] = s[0][i];
        for (int j = 1; j < n_models; j++)
            for (int i = 0; i < len; i++) total[i] += s[j][i];
        for (int i = 0; i < len; i++) {
            const float sign = (float)((total[i] > 0) - (total[i] < 0));
            gamma[i] = sign != 0 ? sign : zero_sign;
        }
        for (int j = 0; j < n_models; j++) {
            const float wd = weighted_divisor ? w[j] : 1.0f, wz = weighted_sign ? 1.0f : w[j];
            const float *sj = s[j];
            for (int i = 0; i < len; i++) {
                float z = sj[i] * gamma[i];
                z = z > 0 ? z : 0.0f;
                const float a = (z > 0 ? 1.0f : 0.0f) * wd;
                count[i] = j == 0 ? a : count[i] + a;
                agree[i] = j == 0 ? z * wz : agree[i] + z * wz;
            }
        }
        if (tie_break) {
            int signs = 0, at_zero = 0;
            for (int i = 0; i < len; i++) {
                signs += (total[i] > 0) - (total[i] < 0);
                at_zero += (total[i] == 0) & (agree[i] != 0);
            }
            sign_sum += signs;
            tied_sum += at_zero;
        }
        float *o = out + start;
        const float *bb = b + start;
        if (!normalize) {
            for (int i = 0; i < len; i++) o[i] = bb[i] + (agree[i] * gamma[i]) * lam;
        } else if (one_if_zero) {
            for (int i = 0; i < len; i++) {
                const float c = count[i] == 0 ? 1.0f : count[i];
                o[i] = bb[i] + ((agree[i] * gamma[i]) / c) * lam;
            }
        } else {
            for (int i = 0; i < len; i++) {
                const float c = count[i] > 1.17549435e-38f ? count[i] : 1.17549435e-38f;
                o[i] = bb[i] + ((agree[i] * gamma[i]) / c) * lam;
            }
        }
        ok &= finite_block(o, len);
    }
    *tied = tied_sum;
    *finite = ok;
    return sign_sum;
}

/* 1 when none of the n float32 values is NaN or Inf. */
int um_all_finite(const float *x, int64_t n) { return finite_block(x, n); }
