// Kernels of the event-driven engine (events.py), compiled on first use by torch.utils.cpp_extension.
//
// Event-driven Linear on spikes for the CPU (issue 11): out[t, n] = bias + sum of rows[i] over the inputs i that
// spike at step t of token n. Each token's union of active rows over the T steps is read once from memory: the
// loop runs over the inputs once and adds row i into the accumulator of every step at which i spikes (no multiply).
// Within a step the rows are added in increasing input order, the order embedding_bag(mode="sum") uses, so both
// give the same floats. Threads split the output columns (at::parallel_for), so each reads a slice of every row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

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
  std::vector<uint64_t> code(in);
  std::vector<int64_t> active;
  active.reserve(in);
  for (int64_t n = 0; n < tokens; ++n) {
    active.clear();
    for (int64_t i = 0; i < in; ++i) {  // each input's steps as a bit pattern (shift and or)
      uint64_t c = 0;
      for (int64_t t = 0; t < steps; ++t) c |= static_cast<uint64_t>(s[(t * tokens + n) * in + i]) << t;
      code[i] = c;
      if (c) active.push_back(i);
    }
    at::parallel_for(0, out, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t i : active) {
        const float* row = w + i * out;
        for (uint64_t t = 0, c = code[i]; c; ++t, c >>= 1) {  // unsigned: bit 63 (T = 64) shifts out
          if (!(c & 1)) continue;
          float* dst = acc + (t * tokens + n) * out;
          for (int64_t j = c0; j < c1; ++j) dst[j] += row[j];
        }
      }
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// LIF over T steps, the arithmetic of EventLIF (events.py) in the same order, so the same spikes bit for bit:
// decay_input: h = x / tau at the first step, then h = (x - v) / tau + v; else h = x, then h = (v - v / tau) + x;
// spike where h >= threshold (one per channel, the last axis), hard reset v = 0 there. Step after step over all
// neurons, the membranes in a buffer, so the channel loop vectorises (IEEE division and subtraction round the same in
// SIMD lanes as in scalar code; -ffp-contract=off keeps out fused multiply-adds that would round differently).
torch::Tensor lif(torch::Tensor x, torch::Tensor threshold, double tau, bool decay_input) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat, "x must be (T, M, C) float32");
  x = x.contiguous();
  const int64_t steps = x.size(0), m = x.size(1), c = x.size(2);
  auto th = threshold.to(torch::kFloat).expand({c}).contiguous();
  auto spikes = torch::empty({steps, m, c}, x.options().dtype(torch::kBool));
  const float* in = x.data_ptr<float>();
  const float* thr = th.data_ptr<float>();
  bool* out = spikes.data_ptr<bool>();
  const float t = static_cast<float>(tau);
  at::parallel_for(0, m, 64, [&](int64_t m0, int64_t m1) {
    std::vector<float> membrane(c);
    float* v = membrane.data();
    for (int64_t row = m0; row < m1; ++row) {
      for (int64_t s = 0; s < steps; ++s) {
        const float* xs = in + (s * m + row) * c;
        bool* fired = out + (s * m + row) * c;
        // the membrane update per case, each a plain loop the compiler vectorises
        if (s == 0 && decay_input) for (int64_t j = 0; j < c; ++j) v[j] = xs[j] / t;
        else if (s == 0) for (int64_t j = 0; j < c; ++j) v[j] = xs[j];
        else if (decay_input) for (int64_t j = 0; j < c; ++j) v[j] = (xs[j] - v[j]) / t + v[j];
        else for (int64_t j = 0; j < c; ++j) v[j] = (v[j] - v[j] / t) + xs[j];
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
