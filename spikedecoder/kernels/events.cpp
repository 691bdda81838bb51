// Kernels of the event-driven engine (events.py), compiled on first use by torch.utils.cpp_extension.
//
// Event-driven Linear on spikes for the CPU: out[t, n] = bias + sum of rows[i] over the inputs i that
// spike at step t of token n. Each token's union of active rows over the T steps is read once from memory and added
// into the accumulator of every step at which its input spikes (no multiply). Within a step the rows are added in
// increasing input order, the order embedding_bag(mode="sum") uses, so both give the same floats.
//
// Speed comes from memory-level parallelism: the active rows go in blocks of kBlock. For each 16-column chunk the
// block's rows are loaded into registers once, then each step's accumulator is loaded, gets the rows of the block
// that spike at that step (a select, in row order: the same roundings as one add after another) and is stored. So
// kBlock row streams are read at once, the next block's rows are prefetched, and the accumulators move once per
// block instead of once per row: 1.4x faster than row after row in decoding at width 1024 (benchmarks/decode.py).
// GCC vector extensions keep this portable: AVX-512 where the CPU has it, two AVX2 halves otherwise.
// Threads split the output columns (at::parallel_for), so each reads a slice of every row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

typedef float f16v __attribute__((vector_size(64), aligned(4), may_alias));  // 16 floats, unaligned, aliasing floats
typedef int32_t i16v __attribute__((vector_size(64)));

constexpr int kBlock = 4;

// Columns [c0, c1) of one token: the rows `act` (their step patterns `code`) summed into acc[t * stride + column].
static void block_sum(const float* w, int64_t out, const int64_t* act, const uint64_t* code, int64_t na, float* acc,
                      int64_t stride, int64_t steps, int64_t c0, int64_t c1) {
  const int64_t full = c0 + ((c1 - c0) & ~int64_t(15));
  for (int64_t a0 = 0; a0 < na; a0 += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, na - a0));
    const float* r[kBlock];
    uint64_t any = 0;
    for (int b = 0; b < kBlock; ++b) {
      r[b] = w + act[a0 + std::min(b, nb - 1)] * out;  // a short last block repeats a row under a zero mask
      any |= b < nb ? code[a0 + b] : 0;
    }
    int ts[64], nt = 0;  // the steps at which some row of the block spikes
    i16v on[64][kBlock];  // on[k][b]: all ones where row b spikes at step ts[k]
    for (int t = 0; t < steps; ++t) {
      if (!((any >> t) & 1)) continue;
      for (int b = 0; b < kBlock; ++b) on[nt][b] = i16v{} - static_cast<int32_t>(b < nb && ((code[a0 + b] >> t) & 1));
      ts[nt++] = t;
    }
    const float* next[kBlock];  // the next block's rows, prefetched chunk by chunk
    int nn = 0;
    for (int b = 0; b < kBlock && a0 + kBlock + b < na; ++b) next[nn++] = w + act[a0 + kBlock + b] * out;
    for (int64_t j = c0; j < full; j += 16) {
      f16v x[kBlock];
      for (int b = 0; b < kBlock; ++b) x[b] = *reinterpret_cast<const f16v*>(r[b] + j);
      for (int b = 0; b < nn; ++b) __builtin_prefetch(next[b] + j, 0, 2);
      for (int k = 0; k < nt; ++k) {
        f16v* d = reinterpret_cast<f16v*>(acc + ts[k] * stride + j);
        f16v v = *d;
        for (int b = 0; b < kBlock; ++b) v = on[k][b] ? v + x[b] : v;
        *d = v;
      }
    }
    for (int k = 0; k < nt; ++k)  // the last columns (fewer than 16), one by one
      for (int b = 0; b < nb; ++b)
        if ((code[a0 + b] >> ts[k]) & 1)
          for (int64_t j = full; j < c1; ++j) acc[ts[k] * stride + j] += r[b][j];
  }
}

torch::Tensor spike_linear(torch::Tensor spikes, torch::Tensor rows, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(spikes.dim() == 3 && spikes.scalar_type() == torch::kBool, "spikes must be (T, N, in) bool");
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kFloat && rows.is_contiguous(),
              "rows must be (in, out) contiguous float32");
  TORCH_CHECK(spikes.size(2) == rows.size(0), "spikes and rows disagree on the input width");
  spikes = spikes.contiguous();
  const int64_t steps = spikes.size(0), tokens = spikes.size(1), in = spikes.size(2), out = rows.size(1);
  TORCH_CHECK(steps <= 64, "at most 64 steps");
  auto y = torch::zeros({steps, tokens, out}, rows.options());
  const bool* s = spikes.data_ptr<bool>();
  const float* w = rows.data_ptr<float>();
  float* acc = y.data_ptr<float>();
  std::vector<uint64_t> code;
  std::vector<int64_t> active;
  code.reserve(in);
  active.reserve(in);
  const int64_t chunks = (out + 15) / 16;
  for (int64_t n = 0; n < tokens; ++n) {
    active.clear();
    code.clear();
    for (int64_t i = 0; i < in; ++i) {  // each input's steps as a bit pattern (shift and or)
      uint64_t c = 0;
      for (int64_t t = 0; t < steps; ++t) c |= static_cast<uint64_t>(s[(t * tokens + n) * in + i]) << t;
      if (c) {
        active.push_back(i);
        code.push_back(c);
      }
    }
    at::parallel_for(0, chunks, 64, [&](int64_t k0, int64_t k1) {
      block_sum(w, out, active.data(), code.data(), active.size(), acc + n * out, tokens * out, steps, k0 * 16,
                std::min(out, k1 * 16));
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// LIF over T steps in the arithmetic of neurons.charge (the form the energy measure prices), in the same order, so
// the same spikes bit for bit as the dense LIF: with tau = 2^k the leak is a multiply by 2^-k (a shift),
//   decay_input, tau = 2:  h = (v + x) * 0.5          decay_input, other 2^k:  h = (v - v * s) + x * s
//   no decay_input:        h = (v - v * s) + x        (s = 2^-k)
// and any other tau h = (x - v) / tau + v (decay_input) or h = (v - v / tau) + x; the membrane starts at 0. Spike
// where h >= threshold (one per channel, the last axis), hard reset v = 0 there. Step after step over all neurons,
// the membranes in a buffer, so the channel loop vectorises (IEEE operations round the same in SIMD lanes as in
// scalar code; -ffp-contract=off keeps out fused multiply-adds that would round differently).
enum class Charge { kHalfSum, kShiftDecayInput, kShift, kDecayInput, kPlain };

static Charge charge_form(double tau, bool decay_input) {
  int exponent = 0;
  const bool power_of_two = std::frexp(tau, &exponent) == 0.5;
  if (power_of_two) return decay_input ? (tau == 2.0 ? Charge::kHalfSum : Charge::kShiftDecayInput) : Charge::kShift;
  return decay_input ? Charge::kDecayInput : Charge::kPlain;
}

torch::Tensor lif(torch::Tensor x, torch::Tensor threshold, double tau, bool decay_input) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat, "x must be (T, M, C) float32");
  x = x.contiguous();
  const int64_t steps = x.size(0), m = x.size(1), c = x.size(2);
  auto th = threshold.to(torch::kFloat).expand({c}).contiguous();
  auto spikes = torch::empty({steps, m, c}, x.options().dtype(torch::kBool));
  const float* in = x.data_ptr<float>();
  const float* thr = th.data_ptr<float>();
  bool* out = spikes.data_ptr<bool>();
  const float t = static_cast<float>(tau), s = static_cast<float>(1.0 / tau);  // s exact when tau = 2^k
  const Charge form = charge_form(tau, decay_input);
  at::parallel_for(0, m, 64, [&](int64_t m0, int64_t m1) {
    std::vector<float> membrane(c);
    float* v = membrane.data();
    for (int64_t row = m0; row < m1; ++row) {
      std::fill(membrane.begin(), membrane.end(), 0.0f);
      for (int64_t step = 0; step < steps; ++step) {
        const float* xs = in + (step * m + row) * c;
        bool* fired = out + (step * m + row) * c;
        // the membrane update per form, each a plain loop the compiler vectorises
        switch (form) {
          case Charge::kHalfSum: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] + xs[j]) * 0.5f; break;
          case Charge::kShiftDecayInput: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] * s) + xs[j] * s; break;
          case Charge::kShift: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] * s) + xs[j]; break;
          case Charge::kDecayInput: for (int64_t j = 0; j < c; ++j) v[j] = (xs[j] - v[j]) / t + v[j]; break;
          case Charge::kPlain: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] / t) + xs[j]; break;
        }
        for (int64_t j = 0; j < c; ++j) {  // fire and hard reset
          const bool fire = v[j] >= thr[j];
          fired[j] = fire;
          v[j] = fire ? 0.0f : v[j];
        }
      }
    }
  });
  return spikes;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spike_linear", &spike_linear, "sum of the active rows per step");
  m.def("lif", &lif, "LIF over T steps with a hard reset, bool spikes");
}
