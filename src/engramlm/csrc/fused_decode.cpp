// Fused CPU kernels for KV-cached decoding with Engram (engramlm.kernels builds this file into a
// Python module).
//
// A decode step works on a few positions, so its time is mostly the fixed cost of each operator
// it dispatches: hashing the new token and running one Engram layer took ~90 small PyTorch
// operators, as many as the whole backbone's attention and FFN blocks at 4 layers
// (docs/benchmarks.md, goal 2). These two functions do the same work in one call each:
//
//   hash_step    raw ids -> compressed ids -> every Engram layer's head-local rows, and the
//                next n-gram prefix (hashing.hash_ngrams + NgramHasher.next_prefix)
//   engram_step  gather -> key/value projection -> gates -> short conv (-> + hidden):
//                Engram.forward's Y (or the residual stream after it) and new conv state
//
// They compute what the PyTorch path computes (tests/test_fused.py holds them to it): the hash
// is integer-exact; the layer agrees to float rounding (its sums run in another order than
// ATen's vectorised ones). Float32 only, CPU only; the Python side keeps PyTorch's operators
// for anything else.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ENGRAMLM_X86 1
#endif

namespace {

constexpr int64_t kDead = -1;  // hashing.DEAD: no token here; blocks older look-backs
// From this many positions the key/value projection is one BLAS GEMM; under it, gemv below. A
// decode step's projection is a few positions against a weight the backbone's layers have
// pushed out of L2. One thread, E=256, 512 outputs, the whole Engram step with caches flushed
// before each call (as between a decode step's layers) / warm: B=1 36 / 10 us, where at::linear
// alone takes 44 / 13 us; B=8 69 / 38 us, against 89 / 37 us with the BLAS GEMM.
constexpr int64_t kGemmPositions = 16;
// From this many elements SiLU is ATen's vectorised kernel; under it, scalar expf.
constexpr int64_t kVectorSilu = 1024;

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "engramlm fused kernels run on the CPU; ", name, " is on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Python's (and torch.remainder's) modulo for a positive divisor: in [0, p).
inline int64_t floor_mod(int64_t x, int64_t p) {
  int64_t r = x % p;
  return r < 0 ? r + p : r;
}

// Wrapping int64 multiply, as torch's int64 kernels wrap (signed overflow is undefined in C++).
inline int64_t wrap_mul(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
}

// sum_i a[i] b[i] (w[i]) in 8 float partial sums: vectorisable without reassociating, and
// float accumulation as ATen's reductions do it (in another order; the result differs in the
// last bits).
inline float dot8(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline float dot8w(const float* a, const float* b, const float* w, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * (b[i + j] * w[i + j]);
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) sum += a[i] * (b[i] * w[i]);
  return sum;
}

// y[p, o] = W[o] . x[p] (+ bias[o]) for P rows x [P, E] and W [O, E], each W row read once
// (all P dot products while it is in L1). A decode step's projection is a few positions against
// a weight that the backbone's layers have pushed out of L2, so reading W once, in order, is
// what costs; at::linear's oneDNN/BLAS path costs ~10 us more per call on such a cold step.
void gemv_generic(const float* W, const float* x, const float* bias, float* y, int64_t P,
                  int64_t O, int64_t E) {
  for (int64_t o = 0; o < O; ++o)
    for (int64_t p = 0; p < P; ++p)
      y[p * O + o] = dot8(W + o * E, x + p * E, E) + (bias ? bias[o] : 0.0f);
}

#ifdef ENGRAMLM_X86
// The same, with AVX-512 or AVX2+FMA where the CPU has them (checked once, at run time). One
// position: four accumulators per row (one would wait on the FMA's latency). Several (AVX2):
// four at a time, each with its own accumulator, sharing every load of W; AVX-512 blocks four
// rows too (gemm_small_avx512 below).
__attribute__((target("avx512f"))) void gemv1_avx512(const float* W, const float* x,
                                                      const float* bias, float* y, int64_t O,
                                                      int64_t E) {
  const int64_t E16 = E - E % 16;
  for (int64_t o = 0; o < O; ++o) {
    const float* w = W + o * E;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= E16; i += 64) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i < E16; i += 16)
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < E; ++i) sum += w[i] * x[i];
    y[o] = sum + (bias ? bias[o] : 0.0f);
  }
}

// Four rows of W against N positions at once (16 accumulators at N = 4): each load of W or x
// feeds four FMAs, so the loads no longer outnumber the FMAs.
template <int N>
__attribute__((target("avx512f"))) void block4_avx512(const float* W, const float* x,
                                                       const float* bias, float* y, int64_t o,
                                                       int64_t p0, int64_t O, int64_t E) {
  const int64_t E16 = E - E % 16;
  __m512 a[4][N];
  for (int r = 0; r < 4; ++r)
    for (int q = 0; q < N; ++q) a[r][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < E16; i += 16) {
    __m512 xv[N];
    for (int q = 0; q < N; ++q) xv[q] = _mm512_loadu_ps(x + (p0 + q) * E + i);
    for (int r = 0; r < 4; ++r) {
      const __m512 wv = _mm512_loadu_ps(W + (o + r) * E + i);
      for (int q = 0; q < N; ++q) a[r][q] = _mm512_fmadd_ps(wv, xv[q], a[r][q]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float* w = W + (o + r) * E;
    for (int q = 0; q < N; ++q) {
      const float* xq = x + (p0 + q) * E;
      float sum = _mm512_reduce_add_ps(a[r][q]);
      for (int64_t i = E16; i < E; ++i) sum += w[i] * xq[i];
      y[(p0 + q) * O + o + r] = sum + (bias ? bias[o + r] : 0.0f);
    }
  }
}

__attribute__((target("avx512f"))) void gemm_small_avx512(const float* W, const float* x,
                                                           const float* bias, float* y, int64_t P,
                                                           int64_t O, int64_t E) {
  const int64_t O4 = O - O % 4;
  for (int64_t o = 0; o < O4; o += 4) {
    for (int64_t p0 = 0; p0 < P; p0 += 4) {
      switch (std::min<int64_t>(4, P - p0)) {
        case 1: block4_avx512<1>(W, x, bias, y, o, p0, O, E); break;
        case 2: block4_avx512<2>(W, x, bias, y, o, p0, O, E); break;
        case 3: block4_avx512<3>(W, x, bias, y, o, p0, O, E); break;
        default: block4_avx512<4>(W, x, bias, y, o, p0, O, E); break;
      }
    }
  }
  for (int64_t p = 0; p < P && O4 < O; ++p)  // the last rows, position by position
    gemv1_avx512(W + O4 * E, x + p * E, bias ? bias + O4 : nullptr, y + p * O + O4, O - O4, E);
}

// Sum of the 8 lanes.
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

__attribute__((target("avx2,fma"))) void gemv_avx2(const float* W, const float* x,
                                                   const float* bias, float* y, int64_t P,
                                                   int64_t O, int64_t E) {
  const int64_t E8 = E - E % 8;
  for (int64_t o = 0; o < O; ++o) {
    const float* w = W + o * E;
    const float b = bias ? bias[o] : 0.0f;
    if (P == 1) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = 0;
      for (; i + 32 <= E8; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
      }
      for (; i < E8; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
      float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; i < E; ++i) sum += w[i] * x[i];
      y[o] = sum + b;
      continue;
    }
    for (int64_t p0 = 0; p0 < P; p0 += 4) {
      const int64_t n = std::min<int64_t>(4, P - p0);
      const float* xs = x + p0 * E;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
      for (int64_t i = 0; i < E8; i += 8) {
        const __m256 wv = _mm256_loadu_ps(w + i);
        for (int64_t q = 0; q < n; ++q)
          a[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + q * E + i), a[q]);
      }
      for (int64_t q = 0; q < n; ++q) {
        float sum = hsum(a[q]);
        for (int64_t i = E8; i < E; ++i) sum += w[i] * xs[q * E + i];
        y[(p0 + q) * O + o] = sum + b;
      }
    }
  }
}
#endif

// The instruction set gemv uses: 2 AVX-512, 1 AVX2+FMA, 0 plain C++ (what this CPU has, unless
// set_isa chose a lower one, as the tests do to cover every path on one machine).
int64_t best_isa() {
#ifdef ENGRAMLM_X86
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int64_t g_isa = best_isa();

int64_t set_isa(int64_t isa) {
  const int64_t best = best_isa();
  TORCH_CHECK(isa <= best, "this CPU supports instruction set level ", best,
              " at most (2 AVX-512, 1 AVX2+FMA, 0 plain), got ", isa);
  g_isa = isa < 0 ? best : isa;
  return g_isa;
}

void gemv(const float* W, const float* x, const float* bias, float* y, int64_t P, int64_t O,
          int64_t E) {
#ifdef ENGRAMLM_X86
  if (g_isa == 2)
    return P == 1 ? gemv1_avx512(W, x, bias, y, O, E) : gemm_small_avx512(W, x, bias, y, P, O, E);
  if (g_isa == 1) return gemv_avx2(W, x, bias, y, P, O, E);
#endif
  gemv_generic(W, x, bias, y, P, O, E);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> hash_step(
    const at::Tensor& input_ids,               // [B, T] raw ids
    const c10::optional<at::Tensor>& lookup,   // [V] raw -> compressed id (None: ids are)
    const c10::optional<at::Tensor>& prefix,   // [B, N-1] compressed ids before input_ids
    const at::Tensor& multipliers,             // [L, N]
    const at::Tensor& moduli,                  // [L, H], H = (N-1) K
    int64_t pad_id, int64_t reset_id,          // reset_id < 0: no resets
    bool dead) {
  check_cpu(input_ids, "input_ids", at::kLong);
  check_cpu(multipliers, "multipliers", at::kLong);
  check_cpu(moduli, "moduli", at::kLong);
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [B, T], got ", input_ids.sizes());
  TORCH_CHECK(multipliers.dim() == 2 && moduli.dim() == 2 &&
                  multipliers.size(0) == moduli.size(0) && multipliers.size(1) >= 2,
              "multipliers must be [L, N] and moduli [L, H], got ", multipliers.sizes(), " and ",
              moduli.sizes());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const int64_t L = multipliers.size(0), N = multipliers.size(1), H = moduli.size(1);
  const int64_t P = N - 1;
  TORCH_CHECK(H % P == 0, "moduli must hold (N-1) x K heads per layer, got H=", H, ", N=", N);
  const int64_t K = H / P;

  // full[b] = prefix (pad-filled without one) then the compressed ids: [B, P + T]
  std::vector<int64_t> full(static_cast<size_t>(B * (P + T)), pad_id);
  if (prefix.has_value()) {
    const at::Tensor pre = prefix->contiguous();
    check_cpu(pre, "prefix", at::kLong);
    TORCH_CHECK(pre.dim() == 2 && pre.size(0) == B && pre.size(1) == P,
                "prefix must be [B, N-1] = [", B, ", ", P, "], got ", pre.sizes());
    const int64_t* p = pre.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(&full[b * (P + T)], p + b * P, sizeof(int64_t) * P);
  }
  const at::Tensor ids = input_ids.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* table = nullptr;
  int64_t vocab = 0;
  at::Tensor lut;
  if (lookup.has_value()) {
    lut = lookup->contiguous();
    check_cpu(lut, "lookup", at::kLong);
    table = lut.data_ptr<int64_t>();
    vocab = lut.numel();
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      int64_t x = id[b * T + t];
      if (table != nullptr && !(dead && x == kDead)) {
        TORCH_CHECK(x >= 0 && x < vocab, "token id ", x, " at position (", b, ", ", t,
                    ") is out of range [0, ", vocab, ")");
        x = table[x];
      }
      full[b * (P + T) + P + t] = x;
    }
  }

  const at::Tensor mult = multipliers.contiguous(), mods = moduli.contiguous();
  const int64_t* m = mult.data_ptr<int64_t>();
  const int64_t* mod = mods.data_ptr<int64_t>();
  for (int64_t i = 0; i < L * H; ++i)
    TORCH_CHECK(mod[i] > 0, "moduli must be positive, got ", mod[i]);
  std::vector<at::Tensor> rows;
  rows.reserve(L);
  for (int64_t l = 0; l < L; ++l) rows.push_back(at::empty({B, T, H}, ids.options()));
  const bool blocking = dead || reset_id >= 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* f = &full[b * (P + T)];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = P + t;  // index of the current token in f
      bool blocked = dead && f[pos] == kDead;
      const int64_t current = blocked ? pad_id : f[pos];
      for (int64_t l = 0; l < L; ++l) {
        const int64_t* ml = m + l * N;
        const int64_t* pl = mod + l * H;
        int64_t* out = rows[l].data_ptr<int64_t>() + (b * T + t) * H;
        int64_t mix = wrap_mul(current, ml[0]);
        bool blk = blocked;
        for (int64_t k = 1; k < N; ++k) {
          const int64_t prev = f[pos - k];  // x'_{t-k}
          if (blocking) blk = blk || (dead && prev == kDead) || (reset_id >= 0 && prev == reset_id);
          mix ^= wrap_mul(blk ? pad_id : prev, ml[k]);
          for (int64_t j = 0; j < K; ++j) out[(k - 1) * K + j] = floor_mod(mix, pl[(k - 1) * K + j]);
        }
      }
    }
  }
  at::Tensor next = at::empty({B, P}, ids.options());
  int64_t* nx = next.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(nx + b * P, &full[b * (P + T) + T], sizeof(int64_t) * P);
  return {rows, next};
}

std::tuple<at::Tensor, at::Tensor> engram_step(
    const at::Tensor& hidden,                          // [B, T, M, D]
    const c10::optional<at::Tensor>& hash_ids,         // [B, T, H] head-local rows
    const c10::optional<at::Tensor>& conv_state,       // [B, M D, (w-1) dilation]
    const c10::optional<at::Tensor>& mask,             // [B, T] bool: false zeroes the gate
    bool residual,                                     // return hidden + Y instead of Y
    const c10::optional<at::Tensor>& memory,           // [B, T, E] rows retrieved, or:
    const c10::optional<at::Tensor>& table,            // [R, hd] rows of all heads
    const c10::optional<at::Tensor>& offsets,          // [H] first row of each head
    const at::Tensor& kv_weight,                       // [(nk + 1) D, E]: nk keys, value
    const c10::optional<at::Tensor>& kv_bias,          // [(nk + 1) D]
    const c10::optional<at::Tensor>& query_weight,     // [M, D] the gate's query RMSNorm
    const c10::optional<at::Tensor>& key_weight,       // [M, D] the gate's key RMSNorm
    double query_eps, double key_eps,
    int64_t gate_mode,                                 // 0 none, 1 plain, 2 signed sqrt
    const c10::optional<at::Tensor>& conv_weight,      // [M D, 1, w]
    const c10::optional<at::Tensor>& conv_norm_weight, // [M, D]
    double conv_eps, int64_t dilation) {
  check_cpu(hidden, "hidden", at::kFloat);
  check_cpu(kv_weight, "kv_weight", at::kFloat);
  TORCH_CHECK(hidden.dim() == 4, "hidden must be [B, T, M, D], got ", hidden.sizes());
  TORCH_CHECK(gate_mode >= 0 && gate_mode <= 2, "gate_mode must be 0, 1 or 2, got ", gate_mode);
  const int64_t B = hidden.size(0), T = hidden.size(1), M = hidden.size(2), D = hidden.size(3);
  const int64_t BT = B * T, E = kv_weight.size(1);
  const int64_t nk = gate_mode == 0 ? 0 : M;
  TORCH_CHECK(kv_weight.dim() == 2 && kv_weight.size(0) == (nk + 1) * D, "kv_weight must be [",
              (nk + 1) * D, ", E], got ", kv_weight.sizes());

  // e_t: the retrieved rows, [BT, E]
  std::vector<float> gathered;
  const float* e = nullptr;
  at::Tensor mem;
  if (memory.has_value()) {
    mem = memory->contiguous();
    check_cpu(mem, "memory", at::kFloat);
    TORCH_CHECK(mem.numel() == BT * E, "memory must be [B, T, E] = [", B, ", ", T, ", ", E,
                "], got ", mem.sizes());
    e = mem.data_ptr<float>();
  } else {
    TORCH_CHECK(table.has_value() && offsets.has_value() && hash_ids.has_value(),
                "engram_step needs memory, or table, offsets and hash_ids");
    check_cpu(*table, "table", at::kFloat);
    check_cpu(*offsets, "offsets", at::kLong);
    check_cpu(*hash_ids, "hash_ids", at::kLong);
    TORCH_CHECK(table->dim() == 2 && table->is_contiguous(), "table must be a contiguous [rows, head_dim]");
    const at::Tensor off = offsets->contiguous();
    const at::Tensor ids = hash_ids->contiguous();
    const int64_t H = off.numel(), hd = table->size(1), R = table->size(0);
    TORCH_CHECK(ids.dim() == 3 && ids.size(0) == B && ids.size(1) == T && ids.size(2) == H,
                "hash_ids must be [B, T, H] = [", B, ", ", T, ", ", H, "], got ", ids.sizes());
    TORCH_CHECK(H * hd == E, "H x head_dim = ", H * hd, " must equal kv_weight's E = ", E);
    gathered.resize(static_cast<size_t>(BT * E));
    const float* src = table->data_ptr<float>();
    const int64_t* o = off.data_ptr<int64_t>();
    const int64_t* r = ids.data_ptr<int64_t>();
    for (int64_t p = 0; p < BT; ++p) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = r[p * H + h] + o[h];
        TORCH_CHECK(row >= 0 && row < R, "table row ", row, " (head ", h, ") is out of range [0, ",
                    R, ")");
        std::memcpy(&gathered[(p * H + h) * hd], src + row * hd, sizeof(float) * hd);
      }
    }
    e = gathered.data();
  }
  // [k^(1..nk); v] = W e + b, [BT, (nk + 1) D]
  const int64_t kvw = (nk + 1) * D;
  TORCH_CHECK(kv_weight.is_contiguous(), "kv_weight must be contiguous");
  const float* bias = nullptr;
  if (kv_bias.has_value()) {
    check_cpu(*kv_bias, "kv_bias", at::kFloat);
    TORCH_CHECK(kv_bias->numel() == kvw && kv_bias->is_contiguous(), "kv_bias must be [", kvw, "]");
    bias = kv_bias->data_ptr<float>();
  }
  std::vector<float> kv(static_cast<size_t>(BT * kvw));
  if (BT < kGemmPositions) {
    gemv(kv_weight.data_ptr<float>(), e, bias, kv.data(), BT, kvw, E);
  } else {  // enough positions for the BLAS GEMM's blocking to pay
    const at::Tensor et = at::from_blob(const_cast<float*>(e), {BT, E}, hidden.options());
    at::Tensor out = at::from_blob(kv.data(), {BT, kvw}, hidden.options());
    if (bias != nullptr)
      at::addmm_out(out, *kv_bias, et, kv_weight.t());
    else
      at::mm_out(out, et, kv_weight.t());
  }
  const float* kvp = kv.data();
  const at::Tensor hid = hidden.contiguous();
  const float* hp = hid.data_ptr<float>();

  // U = alpha^(m) v, [BT, M, D]
  at::Tensor u = at::empty({B, T, M, D}, hidden.options());
  float* up = u.data_ptr<float>();
  // RMSNorm(h) w_q . RMSNorm(k) w_k = (h . (w_q w_k k)) / (rms(h) rms(k)), as Engram._gates
  std::vector<float> gw;
  if (nk > 0) {
    TORCH_CHECK(query_weight.has_value() && key_weight.has_value(),
                "a gate needs query_weight and key_weight");
    const at::Tensor qw = query_weight->contiguous(), kw = key_weight->contiguous();
    check_cpu(qw, "query_weight", at::kFloat);
    check_cpu(kw, "key_weight", at::kFloat);
    TORCH_CHECK(qw.numel() == M * D && kw.numel() == M * D,
                "query_weight and key_weight must be [M, D] = [", M, ", ", D, "]");
    gw.resize(static_cast<size_t>(M * D));
    const float* q = qw.data_ptr<float>();
    const float* k = kw.data_ptr<float>();
    for (int64_t i = 0; i < M * D; ++i) gw[i] = q[i] * k[i];
  }
  const bool* mk = nullptr;
  at::Tensor mkt;
  if (mask.has_value()) {
    mkt = mask->contiguous();
    check_cpu(mkt, "mask", at::kBool);
    TORCH_CHECK(mkt.numel() == BT, "mask must be [B, T] = [", B, ", ", T, "]");
    mk = mkt.data_ptr<bool>();
  }
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t p = 0; p < BT; ++p) {
    const float* v = kvp + p * kvw + nk * D;
    for (int64_t mm = 0; mm < M; ++mm) {
      double alpha = 1.0;
      if (nk > 0) {
        const float* h = hp + (p * M + mm) * D;
        const float* k = kvp + p * kvw + mm * D;
        const float* w = gw.data() + mm * D;
        const double hh = dot8(h, h, D), kk = dot8(k, k, D), dot = dot8w(h, k, w, D);
        double s = dot / std::sqrt(hh / D + query_eps) / std::sqrt(kk / D + key_eps) * inv_sqrt_d;
        if (gate_mode == 2 && s != 0.0)  // sign(s) sqrt(max(|s|, 1e-6)); sign(0) = 0
          s = std::copysign(std::sqrt(std::max(std::abs(s), 1e-6)), s);
        alpha = 1.0 / (1.0 + std::exp(-s));
      }
      if (mk != nullptr && !mk[p]) alpha = 0.0;
      const float a = static_cast<float>(alpha);
      float* out = up + (p * M + mm) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = a * v[d];
    }
  }

  if (!conv_weight.has_value()) {
    if (residual) u.add_(hid);
    return {u, at::zeros({B, M * D, 0}, hidden.options())};
  }

  // Y = SiLU(causal depthwise conv(RMSNorm(U))) + U, carrying the last P normalised inputs
  const at::Tensor cw = conv_weight->contiguous();
  check_cpu(cw, "conv_weight", at::kFloat);
  TORCH_CHECK(conv_norm_weight.has_value(), "the short conv needs conv_norm_weight");
  const at::Tensor cn = conv_norm_weight->contiguous();
  check_cpu(cn, "conv_norm_weight", at::kFloat);
  const int64_t C = M * D, w = cw.size(-1), P = (w - 1) * dilation;
  TORCH_CHECK(cw.numel() == C * w, "conv_weight must be [M D, 1, w] = [", C, ", 1, ", w, "]");
  TORCH_CHECK(cn.numel() == C, "conv_norm_weight must be [M, D] = [", M, ", ", D, "]");
  at::Tensor state = at::empty({B, C, P}, hidden.options());
  std::vector<float> xn(static_cast<size_t>(T * C));  // one sequence's normalised U, [T, C]
  const float* wp = cw.data_ptr<float>();
  const float* np = cn.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  at::Tensor old;
  if (conv_state.has_value()) {
    old = conv_state->contiguous();
    check_cpu(old, "conv_state", at::kFloat);
    TORCH_CHECK(old.dim() == 3 && old.size(0) == B && old.size(1) == C && old.size(2) == P,
                "conv_state must be [B, M D, (w-1) dilation] = [", B, ", ", C, ", ", P,
                "], got ", old.sizes());
  }
  at::Tensor y = at::empty({B, T, M, D}, hidden.options());
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t mm = 0; mm < M; ++mm) {
        const float* uu = up + ((b * T + t) * M + mm) * D;
        const double ss = dot8(uu, uu, D);
        const float inv = static_cast<float>(1.0 / std::sqrt(ss / D + conv_eps));
        float* xr = xn.data() + t * C + mm * D;
        for (int64_t d = 0; d < D; ++d) xr[d] = uu[d] * inv * np[mm * D + d];
      }
    }
    // Channel by channel over the sequence [state (P), new (T)], in the state's [C, P] layout:
    // y[t] = sum_i W[c, i] x[t + i delta], in the order of ShortConv's taps; the new state is
    // the last P of the sequence.
    const float* olds = conv_state.has_value() ? old.data_ptr<float>() + b * C * P : nullptr;
    if (T == 1 && olds != nullptr && P > 0) {  // a decode step: taps i < w-1 read the state
      float* sb = sp + b * C * P;
      for (int64_t c = 0; c < C; ++c) {
        const float* oc = olds + c * P;
        const float* wc = wp + c * w;
        float acc = oc[0] * wc[0];
        for (int64_t i = 1; i < w - 1; ++i) acc += oc[i * dilation] * wc[i];
        acc += xn[c] * wc[w - 1];  // (w-1) delta = P: the new position
        yp[b * C + c] = acc;
        std::memcpy(sb + c * P, oc + 1, sizeof(float) * (P - 1));
        sb[c * P + P - 1] = xn[c];
      }
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      const float* oc = olds == nullptr ? nullptr : olds + c * P;
      const float* wc = wp + c * w;
      auto at_ = [&](int64_t j) -> float {  // position j of the sequence, channel c
        return j >= P ? xn[(j - P) * C + c] : (oc == nullptr ? 0.0f : oc[j]);
      };
      for (int64_t t = 0; t < T; ++t) {
        float acc = at_(t) * wc[0];
        for (int64_t i = 1; i < w; ++i) acc += at_(t + i * dilation) * wc[i];
        yp[(b * T + t) * C + c] = acc;
      }
      float* sc = sp + (b * C + c) * P;
      for (int64_t i = 0; i < P; ++i) sc[i] = at_(T + i);
    }
  }
  // Y = SiLU(y) + U (+ hidden)
  if (BT * C >= kVectorSilu) {
    at::silu_(y);  // ATen's vectorised exp
  } else {
    for (int64_t j = 0; j < BT * C; ++j) yp[j] = yp[j] / (1.0f + std::exp(-yp[j]));
  }
  for (int64_t j = 0; j < BT * C; ++j) yp[j] += up[j];
  if (residual)
    for (int64_t j = 0; j < BT * C; ++j) yp[j] += hp[j];
  return {y, state};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "engramlm's fused CPU decode kernels (engramlm.kernels)";
  m.def("hash_step", &hash_step, "raw ids -> every Engram layer's head-local rows, next prefix",
        py::arg("input_ids"), py::arg("lookup"), py::arg("prefix"), py::arg("multipliers"),
        py::arg("moduli"), py::arg("pad_id"), py::arg("reset_id"), py::arg("dead"));
  m.def("engram_step", &engram_step, "one Engram layer's forward: (Y or hidden + Y, conv state)");
  m.def("set_isa", &set_isa, "the key/value projection's instruction set: 2 AVX-512, 1 AVX2, "
        "0 plain C++, -1 the best this CPU has; returns the one in use", py::arg("isa"));
}
