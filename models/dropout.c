/* Dropout in one pass over memory: keep mask, y = x * keep / (1 - p) and, in backward, dL/dx = dL/dy * keep / (1 - p),
 * for float32 tensors. models/fused.py documents the math and loads this with ctypes.
 *
 * The mask is counter-based: element i is kept when the top 16 bits of
 *     mix32(mix32(lo32(i) ^ key0) + (key1 ^ hi32(i)))
 * are >= round(p * 65536), with mix32 a bijective 32-bit integer hash (lowbias32, from Chris Wellons' hash
 * prospector) and key0, key1 one 64-bit draw from torch's generator per call. Each element's lane depends on
 * its index and the key only, so the loop vectorises (the compiler builds an AVX512, an AVX2 and a plain copy of
 * each loop and the CPU picks one at load time) and splits between threads without changing the mask; torch's
 * own generator is a serial Mersenne Twister.
 *
 * Threads: OpenMP, built against libgomp.so.1. torch's Linux wheels ship their own libgomp.so.1 and load it first,
 * so the loader hands this library the same one: these loops run on torch's intra-op threads (as many as
 * torch.get_num_threads()), which are spinning anyway after torch's last parallel op. A thread of our own made a
 * MiniLM step slower instead, competing with them for the two cores.
 */
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIMD_CLONES
#endif

/* Below this many elements one thread does it all: waking the others costs more than it saves. */
#define PARALLEL_MIN 65536

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* key1 arrives already xor-ed with hi32(i): the callers walk 2^32 elements at a time, so that the loops' counter
 * stays 32-bit (a 64-bit one halved the lanes per vector). */
static inline uint8_t keep_element(int64_t i, uint32_t key0, uint32_t key1_hi, uint32_t threshold) {
    uint32_t lane = mix32(mix32((uint32_t)i ^ key0) + key1_hi) >> 16;
    return lane >= threshold;
}

#define SPAN ((int64_t)1 << 32)  /* elements walked with one key1_hi */
#define SPAN_END(start, n) ((n) - (start) > SPAN ? (start) + SPAN : (n))

/* The keep mask alone, n elements. */
SIMD_CLONES
void dropout_keep_mask(uint8_t *keep, int64_t n, uint32_t key0, uint32_t key1, uint32_t threshold) {
    for (int64_t start = 0; start < n; start += SPAN) {
        uint32_t key1_hi = key1 ^ (uint32_t)(start >> 32);
        int64_t end = SPAN_END(start, n);
        #pragma omp parallel for schedule(static) if (end - start >= PARALLEL_MIN)
        for (int64_t i = start; i < end; i++)
            keep[i] = keep_element(i, key0, key1_hi, threshold);
    }
}

/* The mask and y = x * (keep ? scale : 0): x * 0 as torch's product gives it
 * (-0 for a negative x, NaN for an infinite one), scale the float32 1 / (1 - p). */
SIMD_CLONES
void dropout_forward(const float *x, float *y, uint8_t *keep, int64_t n, uint32_t key0, uint32_t key1,
                     uint32_t threshold, float scale) {
    for (int64_t start = 0; start < n; start += SPAN) {
        uint32_t key1_hi = key1 ^ (uint32_t)(start >> 32);
        int64_t end = SPAN_END(start, n);
        #pragma omp parallel for schedule(static) if (end - start >= PARALLEL_MIN)
        for (int64_t i = start; i < end; i++) {
            uint8_t k = keep_element(i, key0, key1_hi, threshold);
            keep[i] = k;
            y[i] = x[i] * (k ? scale : 0.0f);
        }
    }
}

/* dL/dx = dL/dy * (keep ? scale : 0), n elements. */
SIMD_CLONES
void dropout_backward(const float *grad_y, const uint8_t *keep, float *grad_x, int64_t n, float scale) {
    #pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) grad_x[i] = grad_y[i] * (keep[i] ? scale : 0.0f);
}
