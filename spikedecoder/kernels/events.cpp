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

// Event-driven Linear on counts for the CPU: out[t, n] = bias + sum over the inputs i of rows[i] taken |x[t, n, i]|
// times, added for a positive count and subtracted for a negative one (graded spikes, 0/1 spikes as floats too): no
// multiply, each add priced as one accumulate by the energy counter. One call finds the active inputs of each token
// (non-zero at some step), checks that every count is an integer of at most kMaxCount in magnitude (else it returns
// None and the caller takes the dense product), and sums as block_sum does: the union of a token's active rows read
// once, in blocks of kBlock rows loaded together, each step's accumulator loaded once per block and chunk. Within a
// step the rows go in increasing input order, each row's repeats one after another.
constexpr int kMaxCount = 255;  // neurons.MAX_LEVEL: the largest count read as graded spikes

// Columns [c0, c1) of one token: the rows `act` with their counts cnt[a * steps + t] summed into acc[t * stride + j].
// ts and kc are scratch for one block: the steps at which a row of the block is active, and the block's counts there.
static void count_block_sum(const float* w, int64_t out, const int64_t* act, const int16_t* cnt, int64_t na,
                            float* acc, int64_t stride, int64_t steps, int64_t c0, int64_t c1, int* ts, int* kc) {
  const int64_t full = c0 + ((c1 - c0) & ~int64_t(15));
  for (int64_t a0 = 0; a0 < na; a0 += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, na - a0));
    const float* r[kBlock];
    for (int b = 0; b < kBlock; ++b) r[b] = w + act[a0 + std::min(b, nb - 1)] * out;  // a short block: count 0
    int nt = 0;
    for (int64_t t = 0; t < steps; ++t) {
      bool any = false;
      for (int b = 0; b < nb; ++b) any |= cnt[(a0 + b) * steps + t] != 0;
      if (!any) continue;
      for (int b = 0; b < kBlock; ++b) kc[nt * kBlock + b] = b < nb ? cnt[(a0 + b) * steps + t] : 0;
      ts[nt++] = static_cast<int>(t);
    }
    const float* next[kBlock];
    int nn = 0;
    for (int b = 0; b < kBlock && a0 + kBlock + b < na; ++b) next[nn++] = w + act[a0 + kBlock + b] * out;
    for (int64_t j = c0; j < full; j += 16) {
      f16v x[kBlock];
      for (int b = 0; b < kBlock; ++b) x[b] = *reinterpret_cast<const f16v*>(r[b] + j);
      for (int b = 0; b < nn; ++b) __builtin_prefetch(next[b] + j, 0, 2);
      for (int k = 0; k < nt; ++k) {
        f16v* d = reinterpret_cast<f16v*>(acc + ts[k] * stride + j);
        f16v v = *d;
        for (int b = 0; b < kBlock; ++b) {
          const int c = kc[k * kBlock + b];
          for (int i = 0; i < c; ++i) v = v + x[b];
          for (int i = 0; i > c; --i) v = v - x[b];
        }
        *d = v;
      }
    }
    for (int k = 0; k < nt; ++k)  // the last columns (fewer than 16), one by one
      for (int b = 0; b < nb; ++b) {
        const int c = kc[k * kBlock + b];
        float* d = acc + ts[k] * stride;
        for (int64_t j = full; j < c1; ++j) {
          float v = d[j];
          for (int i = 0; i < c; ++i) v = v + r[b][j];
          for (int i = 0; i > c; --i) v = v - r[b][j];
          d[j] = v;
        }
      }
  }
}

// x: (T, ..., in) float32; returns (T, ..., out), or None where x holds a value that is not a count.
c10::optional<torch::Tensor> count_linear(torch::Tensor x, torch::Tensor rows, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() >= 2 && x.scalar_type() == torch::kFloat, "x must be (T, ..., in) float32");
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kFloat && rows.is_contiguous(),
              "rows must be (in, out) contiguous float32");
  TORCH_CHECK(x.size(-1) == rows.size(0), "x and rows disagree on the input width");
  const bool has_bias = bias.has_value() && bias->defined();
  torch::Tensor b;
  if (has_bias) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == rows.size(1), "bias must have one value per output");
  }
  x = x.contiguous();
  const int64_t steps = x.size(0), in = x.size(-1), out = rows.size(1);
  auto shape = x.sizes().vec();
  int64_t tokens = 1;
  for (size_t d = 1; d + 1 < shape.size(); ++d) tokens *= shape[d];
  shape.back() = out;
  const float* s = x.data_ptr<float>();
  // every token's active inputs and their counts first: a value that is not a count means the dense product
  std::vector<int64_t> active, first(tokens + 1, 0);
  std::vector<int16_t> count;
  for (int64_t n = 0; n < tokens; ++n) {
    for (int64_t i = 0; i < in; ++i) {
      bool any = false;
      for (int64_t t = 0; t < steps; ++t) any |= s[(t * tokens + n) * in + i] != 0.0f;
      if (!any) continue;
      for (int64_t t = 0; t < steps; ++t) {
        const float v = s[(t * tokens + n) * in + i];
        if (!(std::fabs(v) <= kMaxCount)) return c10::nullopt;  // NaN fails too
        const int c = static_cast<int>(v);
        if (static_cast<float>(c) != v) return c10::nullopt;
        count.push_back(static_cast<int16_t>(c));
      }
      active.push_back(i);
    }
    first[n + 1] = static_cast<int64_t>(active.size());
  }
  auto y = torch::zeros(shape, rows.options());
  const float* w = rows.data_ptr<float>();
  const float* bv = has_bias ? b.data_ptr<float>() : nullptr;
  float* acc = y.data_ptr<float>();
  const int64_t chunks = (out + 15) / 16;
  at::parallel_for(0, chunks, 64, [&](int64_t k0, int64_t k1) {
    std::vector<int> ts(steps), kc(steps * kBlock);
    const int64_t c0 = k0 * 16, c1 = std::min(out, k1 * 16);
    for (int64_t n = 0; n < tokens; ++n) {
      const int64_t a = first[n];
      count_block_sum(w, out, active.data() + a, count.data() + a * steps, first[n + 1] - a, acc + n * out,
                      tokens * out, steps, c0, c1, ts.data(), kc.data());
      if (bv != nullptr)  // the bias after the rows, as the bool kernel and embedding_bag add it
        for (int64_t t = 0; t < steps; ++t)
          for (int64_t j = c0; j < c1; ++j) acc[(t * tokens + n) * out + j] += bv[j];
    }
  });
  return y;
}

// LIF over T steps in the arithmetic of neurons.charge (the form the energy measure prices), in the same order, so
// the same spikes bit for bit as the dense LIF: with tau = 2^k the leak is a multiply by 2^-k (a shift),
//   decay_input, tau = 2:  h = (v + x) * 0.5          decay_input, other 2^k:  h = (v - v * s) + x * s
//   no decay_input:        h = (v - v * s) + x        (s = 2^-k)
// and any other tau h = (x - v) / tau + v (decay_input) or h = (v - v / tau) + x; the membrane starts at 0. Spike
// where h >= threshold (one per channel, the last axis), hard reset v = 0 there: bool spikes. Graded neurons (levels
// L > 1, or bipolar) fire as neurons.fire does, the same float operations: s = [h - th >= 0] + sum over k = 2..L of
// [h - th * k >= 0], minus, if bipolar, sum over k = 1..L of [-h - th * k >= 0], as float counts, with the hard reset
// where s != 0. Step after step over all neurons, the membranes in a buffer, so the channel loop vectorises (IEEE
// operations round the same in SIMD lanes as in scalar code; -ffp-contract=off keeps out fused multiply-adds that
// would round differently).
enum class Charge { kHalfSum, kShiftDecayInput, kShift, kDecayInput, kPlain };

static Charge charge_form(double tau, bool decay_input) {
  int exponent = 0;
  const bool power_of_two = std::frexp(tau, &exponent) == 0.5;
  if (power_of_two) return decay_input ? (tau == 2.0 ? Charge::kHalfSum : Charge::kShiftDecayInput) : Charge::kShift;
  return decay_input ? Charge::kDecayInput : Charge::kPlain;
}

// One step's membrane update in `form` (the cases of neurons.charge), v[j] <- h.
static void charge_step(Charge form, float* v, const float* xs, int64_t c, float t, float s) {
  switch (form) {  // a plain loop per form, which the compiler vectorises
    case Charge::kHalfSum: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] + xs[j]) * 0.5f; break;
    case Charge::kShiftDecayInput: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] * s) + xs[j] * s; break;
    case Charge::kShift: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] * s) + xs[j]; break;
    case Charge::kDecayInput: for (int64_t j = 0; j < c; ++j) v[j] = (xs[j] - v[j]) / t + v[j]; break;
    case Charge::kPlain: for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] / t) + xs[j]; break;
  }
}

torch::Tensor lif(torch::Tensor x, torch::Tensor threshold, double tau, bool decay_input, int64_t levels,
                  bool bipolar) {
  TORCH_CHECK(x.dim() >= 2 && x.scalar_type() == torch::kFloat, "x must be (T, ..., C) float32");
  TORCH_CHECK(levels >= 1, "levels must be >= 1");
  x = x.contiguous();
  const int64_t steps = x.size(0), c = x.size(-1);
  int64_t m = 1;  // the neurons of one step, C at a time
  for (int64_t d = 1; d + 1 < x.dim(); ++d) m *= x.size(d);
  const bool graded = levels > 1 || bipolar;
  auto th = threshold.to(torch::kFloat).contiguous();
  TORCH_CHECK(th.numel() == 1 || th.numel() == c, "one threshold, or one per channel (the last axis)");
  const int64_t th_step = th.numel() == 1 ? 0 : 1;  // a layer's one threshold read for every channel
  auto spikes = torch::empty(x.sizes(), x.options().dtype(graded ? torch::kFloat : torch::kBool));
  const float* in = x.data_ptr<float>();
  const float* thr = th.data_ptr<float>();
  bool* fired_at = graded ? nullptr : spikes.data_ptr<bool>();
  float* counts_at = graded ? spikes.data_ptr<float>() : nullptr;
  const float t = static_cast<float>(tau), s = static_cast<float>(1.0 / tau);  // s exact when tau = 2^k
  const Charge form = charge_form(tau, decay_input);
  const int top = static_cast<int>(levels);
  at::parallel_for(0, m, 64, [&](int64_t m0, int64_t m1) {
    std::vector<float> membrane(c), thresholds(c);
    float* v = membrane.data();
    float* tr = thresholds.data();
    for (int64_t j = 0; j < c; ++j) tr[j] = thr[j * th_step];
    for (int64_t row = m0; row < m1; ++row) {
      std::fill(membrane.begin(), membrane.end(), 0.0f);
      for (int64_t step = 0; step < steps; ++step) {
        const int64_t at = (step * m + row) * c;
        charge_step(form, v, in + at, c, t, s);
        if (!graded) {
          bool* fired = fired_at + at;
          for (int64_t j = 0; j < c; ++j) {  // fire and hard reset
            const bool fire = v[j] >= tr[j];
            fired[j] = fire;
            v[j] = fire ? 0.0f : v[j];
          }
          continue;
        }
        float* n = counts_at + at;  // neurons.fire: one comparison per level (and sign)
        for (int64_t j = 0; j < c; ++j) n[j] = v[j] - tr[j] >= 0.0f ? 1.0f : 0.0f;
        for (int k = 2; k <= top; ++k) {
          const float f = static_cast<float>(k);
          for (int64_t j = 0; j < c; ++j) n[j] = n[j] + (v[j] - tr[j] * f >= 0.0f ? 1.0f : 0.0f);
        }
        for (int k = 1; bipolar && k <= top; ++k) {
          const float f = static_cast<float>(k);
          for (int64_t j = 0; j < c; ++j) n[j] = n[j] - (-v[j] - tr[j] * f >= 0.0f ? 1.0f : 0.0f);
        }
        for (int64_t j = 0; j < c; ++j) v[j] = n[j] != 0.0f ? 0.0f : v[j];  // hard reset where it fired
      }
    }
  });
  return spikes;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spike_linear", &spike_linear, "sum of the active rows per step");
  m.def("count_linear", &count_linear, "sum of the active rows, each |count| times, per step; None if not counts");
  m.def("lif", &lif, "LIF over T steps with a hard reset: bool spikes, float counts if graded", pybind11::arg("x"),
        pybind11::arg("threshold"), pybind11::arg("tau"), pybind11::arg("decay_input"), pybind11::arg("levels") = 1,
        pybind11::arg("bipolar") = false);
}
