// int4 (w4a8) and int8 (w8a8) weights x dynamically quantized int8 activations, integer dot products
// (AVX512-VNNI). w4a8 first; w8a8 (the same activation rounding, int8 weights) further down.
//
// Why: torch's int4 CPU kernel turns the codes back into floats for every block of rows, so past 4 rows
// it is arithmetic-bound (benchmarks/QUANT.md 4b) and batch 8 costs ~3x batch 1. Here the activations of
// each row are quantized per group to int8 once per call, and each 64-byte weight vector (16 output
// channels x 8 inputs, two nibbles per byte) is unpacked once and multiplied into every row with
// vpdpbusd (u8 code x s8 activation -> int32): 64 multiply-adds per instruction, the weights read once.
// This is what llama.cpp's Q4 x Q8 dot products do.
//
// Math, per output channel n, row m, group g of G inputs (w = (q - 8) * s + z, codes q in 0..15):
//   sum_k w[n,k] x[m,k] ~= s[n,g] * sa[m,g] * sum_k q[n,k] qa[m,k] + (z[n,g] - 8 s[n,g]) * sum_k x[m,k]
// with qa = round(x * 127 / amax) (half to even), sa = amax / 127, amax = max |x| over the row's group.
// The integer sum is exact, and every float operation is a separate rounding in a fixed order (built
// with -ffp-contract=off: no fused multiply-adds): the groups' terms are added one group at a time, the
// sums of x one input at a time. stitchlib/quant.py's `w4a8_reference` does the same operations in pure
// torch, so the two agree bit for bit (tests/test_quant.py), whatever the row tiling and threads.
//
// Layouts (built by stitchlib/quant.py `pack_w4a8`):
//   qweight uint8 [N/16, K/8, 64]: byte c*4+t of vector (b, j) holds code[16b+c, 8j+t] in its low
//     nibble and code[16b+c, 8j+4+t] in its high nibble (c < 16, t < 4): the vpdpbusd operand layout.
//   sz      float or bfloat16 [N/16, K/G, 2, 16]: scales then zeros of the block's 16 channels.
// Without AVX512-VNNI (or another compiler target) the same loops run in scalar C++: same results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define W4A8_VNNI 1
#ifndef W4A8_PREFETCH
#define W4A8_PREFETCH 2048  // bytes ahead; 2048-4096 measured best on the dev machine (512: -25 %)
#endif
#else
#define W4A8_VNNI 0
#endif

namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Row m's activations -> int8 codes qa [K], per-group scale sa [K/G] and float sum asum [K/G]. Q =
// uint8_t stores qa + 128 (w8a8: vpdpbusd's unsigned operand is the activation there).
template <typename T, typename Q = int8_t>
void quantize_row(const T* x, int64_t K, int64_t G, Q* qa, float* sa, float* asum) {
  std::vector<float> buf(G);
  for (int64_t g = 0; g < K / G; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int64_t k = 0; k < G; ++k) {
      float v = to_float(x[g * G + k]);
      buf[k] = v;
      amax = std::max(amax, std::fabs(v));
      sum += v;
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t k = 0; k < G; ++k) {
      float r = std::nearbyint(buf[k] * inv);  // the default rounding mode: half to even, as torch.round
      r = std::min(127.f, std::max(-127.f, r));
      qa[g * G + k] = static_cast<Q>(static_cast<int>(r) + (std::is_same_v<Q, uint8_t> ? 128 : 0));
    }
    sa[g] = amax / 127.f;
    asum[g] = sum;
  }
}

template <typename S>
inline void load_scales(const S* p, float* s, float* zp) {  // p: [2, 16] of one group -> s, z - 8 s
  for (int c = 0; c < 16; ++c) {
    s[c] = to_float(p[c]);
    zp[c] = to_float(p[16 + c]) - 8.f * s[c];
  }
}

#if W4A8_VNNI
template <typename S>
inline void load_scales_v(const S* p, __m512& s, __m512& zp) {
  if constexpr (std::is_same_v<S, float>) {
    s = _mm512_loadu_ps(p);
    zp = _mm512_loadu_ps(p + 16);
  } else {  // bfloat16 -> float: the 16 bits are the float's high half
    __m256i sb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m256i zb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
    zp = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(zb), 16));
  }
  zp = _mm512_sub_ps(zp, _mm512_mul_ps(_mm512_set1_ps(8.f), s));  // z - 8 s
}

// NB channel blocks x MT rows: out[m, 16*(b0+i) + c] for i < NB, m < MT (fp32, ld = N).
// A tile's float sums: zero for the first K chunk, else what the previous chunks left in `out`.
template <int NB, int MT>
inline void start_sums(__m512 (&facc)[NB][MT], const float* out, int64_t m0, int64_t b0, int64_t N, bool first) {
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MT; ++m)
      facc[i][m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + (m0 + m) * N + (b0 + i) * 16);
}

// Groups [g0, g1) only (the caller walks K in chunks whose activations stay in L1); the first chunk
// (g0 == 0) starts the sums, the others add to what `out` holds.
template <int NB, int MT, typename S>
void tile_vnni(const uint8_t* qw, const S* sz, int64_t b0, int64_t K, int64_t G, const int8_t* qa,
               const float* sa, const float* asum, int64_t m0, float* out, int64_t N, int64_t g0, int64_t g1) {
  const int64_t KG = K / G, J = G / 8;  // groups per row, 64-byte vectors per group per block
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  __m512 facc[NB][MT];
  start_sums<NB, MT>(facc, out, m0, b0, N, g0 == 0);
  for (int64_t g = g0; g < g1; ++g) {
    __m512i iacc[NB][MT] = {};
    for (int64_t j = 0; j < J; ++j) {
      const int64_t k8 = g * J + j;  // which 8 inputs
      __m512i a_lo[MT], a_hi[MT];
      for (int m = 0; m < MT; ++m) {
        const int8_t* q = qa + (m0 + m) * K + k8 * 8;
        int32_t l, h;
        std::memcpy(&l, q, 4);
        std::memcpy(&h, q + 4, 4);
        a_lo[m] = _mm512_set1_epi32(l);
        a_hi[m] = _mm512_set1_epi32(h);
      }
      for (int i = 0; i < NB; ++i) {
        const uint8_t* wp = qw + ((b0 + i) * (K / 8) + k8) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + W4A8_PREFETCH, _MM_HINT_T0);  // overlap the stream with the dot products
        __m512i w = _mm512_loadu_si512(wp);
        __m512i wl = _mm512_and_si512(w, lo4);
        __m512i wh = _mm512_and_si512(_mm512_srli_epi16(w, 4), lo4);
        for (int m = 0; m < MT; ++m) {
          iacc[i][m] = _mm512_dpbusd_epi32(iacc[i][m], wl, a_lo[m]);
          iacc[i][m] = _mm512_dpbusd_epi32(iacc[i][m], wh, a_hi[m]);
        }
      }
    }
    for (int i = 0; i < NB; ++i) {
      __m512 s, zp;
      load_scales_v(sz + ((b0 + i) * KG + g) * 32, s, zp);
      for (int m = 0; m < MT; ++m) {
        const int64_t r = (m0 + m) * KG + g;
        __m512 ss = _mm512_mul_ps(s, _mm512_set1_ps(sa[r]));
        facc[i][m] = _mm512_add_ps(facc[i][m], _mm512_mul_ps(_mm512_cvtepi32_ps(iacc[i][m]), ss));
        facc[i][m] = _mm512_add_ps(facc[i][m], _mm512_mul_ps(zp, _mm512_set1_ps(asum[r])));
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MT; ++m) _mm512_storeu_ps(out + (m0 + m) * N + (b0 + i) * 16, facc[i][m]);
}
#endif

// The portable loop: one channel block, rows [m0, m0 + mt).
template <typename S>
void tile_scalar(const uint8_t* qw, const S* sz, int64_t b, int64_t K, int64_t G, const int8_t* qa,
                 const float* sa, const float* asum, int64_t m0, int64_t mt, float* out, int64_t N) {
  const int64_t KG = K / G, J = G / 8;
  for (int64_t m = m0; m < m0 + mt; ++m) {
    float acc[16] = {0};
    for (int64_t g = 0; g < KG; ++g) {
      int32_t iacc[16] = {0};
      for (int64_t j = 0; j < J; ++j) {
        const int64_t k8 = g * J + j;
        const uint8_t* w = qw + (b * (K / 8) + k8) * 64;
        const int8_t* q = qa + m * K + k8 * 8;
        for (int c = 0; c < 16; ++c)
          for (int t = 0; t < 4; ++t) {
            iacc[c] += (w[c * 4 + t] & 15) * q[t];
            iacc[c] += (w[c * 4 + t] >> 4) * q[4 + t];
          }
      }
      float s[16], zp[16];
      load_scales(sz + (b * KG + g) * 32, s, zp);
      const float sam = sa[m * KG + g], asm_ = asum[m * KG + g];
      for (int c = 0; c < 16; ++c) {
        acc[c] += static_cast<float>(iacc[c]) * (s[c] * sam);
        acc[c] += zp[c] * asm_;
      }
    }
    for (int c = 0; c < 16; ++c) out[m * N + b * 16 + c] = acc[c];
  }
}

#if W4A8_VNNI
template <int V>
using I = std::integral_constant<int, V>;

// Rows in tiles of up to 8 (one accumulator per row and channel block); few rows take more channel
// blocks at a time so that 8 independent vpdpbusd chains hide the instruction's latency. K in chunks of
// <= 16 KB of the tile's int8 activations (re-read for every channel block). For each piece:
// tile(I<NB>, I<MT>, first block, first row, first group, end group).
template <typename Tile>
void walk_tiles(int64_t b_begin, int64_t b_end, int64_t M, int64_t KG, int64_t G, Tile&& tile) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t mt = std::min<int64_t>(8, M - m0);
    const int64_t kc = std::max<int64_t>(1, (16384 / mt) / G);
    for (int64_t g0 = 0; g0 < KG; g0 += kc) {
      const int64_t g1 = std::min(KG, g0 + kc);
      int64_t b = b_begin;
      auto blocks = [&](auto nb, auto mtc) {
        for (; b + decltype(nb)::value <= b_end; b += decltype(nb)::value) tile(nb, mtc, b, m0, g0, g1);
        for (; b < b_end; ++b) tile(I<1>{}, mtc, b, m0, g0, g1);
      };
      switch (mt) {
        case 1: blocks(I<8>{}, I<1>{}); break;
        case 2: blocks(I<4>{}, I<2>{}); break;
        case 3: blocks(I<2>{}, I<3>{}); break;
        case 4: blocks(I<2>{}, I<4>{}); break;
        case 5: blocks(I<1>{}, I<5>{}); break;
        case 6: blocks(I<1>{}, I<6>{}); break;
        case 7: blocks(I<1>{}, I<7>{}); break;
        default: blocks(I<1>{}, I<8>{}); break;
      }
    }
    m0 += mt;
  }
}

template <typename S>
void blocks_vnni(const uint8_t* qw, const S* sz, int64_t b_begin, int64_t b_end, int64_t K, int64_t G,
                 const int8_t* qa, const float* sa, const float* asum, int64_t M, float* out, int64_t N) {
  walk_tiles(b_begin, b_end, M, K / G, G, [&](auto nb, auto mt, int64_t b, int64_t m0, int64_t g0, int64_t g1) {
    tile_vnni<decltype(nb)::value, decltype(mt)::value, S>(qw, sz, b, K, G, qa, sa, asum, m0, out, N, g0, g1);
  });
}
#endif

template <typename S>
void run_blocks(const uint8_t* qw, const S* sz, int64_t b_begin, int64_t b_end, int64_t K, int64_t G,
                const int8_t* qa, const float* sa, const float* asum, int64_t M, float* out, int64_t N) {
#if W4A8_VNNI
  blocks_vnni<S>(qw, sz, b_begin, b_end, K, G, qa, sa, asum, M, out, N);
#else
  for (int64_t b = b_begin; b < b_end; ++b)
    for (int64_t m0 = 0; m0 < M; m0 += 8) tile_scalar<S>(qw, sz, b, K, G, qa, sa, asum, m0, std::min<int64_t>(8, M - m0), out, N);
#endif
}

// Shared by both ops: round each row of x per group (Q = int8_t: qa; uint8_t: qa + 128), then
// blocks(dtype tag, qa, sa, asum, out, first block, end block) over the channel blocks split across
// torch's threads (8 per task at least: one-row tiles take 8 at a time); -> [M, 16 * NB] in x's dtype.
template <typename Q, typename Blocks>
at::Tensor quantized_matmul(const char* name, const at::Tensor& x, int64_t NB, int64_t G, Blocks&& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, ": x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, ": x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = NB * 16;
  auto qa = at::empty({M, K}, x.options().dtype(std::is_same_v<Q, uint8_t> ? at::kByte : at::kChar));
  auto sa = at::empty({M, K / G}, x.options().dtype(at::kFloat));
  auto asum = at::empty({M, K / G}, x.options().dtype(at::kFloat));
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  Q* qap = static_cast<Q*>(qa.data_ptr());
  float* sap = sa.data_ptr<float>();
  float* asp = asum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        quantize_row<scalar_t, Q>(xp + m * K, K, G, qap + m * K, sap + m * (K / G), asp + m * (K / G));
    });
    at::parallel_for(0, NB, 8, [&](int64_t b, int64_t e) { blocks(tag, qap, sap, asp, op, b, e); });
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(at::BFloat16{});
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor w4a8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& sz, int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(2) == 64 && qweight.is_contiguous(),
              "w4a8_mm: qweight must be contiguous uint8 [N/16, K/8, 64]");
  const int64_t M = x.size(0), K = x.size(-1), NB = qweight.size(0), N = NB * 16, G = group_size;
  TORCH_CHECK(qweight.size(1) * 8 == K, "w4a8_mm: qweight is for ", qweight.size(1) * 8, " inputs, x has ", K);
  TORCH_CHECK(G > 0 && G % 8 == 0 && K % G == 0, "w4a8_mm: group size ", G, " must be a multiple of 8 dividing ", K);
  TORCH_CHECK(sz.is_contiguous() && sz.numel() == NB * (K / G) * 32 && sz.scalar_type() == x.scalar_type(),
              "w4a8_mm: scales/zeros must be contiguous [N/16, K/G, 2, 16] in x's dtype");
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  return quantized_matmul<int8_t>("w4a8_mm", x, NB, G, [&](auto tag, const int8_t* qa, const float* sa,
                                                           const float* asum, float* out, int64_t b, int64_t e) {
    using scalar_t = decltype(tag);
    run_blocks<scalar_t>(qw, sz.data_ptr<scalar_t>(), b, e, K, G, qa, sa, asum, M, out, N);
  });
}

// ---- w8a8: int8 weights (symmetric per output channel) x int8-rounded activations -------------------
// Per channel n, row m: sum_k w[n,k] x[m,k] ~= s[n] * sum_g sa[m,g] * sum_{k in g} q[n,k] qa[m,k]. vpdpbusd
// multiplies unsigned by signed bytes, so the activations go in as qa + 128 (1..255) and each group's
// integer sum gives back 128 * wsum[n,g] (wsum = sum_{k in g} q[n,k], stored). Float operations as in
// w4a8: separately rounded, the groups in order, the channel scale last; `w8a8_reference` matches.
// Layouts (stitchlib/quant.py `pack_w8a8`): qweight int8 [N/16, K/4, 64] (byte c*4+t of vector (b, j) =
// q[16b+c, 4j+t]), wsum int16 [N/16, K/G, 16], scales [N] in x's dtype.
#if W4A8_VNNI
template <int NB, int MT, typename S>
void tile_w8_vnni(const int8_t* qw, const int16_t* ws, const S* sc, int64_t b0, int64_t K, int64_t G,
                  const uint8_t* qa, const float* sa, int64_t m0, float* out, int64_t N, int64_t g0, int64_t g1) {
  const int64_t KG = K / G, J = G / 4;
  __m512 facc[NB][MT];
  start_sums<NB, MT>(facc, out, m0, b0, N, g0 == 0);
  for (int64_t g = g0; g < g1; ++g) {
    __m512i iacc[NB][MT] = {};
    for (int64_t j = 0; j < J; ++j) {
      const int64_t k4 = g * J + j;
      __m512i a[MT];
      for (int m = 0; m < MT; ++m) {
        int32_t v;
        std::memcpy(&v, qa + (m0 + m) * K + k4 * 4, 4);
        a[m] = _mm512_set1_epi32(v);
      }
      for (int i = 0; i < NB; ++i) {
        const int8_t* wp = qw + ((b0 + i) * (K / 4) + k4) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + W4A8_PREFETCH, _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512(wp);
        for (int m = 0; m < MT; ++m) iacc[i][m] = _mm512_dpbusd_epi32(iacc[i][m], a[m], w);
      }
    }
    for (int i = 0; i < NB; ++i) {
      __m256i w16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + ((b0 + i) * KG + g) * 16));
      __m512i corr = _mm512_slli_epi32(_mm512_cvtepi16_epi32(w16), 7);  // 128 * wsum
      for (int m = 0; m < MT; ++m) {
        __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[i][m], corr));
        facc[i][m] = _mm512_add_ps(facc[i][m], _mm512_mul_ps(d, _mm512_set1_ps(sa[(m0 + m) * KG + g])));
      }
    }
  }
  for (int i = 0; i < NB; ++i) {
    __m512 s = _mm512_setzero_ps();
    if (g1 == KG) {  // the last chunk: the channel scales
      float tmp[16];
      for (int c = 0; c < 16; ++c) tmp[c] = to_float(sc[(b0 + i) * 16 + c]);
      s = _mm512_loadu_ps(tmp);
    }
    for (int m = 0; m < MT; ++m)
      _mm512_storeu_ps(out + (m0 + m) * N + (b0 + i) * 16, g1 == KG ? _mm512_mul_ps(facc[i][m], s) : facc[i][m]);
  }
}
#endif

template <typename S>
void w8_blocks(const int8_t* qw, const int16_t* ws, const S* sc, int64_t b_begin, int64_t b_end, int64_t K,
               int64_t G, const uint8_t* qa, const float* sa, int64_t M, float* out, int64_t N) {
  const int64_t KG = K / G, J = G / 4;
#if W4A8_VNNI
  (void)J;
  walk_tiles(b_begin, b_end, M, KG, G, [&](auto nb, auto mt, int64_t b, int64_t m0, int64_t g0, int64_t g1) {
    tile_w8_vnni<decltype(nb)::value, decltype(mt)::value, S>(qw, ws, sc, b, K, G, qa, sa, m0, out, N, g0, g1);
  });
#else
  for (int64_t b = b_begin; b < b_end; ++b)
    for (int64_t m = 0; m < M; ++m) {
      float acc[16] = {0};
      for (int64_t g = 0; g < KG; ++g) {
        int32_t iacc[16] = {0};
        for (int64_t j = 0; j < J; ++j) {
          const int64_t k4 = g * J + j;
          const int8_t* w = qw + (b * (K / 4) + k4) * 64;
          const uint8_t* q = qa + m * K + k4 * 4;
          for (int c = 0; c < 16; ++c)
            for (int t = 0; t < 4; ++t) iacc[c] += static_cast<int32_t>(q[t]) * w[c * 4 + t];
        }
        for (int c = 0; c < 16; ++c) {
          const float d = static_cast<float>(iacc[c] - 128 * static_cast<int32_t>(ws[(b * KG + g) * 16 + c]));
          acc[c] += d * sa[m * KG + g];
        }
      }
      for (int c = 0; c < 16; ++c) out[m * N + b * 16 + c] = acc[c] * to_float(sc[b * 16 + c]);
    }
#endif
}

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& wsum, const at::Tensor& scales,
                   int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 3 && qweight.size(2) == 64 && qweight.is_contiguous(),
              "w8a8_mm: qweight must be contiguous int8 [N/16, K/4, 64]");
  const int64_t M = x.size(0), K = x.size(-1), NB = qweight.size(0), N = NB * 16, G = group_size;
  TORCH_CHECK(qweight.size(1) * 4 == K, "w8a8_mm: qweight is for ", qweight.size(1) * 4, " inputs, x has ", K);
  TORCH_CHECK(G > 0 && G % 4 == 0 && K % G == 0, "w8a8_mm: group size ", G, " must be a multiple of 4 dividing ", K);
  TORCH_CHECK(wsum.scalar_type() == at::kShort && wsum.is_contiguous() && wsum.numel() == NB * (K / G) * 16,
              "w8a8_mm: wsum must be contiguous int16 [N/16, K/G, 16]");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N && scales.scalar_type() == x.scalar_type(),
              "w8a8_mm: scales must be [N] in x's dtype");
  const int8_t* qw = qweight.data_ptr<int8_t>();
  const int16_t* ws = wsum.data_ptr<int16_t>();
  return quantized_matmul<uint8_t>("w8a8_mm", x, NB, G, [&](auto tag, const uint8_t* qa, const float* sa,
                                                            const float*, float* out, int64_t b, int64_t e) {
    using scalar_t = decltype(tag);
    w8_blocks<scalar_t>(qw, ws, scales.data_ptr<scalar_t>(), b, e, K, G, qa, sa, M, out, N);
  });
}

bool has_vnni() { return W4A8_VNNI; }

}  // namespace

TORCH_LIBRARY(stitchserve_w4a8, m) {
  m.def("w4a8_mm(Tensor x, Tensor qweight, Tensor sz, int group_size) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor qweight, Tensor wsum, Tensor scales, int group_size) -> Tensor");
  m.def("vectorized() -> bool", &has_vnni);  // compiled with AVX512-VNNI (else the scalar loops)
}

TORCH_LIBRARY_IMPL(stitchserve_w4a8, CPU, m) {
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("w8a8_mm", &w8a8_mm);
}
