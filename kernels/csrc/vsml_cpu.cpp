// Hand-written CPU kernel for one VSML dense-layer update (shared/reference/vsml.md §1.2-1.3, §7.2-7.3).
//
// One call = one layer update of the whole [E, A, B] grid of sub-LSTMs:
//
//     F[a] = W_f fwd_in[a]                       (4N)   forward-message term, once per input a
//     R[b] = W_r bwd_in[b] + β                    (4N)   backward-message term, once per output b
//     repeat micro_ticks times (messages frozen):
//         ĩ, g̃, f̃, õ = split4(F[a] + R[b] + W_h h_ab)
//         c_ab = σ(f̃ + 5) c_ab + σ(ĩ − 5) tanh(g̃),   h_ab = σ(õ) tanh(c_ab)
//     →m'_b = mean_a φ_ab,  ←m'_a = mean_b ψ_ab     φ = [LN](W_fwd h + b_fwd), ψ = [LN](W_bwd h + b_bwd)
//
// The bilinear cell (SubLSTMConfig.bilinear) adds, with x_a = fwd_in[a][0] and e_b = bwd_in[b][0],
//     gates += w_xe x_a e_b   (fixed for all micro-ticks, folded into F[a] + R[b])
//     φ_ab  += x_a (W_xφ h_ab + b_xφ)   (no LN: the kernel also accumulates Σ_a x_a h_ab and projects it once)
//
// Without LayerNorm the readouts are mean-then-project (§7.3): the kernel accumulates Σ_a h_ab and
// Σ_b h_ab and projects the two means once.  With LayerNorm every φ_ab / ψ_ab is formed, normalised
// and accumulated.  Both means are accumulated in-kernel; nothing of size [E, A, B, 4N] is ever stored.
//
// SIMD layout: N = 16 floats = one 512-bit register.  A sub-LSTM's h, c and each of its 4 gate blocks
// are one vector; the h-matvec is 16 broadcast-FMAs per gate block with W_hᵀ (16 x 64 floats = 4 KiB,
// L1-resident) as the vector operand, run for P = 4 pairs at once so every W_hᵀ load feeds 4 FMAs.
// σ and tanh are built from a Cephes-style exp (2^t: range reduction to |f| <= 1/2, degree-5 minimax
// polynomial, exact scaling by 2^n; relative error ~2e-7) and a Newton-refined reciprocal, one reciprocal per
// product σ·tanh (see cell_update).
//
// ISA: AVX-512F when the compiler targets it (-march=native on this project's EPYC), otherwise AVX2+FMA
// (two 256-bit halves), otherwise portable scalar loops (auto-vectorised where the compiler can).
// Force a lower one with -DVSML_CPU_ISA=2 (AVX2) or -DVSML_CPU_ISA=0 (scalar), e.g. to test it.
//
// Threads: torch's OpenMP pool (at::parallel_for) pulls (episode, block of inputs a) work items from an
// atomic counter; each item writes its own partial Σ_a buffer, reduced afterwards in a fixed order, so
// results do not depend on the scheduling or the number of threads.

// Light headers only (no torch/extension.h, no pybind11): the op is registered with TORCH_LIBRARY under
// the namespace VSML_NS (set per build variant by kernels/cpu_vsml.py) and called as torch.ops.<ns>.*;
// this keeps the one-off build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if !defined(VSML_CPU_ISA)
#if defined(__AVX512F__)
#define VSML_CPU_ISA 512
#elif defined(__AVX2__) && defined(__FMA__)
#define VSML_CPU_ISA 2
#else
#define VSML_CPU_ISA 0
#endif
#endif

#if VSML_CPU_ISA == 512 && !defined(__AVX512F__)
#error "VSML_CPU_ISA=512 needs a compiler target with AVX-512F"
#endif
#if VSML_CPU_ISA == 2 && !(defined(__AVX2__) && defined(__FMA__))
#error "VSML_CPU_ISA=2 needs a compiler target with AVX2 and FMA"
#endif

#if VSML_CPU_ISA != 0
#include <immintrin.h>
#endif

namespace {

constexpr int N = 16;        // hidden size: one vector of 16 floats
constexpr int G = 4 * N;     // gate pre-activations i, g, f, o
constexpr int MAX_M = 16;    // message size supported by the kernel

// ------------------------------------------------------------------------------------------------
// a 16-float vector on three ISAs

#if VSML_CPU_ISA == 512
struct V { __m512 v; };
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
inline V vset(float x) { return {_mm512_set1_ps(x)}; }
inline V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V fma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }     // a*b + c
inline V fnma(V a, V b, V c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }   // c - a*b
inline V vmin(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V vround(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V vsqrt(V a) { return {_mm512_sqrt_ps(a.v)}; }
inline V sum8(V a) {                                  // every lane: the sum of its 8-lane half
  __m512 t = _mm512_add_ps(a.v, _mm512_shuffle_f32x4(a.v, a.v, 0xB1));    // swap 128-bit blocks pairwise
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));                       // swap 64-bit pairs
  return {_mm512_add_ps(t, _mm512_permute_ps(t, 0xB1))};                 // swap neighbours
}
inline V ldexp2(V y, V n) { return {_mm512_scalef_ps(y.v, n.v)}; }               // y * 2^n, n integral
inline V vrecip(V d) {                                                           // 1/d, ~1e-7 relative
  __m512 r = _mm512_rcp14_ps(d.v);
  __m512 t = _mm512_fnmadd_ps(d.v, r, _mm512_set1_ps(1.0f));
  return {_mm512_fmadd_ps(r, t, r)};
}
#elif VSML_CPU_ISA == 2
struct V { __m256 lo, hi; };
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline V vset(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V operator+(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V operator-(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V fnma(V a, V b, V c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vmin(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V vround(V a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kMode), _mm256_round_ps(a.hi, kMode)};
}
inline __m256 ldexp2_half(__m256 y, __m256 n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
inline V ldexp2(V y, V n) { return {ldexp2_half(y.lo, n.lo), ldexp2_half(y.hi, n.hi)}; }
inline __m256 recip_half(__m256 d) {
  __m256 r = _mm256_rcp_ps(d);                                   // 12 bits; two Newton steps -> ~1e-7
  r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.0f)), r);
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.0f)), r);
}
inline V vrecip(V d) { return {recip_half(d.lo), recip_half(d.hi)}; }
inline V vsqrt(V a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
inline __m256 sum8_half(__m256 x) {
  __m256 t = _mm256_add_ps(x, _mm256_permute2f128_ps(x, x, 1));
  t = _mm256_add_ps(t, _mm256_permute_ps(t, 0x4E));
  return _mm256_add_ps(t, _mm256_permute_ps(t, 0xB1));
}
inline V sum8(V a) { return {sum8_half(a.lo), sum8_half(a.hi)}; }
#else
// Portable build: plain loops over 16 lanes that the compiler can vectorise for whatever the target has
// (no libm calls in the hot path: rounding by the 1.5·2^23 trick, 2^n from exponent bits).
struct V { float x[16]; };
#define VSML_LANES(expr) V r; for (int l = 0; l < 16; ++l) { r.x[l] = (expr); } return r
inline V vload(const float* p) { VSML_LANES(p[l]); }
inline void vstore(float* p, V a) { for (int l = 0; l < 16; ++l) p[l] = a.x[l]; }
inline V vset(float x) { VSML_LANES(x); }
inline V operator+(V a, V b) { VSML_LANES(a.x[l] + b.x[l]); }
inline V operator-(V a, V b) { VSML_LANES(a.x[l] - b.x[l]); }
inline V operator*(V a, V b) { VSML_LANES(a.x[l] * b.x[l]); }
inline V fma(V a, V b, V c) { VSML_LANES(a.x[l] * b.x[l] + c.x[l]); }
inline V fnma(V a, V b, V c) { VSML_LANES(c.x[l] - a.x[l] * b.x[l]); }
inline V vmin(V a, V b) { VSML_LANES(a.x[l] < b.x[l] ? a.x[l] : b.x[l]); }
inline V vmax(V a, V b) { VSML_LANES(a.x[l] > b.x[l] ? a.x[l] : b.x[l]); }
inline V vround(V a) { VSML_LANES((a.x[l] + 12582912.0f) - 12582912.0f); }     // |a| < 2^22
inline float pow2i(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline V ldexp2(V y, V n) { VSML_LANES(y.x[l] * pow2i(n.x[l])); }
inline V vrecip(V d) { VSML_LANES(1.0f / d.x[l]); }
inline V vsqrt(V a) { VSML_LANES(std::sqrt(a.x[l])); }
inline V sum8(V a) {
  float s0 = 0.f, s1 = 0.f;
  for (int l = 0; l < 8; ++l) { s0 += a.x[l]; s1 += a.x[8 + l]; }
  VSML_LANES(l < 8 ? s0 : s1);
}
#undef VSML_LANES
#endif

// 2^t for t <= 57 (callers pass t = x·log2(e) with their affine argument folded into one FMA, so
// e^x costs no separate scaling): t = n + f with n = round(t) and f = t − n exact, |f| <= 1/2;
// 2^f ~ 1 + degree-5 minimax polynomial (Arm optimized-routines' expf coefficients rescaled from
// r = f·ln2 to f: max relative error 2.2e-7 evaluated in float32), then an exact scaling by 2^n.
// The clamp keeps every product of two such values finite (2^57·2^57 < 2^128); the rounding of
// t = x·log2(e) itself adds a relative error of |t|·6e-8 to e^x (< 1e-6 wherever σ/tanh are not
// saturated).  Below, AVX-512's scalef underflows gracefully to 0; the other ISAs clamp at −125
// (2^n built from exponent bits must stay a normal float).
inline V vexp2(V t) {
  t = vmin(t, vset(57.0f));
#if VSML_CPU_ISA != 512
  t = vmax(t, vset(-125.0f));
#endif
  V n = vround(t);
  V f = t - n;
  V f2 = f * f;
  V p = fma(vset(0x1.59ed2cp-10f), f, vset(0x1.3cee16p-7f));
  V q = fma(vset(0x1.c6bca0p-5f), f, vset(0x1.ebf9acp-3f));
  q = fma(p, f2, q);
  V poly = fma(q, f2, fma(vset(0x1.62e422p-1f), f, vset(1.0f)));
  return ldexp2(poly, n);
}

constexpr float kLog2e = 1.44269504088896341f;

// One micro-step's gate nonlinearities and cell update (vsml.md §1.2), with one reciprocal per product:
//   σ(ĩ−5)·tanh(g̃) = (1 − e_g) / ((1 + e_i)(1 + e_g)),   e_i = exp(5 − ĩ), e_g = exp(−2g̃)
//   c' = σ(f̃+5)·c + σ(ĩ−5)·tanh(g̃),                    σ(f̃+5) = 1 / (1 + exp(−f̃ − 5))
//   h' = σ(õ)·tanh(c') = (1 − e_c) / ((1 + e_o)(1 + e_c)), e_o = exp(−õ), e_c = exp(−2c')
// (tanh(x) = (1 − e^{−2x}) / (1 + e^{−2x}) is the 2σ(2x) − 1 of the torch.compile path.)
inline void cell_update(V gi, V gg, V gf, V go, V& c, V& h) {
  const V one = vset(1.0f);
  V ei = vexp2(fma(gi, vset(-kLog2e), vset(5.0f * kLog2e)));
  V eg = vexp2(gg * vset(-2.0f * kLog2e));
  V ef = vexp2(fma(gf, vset(-kLog2e), vset(-5.0f * kLog2e)));
  V eo = vexp2(go * vset(-kLog2e));
  V pg = one + eg;
  V ig = (one - eg) * vrecip(fma(ei, pg, pg));
  c = fma(vrecip(one + ef), c, ig);
  V ec = vexp2(c * vset(-2.0f * kLog2e));
  V pc = one + ec;
  h = (one - ec) * vrecip(fma(eo, pc, pc));
}

// ------------------------------------------------------------------------------------------------
// one episode's view of θ, re-laid out for the kernel

struct Theta {
  alignas(64) float WhT[N][G];       // WhT[j][k] = W[k][2M + j]: column j of W_h as 4 vectors
  alignas(64) float WfT[MAX_M][G];   // WfT[m][k] = W[k][m]
  alignas(64) float WrT[MAX_M][G];   // WrT[m][k] = W[k][M + m]
  alignas(64) float beta[G];
  alignas(64) float WoT[N][2 * MAX_M];   // LN readouts: WoT[n] = (W_fwd[:, n], W_bwd[:, n])
  alignas(64) float bo[2 * MAX_M];       // (b_fwd, b_bwd), (ln_fwd_g, ln_bwd_g), (ln_fwd_b, ln_bwd_b)
  alignas(64) float lng[2 * MAX_M];
  alignas(64) float lnb[2 * MAX_M];
  alignas(64) float Wxe[G];              // bilinear: gate weights of x_a·e_b
  alignas(64) float WxT[N][2 * MAX_M];   // bilinear, LN: WxT[n] = (W_xφ[:, n], 0)
  alignas(64) float bx[2 * MAX_M];       // bilinear, LN: (b_xφ, 0)
  bool bil;
  const float* W_xphi;  // [M, N] (bilinear)
  const float* b_xphi;  // [M]    (bilinear)
  const float* W_fwd;  // [M, N]
  const float* b_fwd;  // [M]
  const float* W_bwd;  // [M, N]
  const float* b_bwd;  // [M]
  const float* ln;     // [4, M]: g_fwd, b_fwd, g_bwd, b_bwd (LayerNorm only)
};

// θ set layout (vsml/params.py): W [4N, 2M+N] | β [4N] | W_fwd [M, N] | b_fwd [M] | W_bwd [M, N] | b_bwd [M]
// | (LN) ln_fwd_g, ln_fwd_b, ln_bwd_g, ln_bwd_b [M] | (bilinear) w_xe [4N], W_xφ [M, N], b_xφ [M].
void unpack_theta(const float* th, int M, bool ln, bool bil, Theta& t) {
  const int cols = 2 * M + N;
  for (int k = 0; k < G; ++k) {
    const float* row = th + k * cols;
    for (int m = 0; m < M; ++m) { t.WfT[m][k] = row[m]; t.WrT[m][k] = row[M + m]; }
    for (int j = 0; j < N; ++j) t.WhT[j][k] = row[2 * M + j];
  }
  const float* p = th + G * cols;
  std::memcpy(t.beta, p, sizeof(float) * G);
  p += G;
  t.W_fwd = p; p += M * N;
  t.b_fwd = p; p += M;
  t.W_bwd = p; p += M * N;
  t.b_bwd = p; p += M;
  t.ln = ln ? p : nullptr;
  if (ln) p += 4 * M;
  t.bil = bil;
  t.W_xphi = t.b_xphi = nullptr;
  std::memset(t.WxT, 0, sizeof(t.WxT));
  std::memset(t.bx, 0, sizeof(t.bx));
  if (bil) {
    std::memcpy(t.Wxe, p, sizeof(float) * G);
    p += G;
    t.W_xphi = p; p += M * N;
    t.b_xphi = p;
    for (int n = 0; n < N; ++n)
      for (int m = 0; m < M; ++m) t.WxT[n][m] = t.W_xphi[m * N + n];
    for (int m = 0; m < M; ++m) t.bx[m] = t.b_xphi[m];
  }
  for (int n = 0; n < N; ++n)
    for (int m = 0; m < M; ++m) { t.WoT[n][m] = t.W_fwd[m * N + n]; t.WoT[n][M + m] = t.W_bwd[m * N + n]; }
  for (int m = 0; m < M; ++m) {
    t.bo[m] = t.b_fwd[m];  t.bo[M + m] = t.b_bwd[m];
    t.lng[m] = ln ? t.ln[m] : 1.0f;      t.lng[M + m] = ln ? t.ln[2 * M + m] : 1.0f;
    t.lnb[m] = ln ? t.ln[M + m] : 0.0f;  t.lnb[M + m] = ln ? t.ln[3 * M + m] : 0.0f;
  }
}

// out[k] = base[k] + Σ_m WT[m][k] msg[m]   (k < 4N): a message term F[a] or R[b]
inline void message_term(const float (*WT)[G], const float* base, const float* msg, int M, float* out) {
  V acc[4];
  for (int g = 0; g < 4; ++g) acc[g] = base ? vload(base + g * N) : vset(0.0f);
  for (int m = 0; m < M; ++m) {
    V s = vset(msg[m]);
    for (int g = 0; g < 4; ++g) acc[g] = fma(vload(WT[m] + g * N), s, acc[g]);
  }
  for (int g = 0; g < 4; ++g) vstore(out + g * N, acc[g]);
}

// LayerNorm of M values in place (biased variance), then scale and shift: haiku's LayerNorm.
inline void layer_norm(float* z, int M, const float* gamma, const float* shift, float eps) {
  float mu = 0.f;
  for (int m = 0; m < M; ++m) mu += z[m];
  mu /= M;
  float var = 0.f;
  for (int m = 0; m < M; ++m) var += (z[m] - mu) * (z[m] - mu);
  const float inv = 1.0f / std::sqrt(var / M + eps);
  for (int m = 0; m < M; ++m) z[m] = (z[m] - mu) * inv * gamma[m] + shift[m];
}

// ------------------------------------------------------------------------------------------------
// output buffers
//
// h' and c' are large (E·A·B·N floats: 100 MB each for 64 episodes of a 784x32 layer) and written out of
// place on every tick.  Fresh memory from the OS costs a page fault + zeroing per 4 KiB page, measured at
// ~0.4 ms per MB here (30 % of a layer update).  Big outputs therefore come from a small cache of blocks
// freed by earlier outputs (returned by the tensor's deleter, i.e. only once nothing references the
// storage), else from 2 MiB-aligned memory advised to use transparent huge pages.

constexpr size_t kBigBytes = size_t(1) << 20;          // smaller outputs use torch's allocator
constexpr size_t kCacheCap = size_t(1) << 30;          // at most 1 GiB of idle blocks are kept
constexpr size_t kAlign = size_t(2) << 20;

std::mutex g_cache_mu;
std::multimap<size_t, void*> g_cache;
size_t g_cached_bytes = 0;

void release_block(void* p, size_t bytes) {
  std::vector<void*> evicted;                          // freed outside the lock
  {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    if (bytes <= kCacheCap) {
      // make room by dropping idle blocks of other sizes (e.g. from an earlier, differently sized run)
      for (auto it = g_cache.begin(); it != g_cache.end() && g_cached_bytes + bytes > kCacheCap;) {
        g_cached_bytes -= it->first;
        evicted.push_back(it->second);
        it = g_cache.erase(it);
      }
      g_cache.emplace(bytes, p);
      g_cached_bytes += bytes;
      p = nullptr;
    }
  }
  for (void* q : evicted) std::free(q);
  if (p != nullptr) std::free(p);
}

at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  if (bytes < kBigBytes) return at::empty(sizes, opt);
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    auto it = g_cache.find(bytes);
    if (it != g_cache.end()) {
      p = it->second;
      g_cache.erase(it);
      g_cached_bytes -= bytes;
    }
  }
  if (p == nullptr) {
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    if (posix_memalign(&p, kAlign, rounded) != 0) return at::empty(sizes, opt);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(p, sizes, [bytes](void* q) { release_block(q, bytes); }, opt);
}

struct Layer {
  int64_t E, A, B;
  int M, ticks;
  bool ln, bil;
  float eps;
};

// The micro-steps of P consecutive sub-LSTMs q0..q0+P-1 of one work item (flat pair index q = a·B + b
// relative to the item's first input, so a group may straddle two inputs a) and their contribution to
// both means.
//   Fa [items' A, 4N] forward terms of the item's inputs; R [B, 4N] backward terms with β;
//   h_in/c_in/h_out/c_out point at pair q0 of [.., N]; sum_b [B, N or M] this item's Σ_a;
//   sum_a [items' A, N or M] the Σ_b of the item's inputs.
//   Bilinear: xs [items' A] = x_a, es [B] = e_b; without LN sum_b is [B, 2N]: (Σ_a h_ab, Σ_a x_a h_ab).
template <int P>
inline void pairs_update(const Theta& t, const Layer& L, const float* Fa, const float* R, int64_t q0,
                         const float* h_in, const float* c_in, float* h_out, float* c_out,
                         float* sum_b, float* sum_a, const float* xs, const float* es) {
  alignas(64) float hl[P][N];        // h of the P pairs, in memory so its elements can be broadcast
  alignas(64) float fr[P][G];        // F[a] + R[b]: fixed for all micro-ticks
  int64_t ia[P], ib[P];
  V c[P];
  for (int p = 0; p < P; ++p) {
    ia[p] = (q0 + p) / L.B;
    ib[p] = (q0 + p) - ia[p] * L.B;
    vstore(hl[p], vload(h_in + p * N));
    c[p] = vload(c_in + p * N);
    for (int g = 0; g < 4; ++g)
      vstore(fr[p] + g * N, vload(Fa + ia[p] * G + g * N) + vload(R + ib[p] * G + g * N));
    if (t.bil) {                     // + w_xe x_a e_b
      const V xe = vset(xs[ia[p]] * es[ib[p]]);
      for (int g = 0; g < 4; ++g) vstore(fr[p] + g * N, fma(vload(t.Wxe + g * N), xe, vload(fr[p] + g * N)));
    }
  }
  for (int tick = 0; tick < L.ticks; ++tick) {
    V acc[P][4];
    for (int p = 0; p < P; ++p)
      for (int g = 0; g < 4; ++g) acc[p][g] = vload(fr[p] + g * N);
#pragma GCC unroll 16
    for (int j = 0; j < N; ++j) {    // gates += W_h[:, j] h[j]: one W_hᵀ load feeds P FMAs
      V hb[P];
      for (int p = 0; p < P; ++p) hb[p] = vset(hl[p][j]);
      for (int g = 0; g < 4; ++g) {
        V w = vload(t.WhT[j] + g * N);
        for (int p = 0; p < P; ++p) acc[p][g] = fma(w, hb[p], acc[p][g]);
      }
    }
    for (int p = 0; p < P; ++p) {    // gate order i, g, f, o with the −5 / +5 offsets (§1.2)
      V hn;
      cell_update(acc[p][0], acc[p][1], acc[p][2], acc[p][3], c[p], hn);
      vstore(hl[p], hn);
    }
  }
  for (int p = 0; p < P; ++p) {
    V hv = vload(hl[p]);
    vstore(h_out + p * N, hv);
    vstore(c_out + p * N, c[p]);
    if (!L.ln) {                     // mean-then-project: only Σ h is needed (§7.3)
      float* sb = sum_b + ib[p] * (L.bil ? 2 * N : N);
      float* sa = sum_a + ia[p] * N;
      vstore(sb, vload(sb) + hv);
      vstore(sa, vload(sa) + hv);
      if (L.bil) vstore(sb + N, fma(vset(xs[ia[p]]), hv, vload(sb + N)));   // Σ_a x_a h_ab
    } else {                         // φ, ψ = LN(W_fwd h + b_fwd), LN(W_bwd h + b_bwd), then summed
      const int M = L.M;
      alignas(64) float z[2 * MAX_M];
      if (M == 8) {                  // the reference size: (φ, ψ) is one 16-lane vector, LN per 8-lane half
        V zv = vload(t.bo);
        for (int n = 0; n < N; ++n) zv = fma(vload(t.WoT[n]), vset(hl[p][n]), zv);
        if (L.bil) {                 // φ += x_a (W_xφ h + b_xφ): the lower 8 lanes only
          V zx = vload(t.bx);
          for (int n = 0; n < N; ++n) zx = fma(vload(t.WxT[n]), vset(hl[p][n]), zx);
          zv = fma(vset(xs[ia[p]]), zx, zv);
        }
        V d = zv - sum8(zv) * vset(0.125f);
        V rstd = vrecip(vsqrt(sum8(d * d) * vset(0.125f) + vset(L.eps)));
        vstore(z, fma(d * rstd, vload(t.lng), vload(t.lnb)));
        float* sb = sum_b + ib[p] * M;
        float* sa = sum_a + ia[p] * M;
        for (int m = 0; m < 8; ++m) { sb[m] += z[m]; sa[m] += z[8 + m]; }
        continue;
      }
      for (int m = 0; m < M; ++m) { z[m] = t.b_fwd[m]; z[M + m] = t.b_bwd[m]; }
      for (int n = 0; n < N; ++n) {
        const float hn = hl[p][n];
        for (int m = 0; m < 2 * M; ++m) z[m] += t.WoT[n][m] * hn;
      }
      if (L.bil) {
        const float xa = xs[ia[p]];
        for (int m = 0; m < M; ++m) {
          float v = t.b_xphi[m];
          for (int n = 0; n < N; ++n) v += t.W_xphi[m * N + n] * hl[p][n];
          z[m] += xa * v;
        }
      }
      layer_norm(z, M, t.ln, t.ln + M, L.eps);
      layer_norm(z + M, M, t.ln + 2 * M, t.ln + 3 * M, L.eps);
      float* sb = sum_b + ib[p] * M;
      float* sa = sum_a + ia[p] * M;
      for (int m = 0; m < M; ++m) { sb[m] += z[m]; sa[m] += z[M + m]; }
    }
  }
}

std::vector<at::Tensor> layer_update(const at::Tensor& theta, const at::Tensor& fwd_in, const at::Tensor& bwd_in,
                                     const at::Tensor& h, const at::Tensor& c, int64_t micro_ticks,
                                        bool layer_norm_on, double ln_eps, bool bilinear) {
  TORCH_CHECK(theta.dim() == 2, "theta must be [1 or E, P]");
  TORCH_CHECK(fwd_in.dim() == 3 && bwd_in.dim() == 3 && h.dim() == 4 && c.dim() == 4,
              "expected fwd_in [E, A, M], bwd_in [E, B, M], h and c [E, A, B, N]");
  for (const auto& t : {theta, fwd_in, bwd_in, h, c}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "vsml_cpu: float32 tensors only");
    TORCH_CHECK(t.device().is_cpu(), "vsml_cpu: CPU tensors only");
    TORCH_CHECK(t.is_contiguous(), "vsml_cpu: contiguous tensors only");
  }
  Layer L;
  L.E = h.size(0); L.A = h.size(1); L.B = h.size(2);
  L.M = static_cast<int>(fwd_in.size(2));
  L.ticks = static_cast<int>(micro_ticks);
  L.ln = layer_norm_on;
  L.bil = bilinear;
  L.eps = static_cast<float>(ln_eps);
  TORCH_CHECK(h.size(3) == N, "vsml_cpu: hidden size must be 16, got ", h.size(3));
  TORCH_CHECK(L.M >= 1 && L.M <= MAX_M, "vsml_cpu: message size must be in [1, 16], got ", L.M);
  TORCH_CHECK(c.sizes() == h.sizes(), "c must have h's shape");
  TORCH_CHECK(fwd_in.size(0) == L.E && fwd_in.size(1) == L.A, "fwd_in must be [E, A, M]");
  TORCH_CHECK(bwd_in.size(0) == L.E && bwd_in.size(1) == L.B && bwd_in.size(2) == L.M, "bwd_in must be [E, B, M]");
  const int64_t P = (int64_t)G * (2 * L.M + N) + G + 2 * (L.M * N + L.M) + (L.ln ? 4 * L.M : 0)
                    + (L.bil ? G + L.M * N + L.M : 0);
  TORCH_CHECK(theta.size(1) == P, "theta has ", theta.size(1), " values per set, expected ", P);
  TORCH_CHECK(theta.size(0) == 1 || theta.size(0) == L.E, "theta must be [1, P] (shared) or [E, P]");
  TORCH_CHECK(micro_ticks >= 1, "micro_ticks must be >= 1");

  const int64_t E = L.E, A = L.A, B = L.B;
  const int M = L.M;
  const int64_t red = L.ln ? M : N;           // what the means accumulate: φ/ψ (LN) or h (no LN)
  const int64_t redf = L.ln ? M : (L.bil ? 2 * N : N);   // the Σ_a of the forward side (+ Σ_a x_a h_ab)
  auto h_out = empty_big(h.sizes(), h.options());
  auto c_out = empty_big(c.sizes(), c.options());
  auto fwd_out = at::empty({E, B, M}, h.options());
  auto bwd_out = at::empty({E, A, M}, h.options());

  // work items: (episode, block of inputs a); at least 16 items in all (so a few threads have work when E
  // is small) and at most ~8k pairs per item.  The split depends on the sizes only, never on the thread
  // count, so results are bit-identical for any number of threads.
  const int64_t nblk = std::min<int64_t>(A, std::max<int64_t>((16 + E - 1) / E, (A * B + 8191) / 8192));
  const int64_t a_per = (A + nblk - 1) / nblk;
  const int64_t items = E * nblk;
  auto partial = at::zeros({items, B, redf}, h.options());   // per-item Σ_a over its block

  const float* th = theta.data_ptr<float>();
  const bool shared = theta.size(0) == 1;
  const float* fin = fwd_in.data_ptr<float>();
  const float* bin = bwd_in.data_ptr<float>();
  const float* hin = h.data_ptr<float>();
  const float* cin = c.data_ptr<float>();
  float* hout = h_out.data_ptr<float>();
  float* cout_ = c_out.data_ptr<float>();
  float* bout = bwd_out.data_ptr<float>();
  float* part = partial.data_ptr<float>();

  const int64_t pairs = E * A * B;
  // Items are handed out dynamically (an atomic counter) rather than in one static slice per thread: on
  // a machine shared with other jobs a descheduled thread then delays only its current item.
  std::atomic<int64_t> next_item{0};
  auto worker = [&]() {
    Theta t;
    std::vector<float> R(B * G), Fa(a_per * G), sum_a(a_per * red), xs(L.bil ? a_per : 0), es(L.bil ? B : 0);
    int64_t loaded_e = -1;
    for (int64_t it = next_item++; it < items; it = next_item++) {
      const int64_t e = it / nblk, blk = it % nblk;
      const int64_t a0 = blk * a_per, a1 = std::min(A, a0 + a_per), na = a1 - a0;
      if (na <= 0) continue;
      if (e != loaded_e) {
        unpack_theta(th + (shared ? 0 : e) * P, M, L.ln, L.bil, t);
        for (int64_t b = 0; b < B; ++b) message_term(t.WrT, t.beta, bin + (e * B + b) * M, M, R.data() + b * G);
        for (int64_t b = 0; b < (L.bil ? B : 0); ++b) es[b] = bin[(e * B + b) * M];
        loaded_e = e;
      }
      for (int64_t a = 0; a < na; ++a) message_term(t.WfT, nullptr, fin + (e * A + a0 + a) * M, M, Fa.data() + a * G);
      for (int64_t a = 0; a < (L.bil ? na : 0); ++a) xs[a] = fin[(e * A + a0 + a) * M];
      std::fill(sum_a.begin(), sum_a.end(), 0.0f);
      float* sum_b = part + it * B * redf;
      // the item's pairs are contiguous in h and c: [na·B, N] from pair (e, a0, 0)
      const int64_t off = (e * A + a0) * B * N, npairs = na * B;
      const float* hi = hin + off;
      const float* ci = cin + off;
      float* ho = hout + off;
      float* co = cout_ + off;
      int64_t q = 0;
      for (; q + 4 <= npairs; q += 4)
        pairs_update<4>(t, L, Fa.data(), R.data(), q, hi + q * N, ci + q * N, ho + q * N, co + q * N,
                        sum_b, sum_a.data(), xs.data(), es.data());
      switch (npairs - q) {
        case 3: pairs_update<3>(t, L, Fa.data(), R.data(), q, hi + q * N, ci + q * N, ho + q * N, co + q * N,
                                sum_b, sum_a.data(), xs.data(), es.data()); break;
        case 2: pairs_update<2>(t, L, Fa.data(), R.data(), q, hi + q * N, ci + q * N, ho + q * N, co + q * N,
                                sum_b, sum_a.data(), xs.data(), es.data()); break;
        case 1: pairs_update<1>(t, L, Fa.data(), R.data(), q, hi + q * N, ci + q * N, ho + q * N, co + q * N,
                                sum_b, sum_a.data(), xs.data(), es.data()); break;
        default: break;
      }
      const float invB = 1.0f / static_cast<float>(B);
      for (int64_t a = 0; a < na; ++a) {                   // ←m'_a = mean_b ψ_ab
        float* bo = bout + (e * A + a0 + a) * M;
        const float* sa = sum_a.data() + a * red;
        if (!L.ln) {
          for (int m = 0; m < M; ++m) {
            float v = 0.f;
            for (int n = 0; n < N; ++n) v += t.W_bwd[m * N + n] * sa[n];
            bo[m] = v * invB + t.b_bwd[m];
          }
        } else {
          for (int m = 0; m < M; ++m) bo[m] = sa[m] * invB;
        }
      }
    }
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  if (pairs < 2048 || threads <= 1 || at::in_parallel_region()) {   // < ~0.2 ms of work: the fork costs more
    worker();
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(); });
  }

  // →m'_b = mean_a φ_ab: reduce the items' partial sums (fixed order), then project (no LN)
  float* fo = fwd_out.data_ptr<float>();
  const float invA = 1.0f / static_cast<float>(A);
  for (int64_t e = 0; e < E; ++e) {
    const float* tp = th + (shared ? 0 : e) * P;
    float xmean = 0.f;                           // mean_a x_a (bilinear read-out bias)
    for (int64_t a = 0; a < (L.bil ? A : 0); ++a) xmean += fin[(e * A + a) * M];
    xmean *= invA;
    const float* W_fwd = tp + G * (2 * M + N) + G;
    const float* b_fwd = W_fwd + M * N;
    for (int64_t b = 0; b < B; ++b) {
      float s[2 * N > MAX_M ? 2 * N : MAX_M] = {0};
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const float* src = part + ((e * nblk + blk) * B + b) * redf;
        for (int64_t r = 0; r < redf; ++r) s[r] += src[r];
      }
      float* dst = fo + (e * B + b) * M;
      if (!L.ln) {
        for (int m = 0; m < M; ++m) {
          float v = 0.f;
          for (int n = 0; n < N; ++n) v += W_fwd[m * N + n] * s[n];
          dst[m] = v * invA + b_fwd[m];
        }
        if (L.bil) {                 // + W_xφ mean_a(x_a h_ab) + b_xφ mean_a x_a
          const float* W_xphi = tp + P - M - M * N;
          const float* b_xphi = tp + P - M;
          for (int m = 0; m < M; ++m) {
            float v = 0.f;
            for (int n = 0; n < N; ++n) v += W_xphi[m * N + n] * s[N + n];
            dst[m] += v * invA + b_xphi[m] * xmean;
          }
        }
      } else {
        for (int m = 0; m < M; ++m) dst[m] = s[m] * invA;
      }
    }
  }
  return {h_out, c_out, fwd_out, bwd_out};
}

int64_t isa_code() { return VSML_CPU_ISA; }

}  // namespace

#ifndef VSML_NS
#define VSML_NS vsml_cpu
#endif

TORCH_LIBRARY(VSML_NS, m) {
  m.def("layer_update(Tensor theta, Tensor fwd_in, Tensor bwd_in, Tensor h, Tensor c, int micro_ticks, "
        "bool layer_norm, float ln_eps, bool bilinear) -> Tensor[]", &layer_update);
  m.def("isa_code() -> int", &isa_code);   // 512 (AVX-512), 2 (AVX2) or 0 (scalar)
}
