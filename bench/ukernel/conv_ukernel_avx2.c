/* Prototype MLAS-style AVX2/FMA micro-kernel for Kiln's NHWC convolutions (issue #12, ADR 0046).
 *
 * Layout as Kiln's CPU graph passes produce it: input NHWC (pre-padded here: Hp x Wp x C), output
 * H x W x K, weights packed at compile time per output-channel tile of NV vectors of 8 lanes:
 * [K / (8 NV)][R][S][C][8 NV]. A tile is P output pixels of the fused H*W axis x NV vectors; the
 * reduction over kernel taps x input channels runs inside it with P*NV accumulators in ymm registers.
 *
 * Two tile shapes (chosen per call, ``mode``):
 *   mode 0 "reg": weights in registers, one broadcast per pixel (what TVM's tile is):  NV=2, P<=6.
 *   mode 2 "reg+pf": mode 0, prefetching the next channel tile's weights into L2 (see below).
 *   mode 3 "reg x2": mode 0 over 32-channel weight rows, two passes per pixel tile (see below).
 *   mode 1 "mem": MLAS's shape, weights as FMA memory operands, broadcasts in registers: NV=4, P<=3
 *                 (12 accumulators + 3 broadcasts = 15 ymm; each weight vector is loaded by each FMA).
 * The epilogue adds the bias and applies ReLU (ResNet's fused conv + BN + ReLU after folding).
 *
 * Built by bench/ukernel.py with the target's driver and -march (g++ -x c -O3 -march=haswell). */

#include <immintrin.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

/* One tile: acc[p][v] += in_p[tap, c] * w[tap, c, v]; pointers in_p point at pixel p's window origin. */
INLINE void tile_reg(int P, const float* const* in_p, const float* w, int C, int R, int S, int row,
                     const float* bias, float* const* out_p, int relu, int wstride) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int p = 0; p < 6; p++) {
    if (p < P) { acc[p][0] = _mm256_setzero_ps(); acc[p][1] = _mm256_setzero_ps(); }
  }
  for (int r = 0; r < R; r++) {
    for (int s = 0; s < S; s++) {
      const long off = (long)r * row + (long)s * C;
      for (int c = 0; c < C; c++) {
        const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
        w += wstride;
#pragma GCC unroll 6
        for (int p = 0; p < 6; p++) {
          if (p < P) {
            const __m256 b = _mm256_broadcast_ss(in_p[p] + off + c);
            acc[p][0] = _mm256_fmadd_ps(b, w0, acc[p][0]);
            acc[p][1] = _mm256_fmadd_ps(b, w1, acc[p][1]);
          }
        }
      }
    }
  }
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8), z = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int p = 0; p < 6; p++) {
    if (p < P) {
      __m256 o0 = _mm256_add_ps(acc[p][0], b0), o1 = _mm256_add_ps(acc[p][1], b1);
      if (relu) { o0 = _mm256_max_ps(o0, z); o1 = _mm256_max_ps(o1, z); }
      _mm256_storeu_ps(out_p[p], o0);
      _mm256_storeu_ps(out_p[p] + 8, o1);
    }
  }
}

/* acc += b * [w]: the weight as the FMA's memory operand (asm, so the compiler cannot hoist the load
 * into a register shared by the pixels' FMAs). */
INLINE void fma_mem(__m256* acc, __m256 b, const float* w) {
  __asm__("vfmadd231ps %[w], %[b], %[acc]" : [acc] "+x"(*acc) : [b] "x"(b), [w] "m"(*(const __m256*)w));
}

/* The whole 4 vectors x 3 pixels tile in asm (MLAS's ComputeBlock shape): accumulators in ymm0-11,
 * three broadcasts in ymm12-14, twelve FMAs per input channel with the weights as memory operands;
 * ``taps``: byte offsets of the kernel taps from the pixels' window origins. Stores the 12 sums to ``acc``. */
INLINE void mem_tile3(float* acc, const float* i0, const float* i1, const float* i2, const float* w,
                      const long* taps, long ntaps, long C) {
  __asm__ volatile(
      "vxorps %%ymm0, %%ymm0, %%ymm0\n\t"
      "vxorps %%ymm1, %%ymm1, %%ymm1\n\t"
      "vxorps %%ymm2, %%ymm2, %%ymm2\n\t"
      "vxorps %%ymm3, %%ymm3, %%ymm3\n\t"
      "vxorps %%ymm4, %%ymm4, %%ymm4\n\t"
      "vxorps %%ymm5, %%ymm5, %%ymm5\n\t"
      "vxorps %%ymm6, %%ymm6, %%ymm6\n\t"
      "vxorps %%ymm7, %%ymm7, %%ymm7\n\t"
      "vxorps %%ymm8, %%ymm8, %%ymm8\n\t"
      "vxorps %%ymm9, %%ymm9, %%ymm9\n\t"
      "vxorps %%ymm10, %%ymm10, %%ymm10\n\t"
      "vxorps %%ymm11, %%ymm11, %%ymm11\n\t"
      "xor %%r10, %%r10\n\t"
      "2:\n\t"
      "mov (%[taps],%%r10,8), %%rax\n\t"
      "mov %[C], %%r11\n\t"
      "1:\n\t"
      "vbroadcastss (%[i0],%%rax), %%ymm12\n\t"
      "vbroadcastss (%[i1],%%rax), %%ymm13\n\t"
      "vbroadcastss (%[i2],%%rax), %%ymm14\n\t"
      "vfmadd231ps (%[w]), %%ymm12, %%ymm0\n\t"
      "vfmadd231ps 32(%[w]), %%ymm12, %%ymm1\n\t"
      "vfmadd231ps 64(%[w]), %%ymm12, %%ymm2\n\t"
      "vfmadd231ps 96(%[w]), %%ymm12, %%ymm3\n\t"
      "vfmadd231ps (%[w]), %%ymm13, %%ymm4\n\t"
      "vfmadd231ps 32(%[w]), %%ymm13, %%ymm5\n\t"
      "vfmadd231ps 64(%[w]), %%ymm13, %%ymm6\n\t"
      "vfmadd231ps 96(%[w]), %%ymm13, %%ymm7\n\t"
      "vfmadd231ps (%[w]), %%ymm14, %%ymm8\n\t"
      "vfmadd231ps 32(%[w]), %%ymm14, %%ymm9\n\t"
      "vfmadd231ps 64(%[w]), %%ymm14, %%ymm10\n\t"
      "vfmadd231ps 96(%[w]), %%ymm14, %%ymm11\n\t"
      "add $4, %%rax\n\t"
      "sub $-128, %[w]\n\t"
      "dec %%r11\n\t"
      "jnz 1b\n\t"
      "inc %%r10\n\t"
      "cmp %[ntaps], %%r10\n\t"
      "jne 2b\n\t"
      "vmovups %%ymm0, (%[acc])\n\t"
      "vmovups %%ymm1, 32(%[acc])\n\t"
      "vmovups %%ymm2, 64(%[acc])\n\t"
      "vmovups %%ymm3, 96(%[acc])\n\t"
      "vmovups %%ymm4, 128(%[acc])\n\t"
      "vmovups %%ymm5, 160(%[acc])\n\t"
      "vmovups %%ymm6, 192(%[acc])\n\t"
      "vmovups %%ymm7, 224(%[acc])\n\t"
      "vmovups %%ymm8, 256(%[acc])\n\t"
      "vmovups %%ymm9, 288(%[acc])\n\t"
      "vmovups %%ymm10, 320(%[acc])\n\t"
      "vmovups %%ymm11, 352(%[acc])\n\t"
      : [w] "+r"(w)
      : [i0] "r"(i0), [i1] "r"(i1), [i2] "r"(i2), [taps] "r"(taps), [ntaps] "r"(ntaps), [C] "r"(C), [acc] "r"(acc)
      : "rax", "r10", "r11", "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8", "ymm9", "ymm10", "ymm11", "ymm12", "ymm13", "ymm14", "cc", "memory");
}

/* MLAS shape: 4 vectors x P<=3 pixels, weights as memory operands (fma_mem), which stops the compiler from
 * sharing a weight load across the pixels' FMAs (what makes TVM's LLVM spill). */
INLINE void tile_mem(int P, const float* const* in_p, const float* w, int C, int R, int S, int row,
                     const float* bias, float* const* out_p, int relu) {
  __m256 acc[3][4];
  if (P == 3 && C > 0) {
    long taps[64];
    for (int r = 0; r < R; r++)
      for (int s = 0; s < S; s++) taps[r * S + s] = ((long)r * row + (long)s * C) * 4;
    mem_tile3((float*)acc, in_p[0], in_p[1], in_p[2], w, taps, (long)R * S, C);
    goto epilogue;
  }
#pragma GCC unroll 3
  for (int p = 0; p < 3; p++) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; v++) if (p < P) acc[p][v] = _mm256_setzero_ps();
  }
  for (int r = 0; r < R; r++) {
    for (int s = 0; s < S; s++) {
      const long off = (long)r * row + (long)s * C;
      for (int c = 0; c < C; c++) {
        __m256 b[3];
#pragma GCC unroll 3
        for (int p = 0; p < 3; p++) if (p < P) b[p] = _mm256_broadcast_ss(in_p[p] + off + c);
#pragma GCC unroll 3
        for (int p = 0; p < 3; p++) {
          if (p < P) {
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) fma_mem(&acc[p][v], b[p], w + 8 * v);
          }
        }
        w += 32;
      }
    }
  }
epilogue:;
  const __m256 z = _mm256_setzero_ps();
#pragma GCC unroll 3
  for (int p = 0; p < 3; p++) {
    if (p < P) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; v++) {
        __m256 o = _mm256_add_ps(acc[p][v], _mm256_loadu_ps(bias + 8 * v));
        if (relu) o = _mm256_max_ps(o, z);
        _mm256_storeu_ps(out_p[p] + 8 * v, o);
      }
    }
  }
}

#define DISPATCH(fn, P, ...)                       \
  switch (P) {                                     \
    case 1: fn(1, __VA_ARGS__); break;             \
    case 2: fn(2, __VA_ARGS__); break;             \
    case 3: fn(3, __VA_ARGS__); break;             \
    case 4: fn(4, __VA_ARGS__); break;             \
    case 5: fn(5, __VA_ARGS__); break;             \
    default: fn(6, __VA_ARGS__); break;            \
  }

static void tile_reg_any(int P, const float* const* in_p, const float* w, int C, int R, int S, int row,
                         const float* bias, float* const* out_p, int relu, int wstride) {
  DISPATCH(tile_reg, P, in_p, w, C, R, S, row, bias, out_p, relu, wstride)
}

static void tile_mem_any(int P, const float* const* in_p, const float* w, int C, int R, int S, int row,
                         const float* bias, float* const* out_p, int relu) {
  if (P >= 3) tile_mem(3, in_p, w, C, R, S, row, bias, out_p, relu);
  else if (P == 2) tile_mem(2, in_p, w, C, R, S, row, bias, out_p, relu);
  else tile_mem(1, in_p, w, C, R, S, row, bias, out_p, relu);
}

/* The whole convolution: channel tiles outermost when ``channels_outer`` (weights read once), else
 * pixel tiles outermost (input read once). Returns 0, or -1 for a shape this kernel does not take. */
int kiln_ukernel_conv_nhwc(const float* in, const float* wpack, const float* bias, float* out, int H, int W,
                           int C, int K, int R, int S, int stride, int Wp, int mode, int pixels,
                           int channels_outer, int relu) {
  /* mode 2: the "reg" tile, and with channel tiles outermost each pixel tile prefetches (into L2) its
   * share of the next channel tile's weights, so a channel tile's first pass does not wait on DRAM */
  const int prefetch = mode == 2;
  /* mode 3: the "reg" tile run twice per pixel tile over a 32-channel tile whose weights are packed
   * [K/32][R][S][C][32] (each step's weights are two 64-byte lines, as AVX-512's 2-vector tile reads) */
  const int pair = mode == 3;
  if (prefetch || pair) mode = 0;
  const int NV = mode || pair ? 4 : 2, KT = 8 * NV;
  if (K % KT || pixels < 1 || pixels > (mode ? 3 : 6) || R * S > 64) return -1;
  const int HW = H * W, n_ct = K / KT, n_pt = (HW + pixels - 1) / pixels;
  const long wtile = (long)R * S * C * KT, row = (long)Wp * C;
  for (int outer = 0; outer < (channels_outer ? n_ct : n_pt); outer++) {
    for (int inner = 0; inner < (channels_outer ? n_pt : n_ct); inner++) {
      const int ct = channels_outer ? outer : inner, pt = channels_outer ? inner : outer;
      const int p0 = pt * pixels, P = HW - p0 < pixels ? HW - p0 : pixels;
      const float* in_p[6];
      float* out_p[6];
      for (int p = 0; p < P; p++) {
        const int oh = (p0 + p) / W, ow = (p0 + p) % W;
        in_p[p] = in + ((long)oh * stride * Wp + (long)ow * stride) * C;
        out_p[p] = out + (long)(p0 + p) * K + (long)ct * KT;
      }
      const float* w = wpack + ct * wtile;
      if (prefetch && channels_outer && ct + 1 < n_ct) {
        const long lines = (wtile * 4 + 63) / 64, per = (lines + n_pt - 1) / n_pt;
        const char* next = (const char*)(wpack + (ct + 1) * wtile);
        for (long l = pt * per; l < (pt + 1) * per && l < lines; l++) _mm_prefetch(next + l * 64, _MM_HINT_T1);
      }
      if (mode) {
        tile_mem_any(P, in_p, w, C, R, S, (int)row, bias + ct * KT, out_p, relu);
      } else if (pair) {
        tile_reg_any(P, in_p, w, C, R, S, (int)row, bias + ct * KT, out_p, relu, 32);
        float* out_q[6];
        for (int p = 0; p < P; p++) out_q[p] = out_p[p] + 16;
        tile_reg_any(P, in_p, w + 16, C, R, S, (int)row, bias + ct * KT + 16, out_q, relu, 32);
      } else {
        tile_reg_any(P, in_p, w, C, R, S, (int)row, bias + ct * KT, out_p, relu, 16);
      }
    }
  }
  return 0;
}
