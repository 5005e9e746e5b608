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

/* |m - b| over n elements: returns how many exceed `high`; writes those in (low, high] to band (in position order,
 * their number to *n_band; band must hold n floats); *finite = 1 when every |m - b| is finite, which proves m and b
 * finite (NaN or Inf in either gives a NaN or Inf difference). */
int64_t um_band_scan(const float *m, const float *b, int64_t n, float low, float high, float *band,
                     int64_t *n_band, int *finite) {
    int64_t above = 0, kept = 0;
    int64_t start = 0;
    int ok = 1;
    for (; start + SCAN_BLOCK <= n; start += SCAN_BLOCK) {
        int count = 0, inside = 0;
        for (int i = 0; i < SCAN_BLOCK; i++) {
            float a = fabsf(m[start + i] - b[start + i]);
            count += a > high;
            inside |= (a > low) & (a <= high);
            ok &= a <= FLT_MAX;
        }
        above += count;
        if (inside) {
            for (int i = 0; i < SCAN_BLOCK; i++) {
                float a = fabsf(m[start + i] - b[start + i]);
                band[kept] = a;
                kept += (a > low) & (a <= high);
            }
        }
    }
    for (int64_t i = start; i < n; i++) {
        float a = fabsf(m[i] - b[i]);
        above += a > high;
        band[kept] = a;
        kept += (a > low) & (a <= high);
        ok &= a <= FLT_MAX;
    }
    *n_band = kept;
    *finite = ok;
    return above;
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

/* Sparsified sum: out = b + lam * (sum_j w_j s_j [/ divisor]), s_j trimmed as above (t = -inf, f = 1: plain task
 * arithmetic). The sum runs over j in order, as the torch loop does. */
void um_sum_combine(const float *b, const float *const *ms, int n_models, const float *t, const float *f,
                    const float *tie, int64_t *quota, const float *w, int normalize, float divisor, float lam,
                    float *out, int64_t n) {
    float s[n_models][BLOCK];
    float acc[BLOCK];
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
    }
}

/* TIES combine (see _combine_chunk in sparsify.py for the float formulation this reproduces):
 *   s_j = trimmed (weighted by w_j when weighted_sign), gamma = sgn(sum_j s_j), or zero_sign where the sum is 0,
 *   z_j = relu(gamma s_j), count = sum_j [z_j > 0] (* w_j when weighted_divisor), agree = sum_j z_j (* w_j when not
 *   weighted_sign), out = b + lam * gamma * agree [/ count clamped: to FLT_MIN, or 1 where 0 with one_if_zero].
 * Returns sum_j sgn(sum) over the chunk; *tie_mass gets the agreeing mass where the sum is 0. */
int64_t um_ties_combine(const float *b, const float *const *ms, int n_models, const float *t, const float *f,
                        const float *tie, int64_t *quota, const float *w, int weighted_sign, int weighted_divisor,
                        int normalize, int one_if_zero, float lam, float zero_sign, float *out, int64_t n,
                        double *tie_mass) {
    float s[n_models][BLOCK];
    float total[BLOCK], gamma[BLOCK], agree[BLOCK], count[BLOCK];
    int64_t sign_sum = 0;
    double mass = 0.0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        trimmed(ms, b, start, len, n_models, t, f, w, weighted_sign, tie, quota, s);
        for (int i = 0; i < len; i++) total[i] = s[0][i];
        for (int j = 1; j < n_models; j++)
            for (int i = 0; i < len; i++) total[i] += s[j][i];
        int signs = 0;
        for (int i = 0; i < len; i++) {
            const int sign = (total[i] > 0) - (total[i] < 0);
            const float as_float = (float)sign;
            signs += sign;
            gamma[i] = as_float != 0 ? as_float : zero_sign;
        }
        sign_sum += signs;
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
        float block_mass = 0.0f;
        for (int i = 0; i < len; i++) block_mass += total[i] == 0 ? agree[i] : 0.0f;
        mass += block_mass;
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
    }
    *tie_mass = mass;
    return sign_sum;
}

/* 1 when none of the n float32 values (as bit patterns) is NaN or Inf, i.e. has every exponent bit set. */
int um_all_finite(const uint32_t *x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (x[i] & 0x7f800000u) == 0x7f800000u;
    return !bad;
}
