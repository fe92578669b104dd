/* NF4 dequantization as one pass of SIMD table lookups: w[2i] = NF4[b >> 4] * s, w[2i + 1] = NF4[b & 15] * s for
 * each packed byte b = codes[i] of a block with scale s = absmax[block]; the same float32 products as
 * quant/nf4.py's PyTorch path (and bitsandbytes), bit for bit.
 *
 * Why C: the 16 levels fit one vector register, so a lookup is a single register permute (vpermps). Eager
 * PyTorch has no such op: its fastest lookup is a gather from memory, with a separate pass to widen the
 * codes and another to scale, about 3 x bitsandbytes' AVX512 kernel on a small weight. torch.compile wrote
 * the lookup as a scalar loop. The functions carry their own target attributes and nf4_simd_width() asks the
 * CPU at run time, so the library builds with any x86-64 compiler flags and runs on any x86-64 CPU; Python
 * falls back to the PyTorch path where it returns 0 (another architecture, or a CPU without AVX2).
 *
 * With double quantization the block scale is rebuilt in the same pass, s = DYNAMIC[c'] * s'_(block / 256) + μ,
 * rounded after the product and after the sum as PyTorch's two ops do: the library is built with
 * -ffp-contract=off (pyproject.toml), so the compiler never fuses them into one FMA.
 *
 * Threads: OpenMP over blocks, for a weight of parallel_min_blocks blocks or more (one core already runs a 576 x 1536
 * weight in about 0.07 ms). The library is built against libgomp.so.1, the runtime torch's Linux wheels load
 * first, so it runs on torch's own intra-op threads (models/dropout.c says why that matters). Loaded with ctypes
 * (models/native.py), no Python API.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Where a block's scale comes from: absmax, or with double quantization (absmax NULL) the rest. The layout
 * is quant/nf4.py's BlockScales. */
typedef struct {
    const float *absmax;          /* (n_blocks,) float32 scales */
    const uint8_t *absmax_codes;  /* (n_blocks,) 8-bit codes of scale - offset */
    const float *nested_absmax;   /* (ceil(n_blocks / 256),) their scales */
    const float *dynamic_levels;  /* (256,) the 8-bit dynamic code */
    float offset;                 /* the mean of the scales */
} BlockScales;

static inline float block_scale(const BlockScales *scales, int64_t block) {
    if (scales->absmax) return scales->absmax[block];
    float centred = scales->dynamic_levels[scales->absmax_codes[block]] * scales->nested_absmax[block / 256];
    return centred + scales->offset;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

int nf4_simd_width(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 512;
    if (__builtin_cpu_supports("avx2")) return 256;
    return 0;
}

/* 8 packed bytes -> 16 weights per step; a block's half_block bytes are a multiple of 8 (blocksize >= 32). */
__attribute__((target("avx512f")))
static void dequantize_avx512(const uint8_t *codes, const BlockScales *scales, const float *levels, float *out,
                              int64_t first_block, int64_t last_block, int64_t half_block) {
    const __m512 table = _mm512_loadu_ps(levels);  /* the 16 NF4 levels */
    /* lane 2k takes byte k's high nibble, lane 2k + 1 its low one: bitsandbytes' packing order */
    const __m512i byte_of_lane = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i shift_of_lane = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i low_nibble = _mm512_set1_epi32(15);
    for (int64_t block = first_block; block < last_block; block++) {
        const __m512 scale = _mm512_set1_ps(block_scale(scales, block));
        const uint8_t *in = codes + block * half_block;
        float *w = out + 2 * block * half_block;
        for (int64_t i = 0; i < half_block; i += 8) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(in + i)));  /* lanes 0..7 */
            __m512i code = _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of_lane, bytes), shift_of_lane), low_nibble);
            _mm512_storeu_ps(w + 2 * i, _mm512_mul_ps(_mm512_permutexvar_ps(code, table), scale));
        }
    }
}

/* AVX2 permutes 8 lanes: look a code up in levels 0-7 and 8-15 and keep the half its bit 3 names. */
__attribute__((target("avx2")))
static void dequantize_avx2(const uint8_t *codes, const BlockScales *scales, const float *levels, float *out,
                            int64_t first_block, int64_t last_block, int64_t half_block) {
    const __m256 table_low = _mm256_loadu_ps(levels), table_high = _mm256_loadu_ps(levels + 8);
    const __m256i byte_of_lane = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);
    const __m256i shift_of_lane = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const __m256i low_nibble = _mm256_set1_epi32(15);
    for (int64_t block = first_block; block < last_block; block++) {
        const __m256 scale = _mm256_set1_ps(block_scale(scales, block));
        const uint8_t *in = codes + block * half_block;
        float *w = out + 2 * block * half_block;
        for (int64_t i = 0; i < half_block; i += 4) {  /* 4 bytes -> 8 weights */
            int32_t four;
            __builtin_memcpy(&four, in + i, 4);
            __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four));
            __m256i code = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(bytes, byte_of_lane), shift_of_lane), low_nibble);
            __m256 level = _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_low, code),
                                            _mm256_permutevar8x32_ps(table_high, code),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  /* bit 3 -> sign */
            _mm256_storeu_ps(w + 2 * i, _mm256_mul_ps(level, scale));
        }
    }
}

/* The thread's share [*first, *last) of n items: one share per thread of the team. */
static inline void thread_share(int64_t n, int64_t *first, int64_t *last) {
#ifdef _OPENMP
    int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
    int64_t thread = 0, threads = 1;
#endif
    *first = n * thread / threads;
    *last = n * (thread + 1) / threads;
}

/* All n_blocks blocks of codes into out, split between torch's threads from parallel_min_blocks blocks on.
 * width: 512 or 256, at most what nf4_simd_width() returned. Returns 0 on success, -1 for a width or blocksize
 * it cannot take. */
int nf4_dequantize(const uint8_t *codes, const BlockScales *scales, const float *levels, float *out,
                   int64_t n_blocks, int64_t blocksize, int width, int64_t parallel_min_blocks) {
    if (blocksize % 16 != 0 || (width != 512 && width != 256)) return -1;
    #pragma omp parallel if (n_blocks >= parallel_min_blocks)
    {
        int64_t first, last;
        thread_share(n_blocks, &first, &last);
        if (width == 512) dequantize_avx512(codes, scales, levels, out, first, last, blocksize / 2);
        else dequantize_avx2(codes, scales, levels, out, first, last, blocksize / 2);
    }
    return 0;
}

#else
int nf4_simd_width(void) { return 0; }
int nf4_dequantize(const uint8_t *codes, const BlockScales *scales, const float *levels, float *out,
                   int64_t n_blocks, int64_t blocksize, int width, int64_t parallel_min_blocks) {
    (void)codes; (void)scales; (void)levels; (void)out; (void)n_blocks; (void)blocksize; (void)width;
    (void)parallel_min_blocks;
    return -1;
}
#endif
