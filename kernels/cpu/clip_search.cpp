// Rounding errors of candidate integer grids, the inner loop of the clip search (rtn.search_group_params), bit
// for bit as NumPy computes them in rtn._rounding_error: float32 rounding and reconstruction in that function's
// order, squares in float64 times the element weights, and the sums in NumPy's own order (pairwise along a
// contiguous axis, in order along a strided one). Compiled without floating-point contraction (no FMA), so each
// operation rounds as NumPy's does. Called from Python through ctypes (lowbit.kernels.clip_search).
#include <cmath>
#include <cstdint>
#include <vector>

#define LOWBIT_EXPORT extern "C" __attribute__((visibility("default")))
#define LOWBIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace {

// x - reconstruction of x on the grid (scale, offset): rint(x / scale) + offset, clipped to [0, max_code], minus
// offset, times scale (rtn._rounding_error's steps, each rounded to float32).
inline float rounding_difference(float x, float scale, float offset, float max_code) {
    float code = std::rint(x / scale) + offset;
    code = code < 0.0f ? 0.0f : code;
    code = code > max_code ? max_code : code;
    return x - (code - offset) * scale;
}

// NumPy's pairwise sum of n float64 values (numpy/_core/src/umath/loops_utils.h.src, DOUBLE_pairwise_sum).
double pairwise_sum(const double* a, int64_t n) {
    if (n < 8) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) sum += a[i];
        return sum;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) sum += a[i];
        return sum;
    }
    int64_t half = n / 2;
    half -= half % 8;
    return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

}  // namespace

// Groups along the contiguous axis: x [rows, members]; scales and offsets [candidates, rows]; weights [rows,
// members] or null; out [candidates, rows] = the pairwise sum over members of weight * difference^2.
LOWBIT_EXPORT LOWBIT_CLONES void lowbit_rounding_errors_contiguous(
    const float* x, int64_t rows, int64_t members, const float* scales, const float* offsets, int64_t candidates,
    const double* weights, float max_code, double* out) {
    std::vector<double> squares(static_cast<size_t>(members));
    for (int64_t c = 0; c < candidates; ++c) {
        for (int64_t r = 0; r < rows; ++r) {
            const float scale = scales[c * rows + r], offset = offsets[c * rows + r];
            const float* values = x + r * members;
            for (int64_t m = 0; m < members; ++m) {
                const double difference = rounding_difference(values[m], scale, offset, max_code);
                squares[m] = difference * difference;
            }
            if (weights != nullptr) {
                const double* row_weights = weights + r * members;
                for (int64_t m = 0; m < members; ++m) squares[m] *= row_weights[m];
            }
            out[c * rows + r] = pairwise_sum(squares.data(), members);
        }
    }
}

// Groups along a strided axis: x [groups, members, columns]; scales and offsets [candidates, groups, columns];
// weights [groups, members] (one per member, for every column) or null; out [candidates, groups, columns] = the
// sum over members, in order, of weight * difference^2.
LOWBIT_EXPORT LOWBIT_CLONES void lowbit_rounding_errors_strided(
    const float* x, int64_t groups, int64_t members, int64_t columns, const float* scales, const float* offsets,
    int64_t candidates, const double* weights, float max_code, double* out) {
    for (int64_t c = 0; c < candidates; ++c) {
        for (int64_t g = 0; g < groups; ++g) {
            const float* group_scales = scales + (c * groups + g) * columns;
            const float* group_offsets = offsets + (c * groups + g) * columns;
            double* sums = out + (c * groups + g) * columns;
            for (int64_t n = 0; n < columns; ++n) sums[n] = 0.0;
            for (int64_t m = 0; m < members; ++m) {
                const float* values = x + (g * members + m) * columns;
                const double weight = weights != nullptr ? weights[g * members + m] : 1.0;
                for (int64_t n = 0; n < columns; ++n) {
                    const double difference = rounding_difference(values[n], group_scales[n], group_offsets[n], max_code);
                    double square = difference * difference;
                    if (weights != nullptr) square *= weight;
                    sums[n] += square;
                }
            }
        }
    }
}
