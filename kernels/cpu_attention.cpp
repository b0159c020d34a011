// Scaled dot-product attention on x86 CPUs with AVX512_BF16 (Zen 4 and later, Xeons from Cooper Lake), bf16 and
// fp32: a flash attention, softmax online in fp32 over blocks of keys, so the score matrix never leaves the cache.
// In bf16 both matmuls run on the bf16 dot-product instruction (vdpbf16ps: 32 bf16 products summed into 16 fp32
// lanes), which PyTorch's CPU flash kernel does not use on such CPUs (its bf16 runs no faster than its fp32): 0.4-0.5x
// its time at the same error. In fp32 the same loops run on fused multiply-adds: 0.75-0.86x its time on SD 1.5's
// self-attentions, 0.6x on the cross-attentions (its blocked matmuls over 40-wide heads reach 0.6x the cores' GEMM).
// kernels/cpu_attention.py, tests/test_cpu_attention.py.
//
// Per (batch, head): K and V are repacked once into the layout the inner loops read: 32-bit lanes holding a pair of
// bf16 (what vdpbf16ps multiplies) or one fp32. Per task (batch, head, 32 queries), for every block of 256 keys:
//   S = (Q K^T) * scale * log2(e)      fp32, Q's dims (in pairs for bf16) against 16 keys at a time
//   m' = max(m, rowmax S); P = 2^(S - m'); l = l 2^(m - m') + rowsum P; bf16: P rounded to bf16 (as SDPA's kernel does)
//   O = O 2^(m - m') + P V             fp32, P's keys (in pairs for bf16) against 16 output dims at a time
// and at the end O / l (rounded to bf16 for bf16), written straight into (batch, queries, heads, dims): the layout
// the attention's output projection reads, so no transpose copy follows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t QB = 32;   // query rows per task
constexpr int64_t KB = 256;  // keys per block (a multiple of 32)
constexpr int64_t MAXD = 512;  // the widest head: the VAE's mid-block attention (1 head of 512)

// 2^x for x <= 0 (the row max is subtracted first): 2^round(x) * 2^f, f in [-0.5, 0.5], by a degree-7 polynomial
// (relative error ~2e-7, below fp32's rounding of the sums it feeds)
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// acc += a * b lane by lane, where a 32-bit lane holds a pair of bf16 (two dims of a query, or P for two keys; the
// pair's products summed) or one fp32; `a` is one lane broadcast, `b` 16 lanes from memory
template <bool BF16>
inline __m512 mac(__m512 acc, const uint32_t* a, __m512i b) {
  if constexpr (BF16)
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(*(const int*)a), (__m512bh)b);
  else
    return _mm512_fmadd_ps(_mm512_set1_ps(*(const float*)a), _mm512_castsi512_ps(b), acc);
}

inline uint32_t pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }
inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// S[r][16 s + j] = c * (query r . key 16 s + j) for 4 query rows and NJ groups of 16 keys: 4 x NJ accumulators in
// registers. q: the rows' lanes (stride P); k: the keys' lanes, [group][lane][16 keys].
template <int NJ, bool BF16>
inline void scores_tile(const uint32_t* q, int64_t P, const uint32_t* k, float c, float* S) {
  __m512 acc[4][NJ];
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
    for (int s = 0; s < NJ; s++) acc[r][s] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; p++) {
    __m512i keys[NJ];
#pragma GCC unroll 4
    for (int s = 0; s < NJ; s++) keys[s] = _mm512_loadu_si512(k + (s * P + p) * 16);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
      for (int s = 0; s < NJ; s++) acc[r][s] = mac<BF16>(acc[r][s], q + r * P + p, keys[s]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
    for (int s = 0; s < NJ; s++) _mm512_store_ps(S + r * KB + s * 16, _mm512_mul_ps(acc[r][s], _mm512_set1_ps(c)));
}

// O[r][16 s + d] = alpha[r] O[r][16 s + d] + sum over keys of P[r][key] V[key][16 s + d], for 4 rows and NV groups
// of 16 dims. p: the rows' P as lanes of keys (stride ps); v: [key lane][Dp dims]; steps: key lanes.
template <int NV, bool BF16>
inline void values_tile(const uint32_t* p, int64_t ps, const uint32_t* v, int64_t Dp, int64_t steps,
                        const float* alpha, float* O) {
  __m512 acc[4][NV];
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
    for (int s = 0; s < NV; s++) acc[r][s] = _mm512_setzero_ps();
  for (int64_t t = 0; t < steps; t++) {
    __m512i dims[NV];
#pragma GCC unroll 4
    for (int s = 0; s < NV; s++) dims[s] = _mm512_loadu_si512(v + t * Dp + s * 16);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
      for (int s = 0; s < NV; s++) acc[r][s] = mac<BF16>(acc[r][s], p + r * ps + t, dims[s]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
    for (int s = 0; s < NV; s++) {
      float* o = O + r * Dp + s * 16;
      _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), _mm512_set1_ps(alpha[r]), acc[r][s]));
    }
}

inline uint16_t to_bf16(float x) {  // round to nearest even (finite x: O / l)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

// q: (B, H, Lq, D), k and v: (B, H, Lk, D), T = uint16_t (bf16) or float, any strides with the last dim
// contiguous -> out (B, Lq, H, D)
template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out) {
  constexpr bool BF16 = std::is_same_v<T, uint16_t>;
  constexpr int64_t W = BF16 ? 2 : 1;  // elements per 32-bit lane
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t P = D / W, Lk16 = (Lk + 15) / 16 * 16, Dp = (D + 15) / 16 * 16, NV = Dp / 16;
  const T* qd = reinterpret_cast<const T*>(q.data_ptr());
  const T* kd = reinterpret_cast<const T*>(k.data_ptr());
  const T* vd = reinterpret_cast<const T*>(v.data_ptr());
  T* od = reinterpret_cast<T*>(out.data_ptr());
  // lane p of a row (dims 2p, 2p+1 of bf16, dim p of fp32); for V the lane of keys j, j+1 (bf16) or j (fp32)
  auto lane = [](const T* x, int64_t p) {
    if constexpr (BF16) return pair(x[2 * p], x[2 * p + 1]);
    else return bits(x[p]);
  };

  // K as [key group of 16][lane][16 keys], V as [key lane][Dp dims]; padding keys and dims are zeros
  std::vector<uint32_t> Kp(B * H * Lk16 * P), Vp(B * H * (Lk16 / W) * Dp);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / H, h = bh % H;
      const T* kb = kd + b * k.stride(0) + h * k.stride(1);
      const T* vb = vd + b * v.stride(0) + h * v.stride(1);
      uint32_t* kp = Kp.data() + bh * Lk16 * P;
      uint32_t* vp = Vp.data() + bh * (Lk16 / W) * Dp;
      for (int64_t j = 0; j < Lk; j++)
        for (int64_t p = 0; p < P; p++) kp[((j / 16) * P + p) * 16 + j % 16] = lane(kb + j * k.stride(2), p);
      for (int64_t j = 0; j < Lk; j += W)
        for (int64_t d = 0; d < D; d++) {
          if constexpr (BF16)
            vp[(j / 2) * Dp + d] = pair(vb[j * v.stride(2) + d], j + 1 < Lk ? vb[(j + 1) * v.stride(2) + d] : 0);
          else
            vp[j * Dp + d] = bits(vb[j * v.stride(2) + d]);
        }
    }
  });

  const int64_t tiles = (Lq + QB - 1) / QB;
  const float c = (float)(scale * 1.4426950408889634);  // log2(e): the exponentials are powers of 2
  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t Q[QB * MAXD];  // the task's queries as lanes (zeros past Lq)
    alignas(64) float S[QB * KB];      // scores; fp32: P in place
    alignas(64) uint16_t Pb[QB * KB];  // bf16: P
    alignas(64) float O[QB * MAXD];
    float m[QB], l[QB], alpha[QB];
    for (int64_t task = begin; task < end; task++) {
      const int64_t bh = task / tiles, i0 = (task % tiles) * QB, b = bh / H, h = bh % H;
      const int64_t rows = std::min(QB, Lq - i0);
      std::fill(Q, Q + QB * P, 0u);
      for (int64_t i = 0; i < rows; i++) {
        const T* qr = qd + b * q.stride(0) + h * q.stride(1) + (i0 + i) * q.stride(2);
        for (int64_t p = 0; p < P; p++) Q[i * P + p] = lane(qr, p);
      }
      std::fill(O, O + QB * Dp, 0.f);
      std::fill(m, m + QB, -INFINITY);
      std::fill(l, l + QB, 0.f);
      const uint32_t* kp = Kp.data() + bh * Lk16 * P;
      const uint32_t* vp = Vp.data() + bh * (Lk16 / W) * Dp;
      for (int64_t j0 = 0; j0 < Lk16; j0 += KB) {
        const int64_t keys = std::min(KB, Lk16 - j0), groups = keys / 16;  // keys: a multiple of 16
        for (int64_t i = 0; i < QB; i += 4) {
          const uint32_t* kg = kp + (j0 / 16) * P * 16;
          int64_t g = 0;
          for (; g + 4 <= groups; g += 4) scores_tile<4, BF16>(Q + i * P, P, kg + g * P * 16, c, S + i * KB + g * 16);
          for (; g < groups; g++) scores_tile<1, BF16>(Q + i * P, P, kg + g * P * 16, c, S + i * KB + g * 16);
        }
        const int64_t valid = std::min(keys, Lk - j0), width = (keys + 31) / 32 * 32;  // bf16: P in pairs of 16
        for (int64_t i = 0; i < QB; i++) {
          float* s = S + i * KB;
          std::fill(s + valid, s + width, -INFINITY);  // padding keys: P = 0
          __m512 mx = _mm512_set1_ps(-INFINITY);
          for (int64_t j = 0; j < width; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(s + j));
          const float m_new = std::max(m[i], _mm512_reduce_max_ps(mx));
          alpha[i] = std::exp2(m[i] - m_new);
          m[i] = m_new;
          const __m512 mv = _mm512_set1_ps(m_new);
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < width; j += 32) {
            const __m512 lo = exp2_ps(_mm512_sub_ps(_mm512_load_ps(s + j), mv));
            const __m512 hi = exp2_ps(_mm512_sub_ps(_mm512_load_ps(s + j + 16), mv));
            sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
            if constexpr (BF16) {
              _mm512_storeu_si512(Pb + i * KB + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            } else {
              _mm512_store_ps(s + j, lo);
              _mm512_store_ps(s + j + 16, hi);
            }
          }
          l[i] = l[i] * alpha[i] + _mm512_reduce_add_ps(sum);
        }
        // P's rows as lanes of keys: bf16 pairs (KB / 2 lanes a row) or the fp32 scores' own rows
        const uint32_t* pl = BF16 ? reinterpret_cast<const uint32_t*>(Pb) : reinterpret_cast<const uint32_t*>(S);
        const int64_t ps = KB / W, steps = keys / W;
        const uint32_t* vb = vp + (j0 / W) * Dp;
        for (int64_t i = 0; i < QB; i += 4) {
          const uint32_t* pr = pl + i * ps;
          float* o = O + i * Dp;
          int64_t g = 0;
          for (; g + 4 <= NV; g += 4) values_tile<4, BF16>(pr, ps, vb + g * 16, Dp, steps, alpha + i, o + g * 16);
          switch (NV - g) {
            case 3: values_tile<3, BF16>(pr, ps, vb + g * 16, Dp, steps, alpha + i, o + g * 16); break;
            case 2: values_tile<2, BF16>(pr, ps, vb + g * 16, Dp, steps, alpha + i, o + g * 16); break;
            case 1: values_tile<1, BF16>(pr, ps, vb + g * 16, Dp, steps, alpha + i, o + g * 16); break;
          }
        }
      }
      for (int64_t i = 0; i < rows; i++) {
        T* o = od + ((b * Lq + i0 + i) * H + h) * D;
        const float inv = 1.f / l[i];
        for (int64_t d = 0; d < D; d++) {
          if constexpr (BF16) o[d] = to_bf16(O[i * Dp + d] * inv);
          else o[d] = O[i * Dp + d] * inv;
        }
      }
    }
  });
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cpu_attention: q, k, v must be (batch, heads, tokens, dims)");
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "cpu_attention: q, k, v must all be bfloat16 or all float32");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "cpu_attention: CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "cpu_attention: k and v must be (batch, heads, keys, dims) with q's batch, heads and dims");
  TORCH_CHECK(D % 2 == 0 && D <= MAXD && Lk >= 1, "cpu_attention: head dims must be even and at most 512, keys >= 1");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "cpu_attention: the dims must be contiguous");
  auto out = at::empty({B, q.size(2), H, D}, q.options());
  if (dtype == at::kBFloat16)
    attend<uint16_t>(q, k, v, scale, out);
  else
    attend<float>(q, k, v, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(minidiff_cpu, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.impl("attention", c10::DispatchKey::CPU, TORCH_FN(attention));
}
