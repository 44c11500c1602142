// One batch-1 decode step of the BitMar sink decoder (bitmar_core/inference/fast_decoder.py), built by
// `python -m bitmar_core.inference.fast_decoder --build` (scripts/setup.sh). Bit-identical to the PyTorch reference:
//
// * Order-sensitive ops (LayerNorm, the small ternary linears, attention matmuls, softmax, GELU) are
//   the very ATen calls the reference makes, on tensors of the same shapes and strides, so MKL and
//   ATen's vector kernels round exactly as they do there; what goes is the Python around them. The
//   matmuls go one level lower, to the BLAS calls ATen itself makes (sgemm_), wherever a start-up
//   check finds them bit-identical to the ATen calls at the current thread count.
// * Elementwise ops that are single IEEE operations (the absmax int8 quantiser, residual adds,
//   the per-layer scale γ, cache writes) are plain loops: one correctly rounded op is the same
//   everywhere. Compiled with -ffp-contract=off so that no a*b+c becomes an FMA.
// * Rotary positions: q and k are turned by the cos/sin the reference's RotaryTable gives for t,
//   with its very products and sums; the sink keys are also kept unrotated (sink_raw).
// * The 128 → vocab head stays packed (2 bits/weight) and is an integer dot product:
//   D_i = Σ_j q_j T_ij is exact, and logits are (β/s)·γ·D_i. The reference's float sum is within
//   (K+2)·2⁻²⁴·Σ|q_j| of exact (< 0.25 units of D at K = 128), so rows with a smaller D can never
//   win its argmax; only an exact tie at the top (or, for very wide K, a near one) is settled by the
//   reference's own rounding — then, and only then, the head is dequantised and run through ATen
//   like the reference, and those logits are returned.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BITMAR_X86 1
#endif

// The Fortran BLAS entry ATen's CPU matmuls end in (MKL inside libtorch_cpu). Weak: a torch built
// without it still loads this extension, which then keeps to the ATen calls.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

constexpr int64_t kTileRows = 16;  // head rows per tile: one int32 lane each in a 512-bit register
constexpr int64_t kBlockK = 16;    // inputs per 64-byte block: 4 per lane (one dword) × 4 bit shifts

// ---------------------------------------------------------------- the int8 activation quantiser
// Exact replica of quant.absmax_int8 and the `q / s` that follows it:
//   s = (1 / max(amax|x|, eps)) * 127     (Python's `127.0 / t` is `t.reciprocal() * 127`)
//   q = clamp(round_half_even(x * s), -127, 127),  a = q / s
float quantize_scalar(const float* x, int64_t n, float eps, float* a, int8_t* q8) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::fabs(x[i]);
    m = v > m ? v : m;
  }
  if (m < eps) m = eps;
  const float s = (1.0f / m) * 127.0f;
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint(x[i] * s);
    q = std::min(std::max(q, -127.0f), 127.0f);
    if (a) a[i] = q / s;
    if (q8) q8[i] = static_cast<int8_t>(q);
  }
  return s;
}

#if defined(__x86_64__) || defined(_M_X64)
// The same operations, 16 lanes at a time: max is exact in any order, and round-to-nearest-even,
// multiply, divide and min/max are single correctly rounded operations in SIMD as in scalar code.
__attribute__((target("avx512f,avx512bw")))
float quantize_avx512(const float* x, int64_t n, float eps, float* a, int8_t* q8) {
  __m512 vm = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1u);
    vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i)));
  }
  float m = _mm512_reduce_max_ps(vm);
  if (m < eps) m = eps;
  const float s = (1.0f / m) * 127.0f;
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
    if (a) _mm512_mask_storeu_ps(a + i, k, _mm512_div_ps(q, vs));
    if (q8) _mm512_mask_cvtepi32_storeu_epi8(q8 + i, k, _mm512_cvtps_epi32(q));
  }
  return s;
}
#endif

using Quantize = float (*)(const float*, int64_t, float, float*, int8_t*);

Quantize pick_quantize() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return quantize_avx512;
#endif
  return quantize_scalar;
}

const Quantize quantize = pick_quantize();

// ---------------------------------------------------------------- packed ternary head kernels
// Layout (see fast_decoder.py `pack_head`): tile t holds rows 16t..16t+15; block b of a tile is 64 bytes,
// byte 4r+m holds, at bits 2u..2u+1, the code T+1 ∈ {0,1,2} of row 16t+r, input 16b+4u+m. So
// (block >> 2u) & 3 is, per 32-bit lane r, the 4 codes that meet inputs 16b+4u..16b+4u+3: exactly
// the operand of one VNNI dot (u8 codes × s8 activations, 4 products summed into each int32 lane).
// The sum is Σ (T+1)·q = D + Σq; the caller subtracts Σq.

struct HeadArgs {
  const uint8_t* packed;  // tiles × kblocks × 64 bytes
  const int32_t* q4;      // the int8 activations, 4 per int32 (the broadcast operand of one dot)
  int64_t kblocks, vocab;
  int32_t off;            // Σ q_j, since the codes are T+1
  float c;                // (β/s)·γ
  int32_t* scores;        // D per row (tiles × 16, padding rows included)
  float* logits;          // c·D per row (same length)
};

// Each kernel does tiles [t0, t1): D, c·D, and the max / min of D over real rows (< vocab).
#ifdef BITMAR_X86
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void head_dot_avx512vnni(const HeadArgs& g, int64_t t0, int64_t t1, int32_t* mx, int32_t* mn) {
  // Masking in place of shifting: the bytes (w & 3<<2u) hold code·4^u ≤ 128, still a valid u8
  // operand, so accumulator u sums 4^u·code·q exactly and one arithmetic shift per tile undoes
  // it — 24 fewer shifts per tile on the port the dot products need.
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C);
  const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  const __m512i off = _mm512_set1_epi32(g.off);
  const __m512 c = _mm512_set1_ps(g.c);
  __m512i vmax = _mm512_set1_epi32(INT32_MIN), vmin = _mm512_set1_epi32(INT32_MAX);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = g.packed + t * g.kblocks * 64;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = 0; b < g.kblocks; ++b) {
      const __m512i w = _mm512_loadu_si512(p + b * 64);
      const int32_t* qb = g.q4 + 4 * b;
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(w, m0), _mm512_set1_epi32(qb[0]));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(w, m1), _mm512_set1_epi32(qb[1]));
      a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(w, m2), _mm512_set1_epi32(qb[2]));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(w, m3), _mm512_set1_epi32(qb[3]));
    }
    a1 = _mm512_srai_epi32(a1, 2);
    a2 = _mm512_srai_epi32(a2, 4);
    a3 = _mm512_srai_epi32(a3, 6);
    const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)), off);
    _mm512_storeu_si512(g.scores + t * kTileRows, d);
    _mm512_storeu_ps(g.logits + t * kTileRows, _mm512_mul_ps(_mm512_cvtepi32_ps(d), c));
    const int64_t real = std::min<int64_t>(std::max<int64_t>(g.vocab - t * kTileRows, 0), kTileRows);
    const __mmask16 m = static_cast<__mmask16>((1u << real) - 1u);
    vmax = _mm512_mask_max_epi32(vmax, m, vmax, d);
    vmin = _mm512_mask_min_epi32(vmin, m, vmin, d);
  }
  *mx = _mm512_reduce_max_epi32(vmax);
  *mn = _mm512_reduce_min_epi32(vmin);
}

__attribute__((target("avx2")))
void head_dot_avx2(const HeadArgs& g, int64_t t0, int64_t t1, int32_t* mx, int32_t* mn) {
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i off = _mm256_set1_epi32(g.off);
  const __m256 c = _mm256_set1_ps(g.c);
  int32_t best = INT32_MIN, worst = INT32_MAX;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = g.packed + t * g.kblocks * 64;
    for (int half = 0; half < 2; ++half) {  // rows 0..7, then 8..15 of the tile
      __m256i a0 = _mm256_setzero_si256(), a1 = a0;
      for (int64_t b = 0; b < g.kblocks; ++b) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * 64 + half * 32));
        const int32_t* qb = g.q4 + 4 * b;
        // codes ≤ 2 and |q| ≤ 127: the int16 pair sums of maddubs (≤ 508) never saturate.
        const __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(w, three), _mm256_set1_epi32(qb[0]));
        const __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 2), three), _mm256_set1_epi32(qb[1]));
        const __m256i p2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), three), _mm256_set1_epi32(qb[2]));
        const __m256i p3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 6), three), _mm256_set1_epi32(qb[3]));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_add_epi16(p2, p3), ones));
      }
      const int64_t row0 = t * kTileRows + half * 8;
      const __m256i d = _mm256_sub_epi32(_mm256_add_epi32(a0, a1), off);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.scores + row0), d);
      _mm256_storeu_ps(g.logits + row0, _mm256_mul_ps(_mm256_cvtepi32_ps(d), c));
    }
    for (int64_t i = t * kTileRows, e = std::min(g.vocab, (t + 1) * kTileRows); i < e; ++i) {
      best = std::max(best, g.scores[i]);
      worst = std::min(worst, g.scores[i]);
    }
  }
  *mx = best;
  *mn = worst;
}
#endif

void head_dot_scalar(const HeadArgs& g, int64_t t0, int64_t t1, int32_t* mx, int32_t* mn) {
  int32_t best = INT32_MIN, worst = INT32_MAX;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = g.packed + t * g.kblocks * 64;
    for (int64_t r = 0; r < kTileRows; ++r) {
      int32_t acc = 0;
      for (int64_t b = 0; b < g.kblocks; ++b) {
        const int8_t* qb = reinterpret_cast<const int8_t*>(g.q4 + 4 * b);
        for (int u = 0; u < 4; ++u)
          for (int m = 0; m < 4; ++m)
            acc += static_cast<int32_t>((p[b * 64 + r * 4 + m] >> (2 * u)) & 3) * qb[4 * u + m];
      }
      const int64_t i = t * kTileRows + r;
      const int32_t d = acc - g.off;
      g.scores[i] = d;
      g.logits[i] = static_cast<float>(d) * g.c;
      if (i < g.vocab) {
        best = std::max(best, d);
        worst = std::min(worst, d);
      }
    }
  }
  *mx = best;
  *mn = worst;
}

// Rows whose D is within `margin` of the best (the reference's argmax candidates).
int64_t count_near(const int32_t* scores, int64_t n, int32_t best, int64_t margin, bool want_max) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t gap = want_max ? static_cast<int64_t>(best) - scores[i] : static_cast<int64_t>(scores[i]) - best;
    count += gap <= margin;
  }
  return count;
}

#ifdef BITMAR_X86
__attribute__((target("avx512f,avx512bw")))
int64_t count_near_avx512(const int32_t* scores, int64_t n, int32_t best, int64_t margin, bool want_max) {
  int64_t count = 0;  // the loop above, vectorised by the compiler for AVX-512
  for (int64_t i = 0; i < n; ++i) {
    const int64_t gap = want_max ? static_cast<int64_t>(best) - scores[i] : static_cast<int64_t>(scores[i]) - best;
    count += gap <= margin;
  }
  return count;
}
#endif

using HeadDot = void (*)(const HeadArgs&, int64_t, int64_t, int32_t*, int32_t*);
using CountNear = int64_t (*)(const int32_t*, int64_t, int32_t, int64_t, bool);

HeadDot pick_head_dot(std::string* name, CountNear* count) {
  *count = count_near;
#ifdef BITMAR_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni")) {
    *name = "avx512vnni";
    *count = count_near_avx512;
    return head_dot_avx512vnni;
  }
  if (__builtin_cpu_supports("avx2")) {
    *name = "avx2";
    return head_dot_avx2;
  }
#endif
  *name = "scalar";
  return head_dot_scalar;
}

struct Linear {  // a ternary linear in the reference's inference form: y = F.linear(q/s, β·T) · γ
  at::Tensor wt;  // (in, out) view of the (out, in) FP32 β·T that PackedBitLinear caches: weight.t()
  float gamma;
};

struct Layer {
  at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  double ln1_eps, ln2_eps;
  Linear qkv, proj, fc, mlp_proj, cond_mix;  // cond_mix only with conditioning: concat
};

class Stepper {
 public:
  Stepper(int64_t d_model, int64_t n_heads, int64_t vocab, bool concat,
          double quant_eps, at::Tensor wte, std::vector<std::vector<at::Tensor>> layer_tensors,
          std::vector<std::vector<double>> layer_scalars, at::Tensor lnf_w, at::Tensor lnf_b, double lnf_eps,
          at::Tensor head_packed, int64_t head_in, double head_beta, double head_gamma)
      : d_(d_model), h_(n_heads), hd_(d_model / n_heads), vocab_(vocab),
        concat_(concat), eps_(static_cast<float>(quant_eps)), wte_(wte), lnf_w_(lnf_w),
        lnf_b_(lnf_b), lnf_eps_(lnf_eps), packed_(head_packed), head_in_(head_in),
        beta_(static_cast<float>(head_beta)), gamma_(static_cast<float>(head_gamma)) {
    TORCH_CHECK(layer_tensors.size() == layer_scalars.size(), "bitmar_fast: layer lists differ in length");
    // per layer: tensors [ln1_w, ln1_b, ln2_w, ln2_b, W_qkv, W_proj, W_fc, W_mlp_proj (, W_cond_mix)],
    //            scalars [ln1_eps, ln2_eps, γ_qkv, γ_proj, γ_fc, γ_mlp_proj (, γ_cond_mix)]
    const size_t nt = concat ? 9 : 8, ns = concat ? 7 : 6;
    for (size_t i = 0; i < layer_tensors.size(); ++i) {
      const auto& t = layer_tensors[i];
      const auto& s = layer_scalars[i];
      TORCH_CHECK(t.size() == nt && s.size() == ns, "bitmar_fast: layer ", i, " has ", t.size(), " tensors and ",
                  s.size(), " scalars, expected ", nt, " and ", ns);
      Layer L;
      L.ln1_w = t[0]; L.ln1_b = t[1]; L.ln2_w = t[2]; L.ln2_b = t[3];
      L.ln1_eps = s[0]; L.ln2_eps = s[1];
      L.qkv = {t[4].t(), static_cast<float>(s[2])};
      L.proj = {t[5].t(), static_cast<float>(s[3])};
      L.fc = {t[6].t(), static_cast<float>(s[4])};
      L.mlp_proj = {t[7].t(), static_cast<float>(s[5])};
      if (concat) L.cond_mix = {t[8].t(), static_cast<float>(s[6])};
      for (size_t j = 4; j < nt; ++j)
        TORCH_CHECK(t[j].is_contiguous() && t[j].dtype() == at::kFloat, "bitmar_fast: layer ", i,
                    " weight ", j, " must be a contiguous FP32 (out, in) matrix");
      layers_.push_back(L);
    }
    kblocks_ = (head_in_ + kBlockK - 1) / kBlockK;
    TORCH_CHECK(packed_.dtype() == at::kByte && packed_.is_contiguous() && packed_.numel() % (kblocks_ * 64) == 0,
                "bitmar_fast: head codes must be contiguous uint8 tiles of ", kblocks_ * 64, " bytes");
    tiles_ = packed_.numel() / (kblocks_ * 64);
    TORCH_CHECK(tiles_ * kTileRows >= vocab_, "bitmar_fast: head codes hold fewer rows than the vocabulary");
    TORCH_CHECK(wte.numel() == 0 || (wte.dtype() == at::kFloat && wte.is_contiguous() && wte.size(1) == d_model),
                "bitmar_fast: wte must be a contiguous FP32 (vocab, d) table, or empty when tied");
    TORCH_CHECK(head_in == d_model, "bitmar_fast: the head must read the d_model-wide hidden state");
    dot_ = pick_head_dot(&kernel_, &count_);
    att_scale_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd_)));
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    x_ = at::empty({1, 1, d_}, f32);
    xc_ = at::empty({1, 2 * d_}, f32);
    a_d_ = at::empty({1, d_}, f32);
    a_2d_ = at::empty({1, 2 * d_}, f32);
    const int64_t hidden = layers_.empty() ? d_ : layers_[0].fc.wt.size(1);  // mlp_ratio · d
    a_4d_ = at::empty({1, hidden}, f32);
    qkv_ = at::empty({1, 3 * d_}, f32);
    out_d_ = at::empty({1, d_}, f32);
    fc_ = at::empty({1, hidden}, f32);
    y_ = at::empty({h_, 1, hd_}, f32);
    // q = qkv.view(1,1,3d)[..., :d].view(1,1,H,hd).transpose(1,2), as split_heads makes it
    q_view_ = qkv_.view({1, 1, 3 * d_}).narrow(-1, 0, d_).view({1, 1, h_, hd_}).transpose(1, 2);
    scores_.assign(tiles_ * kTileRows, 0);
    q4_.assign(kblocks_ * 4, 0);
  }

  std::string kernel() const { return kernel_; }

  // c_ℓ = P_ℓ([q ; M_r]) per layer, (1,1,d) each, computed by the reference modules in Python.
  void set_conditioning(std::vector<at::Tensor> c) {
    TORCH_CHECK(c.size() == layers_.size(), "bitmar_fast: one conditioning vector per layer expected");
    cond_ = std::move(c);
  }

  // The SinkKVCache tensors (k, v: (1,H,S+W,hd) FP32 contiguous; slot_pos: (S+W,) int64;
  // sink_raw: (1,H,S,hd), the sink keys before rotation).
  void set_caches(std::vector<at::Tensor> k, std::vector<at::Tensor> v, std::vector<at::Tensor> slot_pos,
                  std::vector<at::Tensor> sink_raw, int64_t sink, int64_t window) {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size() && slot_pos.size() == layers_.size() &&
                sink_raw.size() == layers_.size(), "bitmar_fast: one cache per layer expected");
    for (size_t i = 0; i < sink_raw.size(); ++i)
      TORCH_CHECK(sink_raw[i].is_contiguous() && sink_raw[i].dtype() == at::kFloat && sink_raw[i].dim() == 4 &&
                  sink_raw[i].size(1) == h_ && sink_raw[i].size(2) == sink && sink_raw[i].size(3) == hd_,
                  "bitmar_fast: sink_raw ", i, " is not a batch-1 FP32 contiguous (1,H,S,hd) tensor");
    sink_raw_ = std::move(sink_raw);
    for (size_t i = 0; i < k.size(); ++i) {
      TORCH_CHECK(k[i].is_contiguous() && v[i].is_contiguous() && k[i].dtype() == at::kFloat &&
                  k[i].dim() == 4 && k[i].size(0) == 1 && k[i].size(1) == h_ && k[i].size(3) == hd_ &&
                  k[i].size(2) == sink + window && v[i].sizes() == k[i].sizes(),
                  "bitmar_fast: cache ", i, " is not a batch-1 FP32 contiguous (1,H,S+W,hd) pair");
      TORCH_CHECK(slot_pos[i].dtype() == at::kLong && slot_pos[i].numel() == sink + window,
                  "bitmar_fast: slot_pos ", i, " must be int64 (S+W,)");
    }
    k_ = std::move(k); v_ = std::move(v); slot_pos_ = std::move(slot_pos);
    sink_ = sink; window_ = window;
    if (att_buf_.numel() != h_ * (sink + window)) {
      att_buf_ = at::empty({h_ * (sink + window)}, at::kFloat);
      blas_threads_ = -1;  // re-check attention spans for this cache size
    }
    if (probs_buf_.numel() != h_ * (sink + window)) probs_buf_ = at::empty({h_ * (sink + window)}, at::kFloat);
  }

  // Token `tok` at stream index t, with the rotary cos/sin of t ((hd/2,) FP32 each, from the
  // reference's RotaryTable; the sinks' re-rotation is done in Python before this call): writes
  // every layer's cache slot, returns FP32 logits (vocab,).
  at::Tensor step(int64_t tok, int64_t t, const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(!k_.empty() && cond_.size() == layers_.size(), "bitmar_fast: set_caches/set_conditioning first");
    TORCH_CHECK(tok >= 0 && tok < vocab_, "bitmar_fast: token id ", tok, " outside [0, ", vocab_, ")");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dtype() == at::kFloat && sin.dtype() == at::kFloat &&
                cos.numel() == hd_ / 2 && sin.numel() == hd_ / 2, "bitmar_fast: cos/sin must be (hd/2,) FP32");
    const int64_t cap = sink_ + window_;
    const int64_t slot = t < sink_ ? t : sink_ + (t - sink_) % window_;
    const int64_t n_valid = std::min(t + 1, cap);
    check_blas();
    float* px = x_.data_ptr<float>();
    embed_row(tok, px);
    const float* pcos = cos.data_ptr<float>();
    const float* psin = sin.data_ptr<float>();
    const int64_t half = hd_ / 2;
    // att / probs: contiguous (H,1,n) views of the (H,1,S+W) buffers, as bmm would allocate them
    at::Tensor att = att_buf_.as_strided({h_, 1, n_valid}, {n_valid, n_valid, 1});
    at::Tensor probs = probs_buf_.as_strided({h_, 1, n_valid}, {n_valid, n_valid, 1});
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      const float* pc = cond_[i].data_ptr<float>();
      if (concat_) {  // x = cond_mix([x ; c])
        float* pxc = xc_.data_ptr<float>();
        std::memcpy(pxc, px, d_ * sizeof(float));
        std::memcpy(pxc + d_, pc, d_ * sizeof(float));
        linear(pxc, L.cond_mix, a_2d_, out_d_);
        std::memcpy(px, out_d_.data_ptr<float>(), d_ * sizeof(float));
      } else {
        add_(px, pc, d_);
      }
      // attention over the reference's views: q = split_heads(chunk(qkv)[0]), its sliced cache
      linear(at::layer_norm(x_, {d_}, L.ln1_w, L.ln1_b, L.ln1_eps).data_ptr<float>(), L.qkv, a_d_, qkv_);
      {
        float* pq = qkv_.data_ptr<float>();
        if (t < sink_) {  // the sink's key before rotation, for its later re-rotation
          float* pr = sink_raw_[i].data_ptr<float>();
          for (int64_t hh = 0; hh < h_; ++hh)
            std::memcpy(pr + (hh * sink_ + t) * hd_, pq + d_ + hh * hd_, hd_ * sizeof(float));
        }
        // rotate(x) = [x1·cos − x2·sin ; x2·cos + x1·sin] per head, for q and k: the reference's
        // four products and two sums, each rounded once (no FMA: -ffp-contract=off)
        for (int64_t part = 0; part < 2; ++part) {
          for (int64_t hh = 0; hh < h_; ++hh) {
            float* x = pq + part * d_ + hh * hd_;
            for (int64_t j = 0; j < half; ++j) {
              const float x1 = x[j], x2 = x[j + half];
              const float a = x1 * pcos[j];
              const float b = x2 * psin[j];
              const float c = x2 * pcos[j];
              const float e = x1 * psin[j];
              x[j] = a - b;
              x[j + half] = c + e;
            }
          }
        }
        float* pk = k_[i].data_ptr<float>();
        float* pv = v_[i].data_ptr<float>();
        for (int64_t hh = 0; hh < h_; ++hh) {
          std::memcpy(pk + (hh * cap + slot) * hd_, pq + d_ + hh * hd_, hd_ * sizeof(float));
          std::memcpy(pv + (hh * cap + slot) * hd_, pq + 2 * d_ + hh * hd_, hd_ * sizeof(float));
        }
        slot_pos_[i].data_ptr<int64_t>()[slot] = t;
      }
      // What at::matmul does with these 4-D operands: expand, reshape to 3-D, bmm.
      const bool by_blas = attention_by_blas(n_valid);
      if (by_blas) {
        blas_scores(qkv_.data_ptr<float>(), k_[i].data_ptr<float>(), cap, n_valid, att.data_ptr<float>());
      } else {
        at::Tensor q = q_view_.expand({1, h_, 1, hd_}).reshape({h_, 1, hd_});
        at::Tensor keys = k_[i].narrow(2, 0, n_valid).transpose(-2, -1).expand({1, h_, hd_, n_valid}).reshape({h_, hd_, n_valid});
        at::bmm_out(att, q, keys);
      }
      {  // `* (1.0 / math.sqrt(hd))`: ATen casts the Python float to FP32 and multiplies once
        float* pa = att.data_ptr<float>();
        for (int64_t j = 0, n = att.numel(); j < n; ++j) pa[j] = pa[j] * att_scale_;
      }
      at::_softmax_out(probs, att, -1, false);
      if (by_blas) {  // y (H,1,hd): already merge_heads' (1,1,H·hd) order
        blas_mix(probs.data_ptr<float>(), v_[i].data_ptr<float>(), cap, n_valid, y_.data_ptr<float>());
      } else {
        at::Tensor values = v_[i].narrow(2, 0, n_valid).expand({1, h_, n_valid, hd_}).reshape({h_, n_valid, hd_});
        at::bmm_out(y_, probs, values);
      }
      linear(y_.data_ptr<float>(), L.proj, a_d_, out_d_);
      add_(px, out_d_.data_ptr<float>(), d_);
      linear(at::layer_norm(x_, {d_}, L.ln2_w, L.ln2_b, L.ln2_eps).data_ptr<float>(), L.fc, a_d_, fc_);
      const at::Tensor m = at::gelu(fc_);  // (the out= form is slower: it wraps oneDNN's output)
      linear(m.data_ptr<float>(), L.mlp_proj, a_4d_, out_d_);
      add_(px, out_d_.data_ptr<float>(), d_);
    }
    at::Tensor hidden = at::layer_norm(x_, {d_}, lnf_w_, lnf_b_, lnf_eps_);
    return head(hidden, true);
  }

  // Head on one (1,1,d) hidden row: logits (vocab,) and whether the argmax was an exact tie
  // (then the logits are the reference's own, computed by dequantising the head).
  std::tuple<at::Tensor, bool> head_logits(const at::Tensor& hidden, bool resolve_ties) {
    TORCH_CHECK(hidden.numel() == head_in_ && hidden.dtype() == at::kFloat, "bitmar_fast: head input must be ",
                head_in_, " FP32 values");
    at::Tensor h = hidden.contiguous().view({1, 1, head_in_});
    at::Tensor out = head(h, resolve_ties);
    return {out, last_tie_};
  }

  // β·T of the head, (vocab, in) FP32: what PackedBitLinear would cache (for ties and tests).
  at::Tensor dequantized_head() const {
    at::Tensor w = at::empty({vocab_, head_in_}, at::kFloat);
    float* pw = w.data_ptr<float>();
    at::parallel_for(0, vocab_, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) unpack_row(r, pw + r * head_in_);
    });
    return w;
  }

  int64_t ties_resolved() const { return ties_resolved_; }

  // Whether the last step called BLAS directly for (the linears, attention): only where checked
  // bit-identical to ATen's calls at the current thread count.
  std::tuple<bool, bool> blas_direct() const { return {blas_, blas_attention_}; }
  void allow_blas_direct(bool allowed) { blas_allowed_ = allowed; blas_threads_ = -1; }

 private:
  void embed_row(int64_t tok, float* out) const {
    if (wte_.numel() > 0) {
      std::memcpy(out, wte_.data_ptr<float>() + tok * d_, d_ * sizeof(float));
    } else {
      unpack_row(tok, out);  // tied embedding: row tok of β·T (exact: T ∈ {-1,0,1})
    }
  }

  void unpack_row(int64_t row, float* out) const {
    const uint8_t* p = packed_.data_ptr<uint8_t>() + (row / kTileRows) * kblocks_ * 64 + (row % kTileRows) * 4;
    for (int64_t k = 0; k < head_in_; ++k) {
      const int64_t b = k / kBlockK, u = (k % kBlockK) / 4, m = k % 4;
      const int code = (p[b * 64 + m] >> (2 * u)) & 3;
      out[k] = static_cast<float>(code - 1) * beta_;
    }
  }

  static void add_(float* x, const float* y, int64_t n) {  // x ← x + y (the reference's `x + ...`)
    for (int64_t j = 0; j < n; ++j) x[j] = x[j] + y[j];
  }

  // out (1,N) ← F.linear(q/s, β·T) · γ of the K inputs at x, through `a` (1,K): the reference's
  // linear on a (1,1,K) input is this very mm (matmul folds the leading dims).
  void linear(const float* x, const Linear& L, at::Tensor& a, at::Tensor& out) {
    quantize(x, a.size(1), eps_, a.data_ptr<float>(), nullptr);
    if (blas_) {
      blas_gemv(L, a.data_ptr<float>(), out.data_ptr<float>());
    } else {
      at::mm_out(out, a, L.wt);
    }
    float* py = out.data_ptr<float>();
    for (int64_t j = 0, m = out.numel(); j < m; ++j) py[j] = py[j] * L.gamma;
  }

  // The BLAS call ATen's mm makes for (1,K) @ W.t() with W (N,K) contiguous: y = Wᵀ-gemm, m=N, n=1.
  static void blas_gemv(const Linear& L, const float* a, float* y) {
    const int m = static_cast<int>(L.wt.size(1)), k = static_cast<int>(L.wt.size(0)), one_i = 1;
    const float one = 1.0f, zero = 0.0f;
    sgemm_("t", "n", &m, &one_i, &k, &one, L.wt.data_ptr<float>(), &k, a, &k, &zero, y, &m);
  }

  // ATen's bmm runs the per-head BLAS calls below once contraction·rows·cols ≥ 400, a naive loop below.
  bool attention_by_blas(int64_t n) const { return blas_attention_ && hd_ * n >= 400; }

  // scores (H,1,n) = q_h · K_hᵀ per head, as the BLAS calls inside ATen's bmm
  void blas_scores(const float* q, const float* keys, int64_t cap, int64_t n, float* att) const {
    const int ni = static_cast<int>(n), hd = static_cast<int>(hd_), one_i = 1;
    const float one = 1.0f, zero = 0.0f;
    for (int64_t h = 0; h < h_; ++h)
      sgemm_("t", "n", &ni, &one_i, &hd, &one, keys + h * cap * hd_, &hd, q + h * hd_, &hd, &zero, att + h * n, &ni);
  }

  // y (H,1,hd) = p_h · V_h per head
  void blas_mix(const float* probs, const float* values, int64_t cap, int64_t n, float* y) const {
    const int ni = static_cast<int>(n), hd = static_cast<int>(hd_), one_i = 1;
    const float one = 1.0f, zero = 0.0f;
    for (int64_t h = 0; h < h_; ++h)
      sgemm_("n", "n", &hd, &one_i, &ni, &one, values + h * cap * hd_, &hd, probs + h * n, &ni, &zero, y + h * hd_, &hd);
  }

  // Direct BLAS is used only where it gives ATen's bits: checked against the ATen calls on every
  // weight and on attention spans around the switch-over and up to the cache size, for the
  // current thread count (re-checked when it changes). With 2+ threads ATen's bmm splits the
  // heads over threads and MKL then sums differently, so attention keeps to ATen there.
  void check_blas() {
    const int threads = at::get_num_threads();
    if (threads == blas_threads_) return;
    blas_threads_ = threads;
    blas_ = blas_attention_ = false;
    if (!blas_allowed_ || sgemm_ == nullptr) return;
    bool linear_same = true, attention_same = true;
    auto pattern = [](int64_t n, double f) {
      return at::sin(at::arange(n, at::kFloat).mul(f)).mul(3.0f).reshape({1, n}).contiguous();
    };
    std::vector<const Linear*> lins;
    for (const Layer& L : layers_) {
      for (const Linear* l : {&L.qkv, &L.proj, &L.fc, &L.mlp_proj}) lins.push_back(l);
      if (concat_) lins.push_back(&L.cond_mix);
    }
    for (const Linear* l : lins) {
      at::Tensor a = pattern(l->wt.size(0), 0.37), ref = at::mm(a, l->wt), y = at::empty_like(ref);
      blas_gemv(*l, a.data_ptr<float>(), y.data_ptr<float>());
      linear_same = linear_same && at::equal(y, ref);
    }
    const int64_t cap = sink_ + window_;
    if (cap > 0) {
      at::Tensor keys = pattern(h_ * cap * hd_, 0.11).view({1, h_, cap, hd_});
      at::Tensor values = pattern(h_ * cap * hd_, 0.23).view({1, h_, cap, hd_});
      at::Tensor qkv = pattern(3 * d_, 0.71);
      at::Tensor q = qkv.view({1, 1, 3 * d_}).narrow(-1, 0, d_).view({1, 1, h_, hd_}).transpose(1, 2);
      const int64_t first = (400 + hd_ - 1) / hd_;
      for (int64_t n : {first, first + 1, first + 7, cap / 2 + 1, cap - 1, cap}) {
        if (n < first || n > cap) continue;
        at::Tensor kn = keys.narrow(2, 0, n), vn = values.narrow(2, 0, n);
        at::Tensor att = at::matmul(q, kn.transpose(-2, -1));
        at::Tensor probs = at::softmax(att, -1);
        at::Tensor y = at::matmul(probs, vn);
        at::Tensor att2 = at::empty({h_, n}), y2 = at::empty({h_, hd_});
        blas_scores(qkv.data_ptr<float>(), keys.data_ptr<float>(), cap, n, att2.data_ptr<float>());
        blas_mix(probs.contiguous().data_ptr<float>(), values.data_ptr<float>(), cap, n, y2.data_ptr<float>());
        attention_same = attention_same && at::equal(att2, att.reshape({h_, n})) && at::equal(y2, y.reshape({h_, hd_}));
      }
    }
    blas_ = linear_same;
    blas_attention_ = linear_same && attention_same;
  }

  at::Tensor head(const at::Tensor& hidden, bool resolve_ties) {
    const float* ph = hidden.data_ptr<float>();
    const int64_t kp = kblocks_ * kBlockK;
    std::vector<int8_t> q8(kp, 0);
    std::vector<float> a(head_in_);
    const float s = quantize(ph, head_in_, eps_, a.data(), q8.data());
    std::memcpy(q4_.data(), q8.data(), kp);
    int64_t sum_q = 0, sum_abs_q = 0;
    for (int64_t j = 0; j < head_in_; ++j) { sum_q += q8[j]; sum_abs_q += std::abs(static_cast<int>(q8[j])); }

    // logits = (β/s)·γ·D. D < 2²⁴ is exact in FP32; the product is within 2 ulp of exact.
    const float c = (beta_ / s) * gamma_;
    at::Tensor out = at::empty({tiles_ * kTileRows}, at::kFloat);
    HeadArgs g{packed_.data_ptr<uint8_t>(), q4_.data(), kblocks_, vocab_, static_cast<int32_t>(sum_q), c,
               scores_.data(), out.data_ptr<float>()};
    std::mutex mu;
    int32_t best_max = INT32_MIN, best_min = INT32_MAX;
    const HeadDot dot = dot_;
    at::parallel_for(0, tiles_, 512, [&](int64_t t0, int64_t t1) {
      int32_t mx, mn;
      dot(g, t0, t1, &mx, &mn);
      std::lock_guard<std::mutex> lock(mu);
      best_max = std::max(best_max, mx);
      best_min = std::min(best_min, mn);
    });
    const bool want_max = c > 0.0f;  // γ < 0 flips the order; c == 0 makes every logit equal
    const int32_t best = want_max ? best_max : best_min;
    // The reference's rounding is below `margin` units of D; rows that close to the best are
    // candidates for its argmax (margin = 0 for K ≤ ~250: only exact ties).
    const double bound = 2.0 * static_cast<double>(head_in_ + 2) * std::ldexp(1.0, -24) * static_cast<double>(sum_abs_q);
    const int64_t margin = static_cast<int64_t>(std::floor(bound));
    const int64_t candidates = (c == 0.0f || !std::isfinite(c)) ? vocab_ : count_(scores_.data(), vocab_, best, margin, want_max);
    last_tie_ = candidates > 1;
    if (last_tie_ && resolve_ties) {
      ++ties_resolved_;
      at::Tensor at_a = at::from_blob(a.data(), {1, 1, head_in_}, at::kFloat).clone();
      at::Tensor w = dequantized_head();
      at::Tensor ref = at::mul(at::linear(at_a, w), at::scalar_tensor(gamma_, at::kFloat).reshape({1}));
      return ref.reshape({vocab_});
    }
    return out.narrow(0, 0, vocab_);
  }

  int64_t d_, h_, hd_, vocab_;
  bool concat_;
  float eps_;
  at::Tensor wte_;
  std::vector<Layer> layers_;
  at::Tensor lnf_w_, lnf_b_;
  double lnf_eps_;
  at::Tensor packed_;
  int64_t head_in_;
  float beta_, gamma_;
  int64_t tiles_ = 0, kblocks_ = 0;
  HeadDot dot_;
  CountNear count_;
  std::string kernel_;
  std::vector<int32_t> scores_;
  std::vector<int32_t> q4_;
  std::vector<at::Tensor> cond_, k_, v_, slot_pos_, sink_raw_;
  int64_t sink_ = 0, window_ = 0;
  float att_scale_ = 0.0f;
  bool blas_ = false, blas_attention_ = false, blas_allowed_ = true;
  int blas_threads_ = -1;
  at::Tensor x_, xc_, a_d_, a_2d_, a_4d_, qkv_, out_d_, fc_, y_, q_view_, att_buf_, probs_buf_;
  bool last_tie_ = false;
  int64_t ties_resolved_ = 0;
};

// The quantiser alone, for the tests: returns (a = q/s, s).
std::tuple<at::Tensor, double> quantize_row(const at::Tensor& x, double eps, bool simd) {
  at::Tensor xc = x.contiguous().to(at::kFloat);
  at::Tensor a = at::empty_like(xc);
  const Quantize f = simd ? quantize : quantize_scalar;
  const float s = f(xc.data_ptr<float>(), xc.numel(), static_cast<float>(eps), a.data_ptr<float>(), nullptr);
  return {a, s};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "BitMar batch-1 decode step: ATen for order-sensitive ops, a packed 2-bit ternary head";
  m.def("quantize_row", &quantize_row);
  py::class_<Stepper>(m, "Stepper")
      .def(py::init<int64_t, int64_t, int64_t, bool, double, at::Tensor,
                    std::vector<std::vector<at::Tensor>>, std::vector<std::vector<double>>, at::Tensor,
                    at::Tensor, double, at::Tensor, int64_t, double, double>())
      .def("kernel", &Stepper::kernel)
      .def("set_conditioning", &Stepper::set_conditioning)
      .def("set_caches", &Stepper::set_caches)
      .def("step", &Stepper::step)
      .def("head_logits", &Stepper::head_logits)
      .def("dequantized_head", &Stepper::dequantized_head)
      .def("ties_resolved", &Stepper::ties_resolved)
      .def("blas_direct", &Stepper::blas_direct)
      .def("allow_blas_direct", &Stepper::allow_blas_direct);
}
