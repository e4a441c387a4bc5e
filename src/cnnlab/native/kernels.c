/* CPU kernels for cnnlab: a convolution with few input channels fused with the 2x2 max pool
 * after it (and, on CPUs with AVX512-BF16, the same in bfloat16 dot products, and a bfloat16
 * convolution on more channels with its pool), the weight and input gradients of a convolution
 * under a 2x2 max pool from the pooled gradient, the 2x2 max pool alone with its gradient,
 * dropout, the 2x2 max pool with its ReLU and the dropout after it in one pass, and a dense head
 * (Dense, Dropout, Dense; the first Dense's products in bfloat16 where autocast would run it in
 * bfloat16) in one call each way, and a training step's softmax cross-entropy and gradient check.
 *
 * The first block of most small CNNs (Conv2D on 1-3 channels, then MaxPool2D(2)) is where
 * PyTorch spends half of a training step: oneDNN runs a one-channel convolution at under
 * 10 GFLOP/s, writes a full-resolution output, max_pool2d reads it back with indices, and its
 * backward zero-fills and scatters a full-resolution gradient. These kernels compute each
 * pooled output from the input directly (the convolution at the four window positions, the
 * maximum, the activation) and the weight gradient straight from the pooled gradient.
 *
 * Layouts (all contiguous):
 *   x       input, float32 [batch][in_h][in_w][in_c] (NHWC: channels_last)
 *   w       weights, float32 [out_c][in_c][kh][kw] (PyTorch's layout); the kernels use them as
 *           [kh][kw][in_c][out_c_pad], out_c_pad = out_c rounded up to a multiple of LANES,
 *           the extra channels zero (weights_by_tap)
 *   bias    float32 [out_c], or NULL
 *   y       output [batch][pool_h][pool_w][out_c], float32 or bfloat16 (uint16 bits); in
 *           conv_pool_forward [batch][out_rows][out_cols][out_c], zero beyond pool_h, pool_w
 *   argmax  uint8, laid out as y: the window position (0-3, row-major) that won the max, or
 *           NO_GRADIENT where the ReLU after the pool zeroed the output
 *   grad    float32 or bfloat16, laid out as y
 *   grad_w  float32 [out_c][in_c][kh][kw], grad_b float32 [out_c]
 *
 * The convolution has stride 1 and zero padding (pad_top, pad_left; the bottom and right
 * padding follow from conv_h and conv_w). Pool window (i, j) covers conv rows 2i, 2i+1 and
 * columns 2j, 2j+1, clipped to the conv output (TF 'same' pooling pads only below and to the
 * right, with -inf). Ties and NaN follow torch.max_pool2d: the first maximum wins, NaN wins.
 *
 * Each image is first copied into a zero-padded buffer, so every window position's patch is
 * kh rows of kw * in_c contiguous values. Output channels go through in blocks of LANES, two
 * blocks at a time: per tap, two weight loads and eight fused multiply-adds against the four
 * positions' input values, all accumulators in vector registers. GCC's and Clang's vector
 * extensions keep that explicit and portable.
 *
 * Threads come from OpenMP: built with -fopenmp, this library shares the libgomp.so.1 that
 * PyTorch has loaded, so its parallel loops run on PyTorch's own threads instead of fighting
 * them for the cores. Nothing here keeps state. Built by cnnlab.native with the system C
 * compiler (-O3 -march=native).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16
#define MAX_TAPS 128
#define NO_GRADIENT 255
#define DROPPED 4 /* pool_dropout_forward's code: this window position's value was dropped */
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float vf_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef int32_t vi_unaligned __attribute__((vector_size(LANES * sizeof(int32_t)), aligned(4)));
typedef uint16_t vh_unaligned __attribute__((vector_size(LANES * sizeof(uint16_t)), aligned(2)));
typedef uint8_t vb_unaligned __attribute__((vector_size(LANES), aligned(1)));

typedef struct {
    int32_t in_h, in_w, in_c;
    int32_t out_c, kh, kw, pad_top, pad_left;
    int32_t conv_h, conv_w;
    int32_t pool_h, pool_w;
    int32_t relu; /* 1: ReLU after the pool (it commutes with max), 0: no activation */
    /* Rows and columns of y, argmax and grad in conv_pool_forward and conv_pool_weight_grad:
     * pool_h and pool_w, or more where y also holds the zero padding that the next conv needs
     * below and to the right (written here, so that no separate pad pass copies y). The other
     * kernels leave them alone. */
    int32_t out_rows, out_cols;
} Geometry;

INLINE vf load(const float *p) { return *(const vf_unaligned *)p; }
INLINE void store(float *p, vf v) { *(vf_unaligned *)p = v; }
INLINE void store_ints(int32_t *p, vi v) { *(vi_unaligned *)p = v; }
INLINE vf select_f(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }
INLINE vi select_i(vi mask, vi yes, vi no) { return (mask & yes) | (~mask & no); }

/* Lane masks for the max-pool comparisons. With AVX-512 they live in mask registers: built
 * with GCC's vector compares they would be vectors, moved in and out of mask registers at every
 * select, and the window maximum of the first block took as long as its convolution. */
#ifdef __AVX512F__
typedef __mmask16 lanes_mask;
/* value beats best: greater, or NaN (as in torch.max_pool2d: the first maximum wins, NaN wins) */
INLINE lanes_mask beats(vf value, vf best) {
    return _mm512_cmp_ps_mask((__m512)value, (__m512)best, _CMP_GT_OQ) |
           _mm512_cmp_ps_mask((__m512)value, (__m512)value, _CMP_UNORD_Q);
}
INLINE lanes_mask not_positive(vf value) {
    return _mm512_cmp_ps_mask((__m512)value, _mm512_setzero_ps(), _CMP_LE_OQ);
}
INLINE lanes_mask lanes_equal(vi a, int value) {
    return _mm512_cmpeq_epi32_mask((__m512i)a, _mm512_set1_epi32(value));
}
/* value is not zero (NaN included) */
INLINE lanes_mask nonzero(vf value) {
    return _mm512_cmp_ps_mask((__m512)value, _mm512_setzero_ps(), _CMP_NEQ_UQ);
}
INLINE vf pick_f(lanes_mask mask, vf yes, vf no) {
    return (vf)_mm512_mask_mov_ps((__m512)no, mask, (__m512)yes);
}
INLINE vi pick_i(lanes_mask mask, vi yes, vi no) {
    return (vi)_mm512_mask_mov_epi32((__m512i)no, mask, (__m512i)yes);
}
#else
typedef vi lanes_mask;
INLINE lanes_mask beats(vf value, vf best) { return (value > best) | (value != value); }
INLINE lanes_mask not_positive(vf value) { return value <= (vf){0}; }
INLINE lanes_mask lanes_equal(vi a, int value) { return a == value; }
INLINE lanes_mask nonzero(vf value) { return value != (vf){0}; }
INLINE vf pick_f(lanes_mask mask, vf yes, vf no) { return select_f(mask, yes, no); }
INLINE vi pick_i(lanes_mask mask, vi yes, vi no) { return select_i(mask, yes, no); }
#endif
/* bfloat16 bits (the upper half of a float32's) to and from LANES lanes, and window positions.
 * GCC 12 turns these widening and narrowing conversions into lane-by-lane moves through the
 * stack, so AVX-512 builds use its one-instruction widening loads and narrowing stores. */
#ifdef __AVX512F__
INLINE vf load_bf16(const uint16_t *p) {
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
INLINE vi load_bytes(const uint8_t *p) {
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}
INLINE void store_bf16_bits(uint16_t *p, vi bits) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16((__m512i)bits));
}
INLINE void store_bytes(uint8_t *p, vi bytes) {
    _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8((__m512i)bytes));
}
#else
INLINE vf load_bf16(const uint16_t *p) {
    return (vf)(__builtin_convertvector(*(const vh_unaligned *)p, vi) << 16);
}
INLINE vi load_bytes(const uint8_t *p) {
    return __builtin_convertvector(*(const vb_unaligned *)p, vi);
}
INLINE void store_bf16_bits(uint16_t *p, vi bits) {
    *(vh_unaligned *)p = __builtin_convertvector(bits, vh_unaligned);
}
INLINE void store_bytes(uint8_t *p, vi bytes) {
    *(vb_unaligned *)p = __builtin_convertvector(bytes, vb_unaligned);
}
#endif
/* float32 or bfloat16 values at p[at], LANES at a time or one at a time. */
INLINE vf load_any(const void *p, int64_t at, int is_bf16) {
    return is_bf16 ? load_bf16((const uint16_t *)p + at) : load((const float *)p + at);
}

/* Stores v exactly: in bfloat16, values that came from bfloat16 need no rounding. */
INLINE void store_any(void *p, int64_t at, int is_bf16, vf v) {
    if (is_bf16)
        store_bf16_bits((uint16_t *)p + at, ((vi)v >> 16) & 0xffff);
    else
        store((float *)p + at, v);
}

/* The scalar versions, for the channels after the last whole block of LANES. */
INLINE float load_one(const void *p, int64_t at, int is_bf16) {
    if (!is_bf16) return ((const float *)p)[at];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[at] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

INLINE void store_one(void *p, int64_t at, int is_bf16, float value) {
    if (!is_bf16) {
        ((float *)p)[at] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    ((uint16_t *)p)[at] = (uint16_t)(bits >> 16);
}

INLINE int padded(int out_c) { return (out_c + LANES - 1) / LANES * LANES; }
INLINE int padded_rows(const Geometry *g) {
    return (g->conv_h > 2 * g->pool_h ? g->conv_h : 2 * g->pool_h) + g->kh - 1;
}
INLINE int padded_cols(const Geometry *g) {
    return (g->conv_w > 2 * g->pool_w ? g->conv_w : 2 * g->pool_w) + g->kw - 1;
}

/* This thread's share [b0, b1) of a batch split over an OpenMP team (all of it without one, or in
 * a team of one: the parallel regions below run on the calling thread alone when their `if`
 * clause is false, as for one thread). */
static void share(int64_t batch, int64_t *b0, int64_t *b1) {
#ifdef _OPENMP
    const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
    *b0 = batch * t / n;
    *b1 = batch * (t + 1) / n;
#else
    *b0 = 0;
    *b1 = batch;
#endif
}

/* float32 -> bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN. */
INLINE vi to_bf16(vf value) {
    const vi bits = (vi)value;
    const vi rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    return select_i(value != value, (bits >> 16) | 0x40, rounded) & 0xffff;
}

/* Stores v rounded to nearest even in bfloat16. */
INLINE void store_rounded(void *p, int64_t at, int is_bf16, vf v) {
    if (is_bf16)
        store_bf16_bits((uint16_t *)p + at, to_bf16(v));
    else
        store((float *)p + at, v);
}

/* n values of x (float32 or bfloat16) from x[at] on, into float32 `to`. */
INLINE void widen(const void *x, int64_t at, int is_bf16, float *to, int64_t n) {
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) store(to + k, load_any(x, at + k, is_bf16));
    for (; k < n; k++) to[k] = load_one(x, at + k, is_bf16);
}

/* n float32 values of `from` into p[at] on, rounded to nearest even where p is bfloat16. */
INLINE void narrow(const float *from, int64_t n, void *p, int64_t at, int is_bf16) {
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) store_rounded(p, at + k, is_bf16, load(from + k));
    for (; k < n; k++) {
        if (is_bf16)
            ((uint16_t *)p)[at + k] = (uint16_t)to_bf16((vf){0} + from[k])[0];
        else
            ((float *)p)[at + k] = from[k];
    }
}

/* A buffer for pad_image (free it), with LANES zeros to spare after the image for reads past
 * its last pixel whose values go unused (window_rows); NULL when out of memory. */
static float *padded_buffer(const Geometry *g) {
    const size_t image = (size_t)padded_rows(g) * (size_t)padded_cols(g) * (size_t)g->in_c;
    float *buf = malloc(sizeof(float) * (image + LANES));
    if (buf) memset(buf + image, 0, sizeof(float) * LANES);
    return buf;
}

/* Image xb, zero-padded into buf so that every window position's patch lies inside it:
 * rows [-pad_top, padded_rows - pad_top) and the same for columns, in_c values each.
 * Returns the padded row length in floats. */
static int64_t pad_image(const Geometry *g, const float *xb, float *buf) {
    const int rows = padded_rows(g), cols = padded_cols(g), in_c = g->in_c;
    const int64_t row = (int64_t)cols * in_c;
    memset(buf, 0, sizeof(float) * (size_t)(rows * row));
    for (int y = 0; y < g->in_h && y + g->pad_top < rows; y++) {
        const int n = g->in_w + g->pad_left < cols ? g->in_w : cols - g->pad_left;
        memcpy(buf + (y + g->pad_top) * row + (int64_t)g->pad_left * in_c,
               xb + (int64_t)y * g->in_w * in_c, sizeof(float) * (size_t)(n * in_c));
    }
    return row;
}

/* ---------------------------------------------------------------------------------------- */
/* Forward                                                                                   */

/* The conv outputs at the four positions of COUNT windows side by side (window n's top-left
 * input at corner + 2n * in_c), for BLOCKS blocks of LANES channels from w (already offset to
 * the first channel). Two windows at a time share each weight load and give the FMAs sixteen
 * independent sums to overlap. */
INLINE void windows(const int kh, const int kw, const int in_c, const float *corner, int64_t row,
                    const float *w, const float *bias, int out_c_pad, const int blocks,
                    const int count, vf acc[2][2][4]) {
    const int row_taps = kw * in_c;
    for (int q = 0; q < blocks; q++) {
        const vf start = bias ? load(bias + q * LANES) : (vf){0};
        for (int n = 0; n < count; n++)
            for (int p = 0; p < 4; p++) acc[n][q][p] = start;
    }
    for (int ky = 0; ky < kh; ky++) {
        const float *top = corner + ky * row, *bottom = top + row;
        const float *wk = w + (int64_t)ky * row_taps * out_c_pad;
        for (int k = 0; k < row_taps; k++, wk += out_c_pad) {
            vf weight[2];
            for (int q = 0; q < blocks; q++) weight[q] = load(wk + q * LANES);
            for (int n = 0; n < count; n++) {
                const int o = k + 2 * n * in_c;
                const float x0 = top[o], x1 = top[o + in_c], x2 = bottom[o], x3 = bottom[o + in_c];
                for (int q = 0; q < blocks; q++) {
                    acc[n][q][0] += x0 * weight[q];
                    acc[n][q][1] += x1 * weight[q];
                    acc[n][q][2] += x2 * weight[q];
                    acc[n][q][3] += x3 * weight[q];
                }
            }
        }
    }
}

/* Convolutions with HALF output channels (8, as in the `tiny` preset) would leave half of every
 * vector idle. Instead two neighbouring windows share each vector: window j in the low HALF
 * lanes, window j + 1 in the high ones, against weights laid out twice over ("spread": [kh][kw]
 * [in_c][LANES], each tap's HALF weights in both halves). Their outputs then lie side by side
 * in y, so one store writes both. */
#define HALF (LANES / 2)

/* low in lanes [0, HALF), high in [HALF, LANES) */
INLINE vf halves(float low, float high) {
#ifdef __AVX512F__
    return (vf)_mm512_mask_broadcastss_ps(_mm512_set1_ps(low), 0xff00, _mm_set_ss(high));
#else
    const vi upper = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
    return select_f(upper, (vf){0} + high, (vf){0} + low);
#endif
}

/* Each tap's weights for HALF channels, from w ([taps][out_c_pad]) into both halves of spread. */
static void spread_weights(const float *w, int taps, int out_c_pad, float *spread) {
    for (int t = 0; t < taps; t++)
        for (int c = 0; c < LANES; c++) spread[t * LANES + c] = w[t * out_c_pad + c % HALF];
}

/* The four positions' conv outputs of windows j and j + 1 (corner is window j's), packed. */
INLINE void window_pair_packed(const int kh, const int kw, const int in_c, const float *corner,
                               int64_t row, const float *spread, const float *bias_spread,
                               vf acc[4]) {
    const vf start = bias_spread ? load(bias_spread) : (vf){0};
    for (int p = 0; p < 4; p++) acc[p] = start;
    for (int ky = 0; ky < kh; ky++) {
        for (int k = 0; k < kw * in_c; k++) {
            const vf weight = load(spread + (ky * kw * in_c + k) * LANES);
            for (int p = 0; p < 4; p++) {
                const float *at = corner + (ky + (p >> 1)) * row + k + (p & 1) * in_c;
                acc[p] += halves(at[0], at[2 * in_c]) * weight;
            }
        }
    }
}

/* finish's stores for fewer than LANES channels (the last block of a channel count that is not
 * a multiple of LANES). Out of line and through local copies: indexing finish's own vectors
 * would keep them in memory for the whole of it, a store and a reload at every step of the
 * window maximum (the first block's forward pass took 1.5x as long). */
__attribute__((noinline)) static void store_lanes(void *y, int64_t at, int y_is_bf16, vf best,
                                                  vi half, uint8_t *argmax, vi arg, int lanes) {
    float values[LANES];
    int32_t halves_[LANES], args[LANES];
    memcpy(values, &best, sizeof values);
    memcpy(halves_, &half, sizeof halves_);
    memcpy(args, &arg, sizeof args);
    for (int c = 0; c < lanes; c++) {
        if (y_is_bf16)
            ((uint16_t *)y)[at + c] = (uint16_t)halves_[c];
        else
            ((float *)y)[at + c] = values[c];
        if (argmax) argmax[at + c] = (uint8_t)args[c];
    }
}

/* Max over the valid window positions, the activation, and the stores of one block; the
 * winning positions only where argmax is wanted (`track`, a constant once inlined). */
INLINE void finish(const Geometry *g, const vf acc[4], const int valid[4], int lanes,
                   void *y, int64_t at, int y_is_bf16, uint8_t *argmax, const int track) {
    vf best = acc[0]; /* position 0 is always inside the conv output */
    vi arg = (vi){0};
    for (int p = 1; p < 4; p++) {
        if (!valid[p]) continue;
        const lanes_mask wins = beats(acc[p], best);
        best = pick_f(wins, acc[p], best);
        if (track) arg = pick_i(wins, (vi){0} + p, arg);
    }
    if (g->relu) { /* NaN stays NaN and keeps its gradient */
        const lanes_mask dead = not_positive(best);
        best = pick_f(dead, (vf){0}, best);
        if (track) arg = pick_i(dead, (vi){0} + NO_GRADIENT, arg);
    }
    const vi half = y_is_bf16 ? to_bf16(best) : (vi){0};
    if (lanes < LANES) {
        store_lanes(y, at, y_is_bf16, best, half, track ? argmax : NULL, arg, lanes);
        return;
    }
    if (y_is_bf16)
        store_bf16_bits((uint16_t *)y + at, half);
    else
        store((float *)y + at, best);
    if (track) store_bytes(argmax + at, arg);
}

/* Which of the four positions of window (i, j) lie inside the conv output. */
INLINE void window_valid(const Geometry *g, int i, int j, int valid[4]) {
    const int valid_row = 2 * i + 1 < g->conv_h, valid_col = 2 * j + 1 < g->conv_w;
    valid[0] = 1;
    valid[1] = valid_col;
    valid[2] = valid_row;
    valid[3] = valid_row && valid_col;
}

/* Zeroes image b's y beyond the pooled output: columns from pool_w on, rows from pool_h on. */
static void zero_border(const Geometry *g, void *y, int y_is_bf16, int64_t b) {
    const size_t elem = y_is_bf16 ? sizeof(uint16_t) : sizeof(float);
    const size_t pixel = (size_t)g->out_c * elem, row = (size_t)g->out_cols * pixel;
    char *image = (char *)y + (size_t)b * (size_t)g->out_rows * row;
    if (g->out_cols > g->pool_w)
        for (int i = 0; i < g->pool_h; i++)
            memset(image + i * row + (size_t)g->pool_w * pixel, 0,
                   (size_t)(g->out_cols - g->pool_w) * pixel);
    if (g->out_rows > g->pool_h)
        memset(image + (size_t)g->pool_h * row, 0, (size_t)(g->out_rows - g->pool_h) * row);
}

/* Images [b0, b1) of the batch; kh, kw and in_c are g's, passed apart so that callers can
 * make them constants the compiler unrolls (see SHAPED). */
INLINE int forward_shaped(const Geometry *g, const int kh, const int kw, const int in_c,
                          const float *x, const float *w, const float *bias, int64_t b0,
                          int64_t b1, void *y, int y_is_bf16, uint8_t *argmax) {
    const int out_c = g->out_c, out_c_pad = padded(out_c), packed = out_c == HALF;
    const int64_t image = (int64_t)g->in_h * g->in_w * g->in_c;
    const int64_t pooled = (int64_t)g->out_rows * g->out_cols * out_c;
    float spread[MAX_TAPS * LANES], bias_spread[LANES];
    if (packed) {
        spread_weights(w, kh * kw * in_c, out_c_pad, spread);
        if (bias) spread_weights(bias, 1, out_c_pad, bias_spread);
    }
    float *buf = padded_buffer(g);
    if (!buf) return -2;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t row = pad_image(g, x + b * image, buf);
        for (int i = 0; i < g->pool_h; i++) {
            for (int j = 0; j < g->pool_w; j += 2) {
                const int count = j + 1 < g->pool_w ? 2 : 1;
                int valid[2][4];
                for (int n = 0; n < count; n++) window_valid(g, i, j + n, valid[n]);
                const float *corner = buf + 2 * i * row + (int64_t)2 * j * in_c;
                const int64_t at = b * pooled + ((int64_t)i * g->out_cols + j) * out_c;
                if (packed && count == 2 && valid[1][3]) { /* both windows whole */
                    vf acc[4];
                    window_pair_packed(kh, kw, in_c, corner, row, spread,
                                       bias ? bias_spread : NULL, acc);
                    if (argmax)
                        finish(g, acc, valid[1], LANES, y, at, y_is_bf16, argmax, 1);
                    else
                        finish(g, acc, valid[1], LANES, y, at, y_is_bf16, NULL, 0);
                    continue;
                }
                for (int c0 = 0; c0 < out_c_pad; c0 += 2 * LANES) {
                    vf acc[2][2][4];
                    const float *bias_c = bias ? bias + c0 : NULL;
                    const int pair = c0 + LANES < out_c_pad;
                    if (pair && count == 2)
                        windows(kh, kw, in_c, corner, row, w + c0, bias_c, out_c_pad, 2, 2, acc);
                    else if (pair)
                        windows(kh, kw, in_c, corner, row, w + c0, bias_c, out_c_pad, 2, 1, acc);
                    else if (count == 2)
                        windows(kh, kw, in_c, corner, row, w + c0, bias_c, out_c_pad, 1, 2, acc);
                    else
                        windows(kh, kw, in_c, corner, row, w + c0, bias_c, out_c_pad, 1, 1, acc);
                    for (int n = 0; n < count; n++) {
                        for (int q = 0; q <= pair; q++) {
                            const int c = c0 + q * LANES;
                            const int lanes = out_c - c < LANES ? out_c - c : LANES;
                            const int64_t to = at + n * out_c + c;
                            if (argmax)
                                finish(g, acc[n][q], valid[n], lanes, y, to, y_is_bf16, argmax, 1);
                            else
                                finish(g, acc[n][q], valid[n], lanes, y, to, y_is_bf16, NULL, 0);
                        }
                    }
                }
            }
        }
        zero_border(g, y, y_is_bf16, b);
    }
    free(buf);
    return 0;
}

/* The kernel shapes of the usual first layers (3x3 and 4x4 on grey images, 3x3 on colour)
 * run fully unrolled; any other shape takes the general loops. */
#define SHAPED(call, g, ...)                                                                  \
    ((g)->kh == 3 && (g)->kw == 3 && (g)->in_c == 1   ? call(g, 3, 3, 1, __VA_ARGS__)         \
     : (g)->kh == 4 && (g)->kw == 4 && (g)->in_c == 1 ? call(g, 4, 4, 1, __VA_ARGS__)         \
     : (g)->kh == 3 && (g)->kw == 3 && (g)->in_c == 3 ? call(g, 3, 3, 3, __VA_ARGS__)         \
                                                      : call(g, (g)->kh, (g)->kw, (g)->in_c, __VA_ARGS__))

static int forward_images(const Geometry *g, const float *x, const float *w, const float *bias,
                          int64_t b0, int64_t b1, void *y, int y_is_bf16, uint8_t *argmax) {
    return SHAPED(forward_shaped, g, x, w, bias, b0, b1, y, y_is_bf16, argmax);
}

/* PyTorch's weights w [out_c][in_c][kh][kw] and bias [out_c] (or NULL) as the kernels read
 * them: [kh][kw][in_c][out_c_pad], then the bias as [out_c_pad] unless it is NULL, the extra
 * channels zero. One allocation (free it); NULL when out of memory. Relaid out here rather than
 * by the caller: a handful of PyTorch ops per call cost more than the kernel on small batches. */
static float *weights_by_tap(const Geometry *g, const float *w, const float *bias) {
    const int out_c_pad = padded(g->out_c), kh = g->kh, kw = g->kw, in_c = g->in_c;
    const int64_t size = (int64_t)kh * kw * in_c * out_c_pad;
    float *by_tap = calloc((size_t)(size + (bias ? out_c_pad : 0)), sizeof(float));
    if (!by_tap) return NULL;
    for (int o = 0; o < g->out_c; o++)
        for (int c = 0; c < in_c; c++)
            for (int ky = 0; ky < kh; ky++)
                for (int kx = 0; kx < kw; kx++)
                    by_tap[((int64_t)(ky * kw + kx) * in_c + c) * out_c_pad + o] =
                        w[((int64_t)(o * in_c + c) * kh + ky) * kw + kx];
    if (bias) memcpy(by_tap + size, bias, sizeof(float) * (size_t)g->out_c);
    return by_tap;
}

/* pool(act(conv(x))) for the whole batch, images split over `threads` OpenMP threads. */
int conv_pool_forward(const Geometry *g, const float *x, const float *w, const float *bias,
                      int64_t batch, void *y, int32_t y_is_bf16, uint8_t *argmax,
                      int32_t threads) {
    if (g->kh * g->kw * g->in_c > MAX_TAPS) return -1;
    float *by_tap = weights_by_tap(g, w, bias);
    if (!by_tap) return -2;
    const float *bias_pad = bias ? by_tap + (int64_t)g->kh * g->kw * g->in_c * padded(g->out_c)
                                 : NULL;
    int status = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(min : status)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        status = forward_images(g, x, by_tap, bias_pad, b0, b1, y, y_is_bf16, argmax);
    }
    free(by_tap);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* Forward in bfloat16 dot products (AVX512-BF16)                                            */

/* pool(conv(x)) for a bfloat16 input with an even number of channels, unpadded (the caller pads
 * it), no activation (the caller applies it after the pool), y bfloat16 with its argmax. One
 * _mm512_dpbf16_ps multiplies two neighbouring input channels by LANES output channels' weights
 * and adds both products into float32 sums: twice the work of an FMA per instruction, and no
 * widening of the input. `tiny`'s second conv (8 to 16 channels, 3x3) and its pool: 67 us for
 * 128 images against 148 us for oneDNN's bf16 convolution and max_pool_forward. As oneDNN's
 * bf16 convolution, the weights and bias are rounded to bfloat16 and the sums kept in float32;
 * the pool compares those float32 sums before rounding the winner (oneDNN rounds all four
 * first, so where two positions round to the same bfloat16 the first of them wins there). */
int conv_pool_bf16_available(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__
/* to_bf16 for one value. */
static uint16_t bf16_bits(float value) { return (uint16_t)to_bf16((vf){0} + value)[0]; }

/* PyTorch's weights w [out_c][in_c][kh][kw] in bfloat16 pairs: [kh][kw][in_c / 2][out_c_pad][2],
 * so that one 512-bit load holds LANES channels' weights for two neighbouring input channels;
 * then the bias (unless NULL) rounded to bfloat16, as float32 [out_c_pad]. One allocation (free
 * it); NULL when out of memory. */
static void *weight_pairs(const Geometry *g, const float *w, const float *bias, float **bias_pad) {
    const int out_c_pad = padded(g->out_c), kh = g->kh, kw = g->kw, in_c = g->in_c;
    const size_t weights = sizeof(uint16_t) * (size_t)kh * kw * in_c * out_c_pad;
    char *block = calloc(1, weights + (bias ? sizeof(float) * (size_t)out_c_pad : 0));
    if (!block) return NULL;
    uint16_t *pairs = (uint16_t *)block;
    for (int o = 0; o < g->out_c; o++)
        for (int c = 0; c < in_c; c++)
            for (int ky = 0; ky < kh; ky++)
                for (int kx = 0; kx < kw; kx++)
                    pairs[(((int64_t)(ky * kw + kx) * (in_c / 2) + c / 2) * out_c_pad + o) * 2 +
                          (c & 1)] = bf16_bits(w[((int64_t)(o * in_c + c) * kh + ky) * kw + kx]);
    *bias_pad = bias ? (float *)(block + weights) : NULL;
    for (int o = 0; bias && o < g->out_c; o++) {
        const uint32_t bits = (uint32_t)bf16_bits(bias[o]) << 16;
        memcpy(*bias_pad + o, &bits, sizeof bits);
    }
    return block;
}

/* The bfloat16 pair at p in every 32-bit lane. */
INLINE __m512bh pair_at(const uint16_t *p) {
    int32_t bits;
    memcpy(&bits, p, sizeof bits);
    return (__m512bh)_mm512_set1_epi32(bits);
}

/* The conv outputs at the four positions of COUNT windows side by side (window n's top-left
 * input at corner + 2n * in_c; its right and lower positions `right[n]` and `down[n]` values
 * further on, 0 where the pool clips them: they then read position 0 again, and `finish` leaves
 * them out), for BLOCKS blocks of LANES channels from wp (already offset to the first one). */
INLINE void windows_bf16(const int kh, const int kw, const int in_c, const uint16_t *corner,
                         int64_t row, const int64_t down[2], const int64_t right[2],
                         const uint16_t *wp, int out_c_pad, const float *bias, const int blocks,
                         const int count, vf acc[2][2][4]) {
    for (int q = 0; q < blocks; q++) {
        const vf start = bias ? load(bias + q * LANES) : (vf){0};
        for (int n = 0; n < count; n++)
            for (int p = 0; p < 4; p++) acc[n][q][p] = start;
    }
    for (int ky = 0; ky < kh; ky++) {
        for (int kx = 0; kx < kw; kx++) {
            const uint16_t *tap = corner + ky * row + kx * in_c;
            const uint16_t *wk = wp + (int64_t)(ky * kw + kx) * in_c * out_c_pad;
            for (int c = 0; c < in_c; c += 2, wk += 2 * out_c_pad) {
                __m512bh weight[2];
                for (int q = 0; q < blocks; q++)
                    weight[q] = (__m512bh)_mm512_loadu_si512(wk + q * 2 * LANES);
                for (int n = 0; n < count; n++) {
                    const uint16_t *at = tap + c + 2 * n * in_c;
                    const __m512bh x[4] = {pair_at(at), pair_at(at + right[n]),
                                           pair_at(at + down[n]),
                                           pair_at(at + down[n] + right[n])};
                    for (int q = 0; q < blocks; q++)
                        for (int p = 0; p < 4; p++)
                            acc[n][q][p] =
                                (vf)_mm512_dpbf16_ps((__m512)acc[n][q][p], x[p], weight[q]);
                }
            }
        }
    }
}

/* Images [b0, b1) of the batch; kh, kw and in_c as in forward_shaped. */
INLINE void forward_bf16_shaped(const Geometry *g, const int kh, const int kw, const int in_c,
                                const uint16_t *x, const uint16_t *wp, const float *bias,
                                int64_t b0, int64_t b1, uint16_t *y, uint8_t *argmax) {
    const int out_c = g->out_c, out_c_pad = padded(out_c);
    const int64_t row = (int64_t)g->in_w * in_c, image = (int64_t)g->in_h * row;
    const int64_t pooled = (int64_t)g->out_rows * g->out_cols * out_c;
    for (int64_t b = b0; b < b1; b++) {
        for (int i = 0; i < g->pool_h; i++) {
            for (int j = 0; j < g->pool_w; j += 2) {
                const int count = j + 1 < g->pool_w ? 2 : 1;
                int valid[2][4];
                int64_t down[2] = {0, 0}, right[2] = {0, 0};
                for (int n = 0; n < count; n++) {
                    window_valid(g, i, j + n, valid[n]);
                    down[n] = valid[n][2] ? row : 0;
                    right[n] = valid[n][1] ? in_c : 0;
                }
                const uint16_t *corner = x + b * image + 2 * i * row + (int64_t)2 * j * in_c;
                const int64_t at = b * pooled + ((int64_t)i * g->out_cols + j) * out_c;
                for (int c0 = 0; c0 < out_c_pad; c0 += 2 * LANES) {
                    vf acc[2][2][4];
                    const float *bias_c = bias ? bias + c0 : NULL;
                    const uint16_t *wc = wp + (int64_t)2 * c0;
                    const int pair = c0 + LANES < out_c_pad;
#define WINDOWS(blocks, count)                                                                 \
    windows_bf16(kh, kw, in_c, corner, row, down, right, wc, out_c_pad, bias_c, blocks, count, acc)
                    if (pair && count == 2)
                        WINDOWS(2, 2);
                    else if (pair)
                        WINDOWS(2, 1);
                    else if (count == 2)
                        WINDOWS(1, 2);
                    else
                        WINDOWS(1, 1);
#undef WINDOWS
                    for (int n = 0; n < count; n++)
                        for (int q = 0; q <= pair; q++) {
                            const int c = c0 + q * LANES;
                            const int lanes = out_c - c < LANES ? out_c - c : LANES;
                            const int64_t to = at + n * out_c + c;
                            if (argmax)
                                finish(g, acc[n][q], valid[n], lanes, y, to, 1, argmax, 1);
                            else
                                finish(g, acc[n][q], valid[n], lanes, y, to, 1, NULL, 0);
                        }
                }
            }
        }
        zero_border(g, y, 1, b);
    }
}

/* The shapes of the presets' later convs (`tiny`'s 3x3 on 8 channels, `dropout`'s 2x2 on 32)
 * run fully unrolled; any other shape takes the general loops. */
static void forward_bf16_images(const Geometry *g, const uint16_t *x, const uint16_t *wp,
                                const float *bias, int64_t b0, int64_t b1, uint16_t *y,
                                uint8_t *argmax) {
    if (g->kh == 3 && g->kw == 3 && g->in_c == 8)
        forward_bf16_shaped(g, 3, 3, 8, x, wp, bias, b0, b1, y, argmax);
    else if (g->kh == 2 && g->kw == 2 && g->in_c == 32)
        forward_bf16_shaped(g, 2, 2, 32, x, wp, bias, b0, b1, y, argmax);
    else
        forward_bf16_shaped(g, g->kh, g->kw, g->in_c, x, wp, bias, b0, b1, y, argmax);
}
#endif

/* pool(conv(x)) for the whole batch, images split over `threads` OpenMP threads: x bfloat16
 * [batch][in_h][in_w][in_c], in_c even, pad_top = pad_left = 0; then the ReLU where `relu` is
 * set (g->relu is ignored), as act_dropout_forward applies it without a dropout: the same
 * values and codes, NO_GRADIENT where it cut; y bfloat16 and argmax (NULL: not wanted) laid out
 * as in conv_pool_forward.
 * Returns -1 where the shape does not fit or the library was built without AVX512-BF16. */
int conv_pool_forward_bf16(const Geometry *g, const uint16_t *x, const float *w,
                           const float *bias, int64_t batch, uint16_t *y, uint8_t *argmax,
                           int32_t relu, int32_t threads) {
#ifdef __AVX512BF16__
    if (g->in_c % 2 || g->pad_top || g->pad_left) return -1;
    Geometry plain = *g;
    plain.relu = relu != 0;
    float *bias_pad;
    void *block = weight_pairs(g, w, bias, &bias_pad);
    if (!block) return -2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        forward_bf16_images(&plain, x, block, bias_pad, b0, b1, y, argmax);
    }
    free(block);
    return 0;
#else
    (void)g, (void)x, (void)w, (void)bias, (void)batch, (void)y, (void)argmax, (void)relu;
    (void)threads;
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* The first block in bfloat16 dot products (AVX512-BF16)                                    */

/* conv_pool_forward under bf16 autocast: the same pooled outputs, with each dot product taking
 * two neighbouring values of a kernel row at a time. A kernel row is kw * in_c values that lie
 * side by side in the padded image, so every pair of them is one 32-bit load, broadcast, and
 * one _mm512_dpbf16_ps multiplies it by LANES channels' two weights: 8 instructions per window
 * position and block of channels for a 4x4 kernel on a grey image, where the float32 kernel
 * takes 16 multiply-adds (6 against 9 for 3x3). A row of odd length ends with the pair of its
 * last two values, the first of them weighted 0, so nothing past the row is read. The image is
 * rounded to bfloat16 as it is padded and the weights as they are laid out, as autocast's
 * bfloat16 convolution rounds both; the bias stays float32, the sums are float32, and the
 * pool's winner is rounded on output as in conv_pool_forward. */

#ifdef __AVX512BF16__
INLINE int row_pair_count(int run) { return (run + 1) / 2; }

/* Where pair m of a kernel row of `run` values starts in it. */
INLINE int pair_start(int m, int run) { return 2 * m + 1 < run ? 2 * m : run - 2; }

/* PyTorch's weights w [out_c][in_c][kh][kw] in bfloat16 pairs along each kernel row:
 * [kh][pairs][out_c_pad][2] (pair m of row ky: its values pair_start(m) and the one after, the
 * first of a last pair that repeats a value zero); then the bias (unless NULL) as float32
 * [out_c_pad]. One allocation (free it); NULL when out of memory. */
static void *row_pair_weights(const Geometry *g, const float *w, const float *bias,
                              float **bias_pad) {
    const int out_c_pad = padded(g->out_c), in_c = g->in_c, run = g->kw * in_c;
    const int pairs = row_pair_count(run);
    const size_t weights = sizeof(uint16_t) * (size_t)g->kh * pairs * out_c_pad * 2;
    char *block = calloc(1, weights + (bias ? sizeof(float) * (size_t)out_c_pad : 0));
    if (!block) return NULL;
    uint16_t *to = (uint16_t *)block;
    for (int ky = 0; ky < g->kh; ky++)
        for (int m = 0; m < pairs; m++)
            for (int half = 0; half < 2; half++) {
                if (2 * m + 1 >= run && half == 0) continue; /* a repeated value: weight 0 */
                const int t = pair_start(m, run) + half, kx = t / in_c, c = t % in_c;
                for (int o = 0; o < g->out_c; o++)
                    to[(((int64_t)ky * pairs + m) * out_c_pad + o) * 2 + half] =
                        bf16_bits(w[((int64_t)(o * in_c + c) * g->kh + ky) * g->kw + kx]);
            }
    *bias_pad = bias ? (float *)(block + weights) : NULL;
    if (bias) memcpy(*bias_pad, bias, sizeof(float) * (size_t)g->out_c);
    return block;
}

/* pad_image into a bfloat16 buffer (padded_rows x padded_cols x in_c, and LANES to spare),
 * rounding to nearest even. */
static int64_t pad_image_bf16(const Geometry *g, const float *xb, uint16_t *buf) {
    const int rows = padded_rows(g), cols = padded_cols(g), in_c = g->in_c;
    const int64_t row = (int64_t)cols * in_c;
    memset(buf, 0, sizeof(uint16_t) * (size_t)(rows * row));
    for (int y = 0; y < g->in_h && y + g->pad_top < rows; y++) {
        const int n = (g->in_w + g->pad_left < cols ? g->in_w : cols - g->pad_left) * in_c;
        const float *from = xb + (int64_t)y * g->in_w * in_c;
        uint16_t *to = buf + (y + g->pad_top) * row + (int64_t)g->pad_left * in_c;
        for (int k = 0; k < n; k += LANES) { /* the last vector masked: no scalar tail */
            const __mmask16 lanes = n - k >= LANES ? 0xffff : (__mmask16)((1u << (n - k)) - 1);
            const vf v = (vf)_mm512_maskz_loadu_ps(lanes, from + k);
            _mm256_mask_storeu_epi16(to + k, lanes, _mm512_cvtepi32_epi16((__m512i)to_bf16(v)));
        }
    }
    return row;
}

/* The conv outputs at the four positions of COUNT windows side by side (window n's top-left
 * input at corner + 2n * in_c), for BLOCKS blocks of LANES channels from wp (already offset to
 * the first one), as `windows` computes them. */
INLINE void windows_pairs(const int kh, const int run, const int in_c, const uint16_t *corner,
                          int64_t row, const uint16_t *wp, int out_c_pad, const float *bias,
                          const int blocks, const int count, vf acc[2][2][4]) {
    const int pairs = row_pair_count(run);
    for (int q = 0; q < blocks; q++) {
        const vf start = bias ? load(bias + q * LANES) : (vf){0};
        for (int n = 0; n < count; n++)
            for (int p = 0; p < 4; p++) acc[n][q][p] = start;
    }
    for (int ky = 0; ky < kh; ky++)
        for (int m = 0; m < pairs; m++) {
            const uint16_t *tap = corner + ky * row + pair_start(m, run);
            const uint16_t *wk = wp + ((int64_t)ky * pairs + m) * out_c_pad * 2;
            __m512bh weight[2];
            for (int q = 0; q < blocks; q++)
                weight[q] = (__m512bh)_mm512_loadu_si512(wk + q * 2 * LANES);
            for (int n = 0; n < count; n++) {
                const uint16_t *at = tap + 2 * n * in_c;
                const __m512bh x[4] = {pair_at(at), pair_at(at + in_c), pair_at(at + row),
                                       pair_at(at + row + in_c)};
                for (int q = 0; q < blocks; q++)
                    for (int p = 0; p < 4; p++)
                        acc[n][q][p] = (vf)_mm512_dpbf16_ps((__m512)acc[n][q][p], x[p], weight[q]);
            }
        }
}

/* windows_pairs for BLOCKS blocks of channels from c0 and COUNT windows, then their pooled
 * outputs at `at` (window n's at + n * out_c); constant BLOCKS and COUNT keep the sums in
 * registers from the first product to the store. */
INLINE void pairs_and_finish(const Geometry *g, const int kh, const int run, const int in_c,
                             const uint16_t *corner, int64_t row, const uint16_t *wp,
                             const float *bias, int c0, const int blocks, const int count,
                             int valid[2][4], int64_t at, void *y, int y_is_bf16,
                             uint8_t *argmax) {
    const int out_c = g->out_c;
    vf acc[2][2][4];
    windows_pairs(kh, run, in_c, corner, row, wp + (int64_t)2 * c0, padded(out_c),
                  bias ? bias + c0 : NULL, blocks, count, acc);
    for (int n = 0; n < count; n++)
        for (int q = 0; q < blocks; q++) {
            const int c = c0 + q * LANES, lanes = out_c - c < LANES ? out_c - c : LANES;
            const int64_t to = at + n * out_c + c;
            if (argmax)
                finish(g, acc[n][q], valid[n], lanes, y, to, y_is_bf16, argmax, 1);
            else
                finish(g, acc[n][q], valid[n], lanes, y, to, y_is_bf16, NULL, 0);
        }
}

/* Images [b0, b1) of the batch, as forward_shaped. */
INLINE int forward_pairs_shaped(const Geometry *g, const int kh, const int kw, const int in_c,
                                const float *x, const uint16_t *wp, const float *bias,
                                int64_t b0, int64_t b1, void *y, int y_is_bf16,
                                uint8_t *argmax) {
    const int out_c_pad = padded(g->out_c), run = kw * in_c;
    const int64_t image = (int64_t)g->in_h * g->in_w * g->in_c;
    const int64_t pooled = (int64_t)g->out_rows * g->out_cols * g->out_c;
    uint16_t *buf = malloc(sizeof(uint16_t) * ((size_t)padded_rows(g) * (size_t)padded_cols(g) *
                                                   (size_t)in_c + LANES));
    if (!buf) return -2;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t row = pad_image_bf16(g, x + b * image, buf);
        for (int i = 0; i < g->pool_h; i++) {
            for (int j = 0; j < g->pool_w; j += 2) {
                const int count = j + 1 < g->pool_w ? 2 : 1;
                int valid[2][4];
                for (int n = 0; n < count; n++) window_valid(g, i, j + n, valid[n]);
                const uint16_t *corner = buf + 2 * i * row + (int64_t)2 * j * in_c;
                const int64_t at = b * pooled + ((int64_t)i * g->out_cols + j) * g->out_c;
                for (int c0 = 0; c0 < out_c_pad; c0 += 2 * LANES) {
                    const int pair = c0 + LANES < out_c_pad;
#define BLOCK(blocks, count)                                                                   \
    pairs_and_finish(g, kh, run, in_c, corner, row, wp, bias, c0, blocks, count, valid, at, y, \
                     y_is_bf16, argmax)
                    if (pair && count == 2)
                        BLOCK(2, 2);
                    else if (pair)
                        BLOCK(2, 1);
                    else if (count == 2)
                        BLOCK(1, 2);
                    else
                        BLOCK(1, 1);
#undef BLOCK
                }
            }
        }
        zero_border(g, y, y_is_bf16, b);
    }
    free(buf);
    return 0;
}

static int forward_pairs_images(const Geometry *g, const float *x, const uint16_t *wp,
                                const float *bias, int64_t b0, int64_t b1, void *y,
                                int y_is_bf16, uint8_t *argmax) {
    return SHAPED(forward_pairs_shaped, g, x, wp, bias, b0, b1, y, y_is_bf16, argmax);
}
#endif

/* conv_pool_forward in bfloat16 dot products, for a kernel row of at least 2 values (kw *
 * in_c) and at most MAX_TAPS taps. Returns -1 where the shape does not fit or the library was
 * built without AVX512-BF16. */
int conv_pool_forward_pairs(const Geometry *g, const float *x, const float *w,
                            const float *bias, int64_t batch, void *y, int32_t y_is_bf16,
                            uint8_t *argmax, int32_t threads) {
#ifdef __AVX512BF16__
    if (g->kw * g->in_c < 2 || g->kh * g->kw * g->in_c > MAX_TAPS) return -1;
    float *bias_pad;
    void *block = row_pair_weights(g, w, bias, &bias_pad);
    if (!block) return -2;
    int status = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(min : status)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        status = forward_pairs_images(g, x, block, bias_pad, b0, b1, y, y_is_bf16, argmax);
    }
    free(block);
    return status;
#else
    (void)g, (void)x, (void)w, (void)bias, (void)batch, (void)y, (void)y_is_bf16;
    (void)argmax, (void)threads;
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* Weight gradient                                                                           */

/* One block's pooled gradient (`lanes` values at `at`), split by the window position it flows
 * back to; `live` is all of it that flows back at all. */
INLINE void route(const void *grad, int grad_is_bf16, const uint8_t *argmax, int64_t at,
                  int lanes, vf routed[4], vf *live) {
    vf gradient;
    vi arg;
    if (lanes == LANES) {
        gradient = load_any(grad, at, grad_is_bf16);
        arg = load_bytes(argmax + at);
    } else {
        gradient = (vf){0};
        arg = (vi){0} + NO_GRADIENT;
        for (int c = 0; c < lanes; c++) {
            gradient[c] = load_one(grad, at + c, grad_is_bf16);
            arg[c] = argmax[at + c];
        }
    }
    for (int p = 0; p < 4; p++) routed[p] = pick_f(lanes_equal(arg, p), gradient, (vf){0});
    *live = pick_f(lanes_equal(arg, NO_GRADIENT), (vf){0}, gradient);
}

/* grad_w += the four positions' input values times their routed gradients, for COUNT windows
 * side by side (as in `windows`) and BLOCKS blocks: one load and store of grad_w per tap. */
INLINE void accumulate(const int kh, const int kw, const int in_c, const float *corner,
                       int64_t row, float *grad_w, int out_c_pad, const int blocks,
                       const int count, const vf routed[2][2][4]) {
    const int row_taps = kw * in_c;
    for (int ky = 0; ky < kh; ky++) {
        const float *top = corner + ky * row, *bottom = top + row;
        float *dw = grad_w + (int64_t)ky * row_taps * out_c_pad;
        for (int k = 0; k < row_taps; k++, dw += out_c_pad) {
            for (int q = 0; q < blocks; q++) {
                vf sum = load(dw + q * LANES);
                for (int n = 0; n < count; n++) {
                    const int o = k + 2 * n * in_c;
                    const vf *r = routed[n][q];
                    sum += top[o] * r[0];
                    sum += top[o + in_c] * r[1];
                    sum += bottom[o] * r[2];
                    sum += bottom[o + in_c] * r[3];
                }
                store(dw + q * LANES, sum);
            }
        }
    }
}

/* The same for windows j and j + 1 packed as in window_pair_packed, into spread weights. */
INLINE void accumulate_packed(const int kh, const int kw, const int in_c, const float *corner,
                              int64_t row, float *spread, const vf routed[4]) {
    for (int ky = 0; ky < kh; ky++) {
        for (int k = 0; k < kw * in_c; k++) {
            float *dw = spread + (ky * kw * in_c + k) * LANES;
            vf sum = load(dw);
            for (int p = 0; p < 4; p++) {
                const float *at = corner + (ky + (p >> 1)) * row + k + (p & 1) * in_c;
                sum += halves(at[0], at[2 * in_c]) * routed[p];
            }
            store(dw, sum);
        }
    }
}

/* One input channel (grey images' first layers): for each channel, the input at its winner
 * is picked out of the window's neighbourhood by a lane permutation, so that each tap takes
 * one FMA per block of channels rather than four against zero-routed gradients. */
#if defined(__AVX512F__) && LANES == 16
#define SELECTED_MAX_TAPS 16 /* their sums in registers */
#define SELECTED_MAX_KW 7    /* a tap's two columns among a row's eight values */

INLINE int selected_fits(const Geometry *g, int kh, int kw, int in_c) {
    return in_c == 1 && kw <= SELECTED_MAX_KW && kh * kw <= SELECTED_MAX_TAPS &&
           g->out_c % LANES == 0;
}

/* The same for HALF channels, two windows to a vector: the second's taps lie two columns
 * further among the row's eight values. */
INLINE int selected_pairs_fit(const Geometry *g, int kh, int kw, int in_c) {
    return in_c == 1 && kw + 2 <= SELECTED_MAX_KW && kh * kw <= SELECTED_MAX_TAPS &&
           g->out_c == HALF;
}

/* Rows r and r + 1 of the padded image, eight values from column c each: in lanes 0-7 and 8-15. */
INLINE __m512 window_rows(const float *at, int64_t row) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(at)),
                              _mm256_loadu_ps(at + row), 1);
}

/* sums[tap] += gradient x the input each lane picks (`pick`: its row, 0 or 8, plus its column)
 * at that tap, for the kh x kw taps of the window whose top-left input is at corner. */
INLINE void add_picked_taps(vf *sums, const float *corner, int64_t row, const int kh,
                            const int kw, __m512i pick, vf gradient) {
    for (int ky = 0; ky < kh; ky++) {
        const __m512 rows = window_rows(corner + ky * row, row);
        for (int kx = 0; kx < kw; kx++) {
            const __m512i lane = _mm512_add_epi32(pick, _mm512_set1_epi32(kx));
            sums[ky * kw + kx] += gradient * (vf)_mm512_permutexvar_ps(lane, rows);
        }
    }
}

/* Image b's weight and bias gradients (see weight_grad_shaped), block by block of channels. */
INLINE void weight_grad_selected(const Geometry *g, const int kh, const int kw, const float *buf,
                                 int64_t row, const void *grad, int grad_is_bf16,
                                 const uint8_t *argmax, int64_t first, float *grad_w,
                                 float *grad_b) {
    const int out_c = g->out_c; /* whole vectors: no padding in grad_w */
    for (int c = 0; c < out_c; c += LANES) {
        vf sums[SELECTED_MAX_TAPS], bias_sum = {0};
        for (int t = 0; t < kh * kw; t++) sums[t] = (vf){0};
        for (int i = 0; i < g->pool_h; i++)
            for (int j = 0; j < g->pool_w; j++) {
                const int64_t at = first + ((int64_t)i * g->out_cols + j) * out_c + c;
                const vi code = load_bytes(argmax + at);
                /* position p: (p & 1) columns right, (p >> 1) rows down, lane + 8 */
                const __m512i pick = (__m512i)((code & 1) + (code >> 1 & 1) * 8);
                const vf gradient = pick_f(lanes_equal(code, NO_GRADIENT), (vf){0},
                                           load_any(grad, at, grad_is_bf16));
                bias_sum += gradient;
                add_picked_taps(sums, buf + 2 * i * row + 2 * j, row, kh, kw, pick, gradient);
            }
        for (int t = 0; t < kh * kw; t++)
            store(grad_w + t * out_c + c, load(grad_w + t * out_c + c) + sums[t]);
        if (grad_b) store(grad_b + c, load(grad_b + c) + bias_sum);
    }
}

/* weight_grad_selected for HALF channels (the `tiny` preset's 8): windows j and j + 1 side by
 * side in one vector, lanes 0-7 and 8-15, as their codes and gradients lie in memory, each lane
 * picking its input among rows r and r + 1 two columns further for the second window; the two
 * halves' sums go into the spread weights that weight_grad_shaped folds. One permutation and
 * one FMA per tap for both windows, where accumulate_packed takes four FMAs and four pairs of
 * scalar inserts. A last odd window leaves the upper lanes at zero. */
INLINE void weight_grad_selected_pairs(const Geometry *g, const int kh, const int kw,
                                       const float *buf, int64_t row, const void *grad,
                                       int grad_is_bf16, const uint8_t *argmax, int64_t first,
                                       float *spread, vf *spread_b) {
    const vi second = {0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2}; /* columns further */
    /* every lane picks inside its window's patch, a gradient-less one too: 0 times a value read
     * past the image's last pixel could be 0 times NaN */
    vf sums[SELECTED_MAX_TAPS], bias_sum = {0};
    for (int t = 0; t < kh * kw; t++) sums[t] = (vf){0};
    for (int i = 0; i < g->pool_h; i++)
        for (int j = 0; j < g->pool_w; j += 2) {
            const int64_t at = first + ((int64_t)i * g->out_cols + j) * HALF;
            vi code, offset = second;
            vf gradient;
            if (j + 1 < g->pool_w) {
                code = load_bytes(argmax + at);
                gradient = load_any(grad, at, grad_is_bf16);
            } else { /* one window: nothing read past it, the upper lanes inside window j */
                code = (vi){0} + NO_GRADIENT;
                gradient = (vf){0};
                offset = (vi){0};
                for (int c = 0; c < HALF; c++) {
                    code[c] = argmax[at + c];
                    gradient[c] = load_one(grad, at + c, grad_is_bf16);
                }
            }
            const __m512i pick = (__m512i)((code & 1) + (code >> 1 & 1) * 8 + offset);
            gradient = pick_f(lanes_equal(code, NO_GRADIENT), (vf){0}, gradient);
            bias_sum += gradient;
            add_picked_taps(sums, buf + 2 * i * row + 2 * j, row, kh, kw, pick, gradient);
        }
    for (int t = 0; t < kh * kw; t++) store(spread + t * LANES, load(spread + t * LANES) + sums[t]);
    *spread_b += bias_sum;
}
#endif

/* Images [b0, b1), accumulated into grad_w and grad_b (NULL: no bias); see forward_shaped. */
INLINE int weight_grad_shaped(const Geometry *g, const int kh, const int kw, const int in_c,
                              const float *x, const void *grad, int grad_is_bf16,
                              const uint8_t *argmax, int64_t b0, int64_t b1, float *grad_w,
                              float *grad_b) {
    const int out_c = g->out_c, out_c_pad = padded(out_c), packed = out_c == HALF;
    const int taps = kh * kw * in_c;
    const int64_t image = (int64_t)g->in_h * g->in_w * g->in_c;
    const int64_t pooled = (int64_t)g->out_rows * g->out_cols * out_c;
    float spread[MAX_TAPS * LANES];
    vf spread_b = {0};
    if (packed) memset(spread, 0, sizeof(float) * (size_t)(taps * LANES));
    float *buf = padded_buffer(g);
    if (!buf) return -2;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t row = pad_image(g, x + b * image, buf);
#if defined(__AVX512F__) && LANES == 16
        if (!packed && selected_fits(g, kh, kw, in_c)) {
            weight_grad_selected(g, kh, kw, buf, row, grad, grad_is_bf16, argmax, b * pooled,
                                 grad_w, grad_b);
            continue;
        }
        if (packed && selected_pairs_fit(g, kh, kw, in_c)) {
            weight_grad_selected_pairs(g, kh, kw, buf, row, grad, grad_is_bf16, argmax,
                                       b * pooled, spread, &spread_b);
            continue;
        }
#endif
        for (int i = 0; i < g->pool_h; i++) {
            for (int j = 0; j < g->pool_w; j += 2) {
                const int count = j + 1 < g->pool_w ? 2 : 1;
                const float *corner = buf + 2 * i * row + (int64_t)2 * j * in_c;
                const int64_t at = b * pooled + ((int64_t)i * g->out_cols + j) * out_c;
                if (packed && count == 2) {
                    vf routed[4], live;
                    route(grad, grad_is_bf16, argmax, at, LANES, routed, &live);
                    spread_b += live;
                    accumulate_packed(kh, kw, in_c, corner, row, spread, routed);
                    continue;
                }
                for (int c0 = 0; c0 < out_c_pad; c0 += 2 * LANES) {
                    const int pair = c0 + LANES < out_c_pad;
                    vf routed[2][2][4], live;
                    for (int n = 0; n < count; n++) {
                        for (int q = 0; q <= pair; q++) {
                            const int c = c0 + q * LANES;
                            const int lanes = out_c - c < LANES ? out_c - c : LANES;
                            route(grad, grad_is_bf16, argmax, at + n * out_c + c, lanes,
                                  routed[n][q], &live);
                            if (grad_b) store(grad_b + c, load(grad_b + c) + live);
                        }
                    }
                    float *dw = grad_w + c0;
                    if (pair && count == 2)
                        accumulate(kh, kw, in_c, corner, row, dw, out_c_pad, 2, 2, routed);
                    else if (pair)
                        accumulate(kh, kw, in_c, corner, row, dw, out_c_pad, 2, 1, routed);
                    else if (count == 2)
                        accumulate(kh, kw, in_c, corner, row, dw, out_c_pad, 1, 2, routed);
                    else
                        accumulate(kh, kw, in_c, corner, row, dw, out_c_pad, 1, 1, routed);
                }
            }
        }
    }
    if (packed) { /* fold the two windows' halves into the HALF channels */
        for (int t = 0; t < taps; t++)
            for (int c = 0; c < HALF; c++)
                grad_w[t * out_c_pad + c] += spread[t * LANES + c] + spread[t * LANES + HALF + c];
        if (grad_b)
            for (int c = 0; c < HALF; c++) grad_b[c] += spread_b[c] + spread_b[HALF + c];
    }
    free(buf);
    return 0;
}

static int weight_grad_images(const Geometry *g, const float *x, const void *grad,
                              int grad_is_bf16, const uint8_t *argmax, int64_t b0, int64_t b1,
                              float *grad_w, float *grad_b) {
    return SHAPED(weight_grad_shaped, g, x, grad, grad_is_bf16, argmax, b0, b1, grad_w, grad_b);
}

/* The weight gradient grad_w [out_c][in_c][kh][kw] and bias gradient grad_b [out_c] (or NULL).
 * Each chunk of `chunk` images accumulates into its own partial gradient, and the partials
 * are summed in chunk order, so the result does not depend on the number of threads. */
int conv_pool_weight_grad(const Geometry *g, const float *x, const void *grad,
                          int32_t grad_is_bf16, const uint8_t *argmax, int64_t batch,
                          int64_t chunk, float *grad_w, float *grad_b, int32_t threads) {
    (void)threads; /* unused without OpenMP */
    const int kh = g->kh, kw = g->kw, in_c = g->in_c, out_c = g->out_c, out_c_pad = padded(out_c);
    if (kh * kw * in_c > MAX_TAPS || chunk < 1) return -1;
    const int64_t chunks = (batch + chunk - 1) / chunk;
    const int64_t w_size = (int64_t)kh * kw * in_c * out_c_pad, size = w_size + out_c_pad;
    float *partial = calloc((size_t)(chunks * size), sizeof(float));
    if (!partial) return -2;
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : status)
    for (int64_t k = 0; k < chunks; k++) {
        const int64_t end = (k + 1) * chunk < batch ? (k + 1) * chunk : batch;
        float *part = partial + k * size;
        const int done = weight_grad_images(g, x, grad, grad_is_bf16, argmax, k * chunk, end,
                                            part, grad_b ? part + w_size : NULL);
        status = done < status ? done : status;
    }
    for (int64_t k = 1; k < chunks; k++)
        for (int64_t t = 0; t < size; t++) partial[t] += partial[k * size + t];
    for (int o = 0; o < out_c; o++)
        for (int c = 0; c < in_c; c++)
            for (int ky = 0; ky < kh; ky++)
                for (int kx = 0; kx < kw; kx++)
                    grad_w[((int64_t)(o * in_c + c) * kh + ky) * kw + kx] =
                        partial[((int64_t)(ky * kw + kx) * in_c + c) * out_c_pad + o];
    if (grad_b) memcpy(grad_b, partial + w_size, sizeof(float) * (size_t)out_c);
    free(partial);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* Weight gradient of a convolution followed by the 2x2 max pool, from the pooled gradient   */
/*                                                                                           */
/* For convolutions on many channels (oneDNN runs their forward pass and input gradient):    */
/* each pooled gradient flows back to one conv output, its window's winner (argmax from      */
/* max_pool_forward), so three quarters of the conv's output gradient are zero, and a zero   */
/* pooled gradient (a ReLU after the pool that cut it) flows nowhere. oneDNN's weight        */
/* gradient works through all of it; this kernel takes only the winners: for output channel  */
/* c, each of its windows adds gradient * the kh x kw x in_c patch under its winner.          */
/*                                                                                           */
/* x is float32 or bfloat16 [batch][in_h][in_w][in_c]; grad and argmax as max_pool_forward's  */
/* y and argmax ([batch][pool_h][pool_w][out_c]). The patch's kernel row ky is the run of      */
/* kw * in_c values at padded-image row cy + ky, read in whole vectors: `run` is that length  */
/* rounded up to LANES, and the extra products land in the padding of the partial gradients, */
/* [chunks][out_c][kh][run], which the caller drops.                                         */

#define MAX_RUN_VECTORS 16

INLINE int run_length(const Geometry *g) {
    return (g->kw * g->in_c + LANES - 1) / LANES * LANES;
}

/* The first `used` lanes (1 to LANES). */
INLINE lanes_mask first_lanes(int used) {
    vi lane;
    for (int k = 0; k < LANES; k++) lane[k] = k < used ? 1 : 0;
    return lanes_equal(lane, 1);
}

/* The lanes of a kernel row's last vector (of run_length) that hold its values. */
INLINE lanes_mask run_tail_mask(const Geometry *g) {
    return first_lanes(g->kw * g->in_c - (run_length(g) - LANES));
}

/* pad_image for float32 or bfloat16 images, with `tail` zeros after the last row. */
static int64_t pad_image_any(const Geometry *g, const void *x, int is_bf16, int64_t b, float *buf,
                             int tail) {
    const int64_t image = (int64_t)g->in_h * g->in_w * g->in_c;
    const int rows = padded_rows(g), cols = padded_cols(g), in_c = g->in_c;
    const int64_t row = (int64_t)cols * in_c;
    memset(buf + rows * row, 0, sizeof(float) * (size_t)tail);
    if (!is_bf16) return pad_image(g, (const float *)x + b * image, buf);
    memset(buf, 0, sizeof(float) * (size_t)(rows * row));
    for (int y = 0; y < g->in_h && y + g->pad_top < rows; y++) {
        const int n = (g->in_w + g->pad_left < cols ? g->in_w : cols - g->pad_left) * in_c;
        float *to = buf + (y + g->pad_top) * row + (int64_t)g->pad_left * in_c;
        widen(x, b * image + (int64_t)y * g->in_w * in_c, 1, to, n);
    }
    return row;
}

/* Kernel row ky of one output channel: its partial gradient (VECTORS vectors at dw) plus each
 * of the `count` winners' gradient times its patch row (patch[n] floats into buf), summed in
 * registers. */
INLINE void winners_row(const float *buf, const int32_t *patch, const float *gradient, int count,
                        int64_t ky_offset, float *dw, const int vectors) {
    vf acc[MAX_RUN_VECTORS];
    for (int v = 0; v < vectors; v++) acc[v] = load(dw + v * LANES);
    for (int n = 0; n < count; n++) {
        const float *at = buf + patch[n] + ky_offset;
        const float scale = gradient[n];
        for (int v = 0; v < vectors; v++) acc[v] += scale * load(at + v * LANES);
    }
    for (int v = 0; v < vectors; v++) store(dw + v * LANES, acc[v]);
}

/* Output channel c's winners in image b that carry a gradient: where their patches start in
 * the padded image, and the gradients; returns how many. Adds the gradients to *bias. */
static int live_winners(const Geometry *g, const void *grad, int grad_is_bf16,
                        const uint8_t *argmax, int64_t first, int c, int64_t row, int32_t *patch,
                        float *gradient, float *bias) {
    int count = 0;
    float sum = 0.0f;
    for (int i = 0; i < g->pool_h; i++) {
        for (int j = 0; j < g->pool_w; j++) {
            const int64_t at = first + ((int64_t)i * g->pool_w + j) * g->out_c + c;
            const int winner = argmax[at];
            const float value = load_one(grad, at, grad_is_bf16);
            if (winner > 3 || value == 0.0f) continue; /* NaN goes on, as it should */
            sum += value;
            patch[count] = (int32_t)((2 * i + (winner >> 1)) * row +
                                     (int64_t)(2 * j + (winner & 1)) * g->in_c);
            gradient[count++] = value;
        }
    }
    *bias += sum;
    return count;
}

static int pooled_weight_grad_images(const Geometry *g, const void *x, int x_is_bf16,
                                     const void *grad, int grad_is_bf16, const uint8_t *argmax,
                                     int64_t b0, int64_t b1, float *grad_w, float *grad_b) {
    const int run = run_length(g), vectors = run / LANES, windows = g->pool_h * g->pool_w;
    const int64_t pooled = (int64_t)windows * g->out_c;
    const size_t floats = (size_t)padded_rows(g) * (size_t)padded_cols(g) * (size_t)g->in_c + (size_t)run;
    float *buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    int32_t *patch = malloc(sizeof(int32_t) * (size_t)windows);
    float *gradient = malloc(sizeof(float) * (size_t)windows);
    float bias_unused = 0.0f;
    int status = buf && patch && gradient ? 0 : -2;
    for (int64_t b = b0; b < b1 && !status; b++) {
        const int64_t row = pad_image_any(g, x, x_is_bf16, b, buf, run);
        for (int c = 0; c < g->out_c; c++) {
            const int count = live_winners(g, grad, grad_is_bf16, argmax, b * pooled, c, row,
                                           patch, gradient, grad_b ? grad_b + c : &bias_unused);
            for (int ky = 0; ky < g->kh; ky++) {
                float *dw = grad_w + ((int64_t)c * g->kh + ky) * run;
                switch (vectors) { /* constant counts keep the sums in registers */
#define ROW(n)                                                                                \
    case n: winners_row(buf, patch, gradient, count, ky * row, dw, n); break;
                    ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
                    ROW(9) ROW(10) ROW(11) ROW(12) ROW(13) ROW(14) ROW(15) ROW(16)
#undef ROW
                }
            }
        }
    }
    free(buf);
    free(patch);
    free(gradient);
    return status;
}

/* The weight gradient [out_c][kh][kw * in_c] (and the bias gradient, unless grad_b is NULL)
 * of the conv under a 2x2 max pool. Chunks of `chunk` images accumulate into their own rows of
 * the partial gradients ([chunks][out_c][kh][run] then [chunks][out_c]), summed in chunk order
 * at the end, so the result does not depend on the number of threads. */
int pooled_weight_grad(const Geometry *g, const void *x, int32_t x_is_bf16, const void *grad,
                       int32_t grad_is_bf16, const uint8_t *argmax, int64_t batch, int64_t chunk,
                       float *grad_w, float *grad_b, int32_t threads) {
    (void)threads; /* unused without OpenMP */
    const int run = run_length(g);
    if (run > MAX_RUN_VECTORS * LANES || chunk < 1) return -1;
    const int64_t chunks = (batch + chunk - 1) / chunk;
    const int64_t w_size = (int64_t)g->out_c * g->kh * run;
    float *partial = calloc((size_t)(chunks * (w_size + g->out_c)), sizeof(float));
    if (!partial) return -2;
    float *partial_b = partial + chunks * w_size;
    int status = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(min : status)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < chunks; k++) {
            const int64_t end = (k + 1) * chunk < batch ? (k + 1) * chunk : batch;
            const int done = pooled_weight_grad_images(
                g, x, x_is_bf16, grad, grad_is_bf16, argmax, k * chunk, end,
                partial + k * w_size, grad_b ? partial_b + k * g->out_c : NULL);
            status = done < status ? done : status;
        }
        const int64_t taps = (int64_t)g->kw * g->in_c, rows = (int64_t)g->out_c * g->kh;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *out = grad_w + r * taps;
            memcpy(out, partial + r * run, sizeof(float) * (size_t)taps);
            for (int64_t k = 1; k < chunks; k++) {
                const float *from = partial + k * w_size + r * run;
                for (int64_t t = 0; t < taps; t++) out[t] += from[t];
            }
        }
    }
    if (grad_b) {
        memcpy(grad_b, partial_b, sizeof(float) * (size_t)g->out_c);
        for (int64_t k = 1; k < chunks; k++)
            for (int c = 0; c < g->out_c; c++) grad_b[c] += partial_b[k * g->out_c + c];
    }
    free(partial);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* Input gradient of a convolution followed by the 2x2 max pool, from the pooled gradient    */
/*                                                                                           */
/* Only the windows' winners carry a gradient back through the conv, one per window and      */
/* channel. The patches under a window's four positions all lie in its (kh + 1) x (kw + 1)    */
/* "window patch", and channel c's contribution to it is its gradient times its kernel moved */
/* to the winner's position: shifted[c][winner], zero elsewhere, made once a call. So each   */
/* window patch is a sum over the out_c channels of gradient x shifted kernel, in registers, */
/* row by row, without a branch on the winners; it is added to the image's padded fp32        */
/* buffer once per row. That is (kh + 1)(kw + 1) / (kh kw) times the winners' multiply-adds   */
/* but a quarter of oneDNN's dense ones, with no unpooled gradient written and read. Windows  */
/* two pixels apart overlap by whole vectors when 2 * in_c is a multiple of LANES, so those   */
/* read-modify-writes forward cleanly. Images are independent: threads split the batch and   */
/* the result does not depend on their number.                                               */
/*                                                                                           */
/* shifted is float32 [out_c][4][kh + 1][wide_run], wide_run = (kw + 1) * in_c rounded up to  */
/* LANES (made by shift_kernels from weights [out_c][kh][kw][in_c]); grad_x is                */
/* [batch][in_h][in_w][in_c], float32 or bfloat16 (rounded to nearest even).                  */

INLINE int wide_run(const Geometry *g) {
    return ((g->kw + 1) * g->in_c + LANES - 1) / LANES * LANES;
}

/* The last vector's lanes of a window-patch row that hold values. */
INLINE lanes_mask wide_tail_mask(const Geometry *g) {
    return first_lanes((g->kw + 1) * g->in_c - (wide_run(g) - LANES));
}

/* Each channel's kernel at the four window positions inside the window patch. */
static void shift_kernels(const Geometry *g, const float *w, float *shifted) {
    const int run = wide_run(g), rows = g->kh + 1, in_c = g->in_c;
    memset(shifted, 0, sizeof(float) * (size_t)g->out_c * 4 * (size_t)(rows * run));
    for (int c = 0; c < g->out_c; c++)
        for (int p = 0; p < 4; p++)
            for (int ky = 0; ky < g->kh; ky++) {
                float *to = shifted + ((int64_t)(c * 4 + p) * rows + ky + (p >> 1)) * run +
                            (p & 1) * in_c;
                memcpy(to, w + ((int64_t)c * g->kh + ky) * g->kw * in_c,
                       sizeof(float) * (size_t)(g->kw * in_c));
            }
}

/* One window patch row: the sum over channels of gradient[c] x kernel row at[c], VECTORS
 * vectors, added to the buffer at `to` (the tail lanes past the row untouched). */
INLINE void window_row(const float *const *at, const float *gradient, int out_c, float *to,
                       lanes_mask tail_mask, const int vectors) {
    vf acc[MAX_RUN_VECTORS];
    for (int v = 0; v < vectors; v++) acc[v] = (vf){0};
    for (int c = 0; c < out_c; c++)
        for (int v = 0; v < vectors; v++) acc[v] += gradient[c] * load(at[c] + v * LANES);
    for (int v = 0; v < vectors - 1; v++) store(to + v * LANES, load(to + v * LANES) + acc[v]);
    const int v = vectors - 1;
    const vf old = load(to + v * LANES);
    store(to + v * LANES, pick_f(tail_mask, old + acc[v], old));
}

/* Image b's input gradient from the padded buffer into grad_x, without the padding. */
static void store_cropped(const Geometry *g, const float *buf, int64_t row, int64_t b,
                          void *grad_x, int x_is_bf16) {
    const int64_t n = (int64_t)g->in_w * g->in_c;
    for (int y = 0; y < g->in_h; y++) {
        const float *from = buf + (y + g->pad_top) * row + (int64_t)g->pad_left * g->in_c;
        narrow(from, n, grad_x, (b * g->in_h + y) * n, x_is_bf16);
    }
}

static int pooled_input_grad_images(const Geometry *g, const float *shifted, const void *grad,
                                    int grad_is_bf16, const uint8_t *argmax, int64_t b0,
                                    int64_t b1, void *grad_x, int x_is_bf16) {
    const int run = wide_run(g), vectors = run / LANES, rows = g->kh + 1, out_c = g->out_c;
    const int64_t row = (int64_t)padded_cols(g) * g->in_c;
    const size_t floats = (size_t)padded_rows(g) * (size_t)row + (size_t)run;
    const lanes_mask tail_mask = wide_tail_mask(g);
    float *buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    const float **at = malloc(sizeof(float *) * (size_t)out_c);
    float *gradient = malloc(sizeof(float) * (size_t)out_c);
    int status = buf && at && gradient ? 0 : -2;
    for (int64_t b = b0; b < b1 && !status; b++) {
        memset(buf, 0, sizeof(float) * floats);
        for (int i = 0; i < g->pool_h; i++) {
            for (int j = 0; j < g->pool_w; j++) {
                const int64_t first = ((b * g->pool_h + i) * g->pool_w + j) * out_c;
                for (int c = 0; c < out_c; c++) {
                    const int winner = argmax[first + c];
                    const int live = winner <= 3;
                    gradient[c] = live ? load_one(grad, first + c, grad_is_bf16) : 0.0f;
                    at[c] = shifted + (int64_t)(c * 4 + (live ? winner : 0)) * rows * run;
                }
                float *to = buf + 2 * i * row + (int64_t)2 * j * g->in_c;
                for (int r = 0; r < rows; r++) {
                    switch (vectors) { /* constant counts keep the sums in registers */
#define ROW(n)                                                                                \
    case n: window_row(at, gradient, out_c, to + r * row, tail_mask, n); break;
                        ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
                        ROW(9) ROW(10) ROW(11) ROW(12) ROW(13) ROW(14) ROW(15) ROW(16)
#undef ROW
                    }
                    if (r + 1 < rows)
                        for (int c = 0; c < out_c; c++) at[c] += run;
                }
            }
        }
        store_cropped(g, buf, row, b, grad_x, x_is_bf16);
    }
    free(buf);
    free(at);
    free(gradient);
    return status;
}

/* w: the conv's weights, float32 [out_c][kh][kw][in_c]. */
int pooled_input_grad(const Geometry *g, const float *w, const void *grad, int32_t grad_is_bf16,
                      const uint8_t *argmax, int64_t batch, void *grad_x, int32_t x_is_bf16,
                      int32_t threads) {
    (void)threads; /* unused without OpenMP */
    if (wide_run(g) > MAX_RUN_VECTORS * LANES) return -1;
    const size_t floats = (size_t)g->out_c * 4 * (size_t)((g->kh + 1) * wide_run(g));
    float *shifted = malloc(sizeof(float) * floats);
    if (!shifted) return -2;
    shift_kernels(g, w, shifted);
    int status = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(min : status)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        const int done = pooled_input_grad_images(g, shifted, grad, grad_is_bf16, argmax, b0, b1,
                                                  grad_x, x_is_bf16);
        status = done < status ? done : status;
    }
    free(shifted);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* 2x2 max pooling, stride 2, on channels_last tensors                                       */
/*                                                                                           */
/* x [batch][h][w][c] float32 or bfloat16; y [batch][pool_h][pool_w][c], the same type; window */
/* (i, j) covers rows 2i, 2i+1 and columns 2j, 2j+1 clipped to the input, as above. argmax    */
/* [batch][pool_h][pool_w][c] uint8 holds the winning position (0-3): one byte where          */
/* torch.max_pool2d keeps an int64 index. The gradient pass writes every input pixel once     */
/* (the routed gradient or zero) where PyTorch zero-fills the whole input gradient first and  */
/* scatters into it after.                                                                    */

/* Where the four pixels of window (i, j) of image b start, and which of them lie inside the
 * input ('same' pooling clips the window at the bottom and right edges). */
INLINE void window_pixels(int64_t b, int i, int j, int h, int w, int c, int64_t at[4],
                          int valid[4]) {
    for (int p = 0; p < 4; p++) {
        const int row = 2 * i + (p >> 1), col = 2 * j + (p & 1);
        valid[p] = row < h && col < w;
        at[p] = ((b * h + row) * w + col) * c;
    }
}

/* The maximum of LANES channels from c0 over a window's valid positions, and which won. */
INLINE void window_max(const void *x, int is_bf16, const int64_t from[4], const int valid[4],
                       int c0, vf *best, vi *arg) {
    *best = load_any(x, from[0] + c0, is_bf16);
    *arg = (vi){0};
    for (int p = 1; p < 4; p++) {
        if (!valid[p]) continue;
        const vf value = load_any(x, from[p] + c0, is_bf16);
        const lanes_mask wins = beats(value, *best);
        *best = pick_f(wins, value, *best);
        *arg = pick_i(wins, (vi){0} + p, *arg);
    }
}

static void pool_images(const void *x, int is_bf16, int64_t b0, int64_t b1, int h, int w, int c,
                        int pool_h, int pool_w, void *y, uint8_t *argmax) {
    const int whole = c / LANES * LANES;
    for (int64_t b = b0; b < b1; b++) {
        for (int i = 0; i < pool_h; i++) {
            for (int j = 0; j < pool_w; j++) {
                int64_t from[4];
                int valid[4];
                window_pixels(b, i, j, h, w, c, from, valid);
                const int64_t at = ((b * pool_h + i) * pool_w + j) * c;
                for (int c0 = 0; c0 < whole; c0 += LANES) {
                    vf best;
                    vi arg;
                    window_max(x, is_bf16, from, valid, c0, &best, &arg);
                    store_any(y, at + c0, is_bf16, best);
                    store_bytes(argmax + at + c0, arg);
                }
                for (int k = whole; k < c; k++) {
                    float best = load_one(x, from[0] + k, is_bf16);
                    uint8_t arg = 0;
                    for (int p = 1; p < 4; p++) {
                        if (!valid[p]) continue;
                        const float value = load_one(x, from[p] + k, is_bf16);
                        if (value > best || value != value) best = value, arg = (uint8_t)p;
                    }
                    store_one(y, at + k, is_bf16, best);
                    argmax[at + k] = arg;
                }
            }
        }
    }
}

/* Zero where 'valid' pooling dropped the last row or column of an odd-sized input. */
static void zero_dropped(int is_bf16, int64_t b, int h, int w, int c, int pool_h, int pool_w,
                         void *grad_x) {
    const size_t elem = is_bf16 ? 2 : 4;
    char *image = (char *)grad_x + (size_t)(b * h * w * c) * elem;
    for (int row = 0; row < h; row++) {
        if (row >= 2 * pool_h) {
            memset(image + (size_t)(row * w * c) * elem, 0, (size_t)(w * c) * elem);
        } else if (w > 2 * pool_w) {
            const size_t from = (size_t)((row * w + 2 * pool_w) * c) * elem;
            memset(image + from, 0, (size_t)((w - 2 * pool_w) * c) * elem);
        }
    }
}

/* pool_dropout_forward's gradient of LANES values: g times the dropout factor, rounded as
 * `dropout`'s backward pass rounds it, and the window position it goes to (NO_GRADIENT: none). */
INLINE void dropout_gradient(vi code, float scale, int is_bf16, vf *g, vi *winner) {
    *g = *g * select_f((code & DROPPED) == 0, (vf){0} + scale, (vf){0});
    if (is_bf16) *g = (vf)(to_bf16(*g) << 16);
    *winner = select_i(code == NO_GRADIENT, code, code & ~DROPPED);
}

/* Each window's gradient goes to its winning position and zero to the other three: every input
 * pixel is written once, each pooled value and window position read once. With `dropout` (a
 * constant once inlined) the positions are pool_dropout_forward's code and the gradient goes
 * through dropout_gradient (whose channels are whole vectors). */
INLINE void unpool_images(const void *grad_y, int is_bf16, const uint8_t *argmax, int64_t b0,
                          int64_t b1, int h, int w, int c, int pool_h, int pool_w,
                          const int dropout, float scale, void *grad_x) {
    const int whole = c / LANES * LANES;
    for (int64_t b = b0; b < b1; b++) {
        zero_dropped(is_bf16, b, h, w, c, pool_h, pool_w, grad_x);
        for (int i = 0; i < pool_h; i++) {
            for (int j = 0; j < pool_w; j++) {
                int64_t to[4];
                int valid[4];
                window_pixels(b, i, j, h, w, c, to, valid);
                const int64_t at = ((b * pool_h + i) * pool_w + j) * c;
                for (int c0 = 0; c0 < whole; c0 += LANES) {
                    vi arg = load_bytes(argmax + at + c0);
                    vf g = load_any(grad_y, at + c0, is_bf16);
                    if (dropout) dropout_gradient(arg, scale, is_bf16, &g, &arg);
                    for (int p = 0; p < 4; p++)
                        if (valid[p])
                            store_any(grad_x, to[p] + c0, is_bf16,
                                      pick_f(lanes_equal(arg, p), g, (vf){0}));
                }
                for (int k = whole; k < c; k++) {
                    const float g = load_one(grad_y, at + k, is_bf16);
                    for (int p = 0; p < 4; p++)
                        if (valid[p])
                            store_one(grad_x, to[p] + k, is_bf16, argmax[at + k] == p ? g : 0.0f);
                }
            }
        }
    }
}

int max_pool_forward(const void *x, int32_t is_bf16, int64_t batch, int32_t h, int32_t w,
                     int32_t c, int32_t pool_h, int32_t pool_w, void *y, uint8_t *argmax,
                     int32_t threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        pool_images(x, is_bf16, b0, b1, h, w, c, pool_h, pool_w, y, argmax);
    }
    return 0;
}

int max_pool_backward(const void *grad_y, int32_t is_bf16, const uint8_t *argmax, int64_t batch,
                      int32_t h, int32_t w, int32_t c, int32_t pool_h, int32_t pool_w,
                      void *grad_x, int32_t threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        unpool_images(grad_y, is_bf16, argmax, b0, b1, h, w, c, pool_h, pool_w, 0, 0.0f, grad_x);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------- dropout
 *
 * y = x * (keep ? 1 / (1 - p) : 0), with the keep-mask drawn from a counter-based generator,
 * Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
 * SC 2011; the generator behind cuRAND's, TensorFlow's and JAX's dropout). Every element's
 * random number is a function of (seed, its index) alone, so the mask does not depend on the
 * thread count, and the backward pass draws the same mask again instead of storing it.
 *
 * Elements go in blocks of 8 * LANES: the LANES counters block * LANES + lane each give four
 * 32-bit words, every word two 16-bit numbers; element block * 8 * LANES + (2 * word + half)
 * * LANES + lane is kept when its number is at least drop_below (p * 65536, rounded). Keeping
 * the product x * 0 for dropped elements, as PyTorch does, lets a NaN pass through.
 */

typedef uint32_t vu __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint64_t vu64 __attribute__((vector_size(LANES * sizeof(uint32_t))));

#define BLOCK (8 * LANES)

/* The high and low 32 bits of each lane's product with the constant m. */
INLINE void mulhilo(vu a, uint32_t m, vu *hi, vu *lo) {
    const vu64 low_half = (vu64){0} + 0xffffffffu;
    const vu64 even = ((vu64)a & low_half) * (uint64_t)m; /* lanes 0, 2, 4, ... */
    const vu64 odd = ((vu64)a >> 32) * (uint64_t)m;       /* lanes 1, 3, 5, ... */
    *hi = (vu)((even >> 32) | (odd & ~low_half));
    *lo = (vu)((even & low_half) | (odd << 32));
}

/* Philox4x32-10 of the counters (counter, counter_hi, 0, 0) under the key seed. */
INLINE void philox(vu counter, uint32_t counter_hi, uint64_t seed, vu out[4]) {
    vu c0 = counter, c1 = (vu){0} + counter_hi, c2 = (vu){0}, c3 = (vu){0};
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; round++) {
        vu hi0, lo0, hi1, lo1;
        mulhilo(c0, 0xD2511F53u, &hi0, &lo0);
        mulhilo(c2, 0xCD9E8D57u, &hi1, &lo1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

/* The 16-bit random numbers of block `block` (BLOCK elements): numbers[part], lane k, is
 * element block * BLOCK + part * LANES + k's. */
INLINE void block_numbers(int64_t block, uint64_t seed, vu numbers[8]) {
    vu lanes;
    for (int k = 0; k < LANES; k++) lanes[k] = (uint32_t)k;
    const uint64_t counter = (uint64_t)block * LANES;
    vu words[4];
    philox(lanes + (uint32_t)counter, (uint32_t)(counter >> 32), seed, words);
    for (int part = 0; part < 8; part++)
        numbers[part] = (words[part >> 1] >> (16 * (part & 1))) & 0xffffu;
}

/* A 16-bit random number below this drops its element: p * 65536, rounded. */
INLINE uint32_t drop_threshold(float p) { return (uint32_t)((double)p * 65536.0 + 0.5); }

/* What kept elements are multiplied by: the inverse of the exact keep rate. */
INLINE float keep_scale(uint32_t drop_below) {
    return (float)(65536.0 / (65536.0 - drop_below));
}

static void dropout_blocks(const void *x, void *y, int is_bf16, int64_t n, int64_t first,
                           int64_t last, uint32_t drop_below, float scale, uint64_t seed) {
    for (int64_t block = first; block < last; block++) {
        vu numbers[8];
        block_numbers(block, seed, numbers);
        for (int part = 0; part < 8; part++) {
            const vf factor = select_f((vi)(numbers[part] >= drop_below), (vf){0} + scale, (vf){0});
            const int64_t at = block * BLOCK + part * LANES;
            if (at + LANES <= n) {
                store_rounded(y, at, is_bf16, load_any(x, at, is_bf16) * factor);
                continue;
            }
            for (int k = 0; at + k < n && k < LANES; k++) {
                const float value = load_one(x, at + k, is_bf16) * factor[k];
                if (!is_bf16) {
                    ((float *)y)[at + k] = value;
                } else {
                    vf one = (vf){0} + value;
                    ((uint16_t *)y)[at + k] = (uint16_t)to_bf16(one)[0];
                }
            }
        }
    }
}

int dropout(const void *x, void *y, int32_t is_bf16, int64_t n, float p, uint64_t seed,
            int32_t threads) {
    if (!(p >= 0.0f && p < 1.0f)) return 1;
    const uint32_t drop_below = drop_threshold(p);
    const float scale = keep_scale(drop_below);
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        int64_t first, last;
        share(blocks, &first, &last);
        dropout_blocks(x, y, is_bf16, n, first, last, drop_below, scale, seed);
    }
    return 0;
}

/* ------------------------------------------------------------- max pool, ReLU and dropout
 *
 * In training, a 2x2 max pool, the ReLU deferred to it (relu = 1) or no activation, and the
 * dropout after them in one pass: y = act(max of the window) * factor, factor drawn for y's
 * memory order exactly as `dropout` draws it, so y is bit for bit what max_pool_forward, the
 * ReLU and `dropout` give (and the same seed gives the same mask). code, laid out as y, holds
 * the winning position (0-3), plus DROPPED where the dropout zeroed the value, or NO_GRADIENT
 * where the ReLU did: the backward pass reads the mask there instead of drawing it again.
 * Channels must be a multiple of LANES (each vector of the mask then lies in one window).
 */

/* A vector of pooled values (best) and their window positions (arg) after the ReLU (relu = 1)
 * and the dropout whose 16-bit random numbers these are: stored into y and code at `at`. */
INLINE void act_dropout_store(vf best, vi arg, vu number, int relu, uint32_t drop_below,
                              float scale, void *y, int is_bf16, uint8_t *code, int64_t at) {
    const vi kept = (vi)(number >= drop_below);
    arg = select_i(kept, arg, arg + DROPPED);
    if (relu) { /* as torch.relu and its gradient: NaN stays NaN and keeps its gradient */
        const lanes_mask dead = not_positive(best);
        best = pick_f(dead, (vf){0}, best);
        arg = pick_i(dead, (vi){0} + NO_GRADIENT, arg);
    }
    store_rounded(y, at, is_bf16, best * select_f(kept, (vf){0} + scale, (vf){0}));
    store_bytes(code + at, arg);
}

static void pool_dropout_blocks(const void *x, int is_bf16, int h, int w, int c, int pool_h,
                                int pool_w, int relu, int64_t n, int64_t first, int64_t last,
                                uint32_t drop_below, float scale, uint64_t seed, void *y,
                                uint8_t *code) {
    const int64_t windows_per_image = (int64_t)pool_h * pool_w;
    for (int64_t block = first; block < last; block++) {
        vu numbers[8];
        block_numbers(block, seed, numbers);
        for (int part = 0; part < 8; part++) {
            const int64_t at = block * BLOCK + part * LANES;
            if (at >= n) break;
            const int64_t window = at / c, in_image = window % windows_per_image;
            const int c0 = (int)(at % c);
            int64_t from[4];
            int valid[4];
            window_pixels(window / windows_per_image, (int)(in_image / pool_w),
                          (int)(in_image % pool_w), h, w, c, from, valid);
            vf best;
            vi arg;
            window_max(x, is_bf16, from, valid, c0, &best, &arg);
            act_dropout_store(best, arg, numbers[part], relu, drop_below, scale, y, is_bf16, code,
                              at);
        }
    }
}

int pool_dropout_forward(const void *x, int32_t is_bf16, int64_t batch, int32_t h, int32_t w,
                         int32_t c, int32_t pool_h, int32_t pool_w, int32_t relu, float p,
                         uint64_t seed, void *y, uint8_t *code, int32_t threads) {
    if (!(p >= 0.0f && p < 1.0f) || c % LANES) return 1;
    const uint32_t drop_below = drop_threshold(p);
    const float scale = keep_scale(drop_below);
    const int64_t n = batch * pool_h * pool_w * c, blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        int64_t first, last;
        share(blocks, &first, &last);
        pool_dropout_blocks(x, is_bf16, h, w, c, pool_h, pool_w, relu, n, first, last,
                            drop_below, scale, seed, y, code);
    }
    return 0;
}

/* The ReLU (relu = 1) and the dropout of pool_dropout_forward on a pool that already ran (a
 * conv-pool kernel's): y, n pooled values, and code, their window positions (0-3), are
 * overwritten with what pool_dropout_forward gives for the same pool and seed. */
int act_dropout_forward(void *y, int32_t is_bf16, uint8_t *code, int64_t n, int32_t relu,
                        float p, uint64_t seed, int32_t threads) {
    if (!(p >= 0.0f && p < 1.0f) || n % LANES) return 1;
    const uint32_t drop_below = drop_threshold(p);
    const float scale = keep_scale(drop_below);
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) if (threads > 1 && blocks > 1) schedule(static)
    for (int64_t block = 0; block < blocks; block++) {
        vu numbers[8];
        block_numbers(block, seed, numbers);
        for (int part = 0; part < 8; part++) {
            const int64_t at = block * BLOCK + part * LANES;
            if (at >= n) break;
            act_dropout_store(load_any(y, at, is_bf16), load_bytes(code + at), numbers[part],
                              relu, drop_below, scale, y, is_bf16, code, at);
        }
    }
    return 0;
}

/* The gradient of pool_dropout_forward's input, every input pixel written once. */
int pool_dropout_backward(const void *grad_y, int32_t is_bf16, const uint8_t *code,
                          int64_t batch, int32_t h, int32_t w, int32_t c, int32_t pool_h,
                          int32_t pool_w, float p, void *grad_x, int32_t threads) {
    if (!(p >= 0.0f && p < 1.0f) || c % LANES) return 1;
    const uint32_t drop_below = drop_threshold(p);
    const float scale = keep_scale(drop_below);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t b0, b1;
        share(batch, &b0, &b1);
        unpool_images(grad_y, is_bf16, code, b0, b1, h, w, c, pool_h, pool_w, 1, scale, grad_x);
    }
    return 0;
}

/* ------------------------------------- convolution gradients from the pool's winners alone
 *
 * The weight, bias and input gradients of a stride-1 convolution whose output went through
 * the 2x2 max pool (with its deferred ReLU and the dropout after them: pool_dropout_forward),
 * from the pooled gradient and the pool's codes. Only each window's winner gets a gradient: a
 * quarter of the conv's outputs, fewer after the ReLU and the dropout, where oneDNN's backward
 * passes run over the whole unpooled gradient.
 *
 * Image by image:
 * - Winners whose gradient is zero (a ReLU after a plain pool zeroed it) are left out.
 * - Input gradient, window by window: the channels whose winner is position p (0-3) come out
 *   of the codes as a bit mask, and the sum of gradient[o] x kernel o over its set bits (the
 *   kernel is kh rows of kw * in_c contiguous values) builds up in registers, a few kernel rows
 *   at a time (those rows for all windows before the next ones, so that they stay in L1), then
 *   goes once into the image's fp32 buffer at position p's patch. Where in_c is whole vectors,
 *   by rows of the union of the window's four patches instead (add_union_row).
 * - Weight gradient, channel by channel: the windows where channel o has a live winner, as a
 *   bit mask gathered while going through the windows; channel o's kernel gradient sums
 *   gradient x input patch over them, in registers.
 * - Under bf16 autocast with in_c a multiple of 32, both in bf16 dot products (SPLIT below).
 * Visiting set bits keeps branches off the codes themselves (only each loop's exit depends on
 * them). Chunks of `chunk` images sum into their own partial weight gradients, added in chunk
 * order at the end, so the result does not depend on the number of threads.
 *
 * x [batch][in_h][in_w][in_c]: the conv's input with its padding (the conv runs unpadded
 *   here), float32 or bfloat16
 * w float32 or bfloat16 [out_c][kh][kw][in_c] (an OIHW tensor in channels_last strides)
 * grad, code [batch][pool_h][pool_w][out_c]: the gradient of pool_dropout_forward's output
 *   (scaled by the keep rate of p and rounded as dropout_gradient does) and its codes; with
 *   p = 0, of a pool alone (max_pool_forward's or a conv-pool kernel's window positions)
 * grad_x as x, or NULL; grad_w float32, laid out as w; grad_b float32 [out_c], or NULL
 * out_c is whole vectors, at most MAX_BLOCKS of them; a kernel row (kw * in_c values) at most
 * MAX_RUN_VECTORS vectors. Where in_c is not whole vectors (`tiny`'s 8 channels), the rows are
 * read and summed in whole vectors all the same: the kernels are copied with zeros after each
 * row, the lanes past a row's end go unused in the weight gradient's sums, and a mask keeps
 * them out of the input gradient's. */

#define MAX_GROUP_VECTORS 16 /* sums held in registers */
#define MAX_BLOCKS 16

/* The bits of a lane mask: lane k in bit k. */
INLINE uint32_t mask_bits(lanes_mask mask) {
#ifdef __AVX512F__
    return (uint32_t)mask;
#else
    uint32_t bits = 0;
    for (int k = 0; k < LANES; k++) bits |= (uint32_t)(mask[k] != 0) << k;
    return bits;
#endif
}

/* words[k] |= bit for each lane k of `live` that is set. */
INLINE void set_window_bits(uint64_t *words, uint32_t live, uint64_t bit) {
#ifdef __AVX512F__
    const __m512i one = _mm512_set1_epi64((long long)bit);
    __m512i *low = (__m512i *)words, *high = low + 1;
    _mm512_storeu_si512(low, _mm512_mask_or_epi64(_mm512_loadu_si512(low), (__mmask8)live,
                                                  _mm512_loadu_si512(low), one));
    _mm512_storeu_si512(high, _mm512_mask_or_epi64(_mm512_loadu_si512(high),
                                                   (__mmask8)(live >> 8),
                                                   _mm512_loadu_si512(high), one));
#else
    for (int k = 0; k < LANES; k++)
        if (live >> k & 1) words[k] |= bit;
#endif
}

/* Position p's share of a window's input gradient, for `rows` rows of the kernels: the sum
 * over the channels set in `words` (channel 64 * k + bit in word k) of gradient[o] x those rows
 * of kernel o (rows * run vectors at w + o * stride * LANES), added to the rows of `to` (row
 * floats apart, run vectors each). */
INLINE void add_kernels(const float *restrict w, int stride, const float *restrict gradient,
                        const uint64_t *words, int count, float *restrict to, int64_t row,
                        lanes_mask tail, const int rows, const int run) {
    vf acc[MAX_GROUP_VECTORS];
    for (int a = 0; a < rows * run; a++) acc[a] = (vf){0};
    uint64_t any = 0;
    for (int k = 0; k < count; k++) {
        any |= words[k];
        for (uint64_t bits = words[k]; bits; bits &= bits - 1) {
            const int o = 64 * k + __builtin_ctzll(bits);
            const float scale = gradient[o];
            const float *kernel = w + (int64_t)o * stride * LANES;
            for (int a = 0; a < rows * run; a++) acc[a] += scale * load(kernel + a * LANES);
        }
    }
    if (!any) return;
    for (int ky = 0; ky < rows; ky++) {
        for (int v = 0; v < run - 1; v++) {
            float *at = to + ky * row + v * LANES;
            store(at, load(at) + acc[ky * run + v]);
        }
        float *at = to + ky * row + (run - 1) * LANES; /* the row's last vector: its taps only */
        const vf old = load(at);
        store(at, pick_f(tail, old + acc[ky * run + run - 1], old));
    }
}

/* `rows` rows of channel o's kernel gradient (rows * run vectors at dw) plus, for each window
 * set in `words`, its gradient (gradient[window * out_c]) x the input patch at its winner
 * (image + winner_at[window * out_c]: those rows, row floats apart, run vectors each); returns
 * the gradients' sum. */
INLINE float add_patches(const float *restrict image, int64_t row, const uint64_t *words,
                         int count, int out_c, const float *restrict gradient,
                         const int32_t *restrict winner_at, float *restrict dw, const int rows,
                         const int run) {
    vf acc[MAX_GROUP_VECTORS]; /* from zero: GCC made loading them from dw a memcpy to the stack */
    for (int a = 0; a < rows * run; a++) acc[a] = (vf){0};
    float sum = 0.0f;
    for (int k = 0; k < count; k++)
        for (uint64_t bits = words[(int64_t)k * out_c]; bits; bits &= bits - 1) {
            const int64_t at = (int64_t)(64 * k + __builtin_ctzll(bits)) * out_c;
            const float *from = image + winner_at[at];
            const float scale = gradient[at];
            sum += scale;
            for (int ky = 0; ky < rows; ky++)
                for (int v = 0; v < run; v++)
                    acc[ky * run + v] += scale * load(from + ky * row + v * LANES);
        }
    for (int a = 0; a < rows * run; a++) store(dw + a * LANES, load(dw + a * LANES) + acc[a]);
    return sum;
}

/* The kernels go through `rows` kernel rows of run vectors at a time, their sums in registers:
 * group_rows(run) rows (all of them where fewer), for rows of at most MAX_RUN_VECTORS. These
 * are the (rows, run) pairs they are built for. */
#define GROUP_SHAPES(X)                                                                      \
    X(1, 1) X(1, 2) X(1, 3) X(1, 4) X(1, 5) X(1, 6) X(1, 7) X(1, 8) X(1, 9) X(1, 10) X(1, 11)  \
    X(1, 12) X(1, 13) X(1, 14) X(1, 15) X(1, 16) X(2, 1) X(2, 2) X(2, 3) X(2, 4) X(2, 5)       \
    X(2, 6) X(2, 7) X(2, 8) X(3, 1) X(3, 2) X(3, 3) X(3, 4) X(3, 5) X(4, 1) X(4, 2) X(4, 3)    \
    X(4, 4)
#define SHAPE_KEY(rows, run) ((rows) * 32 + (run))

INLINE int min_int(int a, int b) { return a < b ? a : b; }

INLINE int group_rows(int run) {
    const int rows = MAX_GROUP_VECTORS / run;
    return rows < 4 ? rows : 4;
}

int winners_shape_supported(int32_t kh, int32_t run) {
    return kh >= 1 && run >= 1 && run <= MAX_RUN_VECTORS;
}

/* Where in_c is whole vectors, a window's input gradient goes by rows of the union of its four
 * patches instead: union row u spans kw + 1 pixels (run + shift vectors, shift = in_c / LANES)
 * and takes kernel row u of the channels won in the window's top row and kernel row u - 1 of
 * those won in its bottom row, those won on the right added shift vectors further. So a window
 * adds kh + 1 rows of run + shift vectors to the image's buffer, where position by position it
 * added 4 * kh rows of run vectors: `basic`'s whole winners_backward 1.10-1.18x faster on two
 * threads and 1.12-1.17x on one, on a training step's operands (the same sums in another order;
 * two union rows a pass, or kernel rows outermost, were slower). These are the (run, shift)
 * pairs it is built for: kernels 1-5 wide on 16-128 channels. */
#define UNION_SHAPES(X)                                                                      \
    X(1, 1) X(2, 1) X(3, 1) X(4, 1) X(5, 1) X(2, 2) X(4, 2) X(6, 2) X(8, 2) X(10, 2) X(3, 3)   \
    X(6, 3) X(9, 3) X(12, 3) X(15, 3) X(4, 4) X(8, 4) X(12, 4) X(16, 4) X(6, 6) X(12, 6)       \
    X(8, 8) X(16, 8)
#define MAX_UNION_VECTORS 24

/* The sum over the channels set in `words` of gradient[o] x a kernel row (run vectors at
 * rows + o * run * LANES), added to acc from vector `at` on. */
INLINE uint64_t add_rows(vf *acc, const int at, const float *restrict rows,
                         const float *restrict gradient, const uint64_t *words, int count,
                         const int run) {
    uint64_t any = 0;
    for (int k = 0; k < count; k++) {
        any |= words[k];
        for (uint64_t bits = words[k]; bits; bits &= bits - 1) {
            const int o = 64 * k + __builtin_ctzll(bits);
            const float scale = gradient[o];
            const float *row = rows + (int64_t)o * run * LANES;
            for (int v = 0; v < run; v++) acc[at + v] += scale * load(row + v * LANES);
        }
    }
    return any;
}

/* Union row u of a window's input gradient added to `to`, from the kernels by row ([kh][out_c]
 * [run vectors]) and the channels won at each position (by_position[2 * dy + dx]). */
INLINE void add_union_row(const float *restrict w, int kh, int out_c, int u,
                          const float *restrict gradient,
                          const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                          float *restrict to, const int run, const int shift) {
    vf acc[MAX_UNION_VECTORS];
    for (int a = 0; a < run + shift; a++) acc[a] = (vf){0};
    uint64_t any = 0;
    for (int dy = 0; dy < 2; dy++) {
        const int ky = u - dy;
        if (ky < 0 || ky >= kh) continue;
        const float *rows = w + (int64_t)ky * out_c * run * LANES;
        any |= add_rows(acc, 0, rows, gradient, by_position[2 * dy], count, run);
        any |= add_rows(acc, shift, rows, gradient, by_position[2 * dy + 1], count, run);
    }
    if (!any) return;
    for (int a = 0; a < run + shift; a++) store(to + a * LANES, load(to + a * LANES) + acc[a]);
}

/* Where all kh + 1 union rows of a window fit in registers (window_pass rows of run + shift
 * vectors, more than kh: `dropout`'s 2x2 kernels), they build up at once, each channel's kh
 * kernel rows in one visit (the second conv's winners_backward 1.27x faster in bf16, the
 * third's 1.04x; its training steps 1.03x). The same sums in the same order, but a window's
 * rows go into the image's buffer together: where two windows' unions overlap, in another
 * order than union row by union row. */
INLINE int window_pass(int run, int shift) { return MAX_UNION_VECTORS / (run + shift); }

/* The channels set in `words`: each one's kh kernel rows (run vectors, krow floats apart)
 * times gradient[o], added to acc's rows (width vectors apart), for kh < pass. */
INLINE uint64_t add_kernel_rows(vf *acc, const float *restrict w, int64_t krow, int kh,
                                const float *restrict gradient, const uint64_t *words, int count,
                                const int run, const int width, const int pass) {
    uint64_t any = 0;
    for (int k = 0; k < count; k++) {
        any |= words[k];
        for (uint64_t bits = words[k]; bits; bits &= bits - 1) {
            const int o = 64 * k + __builtin_ctzll(bits);
            const float scale = gradient[o];
            const float *kernel = w + (int64_t)o * run * LANES;
            for (int r = 0; r + 1 < pass; r++)
                if (r < kh)
                    for (int v = 0; v < run; v++)
                        acc[r * width + v] += scale * load(kernel + r * krow + v * LANES);
        }
    }
    return any;
}

/* A window's whole input gradient, its kh + 1 union rows at once (to: its top-left pixel,
 * image rows `row` floats apart); the kernels by row as add_union_row's. */
INLINE void add_union_window(const float *restrict w, int kh, int out_c,
                             const float *restrict gradient,
                             const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                             float *restrict to, int64_t row, const int run, const int shift,
                             const int pass) {
    const int width = run + shift;
    const int64_t krow = (int64_t)out_c * run * LANES;
    vf acc[MAX_UNION_VECTORS];
    for (int a = 0; a < pass * width; a++) acc[a] = (vf){0};
    uint64_t any = add_kernel_rows(acc, w, krow, kh, gradient, by_position[0], count, run, width,
                                   pass);
    any |= add_kernel_rows(acc + shift, w, krow, kh, gradient, by_position[1], count, run, width,
                           pass);
    any |= add_kernel_rows(acc + width, w, krow, kh, gradient, by_position[2], count, run, width,
                           pass);
    any |= add_kernel_rows(acc + width + shift, w, krow, kh, gradient, by_position[3], count, run,
                           width, pass);
    if (!any) return;
    for (int r = 0; r < pass; r++)
        if (r <= kh)
            for (int a = 0; a < width; a++) {
                float *at = to + r * row + a * LANES;
                store(at, load(at) + acc[r * width + a]);
            }
}

#define UNION_KEY(run, shift) ((run) * 32 + (shift))

/* in_c / LANES where a window's input gradient can go by union rows (above), else 0. */
INLINE int union_shift(const Geometry *g) {
    if (g->in_c % LANES) return 0;
    const int run = g->kw * g->in_c / LANES, shift = g->in_c / LANES;
    switch (UNION_KEY(run, shift)) {
#define CASE(a, b) case UNION_KEY(a, b):
        UNION_SHAPES(CASE)
#undef CASE
        return shift;
    }
    return 0;
}

static void add_union_row_any(const float *w, int kh, int out_c, int u, const float *gradient,
                              const uint64_t (*by_position)[MAX_BLOCKS / 4], int count, float *to,
                              int run, int shift) {
    switch (UNION_KEY(run, shift)) {
#define CASE(a, b)                                                                            \
    case UNION_KEY(a, b):                                                                     \
        add_union_row(w, kh, out_c, u, gradient, by_position, count, to, a, b);               \
        break;
        UNION_SHAPES(CASE)
#undef CASE
    }
}

static void add_union_window_any(const float *w, int kh, int out_c, const float *gradient,
                                 const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                                 float *to, int64_t row, int run, int shift) {
    switch (UNION_KEY(run, shift)) {
#define CASE(a, b)                                                                            \
    case UNION_KEY(a, b):                                                                     \
        add_union_window(w, kh, out_c, gradient, by_position, count, to, row, a, b,           \
                         window_pass(a, b));                                                  \
        break;
        UNION_SHAPES(CASE)
#undef CASE
    }
}

static void add_kernels_any(const float *w, int stride, const float *gradient,
                            const uint64_t *words, int count, float *to, int64_t row,
                            lanes_mask tail, int rows, int run) {
    switch (SHAPE_KEY(rows, run)) {
#define CASE(a, b)                                                                            \
    case SHAPE_KEY(a, b):                                                                     \
        add_kernels(w, stride, gradient, words, count, to, row, tail, a, b);                  \
        break;
        GROUP_SHAPES(CASE)
#undef CASE
    }
}

static float add_patches_any(const float *image, int64_t row, const uint64_t *words, int count,
                             int out_c, const float *gradient, const int32_t *winner_at,
                             float *dw, int rows, int run) {
    switch (SHAPE_KEY(rows, run)) {
#define CASE(a, b)                                                                            \
    case SHAPE_KEY(a, b):                                                                     \
        return add_patches(image, row, words, count, out_c, gradient, winner_at, dw, a, b);
        GROUP_SHAPES(CASE)
#undef CASE
    }
    return 0.0f;
}

typedef struct {
    float *image;      /* the input image in float32 */
    float *grad_image; /* its gradient, summed in float32 */
    float *gradient;   /* [windows][out_c]: the pooled gradient, scaled where dropout */
    int32_t *winner_at; /* [windows][out_c]: where a live winner's input patch is in image */
    uint64_t (*by_position)[4][MAX_BLOCKS / 4]; /* [windows]: the channels won at each position */
    uint64_t *windows; /* [words][out_c]: bit `window % 64` of word window / 64: a live winner */
    int32_t *corner;   /* [windows]: where each window's top-left pixel is in image */
} WinnersScratch;

/* Image b's winners from its pooled gradient and codes: s->gradient, s->winner_at,
 * s->by_position and s->windows (see WinnersScratch). */
static void gather_winners(const Geometry *g, const void *grad, int grad_is_bf16,
                           const uint8_t *code, float scale, int64_t b, const WinnersScratch *s) {
    const int in_c = g->in_c, out_c = g->out_c, blocks = out_c / LANES;
    const int windows = g->pool_h * g->pool_w, window_words = (windows + 63) / 64;
    const int64_t row = (int64_t)g->in_w * in_c;
    const uint8_t *image_code = code + b * windows * out_c;
    memset(s->windows, 0, sizeof(uint64_t) * (size_t)(window_words * out_c));
    for (int window = 0; window < windows; window++) {
        const int64_t at = (int64_t)window * out_c;
        uint64_t(*by_position)[MAX_BLOCKS / 4] = s->by_position[window];
        memset(by_position, 0, sizeof s->by_position[window]);
        for (int q = 0; q < blocks; q++) {
            /* a dropped value's code (DROPPED set) and NO_GRADIENT match no position */
            const vi winner = load_bytes(image_code + at + q * LANES);
            vf gv = load_any(grad, b * windows * out_c + at + q * LANES, grad_is_bf16) * scale;
            if (grad_is_bf16) gv = (vf)(to_bf16(gv) << 16); /* as dropout_gradient rounds it */
            store(s->gradient + at + q * LANES, gv);
            /* position p's patch is (p & 1) columns right and (p >> 1) rows down */
            store_ints(s->winner_at + at + q * LANES,
                       s->corner[window] + (winner & 1) * in_c + (winner >> 1 & 1) * (int32_t)row);
            const uint32_t has_gradient = mask_bits(nonzero(gv));
            uint32_t live = 0;
            for (int p = 0; p < 4; p++) {
                const uint32_t bits = mask_bits(lanes_equal(winner, p)) & has_gradient;
                by_position[p][q / 4] |= (uint64_t)bits << (16 * (q % 4));
                live |= bits;
            }
            set_window_bits(s->windows + (window / 64) * out_c + q * LANES, live,
                            (uint64_t)1 << (window % 64));
        }
    }
}

/* Image b's share: its input gradient into grad_x (unless NULL), and its weight and bias
 * gradients added to dw ([out_c][patch vectors]) and db (unless NULL); w holds the kernels by
 * group of kernel rows (see winners_backward), of one row each where by_union. */
static void winners_image(const Geometry *g, const void *x, int is_bf16, const float *w,
                          const void *grad, int grad_is_bf16, const uint8_t *code, float scale,
                          int64_t b, void *grad_x, float *dw, float *db, int by_union,
                          const WinnersScratch *s) {
    const int in_c = g->in_c, out_c = g->out_c, words = (out_c / LANES + 3) / 4;
    const int run = run_length(g) / LANES, patch = g->kh * run, windows = g->pool_h * g->pool_w;
    const int window_words = (windows + 63) / 64, rows = group_rows(run);
    const int64_t row = (int64_t)g->in_w * in_c, pixels = (int64_t)g->in_h * row;
    const int32_t position[4] = {0, in_c, (int32_t)row, (int32_t)row + in_c};
    const lanes_mask tail = run_tail_mask(g);
    widen(x, b * pixels, is_bf16, s->image, pixels);
    gather_winners(g, grad, grad_is_bf16, code, scale, b, s);
    if (grad_x) memset(s->grad_image, 0, sizeof(float) * (size_t)pixels);
    /* a few kernel rows for all windows at a time, so that those rows of all kernels stay in L1 */
    const int shift = union_shift(g);
    if (grad_x && by_union && g->kh < window_pass(run, shift))
        for (int window = 0; window < windows; window++)
            add_union_window_any(w, g->kh, out_c, s->gradient + window * out_c,
                                 s->by_position[window], words,
                                 s->grad_image + s->corner[window], row, run, shift);
    else if (grad_x && by_union)
        for (int u = 0; u <= g->kh; u++)
            for (int window = 0; window < windows; window++)
                add_union_row_any(w, g->kh, out_c, u, s->gradient + window * out_c,
                                  s->by_position[window], words,
                                  s->grad_image + s->corner[window] + u * row, run, shift);
    else if (grad_x)
        for (int ky = 0; ky < g->kh; ky += rows)
            for (int window = 0; window < windows; window++)
                for (int p = 0; p < 4; p++) {
                    float *to = s->grad_image + s->corner[window] + position[p] + ky * row;
                    add_kernels_any(w + (int64_t)out_c * ky * run * LANES,
                                    min_int(rows, g->kh - ky) * run, s->gradient + window * out_c,
                                    s->by_position[window][p], words, to, row, tail,
                                    min_int(rows, g->kh - ky), run);
                }
    for (int o = 0; o < out_c; o++)
        for (int ky = 0; ky < g->kh; ky += rows) {
            const float sum = add_patches_any(
                s->image + ky * row, row, s->windows + o, window_words, out_c, s->gradient + o,
                s->winner_at + o, dw + ((int64_t)o * patch + ky * run) * LANES,
                min_int(rows, g->kh - ky), run);
            if (db && ky == 0) db[o] += sum;
        }
    if (grad_x) narrow(s->grad_image, pixels, grad_x, b * pixels, is_bf16);
}

/* Under bf16 autocast (x, w and the gradient in bfloat16) with in_c a multiple of 32, both
 * gradients go in bf16 dot products instead, straight from the bfloat16 values: one 512-bit load
 * holds 32 neighbouring values of a kernel or input row (twice as many as in float32), and two
 * `_mm512_dpbf16_ps` with the pairs (g, 0) and (0, g) add g times its even values and g times its
 * odd values to two float32 sums, exactly (the products of bfloat16 values are exact in float32).
 * The sums stay in that split order, block by block of 32 values (16 even, then 16 odd), in the
 * image's input gradient buffer and the partial weight gradients, and go back to row order once:
 * as the input gradient is rounded to bfloat16 (an even and an odd value make one 32-bit lane,
 * no shuffle) and as the chunks' weight gradients are summed. The input side goes by union rows
 * (add_union_row). No widening of the image either. Against union rows in float32 on a
 * training step's operands, the same bits: `basic`'s 1.09-1.19x on two threads and 1.10x on
 * one (1.28x against position by position); `dropout`'s 2x2 kernels 0.98x (second conv) and
 * 1.10x (third) by union rows, before a window's rows went at once (add_union_window). Training
 * steps on Fashion-MNIST: `basic` 1.09x with both (bench_levers.py --real-data). An Inf or NaN input value makes its pair neighbour's products
 * NaN too (0 x Inf), where it would reach the gradients anyway. */
#ifdef __AVX512BF16__
#define SPLIT 32 /* values per block */

/* The (run, shift) union shapes (UNION_SHAPES) of whole blocks. */
#define SPLIT_UNION_SHAPES(X)                                                                \
    X(2, 2) X(4, 2) X(6, 2) X(8, 2) X(10, 2) X(4, 4) X(8, 4) X(12, 4) X(16, 4) X(6, 6) X(12, 6)  \
    X(8, 8) X(16, 8)
/* The (rows, run) groups (GROUP_SHAPES) of whole blocks. */
#define SPLIT_GROUP_SHAPES(X)                                                                \
    X(1, 2) X(2, 2) X(3, 2) X(4, 2) X(1, 4) X(2, 4) X(3, 4) X(4, 4) X(1, 6) X(2, 6) X(1, 8)     \
    X(2, 8) X(1, 10) X(1, 12) X(1, 14) X(1, 16)

/* Whether winners_image_split takes these: all three in bfloat16, in_c whole blocks and the
 * shapes built. */
static int split_fits(const Geometry *g, int is_bf16, int w_is_bf16, int grad_is_bf16) {
    if (!(is_bf16 && w_is_bf16 && grad_is_bf16) || g->in_c % SPLIT) return 0;
    switch (UNION_KEY(g->kw * g->in_c / LANES, g->in_c / LANES)) {
#define CASE(a, b) case UNION_KEY(a, b):
        SPLIT_UNION_SHAPES(CASE)
#undef CASE
        return 1;
    }
    return 0;
}

/* acc[0 .. 2 * blocks) += g x the even and odd values of `blocks` blocks at `from`, in split
 * order; even and odd hold the bfloat16 pairs (g, 0) and (0, g). */
INLINE void add_split(__m512 *acc, const uint16_t *restrict from, __m512bh even, __m512bh odd,
                      const int blocks) {
    for (int k = 0; k < blocks; k++) {
        const __m512bh values = (__m512bh)_mm512_loadu_si512(from + SPLIT * k);
        acc[2 * k] = _mm512_dpbf16_ps(acc[2 * k], values, even);
        acc[2 * k + 1] = _mm512_dpbf16_ps(acc[2 * k + 1], values, odd);
    }
}

/* The pairs (g, 0) and (0, g) for a float32 g that holds a bfloat16 value. */
INLINE void split_scales(float g, __m512bh *even, __m512bh *odd) {
    uint32_t bits;
    memcpy(&bits, &g, sizeof bits);
    *even = (__m512bh)_mm512_set1_epi32((int)(bits >> 16));
    *odd = (__m512bh)_mm512_set1_epi32((int)(bits & 0xffff0000u));
}

/* add_rows in bf16: kernel rows of `blocks` blocks at rows + o * blocks * SPLIT. */
INLINE uint64_t add_split_rows(__m512 *acc, const uint16_t *restrict rows,
                               const float *restrict gradient, const uint64_t *words, int count,
                               const int blocks) {
    uint64_t any = 0;
    for (int k = 0; k < count; k++) {
        any |= words[k];
        for (uint64_t bits = words[k]; bits; bits &= bits - 1) {
            const int o = 64 * k + __builtin_ctzll(bits);
            __m512bh even, odd;
            split_scales(gradient[o], &even, &odd);
            add_split(acc, rows + (int64_t)o * blocks * SPLIT, even, odd, blocks);
        }
    }
    return any;
}

/* add_union_row in bf16: the kernels by row, [kh][out_c][kw * in_c] bfloat16; `to` in split
 * order. run and shift in vectors, as UNION_SHAPES. */
INLINE void add_split_union_row(const uint16_t *restrict w, int kh, int out_c, int u,
                                const float *restrict gradient,
                                const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                                float *restrict to, const int run, const int shift) {
    const int blocks = run / 2;
    __m512 acc[MAX_UNION_VECTORS];
    for (int a = 0; a < run + shift; a++) acc[a] = _mm512_setzero_ps();
    uint64_t any = 0;
    for (int dy = 0; dy < 2; dy++) {
        const int ky = u - dy;
        if (ky < 0 || ky >= kh) continue;
        const uint16_t *rows = w + (int64_t)ky * out_c * blocks * SPLIT;
        any |= add_split_rows(acc, rows, gradient, by_position[2 * dy], count, blocks);
        any |= add_split_rows(acc + shift, rows, gradient, by_position[2 * dy + 1], count, blocks);
    }
    if (!any) return;
    for (int a = 0; a < run + shift; a++)
        _mm512_storeu_ps(to + a * LANES, _mm512_add_ps(_mm512_loadu_ps(to + a * LANES), acc[a]));
}

/* add_kernel_rows in bf16: kernel rows of `blocks` blocks, krow values apart. */
INLINE uint64_t add_split_kernels(__m512 *acc, const uint16_t *restrict w, int64_t krow, int kh,
                                  const float *restrict gradient, const uint64_t *words,
                                  int count, const int blocks, const int width, const int pass) {
    uint64_t any = 0;
    for (int k = 0; k < count; k++) {
        any |= words[k];
        for (uint64_t bits = words[k]; bits; bits &= bits - 1) {
            const int o = 64 * k + __builtin_ctzll(bits);
            __m512bh even, odd;
            split_scales(gradient[o], &even, &odd);
            const uint16_t *kernel = w + (int64_t)o * blocks * SPLIT;
            for (int r = 0; r + 1 < pass; r++)
                if (r < kh) add_split(acc + r * width, kernel + r * krow, even, odd, blocks);
        }
    }
    return any;
}

/* add_union_window in bf16. */
INLINE void add_split_window(const uint16_t *restrict w, int kh, int out_c,
                             const float *restrict gradient,
                             const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                             float *restrict to, int64_t row, const int run, const int shift,
                             const int pass) {
    const int blocks = run / 2, width = run + shift;
    const int64_t krow = (int64_t)out_c * blocks * SPLIT;
    __m512 acc[MAX_UNION_VECTORS];
    for (int a = 0; a < pass * width; a++) acc[a] = _mm512_setzero_ps();
    uint64_t any = add_split_kernels(acc, w, krow, kh, gradient, by_position[0], count, blocks,
                                     width, pass);
    any |= add_split_kernels(acc + shift, w, krow, kh, gradient, by_position[1], count, blocks,
                             width, pass);
    any |= add_split_kernels(acc + width, w, krow, kh, gradient, by_position[2], count, blocks,
                             width, pass);
    any |= add_split_kernels(acc + width + shift, w, krow, kh, gradient, by_position[3], count,
                             blocks, width, pass);
    if (!any) return;
    for (int r = 0; r < pass; r++)
        if (r <= kh)
            for (int a = 0; a < width; a++) {
                float *at = to + r * row + a * LANES;
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), acc[r * width + a]));
            }
}

static void add_split_window_any(const uint16_t *w, int kh, int out_c, const float *gradient,
                                 const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                                 float *to, int64_t row, int run, int shift) {
    switch (UNION_KEY(run, shift)) {
#define CASE(a, b)                                                                            \
    case UNION_KEY(a, b):                                                                     \
        add_split_window(w, kh, out_c, gradient, by_position, count, to, row, a, b,           \
                         window_pass(a, b));                                                  \
        break;
        SPLIT_UNION_SHAPES(CASE)
#undef CASE
    }
}

static void add_split_union_row_any(const uint16_t *w, int kh, int out_c, int u,
                                    const float *gradient,
                                    const uint64_t (*by_position)[MAX_BLOCKS / 4], int count,
                                    float *to, int run, int shift) {
    switch (UNION_KEY(run, shift)) {
#define CASE(a, b)                                                                            \
    case UNION_KEY(a, b):                                                                     \
        add_split_union_row(w, kh, out_c, u, gradient, by_position, count, to, a, b);         \
        break;
        SPLIT_UNION_SHAPES(CASE)
#undef CASE
    }
}

/* add_patches in bf16: the image in bfloat16, dw in split order; rows and run as GROUP_SHAPES. */
INLINE float add_split_patches(const uint16_t *restrict image, int64_t row, const uint64_t *words,
                               int count, int out_c, const float *restrict gradient,
                               const int32_t *restrict winner_at, float *restrict dw,
                               const int rows, const int run) {
    const int blocks = run / 2;
    __m512 acc[MAX_GROUP_VECTORS];
    for (int a = 0; a < rows * run; a++) acc[a] = _mm512_setzero_ps();
    float sum = 0.0f;
    for (int k = 0; k < count; k++)
        for (uint64_t bits = words[(int64_t)k * out_c]; bits; bits &= bits - 1) {
            const int64_t at = (int64_t)(64 * k + __builtin_ctzll(bits)) * out_c;
            const uint16_t *from = image + winner_at[at];
            __m512bh even, odd;
            split_scales(gradient[at], &even, &odd);
            sum += gradient[at];
            for (int ky = 0; ky < rows; ky++)
                add_split(acc + ky * run, from + ky * row, even, odd, blocks);
        }
    for (int a = 0; a < rows * run; a++)
        _mm512_storeu_ps(dw + a * LANES, _mm512_add_ps(_mm512_loadu_ps(dw + a * LANES), acc[a]));
    return sum;
}

static float add_split_patches_any(const uint16_t *image, int64_t row, const uint64_t *words,
                                   int count, int out_c, const float *gradient,
                                   const int32_t *winner_at, float *dw, int rows, int run) {
    switch (SHAPE_KEY(rows, run)) {
#define CASE(a, b)                                                                            \
    case SHAPE_KEY(a, b):                                                                     \
        return add_split_patches(image, row, words, count, out_c, gradient, winner_at, dw, a, b);
        SPLIT_GROUP_SHAPES(CASE)
#undef CASE
    }
    return 0.0f;
}

/* n values (whole blocks) in split order, rounded to bfloat16 in row order at `to`. */
static void narrow_split(const float *from, int64_t n, uint16_t *to) {
    for (int64_t k = 0; k < n; k += SPLIT) {
        const vi even = to_bf16(load(from + k)), odd = to_bf16(load(from + k + LANES));
        _mm512_storeu_si512(to + k, (__m512i)(even | odd << 16));
    }
}

/* winners_image in bf16 (see above): w holds the kernels by row, [kh][out_c][kw * in_c]. */
static void winners_image_split(const Geometry *g, const uint16_t *x, const uint16_t *w,
                                const void *grad, const uint8_t *code, float scale, int64_t b,
                                uint16_t *grad_x, float *dw, float *db, const WinnersScratch *s) {
    const int in_c = g->in_c, out_c = g->out_c, words = (out_c / LANES + 3) / 4;
    const int run = g->kw * in_c / LANES, patch = g->kh * run, windows = g->pool_h * g->pool_w;
    const int window_words = (windows + 63) / 64, rows = group_rows(run), shift = in_c / LANES;
    const int64_t row = (int64_t)g->in_w * in_c, pixels = (int64_t)g->in_h * row;
    const uint16_t *image = x + b * pixels;
    gather_winners(g, grad, 1, code, scale, b, s);
    if (grad_x) {
        memset(s->grad_image, 0, sizeof(float) * (size_t)pixels);
        if (g->kh < window_pass(run, shift))
            for (int window = 0; window < windows; window++)
                add_split_window_any(w, g->kh, out_c, s->gradient + window * out_c,
                                     s->by_position[window], words,
                                     s->grad_image + s->corner[window], row, run, shift);
        else
            for (int u = 0; u <= g->kh; u++)
                for (int window = 0; window < windows; window++)
                    add_split_union_row_any(w, g->kh, out_c, u, s->gradient + window * out_c,
                                            s->by_position[window], words,
                                            s->grad_image + s->corner[window] + u * row, run,
                                            shift);
        narrow_split(s->grad_image, pixels, grad_x + b * pixels);
    }
    for (int o = 0; o < out_c; o++)
        for (int ky = 0; ky < g->kh; ky += rows) {
            const float sum = add_split_patches_any(
                image + ky * row, row, s->windows + o, window_words, out_c, s->gradient + o,
                s->winner_at + o, dw + ((int64_t)o * patch + ky * run) * LANES,
                min_int(rows, g->kh - ky), run);
            if (db && ky == 0) db[o] += sum;
        }
}

/* The chunks' split weight gradients summed, in row order into grad_w ([out_c][kh][taps]). */
static void unsplit_weight_grad(const float *partial, int64_t chunks, int64_t w_size,
                                int64_t rows, int taps, float *grad_w) {
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int k = 0; k < taps; k += SPLIT) {
            const int64_t at = r * taps + k;
            __m512 even = _mm512_loadu_ps(partial + at);
            __m512 odd = _mm512_loadu_ps(partial + at + LANES);
            for (int64_t c = 1; c < chunks; c++) {
                even = _mm512_add_ps(even, _mm512_loadu_ps(partial + c * w_size + at));
                odd = _mm512_add_ps(odd, _mm512_loadu_ps(partial + c * w_size + at + LANES));
            }
            _mm512_storeu_ps(grad_w + at, _mm512_permutex2var_ps(even, first, odd));
            _mm512_storeu_ps(grad_w + at + LANES, _mm512_permutex2var_ps(even, second, odd));
        }
}
#else
static int split_fits(const Geometry *g, int is_bf16, int w_is_bf16, int grad_is_bf16) {
    (void)g, (void)is_bf16, (void)w_is_bf16, (void)grad_is_bf16;
    return 0;
}
#endif

static int winners_scratch(const Geometry *g, WinnersScratch *s) {
    const int64_t pixels = (int64_t)g->in_h * g->in_w * g->in_c;
    const int windows = g->pool_h * g->pool_w;
    /* LANES floats to spare: a patch's last kernel row is read, and its input gradient
     * added, in whole vectors, which can run up to LANES - 1 values past the image */
    const size_t image_bytes = (size_t)((pixels + LANES) * 4 + 63) / 64 * 64;
    s->image = aligned_alloc(64, image_bytes);
    s->grad_image = aligned_alloc(64, image_bytes);
    s->gradient = malloc(sizeof(float) * (size_t)windows * (size_t)g->out_c);
    s->winner_at = malloc(sizeof(int32_t) * (size_t)windows * (size_t)g->out_c);
    s->by_position = malloc(sizeof *s->by_position * (size_t)windows);
    s->windows = malloc(sizeof(uint64_t) * (size_t)((windows + 63) / 64 * g->out_c));
    s->corner = malloc(sizeof(int32_t) * (size_t)windows);
    if (!(s->image && s->grad_image && s->gradient && s->winner_at && s->by_position &&
          s->windows && s->corner))
        return -2;
    memset(s->image + pixels, 0, sizeof(float) * LANES);
    memset(s->grad_image + pixels, 0, sizeof(float) * LANES);
    for (int i = 0; i < g->pool_h; i++)
        for (int j = 0; j < g->pool_w; j++)
            s->corner[i * g->pool_w + j] = (2 * i * g->in_w + 2 * j) * g->in_c;
    return 0;
}

static void free_winners_scratch(WinnersScratch *s) {
    free(s->image);
    free(s->grad_image);
    free(s->gradient);
    free(s->winner_at);
    free(s->by_position);
    free(s->windows);
    free(s->corner);
}

/* How winners_backward goes for these operands: 0 position by position, 1 by union rows in
 * float32, 2 in bf16 dot products (split order); at most max_method (benchmarks turn them off). */
int winners_method(const Geometry *g, int32_t is_bf16, int32_t w_is_bf16, int32_t grad_is_bf16,
                   int32_t max_method) {
    if (max_method >= 2 && split_fits(g, is_bf16, w_is_bf16, grad_is_bf16)) return 2;
    return max_method >= 1 && union_shift(g) ? 1 : 0;
}

int winners_backward(const Geometry *g, const void *x, int32_t is_bf16, const void *w,
                     int32_t w_is_bf16, const void *grad, int32_t grad_is_bf16,
                     const uint8_t *code, float p, int64_t batch, int64_t chunk,
                     void *grad_x, float *grad_w, float *grad_b, int32_t max_method,
                     int32_t threads) {
    (void)threads; /* unused without OpenMP */
    const int taps = g->kw * g->in_c, run = run_length(g) / LANES, patch = g->kh * run;
    if (g->out_c % LANES || g->out_c > MAX_BLOCKS * LANES ||
        !winners_shape_supported(g->kh, run) ||
        g->conv_h < 2 * g->pool_h || g->conv_w < 2 * g->pool_w || chunk < 1 ||
        !(p >= 0.0f && p < 1.0f))
        return -1;
    const float scale = keep_scale(drop_threshold(p));
    const int64_t chunks = (batch + chunk - 1) / chunk;
    const int64_t w_size = (int64_t)g->out_c * patch * LANES;
    float *kernels = malloc(sizeof(float) * (size_t)w_size);
    float *partial = calloc((size_t)(chunks * (w_size + g->out_c)), sizeof(float));
    if (!partial || !kernels) {
        free(kernels);
        free(partial);
        return -2;
    }
    /* in float32, by group of kernel rows: a group's rows of all kernels contiguous, where the
     * rows of kernels `patch` vectors apart shared L1 sets (basic's input gradient 1.2x slower);
     * each row padded with zeros to whole vectors. By union rows, groups of one row; in bf16
     * dot products, those rows in bfloat16 as they are */
    const int method = winners_method(g, is_bf16, w_is_bf16, grad_is_bf16, max_method);
    const int split = method == 2;
    const int rows = method ? 1 : group_rows(run);
    float *to = kernels;
    uint16_t *to_bf16_rows = (uint16_t *)kernels; /* in bf16 (split): as they are */
    for (int ky = 0; ky < g->kh; ky += rows)
        for (int o = 0; o < g->out_c; o++)
            for (int r = ky; r < min_int(ky + rows, g->kh); r++, to += run * LANES) {
                const int64_t at = ((int64_t)o * g->kh + r) * taps;
                if (split) {
                    memcpy(to_bf16_rows, (const uint16_t *)w + at, sizeof(uint16_t) * (size_t)taps);
                    to_bf16_rows += taps;
                    continue;
                }
                widen(w, at, w_is_bf16, to, taps);
                memset(to + taps, 0, sizeof(float) * (size_t)(run * LANES - taps));
            }
    float *partial_b = partial + chunks * w_size;
    int status = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(min : status)
    {
        WinnersScratch s;
        const int failed = winners_scratch(g, &s);
        status = failed;
#pragma omp for schedule(static)
        for (int64_t k = 0; k < chunks; k++) {
            const int64_t end = (k + 1) * chunk < batch ? (k + 1) * chunk : batch;
            for (int64_t b = k * chunk; b < end && !failed; b++) {
                float *dw = partial + k * w_size, *db = grad_b ? partial_b + k * g->out_c : NULL;
#ifdef __AVX512BF16__
                if (split) {
                    winners_image_split(g, x, (const uint16_t *)kernels, grad, code, scale, b,
                                        grad_x, dw, db, &s);
                    continue;
                }
#endif
                winners_image(g, x, is_bf16, kernels, grad, grad_is_bf16, code, scale, b, grad_x,
                              dw, db, method == 1, &s);
            }
        }
#ifdef __AVX512BF16__
        if (split)
            unsplit_weight_grad(partial, chunks, w_size, (int64_t)g->out_c * g->kh, taps, grad_w);
        else
#endif
            /* the chunks' sums, kernel row by kernel row, without the padding of their rows */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)g->out_c * g->kh; r++)
            for (int v = 0; v < run; v++) {
                const int64_t at = (r * run + v) * LANES;
                vf sum = load(partial + at);
                for (int64_t k = 1; k < chunks; k++) sum += load(partial + k * w_size + at);
                float *out = grad_w + r * taps + v * LANES;
                if ((v + 1) * LANES <= taps) {
                    store(out, sum);
                    continue;
                }
                float lanes[LANES];
                store(lanes, sum);
                memcpy(out, lanes, sizeof(float) * (size_t)(taps - v * LANES));
            }
        free_winners_scratch(&s);
    }
    if (grad_b) {
        memcpy(grad_b, partial_b, sizeof(float) * (size_t)g->out_c);
        for (int64_t k = 1; k < chunks; k++)
            for (int c = 0; c < g->out_c; c++) grad_b[c] += partial_b[k * g->out_c + c];
    }
    free(kernels);
    free(partial);
    return status;
}

/* ------------------------------------------------------------------------ a small dense head
 *
 * In training, Dense(hidden, ReLU or no activation) -> Dropout(p) -> Dense(out), with float32
 * weights and float32 arithmetic as the layers have it (small Dense layers stay float32 under
 * bf16 autocast): one call forward and one backward, where PyTorch runs some twenty ops and
 * six small matrix products that each pay their own dispatch and wake their threads.
 *
 * Layouts (row-major, contiguous):
 *   x        [batch][in_f], float32 or bfloat16; grad_x alike
 *   w1       float32 [hidden][in_f], b1 [hidden] or NULL (PyTorch's Linear layout); grads alike
 *   w2       float32 [out_f][hidden], b2 [out_f] or NULL
 *   xf       float32 [parts][batch][in_pad]: x widened, one copy per part (below), kept for the
 *            backward pass; in bf16 (below) x in pairs instead (dense_head_xf_floats a part)
 *   act      float32 [batch][hid_pad]: the activation's output, before the dropout
 *   dropped  float32 [batch][hid_pad]: the dropout's output
 *   factor   float32 [batch][hid_pad]: what the dropout multiplied each value by (0, or 1 / keep
 *            rate), drawn as `dropout` draws it for a [batch][hidden] tensor: the same seed
 *            gives the same mask
 *   logits   float32 [batch][out_f]
 * in_pad and hid_pad are in_f and hidden rounded up to whole vectors. Lanes past in_f or hidden
 * are never read into a real output: column j of a product depends only on column j of its
 * right-hand matrix, and the sums run over real columns only.
 *
 * The hidden units are split into `parts`, whole vectors each, one per thread: a part's thread
 * transposes its rows of w1, computes its columns of act, dropped and factor forward, and
 * backward their gradient and its rows of grad_w1, from its own copy of x. What one core writes
 * the other then never reads, except the hidden values that the second Dense (forward) and the
 * input gradient (backward) sum over, split by batch rows. (With one shared transposed w1 and
 * one xf, every call's writes had first to take the cache lines back from the other core that
 * read them: the transpose alone took 35 us on two threads against 6 us on one.)
 *
 * The matrix products go by tiles of up to TILE_ROWS rows and TILE_VECTORS vectors of the
 * output, their sums in registers: per step of the sum, a load of each vector of the right-hand
 * row and a broadcast of each left-hand value. The left-hand matrix is read through two
 * strides, so a transposed one (the gradients' g^T) needs no copy.
 */

#define TILE_ROWS 6
#define TILE_VECTORS 4

/* out[i][j] = init[j] + sum over k < depth of a[i * a_row + k * a_step] * b[k * b_row + j], for
 * i < rows and j < cols; out float32 or bfloat16 (rounded), rows out_row apart. b's rows, and
 * init, hold whole vectors: cols rounded up. */
typedef struct {
    const float *a;
    int64_t a_row, a_step;
    const float *b;
    int64_t b_row, depth;
    const float *init; /* or NULL: zeros */
    void *out;
    int out_is_bf16;
    int64_t out_row, rows, cols;
} Product;

/* The first `valid` lanes of v into p[at] (all of them from LANES on), rounded to bfloat16. */
INLINE void store_first(void *p, int64_t at, int is_bf16, vf v, int64_t valid) {
    if (valid >= LANES) {
        store_rounded(p, at, is_bf16, v);
        return;
    }
    float lanes[LANES];
    store(lanes, v);
    narrow(lanes, valid, p, at, is_bf16);
}

/* A tile's sums, each row starting from init[j0...] (zeros where init is NULL). */
INLINE void tile_start(vf sum[TILE_ROWS][TILE_VECTORS], const float *init, int64_t j0,
                       const int rows, const int vectors) {
    for (int v = 0; v < vectors; v++) {
        const vf start = init ? load(init + j0 + v * LANES) : (vf){0};
        for (int r = 0; r < rows; r++) sum[r][v] = start;
    }
}

/* A tile's sums into out (rows out_row apart), the columns before `cols` only. */
INLINE void tile_store(vf sum[TILE_ROWS][TILE_VECTORS], void *out, int out_is_bf16,
                       int64_t out_row, int64_t cols, int64_t i0, int64_t j0, const int rows,
                       const int vectors) {
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < vectors; v++) {
            const int64_t j = j0 + v * LANES;
            store_first(out, (i0 + r) * out_row + j, out_is_bf16, sum[r][v], cols - j);
        }
}

INLINE void product_tile(const Product *p, int64_t i0, int64_t j0, const int rows,
                         const int vectors) {
    vf sum[TILE_ROWS][TILE_VECTORS];
    tile_start(sum, p->init, j0, rows, vectors);
    const float *a = p->a + i0 * p->a_row, *b = p->b + j0;
    for (int64_t k = 0; k < p->depth; k++, a += p->a_step, b += p->b_row) {
        vf right[TILE_VECTORS];
        for (int v = 0; v < vectors; v++) right[v] = load(b + v * LANES);
        for (int r = 0; r < rows; r++) {
            const float left = a[r * p->a_row]; /* broadcast by the product below, where
                                                 * 0 + left would cost an add before it */
            for (int v = 0; v < vectors; v++) sum[r][v] += left * right[v];
        }
    }
    tile_store(sum, p->out, p->out_is_bf16, p->out_row, p->cols, i0, j0, rows, vectors);
}

/* tile(p, i0, j0, r, v) for r = rows and v = vectors (up to TILE_ROWS x TILE_VECTORS) as
 * constants, so that its sums unroll into registers. */
#define TILE_CASE(tile, r, v)                                                                 \
    case (r) * 8 + (v):                                                                       \
        tile(p, i0, j0, r, v);                                                                \
        break;
#define TILE_CASES(tile, r)                                                                   \
    TILE_CASE(tile, r, 1) TILE_CASE(tile, r, 2) TILE_CASE(tile, r, 3) TILE_CASE(tile, r, 4)
#define CALL_TILE(tile)                                                                       \
    switch (rows * 8 + vectors) {                                                             \
        TILE_CASES(tile, 1) TILE_CASES(tile, 2) TILE_CASES(tile, 3)                          \
        TILE_CASES(tile, 4) TILE_CASES(tile, 5) TILE_CASES(tile, 6)                          \
    }

typedef void TileFunction(const void *product, int64_t i0, int64_t j0, int rows, int vectors);

static void product_tile_any(const void *product, int64_t i0, int64_t j0, int rows,
                             int vectors) {
    const Product *p = product;
    CALL_TILE(product_tile)
}

/* A product of rows x cols outputs, tile by tile, on the calling thread. */
static void by_tiles(const void *product, int64_t rows, int64_t cols, TileFunction *tile) {
    const int64_t vectors = (cols + LANES - 1) / LANES;
    for (int64_t v0 = 0; v0 < vectors; v0 += TILE_VECTORS)
        for (int64_t i0 = 0; i0 < rows; i0 += TILE_ROWS) {
            const int64_t tile_rows = rows - i0 < TILE_ROWS ? rows - i0 : TILE_ROWS;
            const int64_t tile_vectors = vectors - v0 < TILE_VECTORS ? vectors - v0 : TILE_VECTORS;
            tile(product, i0, v0 * LANES, (int)tile_rows, (int)tile_vectors);
        }
}

/* The whole product, on the calling thread. */
static void product(const Product *p) { by_tiles(p, p->rows, p->cols, product_tile_any); }

INLINE int64_t whole_vectors(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* Share `part` of `parts` of n, in whole vectors where `vectors`: [*first, *last). */
static void part_range(int64_t n, int64_t part, int64_t parts, int vectors, int64_t *first,
                       int64_t *last) {
    const int64_t unit = vectors ? LANES : 1, units = (n + unit - 1) / unit;
    *first = units * part / parts * unit;
    *last = units * (part + 1) / parts * unit;
    if (*last > n) *last = n;
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef HAS_SHUFFLEVECTOR
/* Rows i and i + s (i & s == 0) swap the off-diagonal s x s blocks of their 2s x 2s blocks:
 * lanes j + s of row i <-> lanes j of row i + s. */
#define SWAP_BLOCKS(s, FIRST, SECOND)                                                         \
    for (int i = 0; i < LANES; i++)                                                           \
        if (!(i & (s))) {                                                                     \
            const vf upper = rows[i], lower = rows[i + (s)];                                  \
            rows[i] = __builtin_shufflevector(upper, lower, FIRST);                           \
            rows[i + (s)] = __builtin_shufflevector(upper, lower, SECOND);                    \
        }
#define FIRST8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define SECOND8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define FIRST4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define SECOND4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define FIRST2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define SECOND2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define FIRST1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define SECOND1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31

/* The LANES x LANES block at from (rows from_row floats apart) transposed into to (rows to_row
 * apart): swapping the off-diagonal halves of the block, then of each diagonal quarter, and so
 * on down to single values, in registers (64 two-vector shuffles for 256 scalar moves). */
INLINE void transpose_block(const float *from, int64_t from_row, float *to, int64_t to_row) {
    vf rows[LANES];
    for (int i = 0; i < LANES; i++) rows[i] = load(from + i * from_row);
    SWAP_BLOCKS(8, FIRST8, SECOND8)
    SWAP_BLOCKS(4, FIRST4, SECOND4)
    SWAP_BLOCKS(2, FIRST2, SECOND2)
    SWAP_BLOCKS(1, FIRST1, SECOND1)
    for (int i = 0; i < LANES; i++) store(to + i * to_row, rows[i]);
}
#endif

/* to[j][i] = from[i * from_row + j] for i < rows, j < cols; to's rows `to_row` floats apart,
 * zeros after the first `rows`. */
static void transpose_padded(const float *from, int64_t from_row, int64_t rows, int64_t cols,
                             float *to, int64_t to_row) {
    for (int64_t j0 = 0; j0 < cols; j0 += LANES) {
        const int64_t j1 = j0 + LANES < cols ? j0 + LANES : cols;
        int64_t i0 = 0;
#ifdef HAS_SHUFFLEVECTOR
        if (j1 - j0 == LANES)
            for (; i0 + LANES <= rows; i0 += LANES)
                transpose_block(from + i0 * from_row + j0, from_row, to + j0 * to_row + i0,
                                to_row);
#endif
        for (int64_t j = j0; j < j1; j++) {
            float *row = to + j * to_row;
            for (int64_t i = i0; i < rows; i++) row[i] = from[i * from_row + j];
            memset(row + rows, 0, sizeof(float) * (size_t)(to_row - rows));
        }
    }
}

/* cols values of each of from's rows (from_row floats apart) into rows to_row floats apart,
 * zeros after them (all zeros where from is NULL: a missing bias). */
static void copy_padded(const float *from, int64_t from_row, int64_t rows, int64_t cols,
                        float *to, int64_t to_row) {
    for (int64_t i = 0; i < rows; i++) {
        if (from)
            memcpy(to + i * to_row, from + i * from_row, sizeof(float) * (size_t)cols);
        else
            memset(to + i * to_row, 0, sizeof(float) * (size_t)cols);
        memset(to + i * to_row + cols, 0, sizeof(float) * (size_t)(to_row - cols));
    }
}

/* factor[b][j] for hidden units [first, last) of every row b (see the layouts above): element
 * b * hidden + j of `dropout`'s order. Whole vectors of a row are whole vectors of that order
 * where hidden is a multiple of LANES; other widths go value by value. */
static void dropout_factors(int64_t batch, int64_t hidden, int64_t first, int64_t last, float p,
                            uint64_t seed, float *factor) {
    const uint32_t drop_below = drop_threshold(p);
    const float scale = keep_scale(drop_below);
    const int64_t hid_pad = whole_vectors(hidden);
    int64_t block = -1;
    vu numbers[8];
    for (int64_t b = 0; b < batch; b++)
        for (int64_t j = first; j < last; j += LANES) {
            const int64_t at = b * hidden + j;
            if (!drop_below) {
                store(factor + b * hid_pad + j, (vf){0} + 1.0f);
                continue;
            }
            if (hidden % LANES == 0) {
                if (at / BLOCK != block) block_numbers(block = at / BLOCK, seed, numbers);
                const vi kept = (vi)(numbers[at % BLOCK / LANES] >= drop_below);
                store(factor + b * hid_pad + j, select_f(kept, (vf){0} + scale, (vf){0}));
                continue;
            }
            for (int64_t k = 0; k < LANES && j + k < last; k++) {
                if (at + k >= (block + 1) * BLOCK || at + k < block * BLOCK)
                    block_numbers(block = (at + k) / BLOCK, seed, numbers);
                const int64_t e = at + k - block * BLOCK;
                factor[b * hid_pad + j + k] = numbers[e / LANES][e % LANES] >= drop_below ? scale
                                                                                         : 0.0f;
            }
        }
}

/* In bfloat16 dot products (`bf16` set, in builds with AVX512-BF16): the first Dense's three
 * matrix products run as autocast runs a Dense too large for float32, on its input, weights and
 * hidden gradient rounded to bfloat16, with float32 sums; the second Dense, the biases, the
 * activation, the dropout and their gradients stay float32 (the hidden values are not rounded).
 * Each operand goes into pairs of neighbouring values along the sum, one 32-bit lane holding
 * two bfloat16 (the first in the low half), so that one _mm512_dpbf16_ps adds two products to
 * each of LANES float32 sums:
 *   forward   act = x w1^T + b1: x by rows [batch][in_f / 2] (xa), w1's part as pairs of its
 *             columns, transposed: [in_f / 2][width]
 *   backward  grad_w1 = grad_h^T x: grad_h and x as pairs of rows, [batch / 2][hid_pad] and
 *             [batch / 2][in_pad] (xb); grad_x = grad_h w1: grad_h by rows, w1 as pairs of rows
 *             [hidden / 2][in_pad]
 * (halves rounded up; a pair past the end holds a zero). Twice the products per instruction of
 * the float32 head: `dropout`'s 576-512 Dense and `basic`'s 512-256 train in bf16 here. */
#ifdef __AVX512BF16__
typedef struct {
    const uint32_t *a;
    int64_t a_row, a_step;
    const uint32_t *b;
    int64_t b_row, depth; /* in pairs */
    const float *init;
    void *out;
    int out_is_bf16;
    int64_t out_row, rows, cols;
} PairProduct;

/* product_tile in bfloat16 pairs. */
INLINE void pair_tile(const PairProduct *p, int64_t i0, int64_t j0, const int rows,
                      const int vectors) {
    vf sum[TILE_ROWS][TILE_VECTORS];
    tile_start(sum, p->init, j0, rows, vectors);
    const uint32_t *a = p->a + i0 * p->a_row, *b = p->b + j0;
    for (int64_t k = 0; k < p->depth; k++, a += p->a_step, b += p->b_row) {
        __m512bh right[TILE_VECTORS];
        for (int v = 0; v < vectors; v++) right[v] = (__m512bh)_mm512_loadu_si512(b + v * LANES);
        for (int r = 0; r < rows; r++) {
            const __m512bh left = (__m512bh)_mm512_set1_epi32((int32_t)a[r * p->a_row]);
            for (int v = 0; v < vectors; v++)
                sum[r][v] = (vf)_mm512_dpbf16_ps((__m512)sum[r][v], left, right[v]);
        }
    }
    tile_store(sum, p->out, p->out_is_bf16, p->out_row, p->cols, i0, j0, rows, vectors);
}

static void pair_tile_any(const void *product, int64_t i0, int64_t j0, int rows, int vectors) {
    const PairProduct *p = product;
    CALL_TILE(pair_tile)
}

/* The whole product, on the calling thread. */
static void pair_product(const PairProduct *p) { by_tiles(p, p->rows, p->cols, pair_tile_any); }

/* to[r][k] = the pair (from[r][2k], from[r][2k + 1]) for r < rows, bfloat16 rounded to nearest
 * even, zero past cols; from float32 or bfloat16, rows from_row values apart; to's rows to_row
 * pairs apart, at least cols / 2 rounded up. */
static void row_pairs(const void *from, int is_bf16, int64_t from_row, int64_t rows,
                      int64_t cols, uint32_t *to, int64_t to_row) {
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *halves = (uint16_t *)(to + r * to_row);
        if (is_bf16) {
            memcpy(halves, (const uint16_t *)from + r * from_row, sizeof(uint16_t) * (size_t)cols);
        } else {
            narrow((const float *)from + r * from_row, cols, halves, 0, 1);
        }
        memset(halves + cols, 0, sizeof(uint16_t) * (size_t)(2 * to_row - cols));
    }
}

/* LANES values of row `r` of from (rows from_row apart) from column k on, zeros past cols and
 * for rows past `rows`. */
INLINE vf row_vector(const void *from, int is_bf16, int64_t from_row, int64_t rows,
                     int64_t cols, int64_t r, int64_t k) {
    if (r >= rows || k >= cols) return (vf){0};
    if (cols - k >= LANES) return load_any(from, r * from_row + k, is_bf16);
    float lanes[LANES] = {0};
    widen(from, r * from_row + k, is_bf16, lanes, cols - k);
    return load(lanes);
}

/* to[q][k] = the pair (from[2q][k], from[2q + 1][k]) for q in [q0, q1) and k < to_cols (whole
 * vectors), bfloat16 rounded to nearest even; zero past `rows` and `cols`. to's rows to_row
 * pairs apart. */
static void interleave_rows(const void *from, int is_bf16, int64_t from_row, int64_t rows,
                            int64_t cols, uint32_t *to, int64_t to_row, int64_t q0, int64_t q1,
                            int64_t to_cols) {
    for (int64_t q = q0; q < q1; q++)
        for (int64_t k = 0; k < to_cols; k += LANES) {
            const vf first = row_vector(from, is_bf16, from_row, rows, cols, 2 * q, k);
            const vf second = row_vector(from, is_bf16, from_row, rows, cols, 2 * q + 1, k);
            store((float *)(to + q * to_row + k), (vf)(to_bf16(first) | to_bf16(second) << 16));
        }
}
#endif

/* Floats of one part's xf: x widened ([batch][in_pad]) in float32, or its pairs (xa, then xb)
 * in bf16. */
int64_t dense_head_xf_floats(int64_t batch, int32_t in_f, int32_t bf16) {
    if (!bf16) return batch * whole_vectors(in_f);
    return batch * ((in_f + 1) / 2) + (batch + 1) / 2 * whole_vectors(in_f);
}

/* The forward pass of hidden units [h0, h1): act, dropped and factor there. */
static void head_forward_part(const void *x, int x_is_bf16, int64_t batch, int64_t in_f,
                              int64_t hidden, const float *w1, const float *b1, int relu,
                              float p, uint64_t seed, int64_t h0, int64_t h1, float *xf,
                              float *act, float *dropped, float *factor, float *scratch,
                              int bf16) {
    const int64_t in_pad = whole_vectors(in_f), hid_pad = whole_vectors(hidden);
    const int64_t width = whole_vectors(h1 - h0);
    dropout_factors(batch, hidden, h0, h1, p, seed, factor);
    if (bf16) {
#ifdef __AVX512BF16__
        const int64_t in_pairs = (in_f + 1) / 2;
        uint32_t *xa = (uint32_t *)xf, *xb = xa + batch * in_pairs;
        uint32_t *w1p = (uint32_t *)scratch, *by_row = w1p + in_pairs * width;
        float *bias = scratch + 2 * in_pairs * width;
        row_pairs(x, x_is_bf16, in_f, batch, in_f, xa, in_pairs);
        interleave_rows(x, x_is_bf16, in_f, batch, in_f, xb, in_pad, 0, (batch + 1) / 2, in_pad);
        row_pairs(w1 + h0 * in_f, 0, in_f, h1 - h0, in_f, by_row, in_pairs);
        transpose_padded((const float *)by_row, in_pairs, h1 - h0, in_pairs, (float *)w1p, width);
        copy_padded(b1 ? b1 + h0 : NULL, 0, 1, h1 - h0, bias, width);
        const PairProduct hidden_values = {.a = xa, .a_row = in_pairs, .a_step = 1,
                                           .b = w1p, .b_row = width, .depth = in_pairs,
                                           .init = bias, .out = act + h0, .out_row = hid_pad,
                                           .rows = batch, .cols = width};
        pair_product(&hidden_values);
#endif
    } else {
        float *w1t = scratch, *bias = scratch + in_f * width;
        for (int64_t b = 0; b < batch; b++) {
            widen(x, b * in_f, x_is_bf16, xf + b * in_pad, in_f);
            memset(xf + b * in_pad + in_f, 0, sizeof(float) * (size_t)(in_pad - in_f));
        }
        transpose_padded(w1 + h0 * in_f, in_f, h1 - h0, in_f, w1t, width);
        copy_padded(b1 ? b1 + h0 : NULL, 0, 1, h1 - h0, bias, width);
        const Product hidden_values = {.a = xf, .a_row = in_pad, .a_step = 1,
                                       .b = w1t, .b_row = width, .depth = in_f, .init = bias,
                                       .out = act + h0, .out_row = hid_pad,
                                       .rows = batch, .cols = width};
        product(&hidden_values);
    }
    /* the activation (as torch.relu: NaN stays NaN), then the dropout (x * 0 keeps NaN) */
    for (int64_t b = 0; b < batch; b++)
        for (int64_t j = h0; j < h0 + width; j += LANES) {
            const int64_t at = b * hid_pad + j;
            vf value = load(act + at);
            if (relu) value = pick_f(not_positive(value), (vf){0}, value);
            store(act + at, value);
            store(dropped + at, value * load(factor + at));
        }
}

/* The widest part's hidden units, in whole vectors. */
INLINE int64_t widest_part(int64_t hidden, int64_t parts) {
    return (whole_vectors(hidden) / LANES + parts - 1) / parts * LANES;
}

int dense_head_forward(const void *x, int32_t x_is_bf16, int64_t batch, int32_t in_f,
                       int32_t hidden, int32_t out_f, const float *w1, const float *b1,
                       int32_t relu, float p, uint64_t seed, const float *w2, const float *b2,
                       int32_t parts, float *xf, float *act, float *dropped, float *factor,
                       float *logits, int32_t threads, int32_t bf16) {
    (void)threads; /* unused without OpenMP */
    if (batch < 1 || in_f < 1 || hidden < 1 || out_f < 1 || parts < 1 ||
        parts > whole_vectors(hidden) / LANES || !(p >= 0.0f && p < 1.0f) ||
        (bf16 && !conv_pool_bf16_available()))
        return 1;
    const int64_t hid_pad = whole_vectors(hidden);
    const int64_t xf_part = dense_head_xf_floats(batch, in_f, bf16);
    const int64_t out_pad = whole_vectors(out_f), width = widest_part(hidden, parts);
    const int64_t part_size = (bf16 ? 2 * ((in_f + 1) / 2) : in_f) * width + width;
    /* per part: its w1 rows transposed and their bias; per batch share: w2 transposed, b2 */
    const int64_t second_size = hidden * out_pad + out_pad;
    float *scratch = malloc(sizeof(float) * (size_t)(parts * (part_size + second_size)));
    if (!scratch) return 2;
#pragma omp parallel num_threads(threads) if (threads > 1 && parts > 1)
    {
#pragma omp for schedule(static, 1)
        for (int64_t part = 0; part < parts; part++) {
            int64_t h0, h1;
            part_range(hidden, part, parts, 1, &h0, &h1);
            head_forward_part(x, x_is_bf16, batch, in_f, hidden, w1, b1, relu, p, seed, h0, h1,
                              xf + part * xf_part, act, dropped, factor,
                              scratch + part * part_size, bf16);
        }
        /* the second Dense by shares of the batch, each from its own copy of w2 transposed */
#pragma omp for schedule(static, 1)
        for (int64_t share = 0; share < parts; share++) {
            int64_t r0, r1;
            part_range(batch, share, parts, 0, &r0, &r1);
            float *w2t = scratch + parts * part_size + share * second_size;
            float *bias = w2t + hidden * out_pad;
            transpose_padded(w2, hidden, out_f, hidden, w2t, out_pad);
            copy_padded(b2, 0, 1, out_f, bias, out_pad);
            const Product second = {.a = dropped + r0 * hid_pad, .a_row = hid_pad, .a_step = 1,
                                    .b = w2t, .b_row = out_pad, .depth = hidden, .init = bias,
                                    .out = logits + r0 * out_f, .out_row = out_f,
                                    .rows = r1 - r0, .cols = out_f};
            if (r1 > r0) product(&second);
        }
    }
    free(scratch);
    return 0;
}

/* The backward pass of hidden units [h0, h1): their hidden gradient (into grad_h), bias and
 * weight gradients, and w2's gradient columns. */
static void head_backward_part(const float *grad_logits, int64_t batch, int64_t in_f,
                               int64_t hidden, int64_t out_f, int relu, const float *w2,
                               int64_t h0, int64_t h1, const float *xf, const float *act,
                               const float *dropped, const float *factor, float *grad_h,
                               float *grad_w1, float *grad_b1, float *grad_w2, float *scratch,
                               uint32_t *grad_pairs, int bf16) {
    const int64_t in_pad = whole_vectors(in_f), hid_pad = whole_vectors(hidden);
    const int64_t width = whole_vectors(h1 - h0);
    float *w2_part = scratch; /* w2's columns [h0, h1), rows of whole vectors */
    copy_padded(w2 + h0, hidden, out_f, h1 - h0, w2_part, width);
    const Product hidden_grad = {.a = grad_logits, .a_row = out_f, .a_step = 1,
                                 .b = w2_part, .b_row = width, .depth = out_f,
                                 .out = grad_h + h0, .out_row = hid_pad,
                                 .rows = batch, .cols = width};
    product(&hidden_grad);
    /* back through the dropout (its factor: an infinite gradient times 0 is NaN, as in
     * PyTorch), then the ReLU (threshold_backward: zero where its output is <= 0) */
    for (int64_t b = 0; b < batch; b++)
        for (int64_t j = h0; j < h0 + width; j += LANES) {
            const int64_t at = b * hid_pad + j;
            vf value = load(grad_h + at) * load(factor + at);
            if (relu) value = pick_f(not_positive(load(act + at)), (vf){0}, value);
            store(grad_h + at, value);
        }
    if (grad_b1)
        for (int64_t j = h0; j < h1; j += LANES) {
            vf sum = (vf){0};
            for (int64_t b = 0; b < batch; b++) sum += load(grad_h + b * hid_pad + j);
            store_first(grad_b1, j, 0, sum, h1 - j);
        }
    const Product weights2 = {.a = grad_logits, .a_row = 1, .a_step = out_f, /* its transpose */
                              .b = dropped + h0, .b_row = hid_pad, .depth = batch,
                              .out = grad_w2 + h0, .out_row = hidden,
                              .rows = out_f, .cols = h1 - h0};
    product(&weights2);
    if (bf16) { /* grad_h's columns [h0, h0 + width) in pairs of rows, for this part alone */
#ifdef __AVX512BF16__
        const int64_t batch_pairs = (batch + 1) / 2;
        const uint32_t *xb = (const uint32_t *)xf + batch * ((in_f + 1) / 2);
        interleave_rows(grad_h + h0, 0, hid_pad, batch, width, grad_pairs + h0, hid_pad, 0,
                        batch_pairs, width);
        const PairProduct weights1 = {.a = grad_pairs + h0, .a_row = 1, .a_step = hid_pad,
                                      .b = xb, .b_row = in_pad, .depth = batch_pairs,
                                      .out = grad_w1 + h0 * in_f, .out_row = in_f,
                                      .rows = h1 - h0, .cols = in_f};
        pair_product(&weights1);
#endif
        return;
    }
    const Product weights1 = {.a = grad_h + h0, .a_row = 1, .a_step = hid_pad, /* transposed */
                              .b = xf, .b_row = in_pad, .depth = batch,
                              .out = grad_w1 + h0 * in_f, .out_row = in_f,
                              .rows = h1 - h0, .cols = in_f};
    product(&weights1);
}

/* grad_logits [batch][out_f] float32; grad_x (x's type) may be NULL: not wanted. parts and xf
 * as in the forward pass. */
int dense_head_backward(const float *grad_logits, int64_t batch, int32_t in_f, int32_t hidden,
                        int32_t out_f, const float *w1, int32_t relu, const float *w2,
                        int32_t parts, const float *xf, const float *act, const float *dropped,
                        const float *factor, void *grad_x, int32_t x_is_bf16, float *grad_w1,
                        float *grad_b1, float *grad_w2, float *grad_b2, int32_t threads,
                        int32_t bf16) {
    (void)threads; /* unused without OpenMP */
    if (batch < 1 || in_f < 1 || hidden < 1 || out_f < 1 || parts < 1 ||
        parts > whole_vectors(hidden) / LANES || (bf16 && !conv_pool_bf16_available()))
        return 1;
    const int64_t in_pad = whole_vectors(in_f), hid_pad = whole_vectors(hidden);
    const int64_t width = widest_part(hidden, parts);
    const int64_t xf_part = dense_head_xf_floats(batch, in_f, bf16);
    /* the hidden gradient; per part its columns of w2; in float32, per batch share where in_f
     * is not whole vectors, w1 with rows of whole vectors; in bf16, the hidden gradient in pairs
     * of rows, w1 in pairs of rows, and per batch share its rows of the hidden gradient in pairs */
    const int64_t hid_pairs = (hidden + 1) / 2, share_rows = (batch + parts - 1) / parts;
    const int64_t w1_size = !bf16 && in_f % LANES ? hidden * in_pad : 0;
    const int64_t pairs_size = bf16 ? (batch + 1) / 2 * hid_pad + hid_pairs * in_pad : 0;
    const int64_t share_size = bf16 ? share_rows * hid_pairs : w1_size;
    const int64_t size = batch * hid_pad + parts * (out_f * width + share_size) + pairs_size;
    float *grad_h = malloc(sizeof(float) * (size_t)size);
    if (!grad_h) return 2;
    float *w2_parts = grad_h + batch * hid_pad, *w1_copies = w2_parts + parts * out_f * width;
    uint32_t *grad_pairs = (uint32_t *)(w1_copies + parts * share_size);
    uint32_t *w1_pairs = grad_pairs + (batch + 1) / 2 * hid_pad;
    (void)w1_pairs; /* unused without AVX512-BF16 */
#pragma omp parallel num_threads(threads) if (threads > 1 && parts > 1)
    {
#pragma omp for schedule(static, 1)
        for (int64_t part = 0; part < parts; part++) {
            int64_t h0, h1;
            part_range(hidden, part, parts, 1, &h0, &h1);
            head_backward_part(grad_logits, batch, in_f, hidden, out_f, relu, w2, h0, h1,
                               xf + part * xf_part, act, dropped, factor, grad_h, grad_w1,
                               grad_b1, grad_w2, w2_parts + part * out_f * width, grad_pairs,
                               bf16);
            if (part == 0 && grad_b2)
                for (int o = 0; o < out_f; o++) {
                    float sum = 0.0f;
                    for (int64_t b = 0; b < batch; b++) sum += grad_logits[b * out_f + o];
                    grad_b2[o] = sum;
                }
        }
#ifdef __AVX512BF16__
        if (bf16 && grad_x) {
#pragma omp for schedule(static)
            for (int64_t q = 0; q < hid_pairs; q++)
                interleave_rows(w1, 0, in_f, hidden, in_f, w1_pairs, in_pad, q, q + 1, in_pad);
        }
#endif
        /* the input gradient by shares of the batch: every hidden unit's gradient */
#pragma omp for schedule(static, 1)
        for (int64_t share = 0; share < parts; share++) {
            int64_t r0, r1;
            part_range(batch, share, parts, 0, &r0, &r1);
            if (bf16) {
#ifdef __AVX512BF16__
                uint32_t *rows = (uint32_t *)(w1_copies + share * share_size);
                const PairProduct input = {.a = rows, .a_row = hid_pairs, .a_step = 1,
                                           .b = w1_pairs, .b_row = in_pad, .depth = hid_pairs,
                                           .out = (char *)grad_x + r0 * in_f * (x_is_bf16 ? 2 : 4),
                                           .out_is_bf16 = x_is_bf16, .out_row = in_f,
                                           .rows = r1 - r0, .cols = in_f};
                if (grad_x && r1 > r0) {
                    row_pairs(grad_h + r0 * hid_pad, 0, hid_pad, r1 - r0, hidden, rows, hid_pairs);
                    pair_product(&input);
                }
#endif
                continue;
            }
            const float *weights = w1;
            if (w1_size) {
                float *copy = w1_copies + share * w1_size;
                copy_padded(w1, in_f, hidden, in_f, copy, in_pad);
                weights = copy;
            }
            const Product input = {.a = grad_h + r0 * hid_pad, .a_row = hid_pad, .a_step = 1,
                                   .b = weights, .b_row = w1_size ? in_pad : in_f,
                                   .depth = hidden,
                                   .out = (char *)grad_x + r0 * in_f * (x_is_bf16 ? 2 : 4),
                                   .out_is_bf16 = x_is_bf16, .out_row = in_f,
                                   .rows = r1 - r0, .cols = in_f};
            if (grad_x && r1 > r0) product(&input);
        }
    }
    free(grad_h);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The loss and the gradient checks of a training step whose model runs as one chain of the
 * kernels above (cnnlab.training.gradients): one call each instead of a dozen PyTorch ops.
 */

/* Softmax cross-entropy of float32 logits [n][k] against int64 labels, the batch mean, with
 * label smoothing as torch.nn.functional.cross_entropy takes it: row i's loss is
 * (1 - smoothing) (-log p[i][label]) + smoothing * (the mean over c of -log p[i][c]). Writes
 * the mean's gradient, (p - (1 - smoothing) onehot(label) - smoothing / k) / n, into grad, the
 * mean loss into *loss (NaN where a logit is NaN or infinite, as in PyTorch) and the number of
 * rows whose largest logit (the first, where several tie) is the label into *correct. Returns
 * 0, or 1 with nothing written where a label is outside [0, k). One thread: a batch of 128 x 10
 * logits takes about a microsecond. */
int softmax_cross_entropy(const float *logits, const int64_t *labels, int64_t n, int32_t k,
                          double smoothing, float *grad, double *loss, int64_t *correct) {
    for (int64_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= k) return 1;
    const float scale = 1.0f / (float)n;
    const float off_label = (float)(smoothing / k);
    const float on_label = (float)(1.0 - smoothing) + off_label;
    double total = 0.0;
    int64_t hits = 0;
    for (int64_t i = 0; i < n; i++) {
        const float *row = logits + i * k;
        float *out = grad + i * k;
        int32_t best = 0;
        for (int32_t c = 1; c < k; c++)
            if (row[c] > row[best] || (row[c] != row[c] && row[best] == row[best])) best = c;
        const float top = row[best];
        double sum = 0.0, logit_sum = 0.0;
        for (int32_t c = 0; c < k; c++) {
            out[c] = expf(row[c] - top);
            sum += out[c];
            logit_sum += row[c];
        }
        const double log_sum = log(sum);
        const double label_loss = log_sum - (row[labels[i]] - top);
        const double mean_loss = log_sum - (logit_sum / k - top);
        total += (1.0 - smoothing) * label_loss + smoothing * mean_loss;
        const float inverse = (float)(1.0 / sum);
        for (int32_t c = 0; c < k; c++) out[c] = (out[c] * inverse - off_label) * scale;
        out[labels[i]] -= (on_label - off_label) * scale;
        hits += best == labels[i];
    }
    *loss = total / n;
    *correct = hits;
    return 0;
}

/* 1 where every value of the `count` float32 arrays (arrays[i] of sizes[i] values) is finite,
 * else 0: the exponent bits of an infinity or a NaN are all ones. */
int all_finite(const float *const *arrays, const int64_t *sizes, int32_t count) {
    uint32_t bad = 0;
    for (int32_t a = 0; a < count; a++) {
        const uint32_t *bits = (const uint32_t *)arrays[a];
        for (int64_t i = 0; i < sizes[a]; i++) bad |= (bits[i] & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}
