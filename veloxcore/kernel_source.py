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
- coefficient = unit_codebook[2^b − 2 + code] · kscale[h, m] (· token scale).
- pre-RoPE keys: k = basis_t[h]ᵀ · c + mean, in "pair order" (dims permuted so
  each RoPE pair is adjacent), then rotated by pos·θ_i and scaled by amp_i.
- values: mlx ``mx.quantize`` words (bits VB, group VG, fp16 scales/biases), or
  spectral codes like the keys (then the output stays in coefficient space and
  is rotated back by the caller).
- outputs per split: unnormalised output (B, HKV, S, G, D), running max and sum
  (B, HKV, S, G), merged by the caller (flash-decoding).
"""

CUDA_HEADER = r"""
#define VX_SHARED __shared__
#define VX_BARRIER() __syncthreads()
#define VX_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define VX_HALF(x) __half2float(x)
#define VX_TO_HALF(x) __float2half(x)
#define VX_ROUND_HALF(x) __half2float(__float2half(x))
__device__ inline float vx_exp(float x) { return expf(x); }
__device__ inline float2 vx_sincos(float x) {
  float s, c;
  sincosf(x, &s, &c);
  return make_float2(s, c);
}
"""

CUDA_PREAMBLE = r"""
  const int tid = threadIdx.x;
  const int blk_x = blockIdx.x;
  const int blk_y = blockIdx.y;
"""

METAL_HEADER = r"""
#define VX_SHARED threadgroup
#define VX_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define VX_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define VX_HALF(x) float(x)
#define VX_TO_HALF(x) half(x)
#define VX_ROUND_HALF(x) float(half(x))
inline float vx_exp(float x) { return metal::precise::exp(x); }
inline float2 vx_sincos(float x) {
  float c;
  float s = metal::precise::sincos(x, c);
  return float2(s, c);
}
"""

METAL_PREAMBLE = r"""
  const int tid = (int)thread_position_in_threadgroup.x;
  const int blk_x = (int)threadgroup_position_in_grid.x;
  const int blk_y = (int)threadgroup_position_in_grid.y;
"""

# Decode attention over the coded tokens of one layer.
# Template constants: D (head dim), G (query heads per KV head), HKV, T (tokens per
# tile, T·D = 4096), NT (threads, 256), MC (basis rows per shared chunk, MC·D =
# 1024), ACC (accumulators per thread, ceil(G·D/NT)), PRE (pre-RoPE keys), KTS /
# VTS (per-token key / value scale), VAFF (affine values), VB, VG (their bits, group).
# meta: total coded tokens, position of the first, tokens per split, rk, wk, rv, wv,
# buffer capacity, number of splits.
DECODE_BODY = r"""
  const int split = blk_x;
  const int bh = blk_y;
  const int h = bh % HKV;
  const int total = meta[0];
  const int pos0 = meta[1];
  const int per_split = meta[2];
  const int rk = meta[3];
  const int wk = meta[4];
  const int rv = meta[5];
  const int wv = meta[6];
  const int cap = meta[7];
  const int n_splits = meta[8];
  const int start = split * per_split;
  const int stop = min(start + per_split, total);
  constexpr int RKP = D + 1;
  constexpr int DD = D / 4;

  VX_SHARED float table[510];
  VX_SHARED float tile[T * RKP];
  VX_SHARED float ubuf[MC * D];
  VX_SHARED unsigned int words[T * DD];
  VX_SHARED float scores[G * T];
  VX_SHARED float tok_scale[T];
  VX_SHARED float run_max[G];
  VX_SHARED float run_sum[G];
  VX_SHARED float rescale[G];

  for (int i = tid; i < 510; i += NT) {
    table[i] = codebook[i];
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
  float qreg[G][4];
  float theta[2];
  float amp[2];
  float kmean[4];
  if (PRE) {
    for (int g = 0; g < G; g++) {
      for (int j = 0; j < 4; j++) {
        qreg[g][j] = q[(bh * G + g) * D + dd * 4 + j];
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
    // Post-RoPE: the rotated query lives in ubuf for the whole kernel.
    for (int i = tid; i < G * D; i += NT) {
      ubuf[i] = q[bh * G * D + i];
    }
  }
  VX_BARRIER();

  for (int t0 = start; t0 < stop; t0 += T) {
    const int n = min(T, stop - t0);
    // 1. This tile's key words (and token scales) into shared memory.
    for (int i = tid; i < T * wk; i += NT) {
      const int t = i / wk;
      words[i] = t < n ? kwords[(bh * cap + t0 + t) * wk + (i - t * wk)] : 0u;
    }
    if (KTS) {
      for (int t = tid; t < T; t += NT) {
        tok_scale[t] = t < n ? VX_HALF(ktok[bh * cap + t0 + t]) : 0.0f;
      }
    }
    VX_BARRIER();
    // 2. Codes -> key coefficients.
    for (int i = tid; i < T * rk; i += NT) {
      const int t = i / rk;
      const int m = i - t * rk;
      const int b = kbits[h * rk + m];
      float c = 0.0f;
      if (b > 0) {
        const int sh = kshift[h * rk + m];
        const int w0 = t * wk + (sh >> 5);
        const int o = sh & 31;
        unsigned int code = words[w0] >> o;
        if (o + b > 32) {
          code |= words[w0 + 1] << (32 - o);
        }
        code &= (1u << b) - 1u;
        c = table[(1 << b) - 2 + (int)code] * kscale[h * rk + m];
        if (KTS) {
          c *= tok_scale[t];
        }
      }
      tile[t * RKP + m] = c;
    }
    VX_BARRIER();
    // 3. Scores of the G query heads against the tile.
    if (PRE) {
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
            scores[g * T + t] = t < n ? s : -1e30f;
          }
        }
      }
    } else {
      for (int i = tid; i < G * T; i += NT) {
        const int g = i / T;
        const int t = i - g * T;
        float s = qbias[bh * G + g];
        for (int m = 0; m < rk; m++) {
          s += ubuf[g * D + m] * tile[t * RKP + m];
        }
        scores[i] = t < n ? s : -1e30f;
      }
    }
    VX_BARRIER();
    // 4. Online softmax: one warp per query head.
    const int warp = tid / 32;
    const int lane = tid - warp * 32;
    for (int g = warp; g < G; g += NT / 32) {
      float tile_max = -1e30f;
      for (int t = lane; t < T; t += 32) {
        tile_max = max(tile_max, scores[g * T + t]);
      }
      for (int off = 16; off > 0; off >>= 1) {
        tile_max = max(tile_max, VX_SHFL_XOR(tile_max, off));
      }
      const float m_old = run_max[g];
      const float m_new = max(m_old, tile_max);
      float sum = 0.0f;
      for (int t = lane; t < T; t += 32) {
        const float p = vx_exp(scores[g * T + t] - m_new);
        scores[g * T + t] = p;
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
    for (int i = tid; i < T * wv; i += NT) {
      const int t = i / wv;
      words[i] = t < n ? vwords[(bh * cap + t0 + t) * wv + (i - t * wv)] : 0u;
    }
    if (VTS) {
      for (int t = tid; t < T; t += NT) {
        tok_scale[t] = t < n ? VX_HALF(vtok[bh * cap + t0 + t]) : 0.0f;
      }
    }
    VX_BARRIER();
    // 6. Codes -> values (or value coefficients) in the tile.
    for (int i = tid; i < T * rv; i += NT) {
      const int t = i / rv;
      const int d = i - t * rv;
      float v = 0.0f;
      if (t < n) {
        if (VAFF) {
          const int bit = d * VB;
          const unsigned int code = (words[t * wv + (bit >> 5)] >> (bit & 31)) & ((1u << VB) - 1u);
          const int gi = (bh * cap + t0 + t) * (D / VG) + d / VG;
          v = (float)code * VX_HALF(vscales[gi]) + VX_HALF(vbiases[gi]);
        } else {
          const int b = vbits[h * rv + d];
          if (b > 0) {
            const int sh = vshift[h * rv + d];
            const int w0 = t * wv + (sh >> 5);
            const int o = sh & 31;
            unsigned int code = words[w0] >> o;
            if (o + b > 32) {
              code |= words[w0 + 1] << (32 - o);
            }
            code &= (1u << b) - 1u;
            v = table[(1 << b) - 2 + (int)code] * vscale[h * rv + d];
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
          s += scores[g * T + t] * tile[t * RKP + d];
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

# Quantise-and-pack arriving vectors: one threadgroup of D threads per token.
# Template constants: D, HKV, PRE (undo RoPE first), TS (per-token scale).
# meta: tokens in the chunk, position of the first, words per token.
# basis (HKV, D, D): rows in pair order (PRE) or original order, columns = coefficients.
ENCODE_BODY = r"""
  const int l = blk_x;
  const int bh = blk_y;
  const int h = bh % HKV;
  const int j = tid;
  const int L = meta[0];
  const int pos0 = meta[1];
  const int wout = meta[2];
  VX_SHARED float xs[D];
  VX_SHARED float ys[D];
  VX_SHARED unsigned int codes[D];
  VX_SHARED float token_scale[1];

  xs[j] = x[(bh * L + l) * D + j];
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
      token_scale[0] = VX_ROUND_HALF(max(sqrt(ss / (float)D) / rms[h], 1e-6f));
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

DECODE_INPUTS = ["q", "qbias", "kwords", "ktok", "kbits", "kshift", "kscale", "basis",
                 "key_mean", "rope", "vwords", "vtok", "vscales", "vbiases", "vbits", "vshift",
                 "vscale", "codebook", "meta"]
DECODE_OUTPUTS = ["out", "out_max", "out_sum"]
ENCODE_INPUTS = ["x", "perm", "rope", "mean", "basis", "rms", "bits", "shift", "scale",
                 "codebook", "meta"]
ENCODE_OUTPUTS = ["out_words", "out_scale"]


def kernel_text(backend: str, body: str) -> tuple[str, str]:
    """(header, source) of a kernel body for "cuda" or "metal"."""
    if backend == "cuda":
        return CUDA_HEADER, CUDA_PREAMBLE + body
    if backend == "metal":
        return METAL_HEADER, METAL_PREAMBLE + body
    raise ValueError(f"no kernel text for backend {backend!r}")
