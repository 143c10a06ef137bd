"""Source text of the fused spectral-cache kernels, one body for CUDA and Metal.

Each kernel body below is written once in the common subset of CUDA C++ and
the Metal Shading Language; a small per-backend header maps the few things that
differ (shared-memory qualifier, barrier, warp/SIMD shuffle, half conversion,
exp and sincos) and a preamble names the thread indices. The Metal kernels
therefore mirror the CUDA ones line by line by construction: the algorithm,
memory layout, tiling and reduction order are the same text.

Layout (per layer; B batch, HKV key/value heads, G query heads per KV head):
- key codes: uint32 words (B, HKV, cap, wk); dim m of a token starts at bit
  ``kshift[h, m]`` and is ``kbits[h, m]`` wide (may straddle two words). The
  coded dims are compacted per head (zero-width dims dropped) into ``rk``
  columns.
- coefficient = unit_codebook[2^b − 2 + code] · kscale[h, m] (· token scale); the
  warp-tiled kernel takes the unit level and finds kscale folded into its basis
  fragments (bfrag).
- pre-RoPE keys: k = basis_t[h]ᵀ · c + mean, in "pair order" (dims permuted so
  each RoPE pair is adjacent), then rotated by pos·θ_i and scaled by amp_i.
- values: mlx ``mx.quantize`` words (bits VB, group VG, fp16 scales/biases), or
  spectral codes like the keys (then the output stays in coefficient space and
  is rotated back by the caller).
- outputs per split: unnormalised output (B, HKV, S, G, D), running max and sum
  (B, HKV, S, G), merged by the caller (flash-decoding).
"""

CUDA_HEADER = r"""
#ifndef VX_STAMP
#define VX_STAMP(k)  // phase timestamps: only the profiling build (kernels.WARP_STAMPS)
#endif
#define VX_SHARED __shared__
#define VX_ALIGN16 __align__(16)
// The kernel's dynamic shared memory (its size is set at the kernel's creation; n words
// is that size, which the CPU emulator allocates statically).
#define VX_DYNAMIC_SHARED(T, name, n) extern __shared__ __align__(16) T name[]
#define VX_TG
#define VX_FN __device__ inline
#define VX_HALF_T __half
#define VX_BARRIER() __syncthreads()
#define VX_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define VX_ANY(p) __any_sync(0xffffffffu, (p))
#define VX_HALF(x) __half2float(x)
#define VX_TO_HALF(x) __float2half(x)
#define VX_ROUND_HALF(x) __half2float(__float2half(x))
#define VX_RINT(x) rintf(x)
#define VX_DIV_RN(a, b) __fdiv_rn((a), (b))
__device__ inline float vx_exp(float x) { return expf(x); }
// The hardware's 2^x of x·log2(e) (two instructions; expf takes eight): for the warp-tiled
// kernel's tile probabilities, which are rounded to fp16 anyway.
__device__ inline float vx_exp_fast(float x) { return __expf(x); }
__device__ inline float2 vx_sincos(float x) {
  float s, c;
  sincosf(x, &s, &c);
  return make_float2(s, c);
}
// Loads of what other blocks wrote in this launch (past L1), and the fence before telling.
__device__ inline float vx_ld_cg(const float* p) { return __ldcg(p); }
__device__ inline float4 vx_ld_cg4(const float4* p) { return __ldcg(p); }
__device__ inline void vx_threadfence() { __threadfence(); }
// sin/cos of an fp32 angle: reduced to [-pi, pi] with 2*pi in two parts (exact to ~1e-7
// for |x| < 1e5), then the fast hardware approximation (abs. error ~5e-7 there).
__device__ inline float2 vx_sincos_fast(float x) {
  const float k = rintf(x * 0.159154943f);
  float r = fmaf(-k, 6.28318548f, x);
  r = fmaf(k, 1.74845553e-7f, r);
  float s, c;
  __sincosf(r, &s, &c);
  return make_float2(s, c);
}
"""

# The warp-tiled kernel's phase timestamps (kernels.WARP_STAMPS): after a block-wide
# barrier, thread 0 writes the low words of %globaltimer (ns, comparable across blocks)
# and clock64 (this SM's cycles) for phase k of its block (slots k and 16 + k of 32);
# slot 31 is the SM's id.
CUDA_STAMPS = r"""
#define VX_STAMP(k)                                                            \
  do {                                                                         \
    __syncthreads();                                                           \
    if (tid == 0) {                                                            \
      unsigned long long now_;                                                 \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now_));                 \
      unsigned int sm_;                                                        \
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_));                         \
      unsigned int* row_ = stamps + (blk_y * grid_x + blk_x) * 32;             \
      row_[k] = (unsigned int)now_;                                            \
      row_[16 + (k)] = (unsigned int)clock64();                                \
      row_[31] = sm_;                                                          \
    }                                                                          \
  } while (0)
"""

# Helpers shared by both backends (after their header's macros).
COMMON_HELPERS = r"""
// The codebook level of the b-bit code starting at bit sh of a token's packed words
// (it may straddle two words): unit Lloyd-Max level, width b at offset 2^b - 2.
VX_FN float vx_level(VX_TG const unsigned int* words, int base, int sh, int b,
                     VX_TG const float* table) {
  const int w0 = base + (sh >> 5);
  const int o = sh & 31;
  unsigned int code = words[w0] >> o;
  if (o + b > 32) {
    code |= words[w0 + 1] << (32 - o);
  }
  code &= (1u << b) - 1u;
  return table[(1 << b) - 2 + (int)code];
}
"""

# One m16n8k16 tensor-core product (fp16 in, fp32 accumulate) and the tile of keys
# built from it. Fragment layout of PTX's mma.m16n8k16 (.row.col): lane = 4·gid + tig;
# A regs: (row gid, cols 2tig..+1), (row gid+8, same), (row gid, cols 2tig+8..+9),
# (row gid+8, same); B regs: (k 2tig..+1, col gid), (k 2tig+8..+9, col gid); C: (row
# gid, cols 2tig..+1), (row gid+8, same).
CUDA_MMA = r"""
__device__ inline void vx_mma_16816(float& c0, float& c1, float& c2, float& c3,
                                    unsigned int a0, unsigned int a1, unsigned int a2,
                                    unsigned int a3, unsigned int b0, unsigned int b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Asynchronous 4-byte copies global -> shared (sm_80+), committed and waited in groups:
// the next tile's codes load while this one is computed.
__device__ inline void vx_cp_async4(void* smem, const void* gmem) {
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem));
}
// 16-byte copies (.cg: past L1, the codes are read once), for 16-byte aligned ends.
__device__ inline void vx_cp_async16(void* smem, const void* gmem) {
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ inline void vx_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ inline void vx_cp_wait_prior() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ inline void vx_cp_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
// Two floats as fp16 in one register, the first in the low half (an mma fragment pair).
__device__ inline unsigned int vx_pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned int*>(&h);
}
// Bytes of x (0-3) and y (4-7) picked by the selector's nibbles (PRMT).
__device__ inline unsigned int vx_byte_perm(unsigned int x, unsigned int y, unsigned int sel) {
  return __byte_perm(x, y, sel);
}
// A pair of 4-bit codes dequantised: codes holds each as the mantissa of an fp16 that
// magic's exponent makes code + magic (1024 + c, or 64 + c for a nibble four bits up),
// so (codes - magic) · scale + bias is two fp16 pair instructions (one rounding, fused).
__device__ inline unsigned int vx_dequant_pair(unsigned int codes, unsigned int magic,
                                               unsigned int scale, unsigned int bias) {
  const __half2 c = __hsub2(*reinterpret_cast<const __half2*>(&codes),
                            *reinterpret_cast<const __half2*>(&magic));
  const __half2 v = __hfma2(c, *reinterpret_cast<const __half2*>(&scale),
                            *reinterpret_cast<const __half2*>(&bias));
  return *reinterpret_cast<const unsigned int*>(&v);
}
"""

CUDA_KEYS = r"""
__device__ inline unsigned int vx_ld2(const __half* p) {
  return *reinterpret_cast<const unsigned int*>(p);
}
// keys[t, d] = RoPE(sum_m coeff[t, m] basis[m, d] + mean[d]) for a tile of tokens:
// coeff (T x rkmax, fp16, row stride chs) in shared memory; basis as fp16 pairs along m
// (d-major: bmat[(d * rkmax + m) / 2]); warps take 16 x 8 output blocks in turn.
__device__ inline void vx_mma_keys(const __half* ch, int chs, const unsigned int* bmat,
                                   int rkmax, const float* kmean, const float* rope, int pos,
                                   float* tile, int tstride, int tiles_m, int tiles_n,
                                   int warp, int nwarps, int lane, int D) {
  const int gid = lane >> 2;
  const int tig = lane & 3;
  for (int idx = warp; idx < tiles_m * tiles_n; idx += nwarps) {
    const int mt = idx / tiles_n;
    const int nt = idx - mt * tiles_n;
    const int r0 = mt * 16 + gid;
    const int bn = nt * 8 + gid;
    float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
    for (int k0 = 0; k0 < rkmax; k0 += 16) {
      const __half* a = ch + k0 + tig * 2;
      vx_mma_16816(c0, c1, c2, c3, vx_ld2(a + r0 * chs), vx_ld2(a + (r0 + 8) * chs),
                   vx_ld2(a + r0 * chs + 8), vx_ld2(a + (r0 + 8) * chs + 8),
                   bmat[(bn * rkmax + k0) / 2 + tig], bmat[(bn * rkmax + k0) / 2 + tig + 4]);
    }
    const int col = nt * 8 + tig * 2;  // an even column: (col, col + 1) is a RoPE pair
    const float theta = rope[col / 2];
    const float amp = rope[D / 2 + col / 2];
    for (int half_row = 0; half_row < 2; half_row++) {
      const int row = r0 + 8 * half_row;
      const float a = (half_row ? c2 : c0) + kmean[col];
      const float b = (half_row ? c3 : c1) + kmean[col + 1];
      const float2 sc = vx_sincos((float)(pos + row) * theta);
      tile[row * tstride + col] = amp * (a * sc.y - b * sc.x);
      tile[row * tstride + col + 1] = amp * (a * sc.x + b * sc.y);
    }
  }
}
"""

# The warp-tiled kernel's helpers (CUDA only): a tile's softmax step, a key column's
# level, the copy of a tile's codes into shared memory.
CUDA_STAGE = r"""
// Reductions over the 8 lanes of an mma fragment column (lane xor 4, 8, 16: one query
// head's scores in the warp-tiled kernel), and over a whole warp.
__device__ inline float vx_column_max(float x) {
  x = max(x, VX_SHFL_XOR(x, 4));
  x = max(x, VX_SHFL_XOR(x, 8));
  return max(x, VX_SHFL_XOR(x, 16));
}
__device__ inline float vx_column_sum(float x) {
  x += VX_SHFL_XOR(x, 4);
  x += VX_SHFL_XOR(x, 8);
  return x + VX_SHFL_XOR(x, 16);
}
__device__ inline float vx_warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) {
    x = max(x, VX_SHFL_XOR(x, off));
  }
  return x;
}
__device__ inline float vx_warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) {
    x += VX_SHFL_XOR(x, off);
  }
  return x;
}
// One 16-token tile's step of a query head's online softmax (warp-tiled kernel): a and b
// are this lane's scores of tokens gid and gid + 8 (-1e30 past the last token); the 8
// lanes of a fragment column (lane xor 4, 8, 16) share the head. The probabilities come
// back rounded to fp16 (what the P·V product reads) and are summed after rounding, so
// numerator and denominator see the same weights; returns the rescale of the head's
// earlier partials.
__device__ inline float vx_softmax_tile(float a, float b, float& m_run, float& l_run,
                                        float& pa, float& pb) {
  const float m_new = max(m_run, vx_column_max(max(a, b)));
  pa = VX_ROUND_HALF(vx_exp_fast(a - m_new));
  pb = VX_ROUND_HALF(vx_exp_fast(b - m_new));
  const float sum = vx_column_sum(pa + pb);
  const float r = vx_exp_fast(m_run - m_new);
  l_run = l_run * r + sum;
  m_run = m_new;
  return r;
}
// The same step with the head's sum kept per lane (summed over the column's 8 lanes once,
// after the last tile) and, LAZY, its maximum raised only when a score passes it by more
// than VX_LAZY_MARGIN: below that the probabilities exp(s - m) stay below e^8 (fp16
// holds them; numerator and denominator share m, so the softmax is unchanged) and the
// tile needs no shuffle at all. grow: whether any lane of the warp has such a score (the
// same for the whole warp, so the shuffles run in every lane or none).
#define VX_LAZY_MARGIN 8.0f
__device__ inline float vx_softmax_tile_lane(float a, float b, bool grow, float& m_run,
                                             float& l_lane, float& pa, float& pb) {
  const float m_new = grow ? max(m_run, vx_column_max(max(a, b))) : m_run;
  pa = VX_ROUND_HALF(vx_exp_fast(a - m_new));
  pb = VX_ROUND_HALF(vx_exp_fast(b - m_new));
  const float r = grow ? vx_exp_fast(m_run - m_new) : 1.0f;
  l_lane = l_lane * r + (pa + pb);
  m_run = m_new;
  return r;
}
// The unit codebook level of a column's code in a token's words, the column packed as
// bit offset | mask << 12 | table base << 20 (vx_key_column): two words are always read
// (code buffers keep a spare word after the last token), the funnel shift takes the
// offset's low five bits itself.
__device__ inline float vx_level_col(const unsigned int* words, int base, int col,
                                     const float* table) {
  const int w0 = base + ((col >> 5) & 127);
  const unsigned int code = __funnelshift_r(words[w0], words[w0 + 1], col) &
                            ((unsigned int)(col >> 12) & 255u);
  return table[(col >> 20) + (int)code];
}
__device__ inline int vx_key_column(int bits, int shift) {
  return bits > 0 ? shift | ((1 << bits) - 1) << 12 | ((1 << bits) - 2) << 20 : 0;
}
// The same with the column unpacked once per block as (word, bit offset in it, mask,
// table base), so that a tile's decode extracts no fields (one 16-byte shared load a
// column, 16 bytes of shared memory instead of 4): w is the token's first word.
__device__ inline unsigned int vx_code4(const unsigned int* w, int4 col) {
  return __funnelshift_r(w[col.x], w[col.x + 1], col.y) & (unsigned int)col.z;
}
__device__ inline float vx_level_col4(const unsigned int* w, int4 col, const float* table) {
  return table[col.w + (int)vx_code4(w, col)];
}
__device__ inline int4 vx_key_column4(int bits, int shift) {
  return bits > 0 ? make_int4(shift >> 5, shift & 31, (1 << bits) - 1, (1 << bits) - 2)
                  : make_int4(0, 0, 0, 0);
}
// A key pair (kpair4's word, bit offset, mask, table base) packed in one register for
// KPREG: base (15 bits) | offset << 15 | width << 20 | word << 25, or bit 31 where the
// pair decodes column by column (base -1). The host keeps words < 64 and bases < 2^15.
__device__ inline unsigned int vx_pack_pair(int4 pr) {
  return pr.w < 0 ? 0x80000000u
                  : (unsigned int)pr.w | (unsigned int)pr.y << 15 |
                        (unsigned int)__popc((unsigned int)pr.z) << 20 |
                        (unsigned int)pr.x << 25;
}
// Back to kpair4's (word, bit offset, mask, table base) of a pair in the table.
__device__ inline int4 vx_unpack_pair(unsigned int d) {
  return make_int4((int)((d >> 25) & 63u), (int)((d >> 15) & 31u),
                   (int)((1u << ((d >> 20) & 31u)) - 1u), (int)(d & 0x7FFFu));
}
// Step 3 of the warp-tiled kernel: lane (gid, tig)'s A fragments of a tile's key
// coefficients (unit levels: the columns' scales are in the basis), tokens gid and gid + 8,
// from the tile's key words kw (wk a token): by pairs from the pair table where KPAIR,
// else column by column from kcol4 (KCOL4) or kcol. KPREG: the lane's pairs are read from
// kpr, packed in registers once per split (vx_pack_pair), not from kpair4 every tile.
// KPALL: every pair is in the table (no branch, no column-by-column path).
template <int KS, bool KPAIR, bool KCOL4, bool KPREG, bool KPALL>
__device__ inline void vx_key_fragments(unsigned int (&af)[KS][4], const unsigned int* kw,
                                        int wk, const int4* kcol4, const int* kcol,
                                        const int4* kpair4, const unsigned int* ptab_s,
                                        const float* table, int gid, int tig,
                                        const unsigned int (&kpr)[KPREG ? KS : 1][2]) {
#pragma unroll
  for (int ks = 0; ks < KS; ks++) {
    if (KPAIR) {
      // Registers 0 / 1: columns (2 tig, +1) of the step for tokens gid / gid + 8 (pair
      // 8 ks + tig); registers 2 / 3 the same for columns + 8 (pair + 4).
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int pi = ks * 8 + half * 4 + tig;
        const unsigned int d = KPREG ? kpr[KPREG ? ks : 0][half] : 0u;
        const int4 pr = KPREG ? vx_unpack_pair(d) : kpair4[pi];
        if (KPALL || (KPREG ? !(d >> 31) : pr.w >= 0)) {
          af[ks][2 * half] = ptab_s[pr.w + (int)vx_code4(kw + gid * wk, pr)];
          af[ks][2 * half + 1] = ptab_s[pr.w + (int)vx_code4(kw + (gid + 8) * wk, pr)];
        } else {  // a pair too wide for the table: two levels, as without KPAIR
          const int4 ca = kcol4[2 * pi];
          const int4 cb = kcol4[2 * pi + 1];
          af[ks][2 * half] = vx_pack_half2(vx_level_col4(kw + gid * wk, ca, table),
                                              vx_level_col4(kw + gid * wk, cb, table));
          af[ks][2 * half + 1] =
              vx_pack_half2(vx_level_col4(kw + (gid + 8) * wk, ca, table),
                            vx_level_col4(kw + (gid + 8) * wk, cb, table));
        }
      }
      continue;
    }
    float c[8];
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int ci = ks * 16 + 2 * tig + (e & 1) + (e >> 1) * 8;
      if (KCOL4) {
        const int4 col = kcol4[ci];
        c[e] = vx_level_col4(kw + gid * wk, col, table);
        c[4 + e] = vx_level_col4(kw + (gid + 8) * wk, col, table);
      } else {
        const int col = kcol[ci];
        c[e] = vx_level_col(kw, gid * wk, col, table);
        c[4 + e] = vx_level_col(kw, (gid + 8) * wk, col, table);
      }
    }
    af[ks][0] = vx_pack_half2(c[0], c[1]);
    af[ks][1] = vx_pack_half2(c[4], c[5]);
    af[ks][2] = vx_pack_half2(c[2], c[3]);
    af[ks][3] = vx_pack_half2(c[6], c[7]);
  }
}
// Lane (gid, tig)'s A fragment of (P·V)^T for the tile's 16-dim slice sl: dims 16 sl + gid
// and + 8 of tokens 2 tig, +1, +8, +9, dequantised to fp16 (VB bits, VW words a token, NG
// groups of VG dims, staged VWS words apart; 4-bit codes by nib_sel / nib_mask /
// nib_magic, see the tile loop).
template <int VB, int VW, int VWS, int NG, int VG>
__device__ inline void vx_value_slice(unsigned int va[4], int sl, const unsigned int* vw,
                                      const VX_HALF_T* vsc, const VX_HALF_T* vbi, int gid,
                                      int tig, unsigned int nib_sel, unsigned int nib_mask,
                                      unsigned int nib_magic) {
  const unsigned short* vsc16 = reinterpret_cast<const unsigned short*>(vsc);
  const unsigned short* vbi16 = reinterpret_cast<const unsigned short*>(vbi);
  const int gi = (sl * 16) / VG;  // one group per slice
#pragma unroll
  for (int o = 0; o < 2; o++) {  // tokens 2 tig + 8 o and the next
    const int t = 2 * tig + 8 * o;
    if (VB == 4) {
      const int i0 = t * NG + gi;
      const int i1 = i0 + NG;  // token t + 1
      const unsigned int scale = vsc16[i0] | ((unsigned int)vsc16[i1] << 16);
      const unsigned int bias = vbi16[i0] | ((unsigned int)vbi16[i1] << 16);
      const uint2 wa = *reinterpret_cast<const uint2*>(vw + t * VWS + 2 * sl);
      const uint2 wb = *reinterpret_cast<const uint2*>(vw + (t + 1) * VWS + 2 * sl);
      va[2 * o] = vx_dequant_pair(
          (vx_byte_perm(wa.x, wb.x, nib_sel) & nib_mask) | nib_magic, nib_magic, scale, bias);
      va[2 * o + 1] = vx_dequant_pair(
          (vx_byte_perm(wa.y, wb.y, nib_sel) & nib_mask) | nib_magic, nib_magic, scale, bias);
    } else {
      float v[4];  // (dim 16 s + gid, + 8) x (token t, t + 1)
#pragma unroll
      for (int u = 0; u < 4; u++) {
        const int tt = t + (u & 1);
        const int bit = (sl * 16 + gid + 8 * (u >> 1)) * VB;
        const int w = tt * VWS + (bit >> 5);
        unsigned int code = vw[w] >> (bit & 31);
        if ((VB & (VB - 1)) != 0) {  // 3/5/6-bit codes may straddle two words
          code = (unsigned int)((((unsigned long long)vw[w + 1] << 32) | vw[w]) >>
                                (bit & 31));
        }
        code &= (1u << VB) - 1u;
        v[u] = (float)code * VX_HALF(vsc[tt * NG + gi]) + VX_HALF(vbi[tt * NG + gi]);
      }
      va[2 * o] = vx_pack_half2(v[0], v[1]);
      va[2 * o + 1] = vx_pack_half2(v[2], v[3]);
    }
  }
}
// Start copying N words into shared memory across a block's THREADS threads (wait before
// reading): in 16-byte pieces where src starts on a 16-byte boundary (dst must), the last
// N % 4 words and a misaligned src in 4-byte ones.
template <int N, int THREADS>
__device__ inline void vx_copy_words(unsigned int* dst, const unsigned int* src, int tid) {
  constexpr int N16 = (N / 4) * 4;
  const bool a16 = (reinterpret_cast<unsigned long long>(src) & 15ull) == 0;
  for (int i = 4 * tid; a16 && i < N16; i += 4 * THREADS) {
    vx_cp_async16(dst + i, src + i);
  }
  for (int i = (a16 ? N16 : 0) + tid; i < N; i += THREADS) {
    vx_cp_async4(dst + i, src + i);
  }
}
// Start copying one warp's TILES adjacent 16-token tiles of codes into shared memory
// (wait before reading): tiles of one head are adjacent in memory and in the warp's
// buffers, so a tile pair (TP 2) is one run of each array. Counts in 32-bit words per
// token: WK key, VWN value; SB scale (and bias) words per 16 tokens; 8 words of fp16
// per-token key scales a tile WITH_KTS. Each run's chunks go to the lanes in rounds of
// 32 (vx_lane_rounds): the counts are compile-time, so every round but a partial last
// one is an unpredicated copy at a constant offset from the lane's first (as a loop from
// the lane's index, nvcc built a remainder loop with branches around each copy: 170 of
// the 8B shape's instructions a tile, H200 SASS profile; now ~37 by the SASS, ~65 at
// head_dim 64, where a tile is not paired). The
// 4-byte path (misaligned inputs, rare) keeps plain loops: unrolled too, the kernel
// spilled at head_dim 64 under three blocks an SM. Tiles start at multiples of 16
// tokens, so every run is a whole number of 16-byte chunks at 16-byte offsets: with a16
// (every buffer's address 16-byte aligned) they move as 16-byte copies, a quarter of the
// instructions of 4-byte ones. A token's value words land VWS words apart (VWS = VWN, or
// VWN padded where VWN is a multiple of 4, so that a 16-byte chunk never spans two
// tokens).
// Word w of a run of tokens of VWN words, staged VWS words a token (VPAD's padding).
template <int VWN, int VWS>
__device__ inline int vx_staged_word(int w) {
  return w + (VWS - VWN) * (w / VWN);
}
template <int N, typename F>
__device__ inline void vx_lane_rounds(int lane, F copy) {  // copy(round): item lane + 32 round
#pragma unroll
  for (int j = 0; j < (N + 31) / 32; j++) {
    if (32 * (j + 1) <= N || lane + 32 * j < N) {  // (compile-time true but in the last)
      copy(j);
    }
  }
}
template <int WK, int VWN, int VWS, int SB, bool WITH_KTS, int TILES>
__device__ inline void vx_stage_tile(unsigned int* kw, unsigned int* vw, unsigned int* vsc,
                                     unsigned int* vbi, unsigned int* kts,
                                     const unsigned int* kwords, const unsigned int* vwords,
                                     const VX_HALF_T* vscales, const VX_HALF_T* vbiases,
                                     const VX_HALF_T* ktok, int row0, bool a16, int lane) {
  const unsigned int* vs = reinterpret_cast<const unsigned int*>(vscales) + row0 / 16 * SB;
  const unsigned int* vb = reinterpret_cast<const unsigned int*>(vbiases) + row0 / 16 * SB;
  const unsigned int* kt = reinterpret_cast<const unsigned int*>(ktok) + row0 / 2;
  const unsigned int* ks = kwords + row0 * WK;
  const unsigned int* vsrc = vwords + row0 * VWN;
  static_assert(VWS == VWN || VWN % 4 == 0, "a padded token's words are whole chunks");
  static_assert(SB * TILES <= 128, "a lane's one 16-byte copy of scales (and biases)");
  if (a16) {
    // (Each lane's first chunk, then constant steps of 32 chunks: the copies' addresses
    // fold into the instructions' offsets.)
    unsigned int* kw_l = kw + 4 * lane;
    const unsigned int* ks_l = ks + 4 * lane;
    vx_lane_rounds<4 * WK * TILES>(lane, [&](int j) {
      vx_cp_async16(kw_l + 128 * j, ks_l + 128 * j);
    });
    // Chunk i (lane + 32 j) is token 4 i / VWN's; where VWN divides 128 chunks' words,
    // a round is a constant number of padded tokens further.
    constexpr bool STEADY = VWS == VWN || 128 % VWN == 0;
    unsigned int* vw_l = vw + vx_staged_word<VWN, VWS>(4 * lane);
    const unsigned int* vs_l = vsrc + 4 * lane;
    vx_lane_rounds<4 * VWN * TILES>(lane, [&](int j) {
      if (STEADY) {
        vx_cp_async16(vw_l + vx_staged_word<VWN, VWS>(128) * j, vs_l + 128 * j);
      } else {
        const int i = 4 * (lane + 32 * j);
        vx_cp_async16(vw + vx_staged_word<VWN, VWS>(i), vsrc + i);
      }
    });
    if (lane < SB * TILES / 4) {
      vx_cp_async16(vsc + 4 * lane, vs + 4 * lane);
      vx_cp_async16(vbi + 4 * lane, vb + 4 * lane);
    }
    if (WITH_KTS && lane < 2 * TILES) {
      vx_cp_async16(kts + 4 * lane, kt + 4 * lane);
    }
    return;
  }
  for (int i = lane; i < 16 * WK * TILES; i += 32) {  // (misaligned inputs: a rare path)
    vx_cp_async4(kw + i, ks + i);
  }
  for (int i = lane; i < 16 * VWN * TILES; i += 32) {
    vx_cp_async4(vw + vx_staged_word<VWN, VWS>(i), vsrc + i);
  }
  for (int i = lane; i < SB * TILES; i += 32) {
    vx_cp_async4(vsc + i, vs + i);
    vx_cp_async4(vbi + i, vb + i);
  }
  if (WITH_KTS && lane < 8 * TILES) {
    vx_cp_async4(kts + lane, kt + lane);
  }
}
"""

CUDA_PREAMBLE = r"""
  const int tid = threadIdx.x;
  const int blk_x = blockIdx.x;
  const int blk_y = blockIdx.y;
  const int grid_x = gridDim.x;
"""

METAL_HEADER = r"""
#define VX_SHARED threadgroup
#define VX_TG threadgroup
#define VX_FN inline
#define VX_HALF_T half
#define VX_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define VX_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define VX_HALF(x) float(x)
#define VX_TO_HALF(x) half(x)
#define VX_ROUND_HALF(x) float(half(x))
#define VX_RINT(x) metal::rint(x)
#define VX_DIV_RN(a, b) ((a) / (b))
inline float vx_exp(float x) { return metal::precise::exp(x); }
inline float2 vx_sincos(float x) {
  float c;
  float s = metal::precise::sincos(x, c);
  return float2(s, c);
}
// Tensor-core key reconstruction is CUDA-only (MMA = false on Metal): never called.
template <typename A, typename B, typename C, typename E, typename F>
inline void vx_mma_keys(A, int, B, int, C, E, int, F, int, int, int, int, int, int, int) {}
"""

METAL_PREAMBLE = r"""
  const int tid = (int)thread_position_in_threadgroup.x;
  const int blk_x = (int)threadgroup_position_in_grid.x;
  const int blk_y = (int)threadgroup_position_in_grid.y;
  const int grid_x = (int)threadgroups_per_grid.x;
"""

# Decode attention over the coded tokens of one layer.
# Template constants: T (query dtype), D (head dim), G (query heads per KV head), HKV,
# T_TILE (tokens per tile, T_TILE·D = 4096), NT (threads, 256), MC (basis rows per
# shared chunk, MC·D = 1024), ACC (accumulators per thread, ceil(G·D/NT)), PRE
# (pre-RoPE keys), KTS / VTS (per-token key / value scale), VAFF (affine values), VB,
# VG (their bits, group).
# MMA (keys on tensor cores, CUDA), RKMAX / CHS (coefficient columns / fp16 row stride).
# coded: a dummy whose length is the number of coded tokens; layout: rk, wk, rv, wv,
# position of the first coded token; splits = the grid's x size.
DECODE_BODY = r"""
  const int split = blk_x;
  const int bh = blk_y;
  const int h = bh % HKV;
  // Per-step numbers come from array shapes and the grid, not from arrays made per
  // step (a fresh host array costs a page migration on every launch).
  const int total = coded_shape[0];
  const int cap = kwords_shape[2];
  const int n_splits = grid_x;
  const int per_split = ((total + n_splits - 1) / n_splits + T_TILE - 1) / T_TILE * T_TILE;
  const int rk = layout[0];
  const int wk = layout[1];
  const int rv = layout[2];
  const int wv = layout[3];
  const int pos0 = layout[4];
  const int start = split * per_split;
  const int stop = min(start + per_split, total);
  constexpr int RKP = D + 1;
  constexpr int DD = D / 4;

  VX_SHARED float table[510];
  VX_SHARED float tile[T_TILE * RKP];
  VX_SHARED float ubuf[MC * D];
  VX_SHARED unsigned int words[T_TILE * DD];
  VX_SHARED float scores[G * T_TILE];
  VX_SHARED float tok_scale[T_TILE];
  VX_SHARED float run_max[G];
  VX_SHARED float run_sum[G];
  VX_SHARED float rescale[G];
  VX_SHARED float qbias[G];
  VX_SHARED VX_HALF_T ch[MMA ? T_TILE * CHS : 2];
  VX_SHARED int kbits_s[D];
  VX_SHARED int kshift_s[D];
  VX_SHARED float kscale_s[D];
  VX_SHARED int vbits_s[D];
  VX_SHARED int vshift_s[D];
  VX_SHARED float vscale_s[D];

  for (int i = tid; i < 510; i += NT) {
    table[i] = codebook[i];
  }
  for (int m = tid; m < D; m += NT) {
    kbits_s[m] = m < rk ? kbits[h * rk + m] : 0;
    kshift_s[m] = m < rk ? kshift[h * rk + m] : 0;
    kscale_s[m] = m < rk ? kscale[h * rk + m] : 0.0f;
    vbits_s[m] = !VAFF && m < rv ? vbits[h * rv + m] : 0;
    vshift_s[m] = !VAFF && m < rv ? vshift[h * rv + m] : 0;
    vscale_s[m] = !VAFF && m < rv ? vscale[h * rv + m] : 0.0f;
  }
  if (tid < G) {
    run_max[tid] = -1e30f;
    run_sum[tid] = 0.0f;
  }
  float acc[ACC];
  for (int a = 0; a < ACC; a++) {
    acc[a] = 0.0f;
  }
  const int tt = tid / DD;
  const int dd = tid - tt * DD;
  const float qscale = params[0];
  float qreg[G][4];
  float theta[2];
  float amp[2];
  float kmean[4];
  if (PRE && MMA) {
    // The query in RoPE pair order, times the softmax scale, for the whole kernel.
    for (int i = tid; i < G * D; i += NT) {
      const int g = i / D;
      ubuf[i] = static_cast<float>(q[(bh * G + g) * D + perm[i - g * D]]) * qscale;
    }
    for (int g = tid; g < G; g += NT) {
      qbias[g] = 0.0f;
    }
  } else if (PRE) {
    // The query in RoPE pair order, times the softmax scale.
    for (int g = 0; g < G; g++) {
      for (int j = 0; j < 4; j++) {
        qreg[g][j] = static_cast<float>(q[(bh * G + g) * D + perm[dd * 4 + j]]) * qscale;
      }
    }
    for (int p = 0; p < 2; p++) {
      theta[p] = rope[dd * 2 + p];
      amp[p] = rope[D / 2 + dd * 2 + p];
    }
    for (int j = 0; j < 4; j++) {
      kmean[j] = key_mean[h * D + dd * 4 + j];
    }
  } else {
    // Post-RoPE: the query rotated into the key basis (ubuf, for the whole kernel)
    // and its product with the key mean (qbias).
    for (int i = tid; i < G * D; i += NT) {
      const int g = i / D;
      const int m = i - g * D;
      float s = 0.0f;
      if (m < rk) {
        for (int d = 0; d < D; d++) {
          s += static_cast<float>(q[(bh * G + g) * D + d]) * basis[(h * D + d) * rk + m];
        }
      }
      ubuf[i] = s * qscale;
    }
    for (int g = tid; g < G; g += NT) {
      float s = 0.0f;
      for (int d = 0; d < D; d++) {
        s += static_cast<float>(q[(bh * G + g) * D + d]) * key_mean[h * D + d];
      }
      qbias[g] = s * qscale;
    }
  }
  VX_BARRIER();

  for (int t0 = start; t0 < stop; t0 += T_TILE) {
    const int n = min(T_TILE, stop - t0);
    // 1. This tile's key words (and token scales) into shared memory.
    for (int i = tid; i < T_TILE * wk; i += NT) {
      const int t = i / wk;
      words[i] = t < n ? kwords[(bh * cap + t0 + t) * wk + (i - t * wk)] : 0u;
    }
    if (KTS) {
      for (int t = tid; t < T_TILE; t += NT) {
        tok_scale[t] = t < n ? VX_HALF(ktok[bh * cap + t0 + t]) : 0.0f;
      }
    }
    VX_BARRIER();
    // 2. Codes -> key coefficients (fp16 for the tensor-core product).
    const int ccols = MMA ? RKMAX : rk;
    for (int i = tid; i < T_TILE * ccols; i += NT) {
      const int t = i / ccols;
      const int m = i - t * ccols;
      const int b = kbits_s[m];
      float c = 0.0f;
      if (b > 0) {
        c = vx_level(words, t * wk, kshift_s[m], b, table) * kscale_s[m];
        if (KTS) {
          c *= tok_scale[t];
        }
      }
      if (MMA) {
        ch[t * CHS + m] = VX_TO_HALF(c);
      } else {
        tile[t * RKP + m] = c;
      }
    }
    VX_BARRIER();
    // 3. Scores of the G query heads against the tile.
    if (PRE && !MMA) {
      // k = basisᵀ c + mean, 4 tokens x 4 dims per thread, basis rows streamed in chunks.
      float kacc[4][4];
      for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 4; j++) {
          kacc[i][j] = 0.0f;
        }
      }
      for (int m0 = 0; m0 < rk; m0 += MC) {
        for (int i = tid; i < MC * D; i += NT) {
          const int mm = i / D;
          ubuf[i] = m0 + mm < rk ? basis[(h * rk + m0 + mm) * D + (i - mm * D)] : 0.0f;
        }
        VX_BARRIER();
        const int mmax = min(MC, rk - m0);
        for (int mm = 0; mm < mmax; mm++) {
          float cv[4];
          float uv[4];
          for (int i = 0; i < 4; i++) {
            cv[i] = tile[(tt * 4 + i) * RKP + m0 + mm];
          }
          for (int j = 0; j < 4; j++) {
            uv[j] = ubuf[mm * D + dd * 4 + j];
          }
          for (int i = 0; i < 4; i++) {
            for (int j = 0; j < 4; j++) {
              kacc[i][j] += cv[i] * uv[j];
            }
          }
        }
        VX_BARRIER();
      }
      for (int i = 0; i < 4; i++) {
        const int t = tt * 4 + i;
        const float pos = (float)(pos0 + t0 + t);
        float k[4];
        for (int j = 0; j < 4; j++) {
          k[j] = kacc[i][j] + kmean[j];
        }
        for (int p = 0; p < 2; p++) {
          const float2 sc = vx_sincos(pos * theta[p]);
          const float a = k[2 * p];
          const float b = k[2 * p + 1];
          k[2 * p] = amp[p] * (a * sc.y - b * sc.x);
          k[2 * p + 1] = amp[p] * (a * sc.x + b * sc.y);
        }
        for (int g = 0; g < G; g++) {
          float s = qreg[g][0] * k[0] + qreg[g][1] * k[1] + qreg[g][2] * k[2] + qreg[g][3] * k[3];
          for (int off = DD / 2; off > 0; off >>= 1) {
            s += VX_SHFL_XOR(s, off);
          }
          if (dd == 0) {
            scores[g * T_TILE + t] = t < n ? s : -1e30f;
          }
        }
      }
    } else {
      if (MMA) {
        // Keys = coefficients x basis on tensor cores, plus mean, RoPE -> tile.
        vx_mma_keys(ch, CHS, basis_mma + h * D * (RKMAX / 2), RKMAX, key_mean + h * D, rope,
                    pos0 + t0, tile, RKP, T_TILE / 16, D / 8, tid / 32, NT / 32, tid % 32, D);
        VX_BARRIER();
      }
      // Eight consecutive lanes per (head, token), each over every eighth dim.
      const int kd = MMA ? D : rk;
      for (int i = tid; i < G * T_TILE * 8; i += NT) {
        const int pair = i / 8;
        const int part = i - pair * 8;
        const int g = pair / T_TILE;
        const int t = pair - g * T_TILE;
        float s = 0.0f;
        for (int m = part; m < kd; m += 8) {
          s += ubuf[g * D + m] * tile[t * RKP + m];
        }
        s += VX_SHFL_XOR(s, 4);
        s += VX_SHFL_XOR(s, 2);
        s += VX_SHFL_XOR(s, 1);
        if (part == 0) {
          scores[pair] = t < n ? s + qbias[g] : -1e30f;
        }
      }
    }
    VX_BARRIER();
    // 4. Online softmax: one warp per query head.
    const int warp = tid / 32;
    const int lane = tid - warp * 32;
    for (int g = warp; g < G; g += NT / 32) {
      float tile_max = -1e30f;
      for (int t = lane; t < T_TILE; t += 32) {
        tile_max = max(tile_max, scores[g * T_TILE + t]);
      }
      for (int off = 16; off > 0; off >>= 1) {
        tile_max = max(tile_max, VX_SHFL_XOR(tile_max, off));
      }
      const float m_old = run_max[g];
      const float m_new = max(m_old, tile_max);
      float sum = 0.0f;
      for (int t = lane; t < T_TILE; t += 32) {
        const float p = vx_exp(scores[g * T_TILE + t] - m_new);
        scores[g * T_TILE + t] = p;
        sum += p;
      }
      for (int off = 16; off > 0; off >>= 1) {
        sum += VX_SHFL_XOR(sum, off);
      }
      if (lane == 0) {
        const float r = vx_exp(m_old - m_new);
        rescale[g] = r;
        run_sum[g] = run_sum[g] * r + sum;
        run_max[g] = m_new;
      }
    }
    // 5. This tile's value words (and token scales).
    for (int i = tid; i < T_TILE * wv; i += NT) {
      const int t = i / wv;
      words[i] = t < n ? vwords[(bh * cap + t0 + t) * wv + (i - t * wv)] : 0u;
    }
    if (VTS) {
      for (int t = tid; t < T_TILE; t += NT) {
        tok_scale[t] = t < n ? VX_HALF(vtok[bh * cap + t0 + t]) : 0.0f;
      }
    }
    VX_BARRIER();
    // 6. Codes -> values (or value coefficients) in the tile.
    const int vcols = VAFF ? D : rv;
    for (int i = tid; i < T_TILE * vcols; i += NT) {
      const int t = i / vcols;
      const int d = i - t * vcols;
      float v = 0.0f;
      if (t < n) {
        if (VAFF) {
          // mx.quantize packs codes as a little-endian bit stream; 3/5/6-bit codes
          // can straddle two words.
          const int bit = d * VB;
          const int sh = bit & 31;
          unsigned int code = words[t * wv + (bit >> 5)] >> sh;
          if ((VB & (VB - 1)) != 0 && sh + VB > 32) {
            code |= words[t * wv + (bit >> 5) + 1] << (32 - sh);
          }
          code &= (1u << VB) - 1u;
          const int gi = (bh * cap + t0 + t) * (D / VG) + d / VG;
          v = (float)code * VX_HALF(vscales[gi]) + VX_HALF(vbiases[gi]);
        } else {
          const int b = vbits_s[d];
          if (b > 0) {
            v = vx_level(words, t * wv, vshift_s[d], b, table) * vscale_s[d];
            if (VTS) {
              v *= tok_scale[t];
            }
          }
        }
      }
      tile[t * RKP + d] = v;
    }
    VX_BARRIER();
    // 7. Rescale and accumulate p · v.
    for (int a = 0; a < ACC; a++) {
      const int idx = tid + a * NT;
      if (idx < G * rv) {
        const int g = idx / rv;
        const int d = idx - g * rv;
        float s = acc[a] * rescale[g];
        for (int t = 0; t < n; t++) {
          s += scores[g * T_TILE + t] * tile[t * RKP + d];
        }
        acc[a] = s;
      }
    }
    VX_BARRIER();
  }
  for (int a = 0; a < ACC; a++) {
    const int idx = tid + a * NT;
    if (idx < G * rv) {
      const int g = idx / rv;
      const int d = idx - g * rv;
      out[((bh * n_splits + split) * G + g) * D + d] = acc[a];
    }
  }
  if (tid < G) {
    out_max[(bh * n_splits + split) * G + tid] = run_max[tid];
    out_sum[(bh * n_splits + split) * G + tid] = run_sum[tid];
  }
"""

# Decode attention over the coded tokens, one warp per 16-token tile (CUDA; the default
# configuration: pre-RoPE keys on tensor cores, affine values). Each warp runs its own
# online softmax over the tiles it takes (every NW-th of the split) with no block-wide
# barrier; the warps' partials are merged once at the end into the split's (out, max,
# sum), the same outputs as DECODE_BODY. Per tile and lane: the key coefficients of
# tokens (gid, gid + 8) are decoded straight into mma A fragments (fp16), keys = basis ·
# coefficients come out of mma.m16n8k16 as C fragments whose column pairs are RoPE pairs,
# so the mean, RoPE and the scores against the G query heads are applied in registers;
# the values (dequantised straight into A fragments) times the probabilities (fp16, a
# column per query head) are a second mma per 16 dims, (P·V)^T accumulated in C fragments.
# The last block of each KV head to finish merges the splits with the exact tokens.
# Template constants: T, D, G, HKV, NW (warps), NT (= 32 NW), RKMAX (coefficient columns,
# a multiple of 16), KTS (per-token key scale), VB, VG (affine value bits, group), MAXE
# (exact tokens), MAXS (splits), VHAD (values were coded Hadamard-rotated: the output is
# turned back by a fast Walsh-Hadamard transform), ML (float4 loads in flight per thread in
# the last block's merge of the splits), UNROLL_NT (unrolling of the loop over
# 8-dim slices: fewer registers when small), UNROLL_V (of the values' loop over 16-dim
# slices: whole, the accumulators stay in registers), BREG (the basis fragments held in registers),
# SBASIS (else in dynamic shared memory, 2 · D · RKMAX bytes; neither: read from bfrag),
# QMMA (the scores against the query heads on tensor cores too; else in registers, FMA by
# FMA), KPAIR (words of the key pair table, ptab: 0, none), VEARLY (the values' A
# fragments dequantised before the tile's softmax rather than after; full unrolling only),
# KEARLY (the next tile's key fragments decoded after this tile's scores), LAZY (QMMA's
# softmax keeps its sums per lane and moves a head's maximum only past a margin), KPREG
# (with KPAIR: a lane's key pairs packed in registers once per split), KPALL (every key
# pair is in the table: no per-pair branch), VPAD (a staged token's value words padded
# against bank conflicts), QPAD (the same for the rows of a warp's turned query).
# bfrag: the basis, each column times its scale, as B fragments, ((h · D/8 + n-tile) ·
# RKMAX/16 + k-step) · 64 + lane · 2 + reg (a lane's two registers side by side: one
# 8-byte shared-memory load an mma under SBASIS); kbits/kshift: per compacted column (H, RKMAX);
# key_mean, rope in RoPE pair order. kpair (H, RKMAX/2, 4): per pair of compacted key
# columns (2i, 2i + 1), adjacent in a token's bits, their codes' word, bit offset, mask and
# base in ptab, a table of the pair's levels as fp16 pairs (an mma A register), or base -1
# where the pair's table did not fit (kernels.key_pair_tables).
DECODE_WARP_BODY = r"""
  // Block 0 of each KV head computes the exact tokens' partial (sinks, the uncoded tail)
  // from the start, alongside the others' tiles and off the critical path; blocks 1 to
  // n_splits walk the coded tokens' splits.
  const bool exact_block = blk_x == 0;
  const int split = blk_x - 1;
  const int bh = blk_y;
  const int h = bh % HKV;
  const int total = coded_shape[0];
  const int cap = kwords_shape[2];
  const int n_splits = grid_x - 1;
  // The splits' partials share one output (each output of a launch costs host time in
  // MLX's call): per (KV head, split, query head) the unnormalised output, then all
  // their maxima, then all their sums; then the same for the exact tokens (one partial
  // per KV head and query head).
  float* out = partials;
  float* out_max = partials + gridDim.y * n_splits * G * D;
  float* out_sum = out_max + gridDim.y * n_splits * G;
  float* ex_out = out_sum + gridDim.y * n_splits * G;
  float* ex_max = ex_out + gridDim.y * G * D;
  float* ex_sum = ex_max + gridDim.y * G;
  // TP: a warp takes TP adjacent 16-token tiles an iteration (tile pairs: each basis
  // fragment loaded once for both tiles' mma).
  constexpr int STEP = 16 * NW * TP;
  constexpr int KS = RKMAX / 16;
  constexpr int NTD = D / 8;
  constexpr int VW = D * VB / 32;
  constexpr int NG = D / VG;
  const int per_split = ((total + n_splits - 1) / n_splits + STEP - 1) / STEP * STEP;
  constexpr int wk = WKS;  // = layout[1]
  const int pos0 = layout[4];
  const int start = exact_block ? total : split * per_split;  // (no tiles for block 0)
  static_assert(TP == 1 || TP == 2, "one tile or a pair an iteration");
  static_assert(TP == 1 || (QMMA && !KEARLY && !VEARLY), "tile pairs: QMMA, no reordering");
  const int stop = min(start + per_split, total);
  const int warp = tid / 32;
  const int lane = tid - warp * 32;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  static_assert(G <= 8, "query heads are columns 0-7 of the probabilities' mma fragment");
  static_assert(NTD % 2 == 0, "P·V and QMMA take 16 dims at a time");
  static_assert(VG % 16 == 0, "a 16-dim slice of the values is in one group (mlx: 32-128)");
  static_assert(D <= NT, "the exact tokens' values give each output dim a thread");

  constexpr int RS = D / 2 + 4;  // row stride of rot_s (float2): no bank conflicts
  constexpr int QP = (D / 2 + 31) / 32;  // RoPE pairs per lane in the query's rotation
  VX_SHARED float table[510];
  VX_ALIGN16 VX_SHARED float qs[G * D];
  // Per compacted key column: bit offset | mask << 12 | codebook base << 20
  // (vx_key_column; a padding column reads code 0, and its basis column is zero), or
  // up to head_dim 64, where shared memory is plentiful, and with the pair table (its
  // too-wide pairs decode from them), the four unpacked (KCOL4: vx_key_column4, two to
  // four instructions fewer per coefficient). The columns' scales are folded into the
  // basis fragments (bfrag) on the host.
  constexpr bool KCOL4 = D <= 64 || KPAIR != 0;
  static_assert(!KPAIR || KCOL4, "a pair too wide for the table decodes from kcol4");
  static_assert(!VEARLY || UNROLL_V >= NTD / 2, "early values are indexed by constants");
  static_assert(!LAZY || QMMA, "the lazy softmax is QMMA's (a lane's two heads)");
  static_assert(!KPREG || (KPAIR && KPAIR <= 32768 && WKS < 64), "vx_pack_pair's fields");
  static_assert(!KPALL || KPAIR, "KPALL: every pair in the table");
  VX_SHARED int kcol[KCOL4 ? 1 : RKMAX];
  VX_ALIGN16 VX_SHARED int4 kcol4[KCOL4 ? RKMAX : 1];
  // KPAIR: each pair of key columns decodes with one lookup into a table of fp16 pairs
  // (both levels, packed as the A fragment wants them) instead of two levels and a pack.
  VX_ALIGN16 VX_SHARED unsigned int ptab_s[KPAIR ? KPAIR : 1];
  VX_ALIGN16 VX_SHARED int4 kpair4[KPAIR ? RKMAX / 2 : 1];
  VX_SHARED int perm_s[D];  // RoPE pair order -> dims (the exact keys' order)
  // RoPE by position P = P0 + r (P0 the tile's first token, r < 16): the query turns by
  // -P0·θ once per tile (per warp, into fin_o), the keys by r·θ from a table of (cos,
  // sin) instead of two sin/cos per pair and token: rows 0-15 up to head_dim 64; beyond,
  // rows 0-7 and the 8-row step (a complex product per pair and tile), since rows 8-15
  // would take 3.8 KB of the 48 KiB of static shared memory at head_dim 128.
  constexpr int ROT_ROWS = D <= 64 ? 16 : 8;
  VX_ALIGN16 VX_SHARED float2 rot_s[ROT_ROWS * RS];
  VX_SHARED float2 rot8_s[ROT_ROWS == 16 ? 1 : D / 2];
  VX_SHARED float2 rot16_s[TP == 2 ? D / 2 : 1];  // TP 2: the second tile's 16-row step
  VX_SHARED float2 mean_s[D / 2];  // the key mean, RoPE pair order
  // Per warp, two buffers of a tile's codes (double-buffered: one loads, one is read).
  // fp16 arrays travel as 32-bit words (16 tokens: whole words, 16-byte aligned); spare
  // words let a code straddling the last word read two words without a branch. WKS is
  // the layout's key words per token (layout[1]).
  constexpr int KWT = 16 * TP * WKS + 4;  // one buffer of key words (TP tiles)
  // A staged token's value words start VWS words apart: VPAD, 4 past VW where VW is a
  // multiple of 8 words (4-bit values at head_dim 64 or 128, 8-bit, ...), so that the
  // P·V loads of lanes tig 0-3 (tokens 2 tig + 8 o: 64 or 128 bytes apart unpadded, the
  // same banks) take one shared-memory wavefront, not two or four.
  constexpr int VWS = VPAD && VW % 8 == 0 ? VW + 4 : VW;
  constexpr int VWT = 16 * TP * VWS + 4;  // one buffer of value words (TP tiles)
  constexpr int SBW = 16 * NG / 2;
  VX_ALIGN16 VX_SHARED unsigned int kw_static[SBASIS ? 1 : NW * 2 * KWT];
  VX_ALIGN16 VX_SHARED unsigned int vw_static[SBASIS ? 1 : NW * 2 * VWT];
  VX_ALIGN16 VX_SHARED unsigned int vsc_s[NW][2][TP * SBW];
  VX_ALIGN16 VX_SHARED unsigned int vbi_s[NW][2][TP * SBW];
  VX_ALIGN16 VX_SHARED unsigned int kts_s[NW][2][TP * 8];
  // A tile's probabilities, fp16, row g = query head, 16 tokens: the B fragment of (P·V)^T.
  VX_SHARED unsigned int ph_s[NW][8 * 8];
  VX_SHARED float fin_m[NW][G];
  VX_SHARED float fin_l[NW][G];
  // A warp's turned query, rows of QWS floats: QPAD, 8 past D, so that the QMMA B
  // fragment's loads of rows gid < G fall in different banks (D apart, they take up to G
  // wavefronts instead of one). Later a warp's partial output (G x D).
  constexpr int QWS = QPAD ? D + 8 : D;
  VX_ALIGN16 VX_SHARED float fin_o[NW][G * QWS];
  // SBASIS: the head's key basis B fragments (bfrag's layout, 2 · D/8 · RKMAX/16 words
  // per lane) in dynamic shared memory, copied once per block, instead of two global
  // loads per mma (BREG keeps them in registers instead); the key and value word buffers
  // follow them there. (MLX raises a kernel's shared-memory limit only for a dynamic
  // request above 48,000 B, which the host pads to; with the buffers inside it the
  // padding is mostly used: head_dim 128, 69 KiB a block in all, three blocks per SM.)
  constexpr int BFW = NTD * KS * 64;
  VX_DYNAMIC_SHARED(unsigned int, dyn_s, SBASIS ? BFW + NW * 2 * (KWT + VWT) : 1);
  const unsigned int* bfrag_s = dyn_s;
  unsigned int* kw_s = SBASIS ? dyn_s + BFW : kw_static;
  unsigned int* vw_s = SBASIS ? dyn_s + BFW + NW * 2 * KWT : vw_static;
  const bool a16 = ((reinterpret_cast<unsigned long long>(kwords) |
                     reinterpret_cast<unsigned long long>(vwords) |
                     reinterpret_cast<unsigned long long>(vscales) |
                     reinterpret_cast<unsigned long long>(vbiases) |
                     (KTS ? reinterpret_cast<unsigned long long>(ktok) : 0ull)) & 15ull) == 0;

  VX_STAMP(0);
  // 1. The basis (SBASIS), then the first tile's codes start loading before the set-up's
  // loads (independent); two groups, so the basis can be waited for alone.
  if (SBASIS && !exact_block) {
    vx_copy_words<BFW, NT>(dyn_s, bfrag + h * BFW, tid);
  }
  if (KPAIR && !exact_block) {  // (every block copies the pair table: 387 of them for
                                // the default model at 16k)
    vx_copy_words<KPAIR, NT>(ptab_s, ptab, tid);
  }
  vx_cp_commit();
  int buf = 0;
  // A warp's TP tiles from token row0 into buffer b (tiles start at multiples of 16
  // tokens, and a pair at multiples of 32: a pair never crosses the buffers' capacity).
  auto stage = [&](int b, int row0) {  // (TP tiles: adjacent here and in the buffers)
    vx_stage_tile<WKS, VW, VWS, SBW, KTS, TP>(
        kw_s + (warp * 2 + b) * KWT, vw_s + (warp * 2 + b) * VWT, vsc_s[warp][b],
        vbi_s[warp][b], kts_s[warp][b], kwords, vwords, vscales, vbiases, ktok, row0, a16,
        lane);
  };
  if (start + warp * 16 * TP < stop) {
    stage(0, bh * cap + start + warp * 16 * TP);
  }
  vx_cp_commit();
  // Set-up: every global load at once (no load waits on another), then one shuffle in
  // shared memory: the query, times the softmax scale, goes to RoPE pair order via
  // fin_o (free until the tile loop, where it holds each warp's turned query).
  for (int i = tid; i < 510; i += NT) {
    table[i] = codebook[i];
  }
  for (int i = tid; i < RKMAX; i += NT) {
    if (KCOL4) {
      kcol4[i] = vx_key_column4(kbits[h * RKMAX + i], kshift[h * RKMAX + i]);
    } else {
      kcol[i] = vx_key_column(kbits[h * RKMAX + i], kshift[h * RKMAX + i]);
    }
  }
  for (int i = tid; i < (KPAIR ? RKMAX / 2 : 0); i += NT) {
    const int* kp = kpair + (h * (RKMAX / 2) + i) * 4;
    kpair4[i] = make_int4(kp[0], kp[1], kp[2], kp[3]);
  }
  for (int i = tid; i < ROT_ROWS * (D / 2); i += NT) {
    const int r = i / (D / 2);
    const int p = i - r * (D / 2);
    const float2 u = vx_sincos((float)r * rope[p]);
    rot_s[r * RS + p] = make_float2(u.y, u.x);
    if (r == 0) {
      if (ROT_ROWS == 8) {
        const float2 u8 = vx_sincos(8.0f * rope[p]);
        rot8_s[p] = make_float2(u8.y, u8.x);
      }
      if (TP == 2) {
        const float2 u16 = vx_sincos(16.0f * rope[p]);
        rot16_s[p] = make_float2(u16.y, u16.x);
      }
      mean_s[p] = make_float2(key_mean[h * D + 2 * p], key_mean[h * D + 2 * p + 1]);
    }
  }
  for (int i = tid; i < G * D; i += NT) {
    fin_o[0][i] = static_cast<float>(q[bh * G * D + i]) * params[0];
  }
  ph_s[warp][lane] = 0u;  // rows of absent query heads stay zero
  ph_s[warp][lane + 32] = 0u;
  if (tid < D) {
    perm_s[tid] = perm[tid];
  }
  VX_BARRIER();
  for (int i = tid; i < G * D; i += NT) {
    qs[i] = fin_o[0][i - i % D + perm_s[i % D]];
  }
  vx_cp_wait_prior();  // this thread's share of the basis (all groups but the tile's)
  VX_BARRIER();
  VX_STAMP(1);

  // BREG: the key basis's B fragments stay in this lane's registers for the whole split
  // (2 · D/8 · RKMAX/16 words: 64 at head_dim 64) instead of two loads per mma.
  unsigned int breg[BREG ? NTD : 1][BREG ? KS : 1][2];
  if (BREG && !exact_block) {
    for (int nt = 0; nt < (BREG ? NTD : 1); nt++) {
      for (int ks = 0; ks < (BREG ? KS : 1); ks++) {
        const int fb = ((h * NTD + nt) * KS + ks) * 64 + 2 * lane;
        breg[nt][ks][0] = bfrag[fb];
        breg[nt][ks][1] = bfrag[fb + 1];
      }
    }
  }
  // KPREG: this lane's key pairs (8 ks + tig, + 4) packed in registers for the split, so
  // that a tile's lookups wait on no load of kpair4 (Nsight Compute: the pairs' base test
  // was the kernel's most-sampled stall).
  unsigned int kpr[KPREG ? KS : 1][2];
  if (KPREG) {
    for (int ks = 0; ks < (KPREG ? KS : 1); ks++) {
      kpr[ks][0] = vx_pack_pair(kpair4[ks * 8 + tig]);
      kpr[ks][1] = vx_pack_pair(kpair4[ks * 8 + 4 + tig]);
    }
  }
  float qth[QP];  // θ and amplitude of this lane's RoPE pairs (lane, lane + 32, ...)
  float qamp[QP];
  for (int k = 0; k < QP; k++) {
    const int p = min(lane + 32 * k, D / 2 - 1);
    qth[k] = rope[p];
    qamp[k] = rope[D / 2 + p];
  }
  // (P·V)^T: this lane's C fragments, per 16-dim slice s: dims 16 s + gid and + 8 of
  // query heads 2 tig and 2 tig + 1.
  float vacc[NTD / 2][4];
  // Running max and sum per query head g (QMMA: of this lane's heads 2 tig and 2 tig + 1).
  constexpr int GR = G > 2 ? G : 2;
  float m_run[GR];
  float l_run[GR];
  for (int g = 0; g < GR; g++) {
    m_run[g] = -1e30f;
    l_run[g] = 0.0f;
  }
  for (int sl = 0; sl < NTD / 2; sl++) {
    for (int e = 0; e < 4; e++) {
      vacc[sl][e] = 0.0f;
    }
  }
  // The tile's key A fragments and per-token key scales (step 3). KEARLY: the next
  // tile's are decoded once this tile's scores are done, so that their shared-memory
  // load chains overlap the softmax and the values instead of starting the next tile.
  unsigned int afrag[TP][KS][4];
  float ts0[TP];
  float ts1[TP];
  auto tile_keys = [&](int b) {  // from the codes in buffer b
#pragma unroll
    for (int tp = 0; tp < TP; tp++) {
      const VX_HALF_T* kts = reinterpret_cast<const VX_HALF_T*>(kts_s[warp][b] + tp * 8);
      ts0[tp] = KTS ? VX_HALF(kts[gid]) : 1.0f;
      ts1[tp] = KTS ? VX_HALF(kts[gid + 8]) : 1.0f;
      vx_key_fragments<KS, KPAIR != 0, KCOL4, KPREG, KPALL>(
          afrag[tp], kw_s + (warp * 2 + b) * KWT + tp * 16 * WKS, wk, kcol4, kcol, kpair4,
          ptab_s, table, gid, tig, kpr);
    }
  };
  if (KEARLY && start + warp * 16 * TP < stop) {
    vx_cp_wait_all();  // the first tile's codes
    __syncwarp();
    tile_keys(buf);
  }
  // Whole 16-token tiles are copied (the buffers' capacity is a multiple of 16; rows past
  // the last token are masked below).
  for (int t0 = start + warp * 16 * TP; t0 < stop; t0 += STEP) {
    if (t0 + STEP < stop) {
      stage(buf ^ 1, bh * cap + t0 + STEP);
    }
    vx_cp_commit();
    vx_cp_wait_prior();
    __syncwarp();
    const unsigned int* vw_t = vw_s + (warp * 2 + buf) * VWT;  // (the first tile's)
    const VX_HALF_T* vsc_t = reinterpret_cast<const VX_HALF_T*>(vsc_s[warp][buf]);
    const VX_HALF_T* vbi_t = reinterpret_cast<const VX_HALF_T*>(vbi_s[warp][buf]);
    // 2. The query turned by -P0·θ (and scaled by the RoPE amplitude), per warp.
    float* qw = fin_o[warp];
    const float p0 = (float)(pos0 + t0);
    for (int k = 0; k < QP; k++) {
      const int p = lane + 32 * k;
      if (p < D / 2) {
        const float2 u = vx_sincos_fast(p0 * qth[k]);
        const float cs = qamp[k] * u.y;
        const float sn = qamp[k] * u.x;
        for (int g = 0; g < G; g++) {
          const float2 qq = reinterpret_cast<const float2*>(qs)[(g * D) / 2 + p];
          reinterpret_cast<float2*>(qw)[(g * QWS) / 2 + p] =
              make_float2(qq.x * cs + qq.y * sn, qq.y * cs - qq.x * sn);
        }
      }
    }
    // 3. Key coefficients of tokens gid and gid + 8 -> A fragments (fp16), with their
    // per-token scales (KEARLY: decoded in the previous tile's iteration).
    if (!KEARLY) {
      tile_keys(buf);
    }
    __syncwarp();  // the turned query is read across the warp
    // 4. Keys of 8 dims at a time on tensor cores; token scale, mean, RoPE by r·θ and
    // scores in registers. QMMA: the scores S (16 tokens x 8 query heads) = K · Q^T on
    // tensor cores too — two slices' keys (C fragments: rows gid, gid + 8, columns 2 tig,
    // +1) are one k16 A fragment, and the query heads (rows >= G zero) the B fragment.
    float s0[G];
    float s1[G];
    for (int g = 0; g < G; g++) {
      s0[g] = 0.0f;
      s1[g] = 0.0f;
    }
    float sc[TP][4];  // QMMA: each tile's S C fragment
    unsigned int ka[TP][2];  // QMMA: the even slice's half of each tile's A fragment
#pragma unroll
    for (int tp = 0; tp < TP; tp++) {
      for (int e = 0; e < 4; e++) {
        sc[tp][e] = 0.0f;
      }
      ka[tp][0] = ka[tp][1] = 0u;
    }
    const float2* qw2 = reinterpret_cast<const float2*>(qw);
#pragma unroll UNROLL_NT
    for (int nt = 0; nt < NTD; nt++) {
      float cc[TP][4];
#pragma unroll
      for (int tp = 0; tp < TP; tp++) {
        for (int e = 0; e < 4; e++) {
          cc[tp][e] = 0.0f;
        }
      }
      for (int ks = 0; ks < KS; ks++) {
        const int fb = (nt * KS + ks) * 64 + 2 * lane;
        unsigned int b0, b1;
        if (BREG) {
          b0 = breg[BREG ? nt : 0][BREG ? ks : 0][0];
          b1 = breg[BREG ? nt : 0][BREG ? ks : 0][1];
        } else if (SBASIS) {  // one 8-byte load (dyn_s is 16-byte aligned for cp.async)
          const uint2 bs = *reinterpret_cast<const uint2*>(bfrag_s + fb);
          b0 = bs.x;
          b1 = bs.y;
        } else {  // two 4-byte loads: bfrag's alignment is not checked here
          b0 = bfrag[h * BFW + fb];
          b1 = bfrag[h * BFW + fb + 1];
        }
#pragma unroll
        for (int tp = 0; tp < TP; tp++) {  // (TP 2: one basis fragment, two tiles)
          vx_mma_16816(cc[tp][0], cc[tp][1], cc[tp][2], cc[tp][3], afrag[tp][ks][0],
                       afrag[tp][ks][1], afrag[tp][ks][2], afrag[tp][ks][3], b0, b1);
        }
      }
      const int p = nt * 4 + tig;  // columns (2p, 2p + 1) are a RoPE pair
      const float2 m = mean_s[p];
      float2 u0 = rot_s[gid * RS + p];  // (cos, sin) of gid·θ
      float2 u1;  // of (gid + 8)·θ
      if (ROT_ROWS == 16) {
        u1 = rot_s[(gid + 8) * RS + p];
      } else {
        const float2 u8 = rot8_s[p];
        u1 = make_float2(u0.x * u8.x - u0.y * u8.y, u0.x * u8.y + u0.y * u8.x);
      }
#pragma unroll
      for (int tp = 0; tp < TP; tp++) {
        if (tp == 1) {  // the second tile's rows are 16 further: turn by 16·θ more
          const float2 v = rot16_s[TP == 2 ? p : 0];
          u0 = make_float2(u0.x * v.x - u0.y * v.y, u0.x * v.y + u0.y * v.x);
          u1 = make_float2(u1.x * v.x - u1.y * v.y, u1.x * v.y + u1.y * v.x);
        }
        const float a0 = cc[tp][0] * ts0[tp] + m.x, b0 = cc[tp][1] * ts0[tp] + m.y;
        const float a1 = cc[tp][2] * ts1[tp] + m.x, b1 = cc[tp][3] * ts1[tp] + m.y;
        const float k0a = a0 * u0.x - b0 * u0.y;
        const float k0b = a0 * u0.y + b0 * u0.x;
        const float k1a = a1 * u1.x - b1 * u1.y;
        const float k1b = a1 * u1.y + b1 * u1.x;
        if (QMMA) {
          if ((nt & 1) == 0) {
            ka[tp][0] = vx_pack_half2(k0a, k0b);
            ka[tp][1] = vx_pack_half2(k1a, k1b);
          } else {  // B: query head gid at pairs p - 4 (k rows 2 tig, +1) and p (+8, +9)
            const float2 qa =
                gid < G ? qw2[(gid * QWS) / 2 + p - 4] : make_float2(0.0f, 0.0f);
            const float2 qb = gid < G ? qw2[(gid * QWS) / 2 + p] : make_float2(0.0f, 0.0f);
            vx_mma_16816(sc[tp][0], sc[tp][1], sc[tp][2], sc[tp][3], ka[tp][0], ka[tp][1],
                         vx_pack_half2(k0a, k0b), vx_pack_half2(k1a, k1b),
                         vx_pack_half2(qa.x, qa.y), vx_pack_half2(qb.x, qb.y));
          }
          continue;
        }
        for (int g = 0; g < G; g++) {
          const float2 qq = qw2[(g * QWS) / 2 + p];
          s0[g] += qq.x * k0a + qq.y * k0b;
          s1[g] += qq.x * k1a + qq.y * k1b;
        }
      }
    }
    // The values' A fragments (step 6), dequantised here with VEARLY: independent of the
    // softmax's shuffle and exp chains below, so the warp has work while those wait (held
    // in registers across them). 4-bit codes: a token's dims 16 s + gid and + 8 are nibble
    // gid of its words 2 s and 2 s + 1; one PRMT puts two tokens' bytes gid / 2 side by
    // side, and the nibble (low or high by gid's parity) becomes the mantissa of 1024 + c
    // or 64 + c.
    const unsigned int nib_sel = (gid >> 1) | ((4 + (gid >> 1)) << 8);
    const unsigned int nib_mask = (gid & 1) ? 0x00F000F0u : 0x000F000Fu;
    const unsigned int nib_magic = (gid & 1) ? 0x54005400u : 0x64006400u;
    unsigned int va_early[VEARLY ? NTD / 2 : 1][4];
    if (VEARLY) {
#pragma unroll
      for (int sl = 0; sl < (VEARLY ? NTD / 2 : 1); sl++) {
        vx_value_slice<VB, VW, VWS, NG, VG>(va_early[sl], sl, vw_t, vsc_t, vbi_t, gid, tig,
                                            nib_sel, nib_mask, nib_magic);
      }
    }
    if (KEARLY && t0 + STEP < stop) {  // the next tile's keys (its codes: buffer buf ^ 1)
      vx_cp_wait_all();
      __syncwarp();
      tile_keys(buf ^ 1);
    }
#pragma unroll
    for (int tp = 0; tp < TP; tp++) {  // each tile's softmax and values in turn
      // 5. Scores summed over the quad, masked past n; online softmax per query head
      // (vx_softmax_tile: probabilities rounded to fp16 before they are summed).
      const int n = min(16, stop - t0 - 16 * tp);
      if (TP > 1 && n <= 0) {  // (warp-uniform: a pair's second tile past the split)
        break;
      }
      const unsigned int* vw = vw_t + tp * 16 * VWS;
      const VX_HALF_T* vsc = vsc_t + tp * 2 * SBW;
      const VX_HALF_T* vbi = vbi_t + tp * 2 * SBW;
      const float sc0 = sc[tp][0], sc1 = sc[tp][1], sc2 = sc[tp][2], sc3 = sc[tp][3];
      const bool ok0 = gid < n;
      const bool ok1 = gid + 8 < n;
      // The rescales of query heads 2 tig and 2 tig + 1: this lane's columns of (P·V)^T.
      float r_pair[2] = {1.0f, 1.0f};
      VX_HALF_T* ph = reinterpret_cast<VX_HALF_T*>(ph_s[warp]);
      if (QMMA) {
        // Lane (gid, tig) holds the scores of tokens gid and gid + 8 for query heads 2 tig
        // and 2 tig + 1: each lane runs the softmax of its two heads (columns past G are
        // zero scores, never written), maxima and sums over the 8 lanes of a column.
        // LAZY: the sums stay per lane (see vx_softmax_tile_lane), and the maxima move only
        // when a score of the warp passes its head's by the margin (the first tile's do).
        const bool grow = !LAZY || VX_ANY(max(ok0 ? sc0 : -1e30f, ok1 ? sc2 : -1e30f) >
                                              m_run[0] + VX_LAZY_MARGIN ||
                                          max(ok0 ? sc1 : -1e30f, ok1 ? sc3 : -1e30f) >
                                              m_run[1] + VX_LAZY_MARGIN);
        for (int e = 0; e < 2; e++) {
          const int hd = 2 * tig + e;
          float pa, pb;
          const float a = ok0 ? (e ? sc1 : sc0) : -1e30f;
          const float b = ok1 ? (e ? sc3 : sc2) : -1e30f;
          r_pair[e] = LAZY ? vx_softmax_tile_lane(a, b, grow, m_run[e], l_run[e], pa, pb)
                           : vx_softmax_tile(a, b, m_run[e], l_run[e], pa, pb);
          if (hd < G) {
            ph[hd * 16 + gid] = VX_TO_HALF(pa);
            ph[hd * 16 + gid + 8] = VX_TO_HALF(pb);
          }
        }
      }
      for (int g = 0; g < (QMMA ? 0 : G); g++) {
        float a = s0[g];
        float b = s1[g];
        a += VX_SHFL_XOR(a, 1);
        a += VX_SHFL_XOR(a, 2);
        b += VX_SHFL_XOR(b, 1);
        b += VX_SHFL_XOR(b, 2);
        float pa, pb;
        const float r = vx_softmax_tile(ok0 ? a : -1e30f, ok1 ? b : -1e30f, m_run[g], l_run[g],
                                        pa, pb);
        r_pair[0] = g == 2 * tig ? r : r_pair[0];
        r_pair[1] = g == 2 * tig + 1 ? r : r_pair[1];
        if (tig == 0) {
          ph[g * 16 + gid] = VX_TO_HALF(pa);
          ph[g * 16 + gid + 8] = VX_TO_HALF(pb);
        }
      }
      __syncwarp();
      // 6. Values: (P·V)^T (16 dims x 8 query heads) += V^T (16 dims x 16 tokens) · P^T
      // per 16-dim slice on tensor cores: P^T is the B fragment (column g = query head g;
      // columns past G are zero), and lane (gid, tig) dequantises dims 16 s + gid and + 8
      // of tokens 2 tig, +1, +8, +9 (mx.quantize's little-endian bit stream) into its A
      // fragment: as rows of P · V, rows 8-15 of the product would be wasted and a lane's
      // row would be a head whose rescale another lane holds.
      const unsigned int pb0 = ph_s[warp][gid * 8 + tig];
      const unsigned int pb1 = ph_s[warp][gid * 8 + 4 + tig];
#pragma unroll UNROLL_V
      for (int sl = 0; sl < NTD / 2; sl++) {
        unsigned int va[4];
        if (VEARLY) {
          for (int u = 0; u < 4; u++) {
            va[u] = va_early[VEARLY ? sl : 0][u];
          }
        } else {
          vx_value_slice<VB, VW, VWS, NG, VG>(va, sl, vw, vsc, vbi, gid, tig, nib_sel,
                                              nib_mask, nib_magic);
        }
        vacc[sl][0] *= r_pair[0];
        vacc[sl][1] *= r_pair[1];
        vacc[sl][2] *= r_pair[0];
        vacc[sl][3] *= r_pair[1];
        vx_mma_16816(vacc[sl][0], vacc[sl][1], vacc[sl][2], vacc[sl][3], va[0], va[1], va[2],
                     va[3], pb0, pb1);
      }
      __syncwarp();
    }
    buf ^= 1;
  }
  VX_STAMP(2);
  // 7. Merge the warps' partials into the split's (block 0 has none).
  if (!exact_block) {
    if (LAZY) {  // the heads' sums over their columns' 8 lanes
      for (int e = 0; e < 2; e++) {
        l_run[e] = vx_column_sum(l_run[e]);
      }
    }
    for (int g = 0; g < G; g++) {
      // (QMMA: head g's running max and sum are lane (0, g / 2)'s, entry g % 2.)
      if (QMMA ? lane == g / 2 : lane == 0) {
        fin_m[warp][g] = m_run[QMMA ? g % 2 : g];
        fin_l[warp][g] = l_run[QMMA ? g % 2 : g];
      }
    }
    for (int e = 0; e < 2; e++) {
      const int hd = 2 * tig + e;
      if (hd < G) {
        for (int sl = 0; sl < NTD / 2; sl++) {
          fin_o[warp][hd * D + sl * 16 + gid] = vacc[sl][e];
          fin_o[warp][hd * D + sl * 16 + gid + 8] = vacc[sl][2 + e];
        }
      }
    }
    VX_BARRIER();
    for (int i = tid; i < G * D; i += NT) {
      const int g = i / D;
      const int d = i - g * D;
      float top = -1e30f;
      for (int w = 0; w < NW; w++) {
        top = max(top, fin_m[w][g]);
      }
      float o = 0.0f;
      float l = 0.0f;
      for (int w = 0; w < NW; w++) {
        const float f = vx_exp(fin_m[w][g] - top);
        o += f * fin_o[w][i];
        l += f * fin_l[w][g];
      }
      const int slot = (bh * n_splits + split) * G + g;
      out[slot * D + d] = o;
      if (d == 0) {
        out_max[slot] = top;
        out_sum[slot] = l;
      }
    }
  }
  // 8. The exact tokens (sinks, the uncoded tail) are one more partial, block 0's
  // (computed while the others walk their tiles); the last of the n_splits + 1 blocks to
  // arrive merges every split with it and normalises: one launch per decode step.
  // ``counter`` counts the arrivals and is zero before and after every launch (the last
  // block resets it).
  const int E = cmeta[0];
  const int EC = cmeta[1];  // the exact buffers' capacity (tokens per head)
  // The merge's scratch lives in the key tile buffers (dead by now) where it fits.
  constexpr int MERGE_WORDS = G * MAXE + G * MAXS + 2 * G;
  constexpr bool MERGE_IN_TILES = MERGE_WORDS <= NW * 2 * KWT;
  VX_SHARED float merge_s[MERGE_IN_TILES ? 1 : MERGE_WORDS];
  float* pexact = MERGE_IN_TILES ? reinterpret_cast<float*>(kw_s) : merge_s;
  float* wsplit = pexact + G * MAXE;
  float* head_total = wsplit + G * MAXS;
  float* wexact = head_total + G;
  if (exact_block) {
    // Exact tokens' scores: a thread per (head, token), all of its loads at once (the
    // query, scaled, from shared memory in pair order; the key's dims in that order).
    for (int i = tid; i < G * E; i += NT) {
      const int g = i / E;
      const int e = i - g * E;
      const T* ke = ek + (bh * EC + e) * D;
      float sc = 0.0f;
#pragma unroll
      for (int j = 0; j < D; j++) {
        sc += qs[g * D + j] * static_cast<float>(ke[perm_s[j]]);
      }
      pexact[g * MAXE + e] = sc;
    }
    VX_BARRIER();
    // Per head (a warp each): the largest exact score, each token's weight relative to
    // it, and their sum.
    for (int g = warp; g < G; g += NW) {
      float pe[(MAXE + 31) / 32];
      float top = -1e30f;
      for (int k = 0; k < (MAXE + 31) / 32; k++) {
        const int e = lane + 32 * k;
        pe[k] = e < E ? pexact[g * MAXE + e] : -1e30f;
        top = max(top, pe[k]);
      }
      top = vx_warp_max(top);
      float sum = 0.0f;
      for (int k = 0; k < (MAXE + 31) / 32; k++) {
        const int e = lane + 32 * k;
        const float w = vx_exp(pe[k] - top);
        if (e < E) {
          pexact[g * MAXE + e] = w;
          sum += w;
        }
      }
      sum = vx_warp_sum(sum);
      if (lane == 0) {
        ex_max[bh * G + g] = top;
        ex_sum[bh * G + g] = sum;
      }
    }
    VX_BARRIER();
    // Their values (thread d, every head at once).
    if (tid < D) {
      float ex[G];
      for (int g = 0; g < G; g++) {
        ex[g] = 0.0f;
      }
      const T* vd = ev + bh * EC * D + tid;
#pragma unroll 8
      for (int e = 0; e < E; e++) {
        const float v = static_cast<float>(vd[e * D]);
        for (int g = 0; g < G; g++) {
          ex[g] += pexact[g * MAXE + e] * v;
        }
      }
      for (int g = 0; g < G; g++) {
        ex_out[(bh * G + g) * D + tid] = ex[g];
      }
    }
  }
  VX_SHARED int is_last;
  VX_STAMP(3);
  vx_threadfence();
  VX_BARRIER();
  if (tid == 0) {
    is_last = atomicAdd(const_cast<int*>(counter) + bh, 1) == n_splits;
  }
  VX_BARRIER();
  if (!is_last) {
    return;
  }
  VX_STAMP(4);
  vx_threadfence();
  VX_STAMP(5);  // (the exact tokens' scores were here before they moved to block 0)
  // Per head (a warp each): the largest maximum, then every split's and the exact
  // tokens' weight relative to it, and their sums — every load issued at once.
  for (int g = warp; g < G; g += NW) {
    const int base = bh * n_splits * G + g;
    float ms[MAXS / 32];
    float ls[MAXS / 32];
    const float me = vx_ld_cg(ex_max + bh * G + g);
    const float le = vx_ld_cg(ex_sum + bh * G + g);
    float top = me;
    for (int k = 0; k < MAXS / 32; k++) {
      const int s = lane + 32 * k;
      ms[k] = s < n_splits ? vx_ld_cg(out_max + base + s * G) : -1e30f;
      ls[k] = s < n_splits ? vx_ld_cg(out_sum + base + s * G) : 0.0f;
      top = max(top, ms[k]);
    }
    top = vx_warp_max(top);
    float coded_sum = 0.0f;
    for (int k = 0; k < MAXS / 32; k++) {
      const int s = lane + 32 * k;
      const float w = vx_exp(ms[k] - top);
      coded_sum += w * ls[k];
      if (s < n_splits) {
        wsplit[g * MAXS + s] = w;
      }
    }
    coded_sum = vx_warp_sum(coded_sum);
    if (lane == 0) {
      const float we = vx_exp(me - top);
      wexact[g] = we;
      head_total[g] = coded_sum + we * le;
    }
  }
  VX_BARRIER();
  VX_STAMP(6);
  // The coded tokens' output: every split's partial weighted and summed, four dims per
  // load, ML loads in flight per thread; with few output chunks, PH threads share a
  // chunk's splits (summed below).
  constexpr int CH = G * D / 4;
  constexpr int PH = NT / CH >= 4 ? 4 : (NT / CH >= 1 ? NT / CH : 1);
  float* merged = &fin_o[0][0];  // PH x G x D (the warps' partials are dead)
  for (int i = tid; i < CH * PH; i += NT) {
    const int c = i % CH;
    const int ph_ = i / CH;
    const int g = 4 * c / D;
    const float4* src = reinterpret_cast<const float4*>(out + bh * n_splits * G * D) + c;
    float4 acc4[ML];
    for (int u = 0; u < ML; u++) {
      acc4[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    int s = ph_;
    for (; s + (ML - 1) * PH < n_splits; s += ML * PH) {
      for (int u = 0; u < ML; u++) {
        const float w = wsplit[g * MAXS + s + u * PH];
        const float4 x = vx_ld_cg4(src + (s + u * PH) * CH);
        acc4[u].x += w * x.x;
        acc4[u].y += w * x.y;
        acc4[u].z += w * x.z;
        acc4[u].w += w * x.w;
      }
    }
    for (; s < n_splits; s += PH) {
      const float w = wsplit[g * MAXS + s];
      const float4 x = vx_ld_cg4(src + s * CH);
      acc4[0].x += w * x.x;
      acc4[0].y += w * x.y;
      acc4[0].z += w * x.z;
      acc4[0].w += w * x.w;
    }
    for (int u = 1; u < ML; u++) {
      acc4[0].x += acc4[u].x;
      acc4[0].y += acc4[u].y;
      acc4[0].z += acc4[u].z;
      acc4[0].w += acc4[u].w;
    }
    merged[ph_ * G * D + 4 * c] = acc4[0].x;
    merged[ph_ * G * D + 4 * c + 1] = acc4[0].y;
    merged[ph_ * G * D + 4 * c + 2] = acc4[0].z;
    merged[ph_ * G * D + 4 * c + 3] = acc4[0].w;
  }
  VX_BARRIER();
  if (PH > 1) {
    for (int i = tid; i < G * D; i += NT) {
      float o = merged[i];
      for (int p = 1; p < PH; p++) {
        o += merged[p * G * D + i];
      }
      merged[i] = o;
    }
    VX_BARRIER();
  }
  VX_STAMP(7);
  // The output, a warp per query head (lane: dims lane, lane + 32, ...), in registers and
  // without block barriers: +vh values were coded as v·H/sqrt(D) (Sylvester Hadamard), so
  // the merged output turns back by a fast Walsh-Hadamard transform (butterflies of
  // stride below 32 across lanes by shuffles, the rest between a lane's own dims);
  // 1/sqrt(D) goes with the normalisation, and the exact partial, never rotated, is added
  // after it.
  constexpr int DL = (D + 31) / 32;
  for (int g = warp; g < G; g += NW) {
    float x[DL];
#pragma unroll
    for (int j = 0; j < DL; j++) {
      const int d = lane + 32 * j;
      x[j] = d < D ? merged[g * D + d] : 0.0f;
    }
    if (VHAD) {
#pragma unroll
      for (int len = 1; len < D && len < 32; len <<= 1) {
#pragma unroll
        for (int j = 0; j < DL; j++) {
          const float y = VX_SHFL_XOR(x[j], len);
          x[j] = (lane & len) ? y - x[j] : x[j] + y;
        }
      }
#pragma unroll
      for (int m = 1; m < DL; m <<= 1) {
#pragma unroll
        for (int j = 0; j < DL; j++) {
          if ((j & m) == 0 && j + m < DL) {
            const float a = x[j];
            x[j] = a + x[j + m];
            x[j + m] = a - x[j + m];
          }
        }
      }
    }
    const float back = VHAD ? 1.0f / sqrtf((float)D) : 1.0f;
    const float we = wexact[g];
    const float total_g = head_total[g];
#pragma unroll
    for (int j = 0; j < DL; j++) {
      const int d = lane + 32 * j;
      if (d < D) {
        const float o = x[j] * back + we * vx_ld_cg(ex_out + (bh * G + g) * D + d);
        result[(bh * G + g) * D + d] = static_cast<T>(o / total_g);
      }
    }
  }
  if (tid == 0) {
    const_cast<int*>(counter)[bh] = 0;
  }
  VX_STAMP(8);
"""

# Merge the splits' partials with the exact tokens (sinks, recent window) and
# normalise: one threadgroup of D threads per query head (D a power of two).
# Spectral values are rotated back here (coefficients -> dims, plus the mean).
# Template constants: D, G, HKV, MAXS (split capacity), MAXE (exact-token capacity),
# SPECV (spectral values). cmeta: exact tokens, rv, the exact buffers' capacity
# (splits: the partials' shape).
COMBINE_BODY = r"""
  const int bhg = blk_y;
  const int g = bhg % G;
  const int bh = bhg / G;
  const int h = bh % HKV;
  const int d = tid;
  const int S = out_max_shape[2];
  const int E = cmeta[0];
  const int rv = cmeta[1];
  const int EC = cmeta[2];
  const float qscale = params[0];
  VX_SHARED float wsplit[MAXS];
  VX_SHARED float pexact[MAXE];
  VX_SHARED float red[D];
  VX_SHARED float oc[D];
  const int base = (bh * S) * G + g;  // partial (split s) at base + s * G

  // Exact tokens' scores: one warp per token, lanes over dims.
  const int warp = tid / 32;
  const int lane = tid - warp * 32;
  for (int e = warp; e < E; e += D / 32) {
    float s = 0.0f;
    for (int i = lane; i < D; i += 32) {
      const float qi = static_cast<float>(q[(bh * G + g) * D + i]);
      s += qi * static_cast<float>(ek[(bh * EC + e) * D + i]);
    }
    for (int off = 16; off > 0; off >>= 1) {
      s += VX_SHFL_XOR(s, off);
    }
    if (lane == 0) {
      pexact[e] = s * qscale;
    }
  }
  VX_BARRIER();
  // Global max.
  float local = -1e30f;
  for (int s = tid; s < S; s += D) {
    local = max(local, out_max[base + s * G]);
  }
  for (int e = tid; e < E; e += D) {
    local = max(local, pexact[e]);
  }
  red[tid] = local;
  VX_BARRIER();
  for (int off = D / 2; off > 0; off >>= 1) {
    if (tid < off) {
      red[tid] = max(red[tid], red[tid + off]);
    }
    VX_BARRIER();
  }
  const float top = red[0];
  VX_BARRIER();
  // Weights and the coded tokens' total.
  local = 0.0f;
  for (int s = tid; s < S; s += D) {
    const float w = vx_exp(out_max[base + s * G] - top);
    wsplit[s] = w;
    local += w * out_sum[base + s * G];
  }
  for (int e = tid; e < E; e += D) {
    pexact[e] = vx_exp(pexact[e] - top);
  }
  red[tid] = local;
  VX_BARRIER();
  for (int off = D / 2; off > 0; off >>= 1) {
    if (tid < off) {
      red[tid] = red[tid] + red[tid + off];
    }
    VX_BARRIER();
  }
  const float coded_total = red[0];
  float total = coded_total;
  for (int e = 0; e < E; e++) {
    total += pexact[e];
  }
  // Coded tokens' output (in coefficient space for spectral values); four independent
  // sums keep four loads in flight (one chain of S dependent loads was ~40 us at S = 128).
  float o4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int s4 = 0;
  for (; s4 + 4 <= S; s4 += 4) {
    for (int u = 0; u < 4; u++) {
      o4[u] += wsplit[s4 + u] * out[(base + (s4 + u) * G) * D + d];
    }
  }
  for (; s4 < S; s4++) {
    o4[0] += wsplit[s4] * out[(base + s4 * G) * D + d];
  }
  float o = (o4[0] + o4[1]) + (o4[2] + o4[3]);
  if (SPECV) {
    oc[d] = o;
    VX_BARRIER();
    o = vmean[h * D + d] * coded_total;
    for (int m = 0; m < rv; m++) {
      o += oc[m] * vback[(h * rv + m) * D + d];
    }
  }
  for (int e = 0; e < E; e++) {
    o += pexact[e] * static_cast<float>(ev[(bh * EC + e) * D + d]);
  }
  result[(bh * G + g) * D + d] = static_cast<T>(o / total);
"""

# Quantise-and-pack arriving vectors: one threadgroup of D threads per token.
# Template constants: D, HKV, PRE (undo RoPE first), TS (per-token scale).
# position: a dummy whose length is the first token's position + 1; emeta: words per token.
# basis (HKV, D, D): rows in pair order (PRE) or original order, columns = coefficients.
ENCODE_BODY = r"""
  const int l = blk_x;
  const int bh = blk_y;
  const int h = bh % HKV;
  const int j = tid;
  const int L = x_shape[2];
  const int pos0 = position_shape[0] - 1;
  const int wout = emeta[0];
  VX_SHARED float xs[D];
  VX_SHARED float ys[D];
  VX_SHARED unsigned int codes[D];
  VX_SHARED float token_scale[1];

  xs[j] = static_cast<float>(x[(bh * L + l) * D + j]);
  VX_BARRIER();
  float k = xs[j];
  if (PRE) {
    const int i = j / 2;
    const float xa = xs[perm[2 * i]];
    const float xb = xs[perm[2 * i + 1]];
    const float2 sc = vx_sincos((float)(pos0 + l) * rope[i]);
    const float inv = 1.0f / rope[D / 2 + i];
    k = ((j & 1) == 0 ? xa * sc.y + xb * sc.x : xb * sc.y - xa * sc.x) * inv;
  }
  k -= mean[h * D + j];
  VX_BARRIER();
  xs[j] = k;
  VX_BARRIER();
  float y = 0.0f;
  for (int d = 0; d < D; d++) {
    y += basis[(h * D + d) * D + j] * xs[d];
  }
  ys[j] = y;
  VX_BARRIER();
  float ts = 1.0f;
  if (TS) {
    if (j == 0) {
      float ss = 0.0f;
      for (int d = 0; d < D; d++) {
        ss += ys[d] * ys[d];
      }
      const float ratio = sqrt(ss / (float)D) / rms[h];
      token_scale[0] = VX_ROUND_HALF(min(max(ratio, ts_clamp[0]), ts_clamp[1]));
    }
    VX_BARRIER();
    ts = token_scale[0];
  }
  const int b = bits[h * D + j];
  unsigned int code = 0u;
  if (b > 0) {
    const float u = y / ts;
    const float s = scale[h * D + j];
    const int base = (1 << b) - 2;
    int lo = 0;
    int hi = (1 << b) - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      const float th = 0.5f * (codebook[base + mid - 1] + codebook[base + mid]) * s;
      if (u >= th) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    code = (unsigned int)lo;
  }
  codes[j] = code;
  VX_BARRIER();
  if (j < wout) {
    unsigned int word = 0u;
    for (int m = 0; m < D; m++) {
      const int bm = bits[h * D + m];
      if (bm > 0) {
        const int st = shift[h * D + m];
        const int w = st >> 5;
        const int o = st & 31;
        if (w == j) {
          word |= codes[m] << o;
        } else if (w + 1 == j && o + bm > 32) {
          word |= codes[m] >> (32 - o);
        }
      }
    }
    out_words[(bh * L + l) * wout + j] = word;
  }
  if (TS && j == 0) {
    out_scale[bh * L + l] = VX_TO_HALF(ts);
  }
"""

# Entropy-coded keys (veloxcore.entropy, one rANS lane per block): one thread per
# stream, i.e. per block of BLK tokens of one KV head (the cache's short first block, of
# `first` tokens, included), decoding its T·D symbols in order into coefficients.
# Template constants: D, HKV, BLK (tokens per block), HEADER (bytes before the words),
# SPAN (index offset of symbols), PBITS (probability bits), NT (threads per group).
# codes (B, HKV, L, W) uint8 from the first coded position; tindex (HKV, 256, D): the
# table of each head, step code and dim; steps (HKV, 256): each step code's step (0 for
# the all-zero code); slot_step / slot_symbol: the tables' per-slot decode entries
# (CodeTables); emeta: tokens of the short first block (0: none). status: per stream,
# 0 when it ended in the encoder's initial state within its words, else 1.
ENTROPY_DECODE_BODY = r"""
  const int s = blk_x * NT + tid;
  const int BH = codes_shape[0] * codes_shape[1];
  const int L = codes_shape[2];
  const int W = codes_shape[3];
  const int first = emeta[0];
  const int lead = first > 0 ? 1 : 0;
  const int n_blocks = lead + (L - first) / BLK;
  if (s < BH * n_blocks) {
    const int bh = s / n_blocks;
    const int j = s - bh * n_blocks;
    const int h = bh % HKV;
    const int t0 = j < lead ? 0 : first + (j - lead) * BLK;
    const int T = j < lead ? first : BLK;
    const int row = (bh * L + t0) * W;
    const int n_words = (T * W - HEADER) / 2;
    const int g = (int)codes[row];
    unsigned int x = (unsigned int)codes[row + 1] | ((unsigned int)codes[row + 2] << 8)
                     | ((unsigned int)codes[row + 3] << 16)
                     | ((unsigned int)codes[row + 4] << 24);
    const float step = steps[h * 256 + g];
    const int tables = (h * 256 + g) * D;
    const unsigned int mask = (1u << PBITS) - 1u;
    const int out0 = (bh * L + t0) * D;
    // The loop is one chain of dependent table loads (a step's slot is the previous
    // step's state): what does not depend on the state — the next step's table, the
    // next renormalisation word — is loaded a step ahead, off that chain. Past its words
    // (corrupt codes) a stream reads zeros; status reports it.
    int p = 0;
    unsigned int word = n_words > 0
        ? ((unsigned int)codes[row + HEADER] | ((unsigned int)codes[row + HEADER + 1] << 8))
        : 0u;
    unsigned int table = (unsigned int)tindex[tables] << PBITS;
    for (int i = 0; i < T * D; i++) {
      const unsigned int slot = table | (x & mask);
      table = (unsigned int)tindex[tables + ((i + 1) % D)] << PBITS;
      const unsigned int e = slot_step[slot];
      const int symbol = (int)slot_symbol[slot];
      x = (e >> PBITS) * (x >> PBITS) + (e & mask);
      if (x < 65536u) {
        x = (x << 16) | word;
        p++;
        const int at = row + HEADER + 2 * p;
        word = p < n_words
            ? ((unsigned int)codes[at] | ((unsigned int)codes[at + 1] << 8)) : 0u;
      }
      y[out0 + i] = (float)(symbol - SPAN) * step;
    }
    status[s] = (x == 65536u && p <= n_words) ? 0 : 1;
  }
"""

DECODE_INPUTS = ["q", "perm", "params", "coded", "layout", "basis_mma", "kwords", "ktok",
                 "kbits", "kshift", "kscale", "basis", "key_mean", "rope", "vwords", "vtok",
                 "vscales", "vbiases", "vbits", "vshift", "vscale", "codebook"]
DECODE_OUTPUTS = ["out", "out_max", "out_sum"]
DECODE_WARP_INPUTS = ["q", "perm", "params", "coded", "layout", "bfrag", "kwords", "ktok",
                      "kbits", "kshift", "key_mean", "rope", "vwords", "vscales",
                      "vbiases", "codebook", "kpair", "ptab", "ek", "ev", "cmeta", "counter",
                      "after"]
DECODE_WARP_OUTPUTS = ["partials", "result"]
COMBINE_INPUTS = ["q", "out", "out_max", "out_sum", "ek", "ev", "vback", "vmean", "params",
                  "cmeta"]
COMBINE_OUTPUTS = ["result"]
ENCODE_INPUTS = ["x", "perm", "rope", "mean", "basis", "rms", "ts_clamp", "bits", "shift",
                 "scale", "codebook", "position", "emeta"]
ENCODE_OUTPUTS = ["out_words", "out_scale"]


# Entropy coding of key coefficients (veloxcore.entropy.EntropyKeyCoder.encode_blocks):
# one warp per stream (a block of one KV head's tokens). Rate control as the host's: the
# finest step code g whose modelled cost (the tables' bits per index, summed over the
# warp) fits the block's words, by bisection over 0..ZERO; the block's indices at g are
# then coded by lane 0 in reverse (rANS), its words kept in the decoder's order, and a
# block whose words overflow is coded again one step coarser. Template constants as the
# decoder's, plus ALPH (symbols per table), ZERO (the all-zero step code), WIDTH (bytes per
# token) and MAXW (words of a whole block).
# y (B, HKV, L, D) float32 coefficients; cost (tables, ALPH) float32 bits; cum (tables,
# ALPH + 1) uint32 cumulative frequencies; support (tables,) int32 largest |index|.
# status: 0, or 1 where even the all-zero code did not fit (the host raises there).
ENTROPY_ENCODE_BODY = r"""
  VX_SHARED float ys[BLK * D];
  VX_SHARED unsigned short starts[BLK * D];
  VX_SHARED unsigned short freqs[BLK * D];
  VX_SHARED unsigned short words[MAXW];
  VX_SHARED unsigned int shared[3];  // the next step code (or ZERO + 1: none fits), count, x
  const int s = blk_x;
  const int lane = tid;
  const int L = y_shape[2];
  const int W = WIDTH;
  const int first = emeta[0];
  const int lead = first > 0 ? 1 : 0;
  const int n_blocks = lead + (L - first) / BLK;
  const int bh = s / n_blocks;
  const int j = s - bh * n_blocks;
  const int h = bh % HKV;
  const int t0 = j < lead ? 0 : first + (j - lead) * BLK;
  const int T = j < lead ? first : BLK;
  const int n = T * D;
  const int max_words = (T * W - HEADER) / 2;
  const float budget = (float)(16 * max_words - 16);
  for (int i = lane; i < n; i += 32) {
    ys[i] = y[(bh * L + t0) * D + i];
  }
  VX_BARRIER();
  int lo = 0;
  int hi = ZERO;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const float step = steps[h * 256 + mid];
    float spent = 0.0f;
    for (int i = lane; i < n; i += 32) {
      const int table = (int)tindex[(h * 256 + mid) * D + (i % D)];
      const float limit = (float)support[table];
      const float k = mid == ZERO ? 0.0f
          : min(max(VX_RINT(VX_DIV_RN(ys[i], step)), -limit), limit);
      spent += cost[table * ALPH + (int)k + SPAN];
    }
    for (int off = 16; off > 0; off >>= 1) {
      spent += VX_SHFL_XOR(spent, off);
    }
    if (spent <= budget) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  int g = lo;
  while (true) {
    const float step = steps[h * 256 + g];
    for (int i = lane; i < n; i += 32) {
      const int table = (int)tindex[(h * 256 + g) * D + (i % D)];
      const float limit = (float)support[table];
      const float k = g == ZERO ? 0.0f
          : min(max(VX_RINT(VX_DIV_RN(ys[i], step)), -limit), limit);
      const int at = table * (ALPH + 1) + (int)k + SPAN;
      const unsigned int start = cum[at];
      starts[i] = (unsigned short)start;
      freqs[i] = (unsigned short)(cum[at + 1] - start);
    }
    VX_BARRIER();
    if (lane == 0) {
      // Words leave in reverse; kept from the end of the buffer so that they end up in
      // the order the decoder reads them. Past max_words the block cannot fit: stop.
      unsigned int x = 65536u;
      int count = 0;
      for (int i = n - 1; i >= 0 && count <= max_words; i--) {
        const unsigned int f = (unsigned int)freqs[i];
        if (x >= (f << (32 - PBITS))) {
          count++;
          if (count <= max_words) {
            words[max_words - count] = (unsigned short)(x & 0xFFFFu);
          }
          x >>= 16;
        }
        x = ((x / f) << PBITS) + (x % f) + (unsigned int)starts[i];
      }
      shared[0] = (unsigned int)(count <= max_words ? g : g + 1);
      shared[1] = (unsigned int)count;
      shared[2] = x;
    }
    VX_BARRIER();
    const int next = (int)shared[0];
    VX_BARRIER();  // lane 0 may write shared again in the next round
    if (next == g || next > ZERO) {
      break;
    }
    g = next;
  }
  const int count = (int)shared[1];
  const unsigned int x = shared[2];
  const int row = (bh * L + t0) * W;
  for (int b = lane; b < T * W; b += 32) {
    unsigned int byte = 0u;
    if (b == 0) {
      byte = (unsigned int)g;
    } else if (b < HEADER) {
      byte = (x >> (8 * (b - 1))) & 0xFFu;
    } else {
      const int w = (b - HEADER) / 2;
      if (count <= max_words && w < count) {
        const unsigned int word = (unsigned int)words[max_words - count + w];
        byte = ((b - HEADER) & 1) ? (word >> 8) : (word & 0xFFu);
      }
    }
    out_codes[row + b] = (unsigned char)byte;
  }
  if (lane == 0) {
    status[s] = count <= max_words ? 0 : 1;
  }
"""

ENTROPY_DECODE_INPUTS = ["codes", "tindex", "steps", "slot_step", "slot_symbol", "emeta"]
ENTROPY_DECODE_OUTPUTS = ["y", "status"]
ENTROPY_ENCODE_INPUTS = ["y", "tindex", "steps", "support", "cost", "cum", "emeta"]
ENTROPY_ENCODE_OUTPUTS = ["out_codes", "status"]


def with_launch_bounds(header: str, source: str, threads: int, min_blocks: int):
    """(header, source) of a CUDA kernel compiled with ``__launch_bounds__(threads,
    min_blocks)``. MLX writes the signature itself (``__global__ void <name>(``, the name
    carrying a hash of the template arguments), so the header redefines ``__global__``
    (NVRTC's is ``__location__(global)``) for that one declaration and the body restores
    it; ``__global__ __launch_bounds__(…) void f(…)`` is CUTLASS's spelling."""
    bounds = (f"#undef __global__\n#define __global__ __location__(global) "
              f"__launch_bounds__({threads}, {min_blocks})\n")
    restore = "\n#undef __global__\n#define __global__ __location__(global)\n"
    return header + bounds, source + restore


def kernel_text(backend: str, body: str) -> tuple[str, str]:
    """(header, source) of a kernel body for "cuda" or "metal"."""
    if backend == "cuda":
        return (CUDA_HEADER + COMMON_HELPERS + CUDA_MMA + CUDA_KEYS + CUDA_STAGE,
                CUDA_PREAMBLE + body)
    if backend == "metal":
        return METAL_HEADER + COMMON_HELPERS, METAL_PREAMBLE + body
    raise ValueError(f"no kernel text for backend {backend!r}")
