// decode_layers: every decoder layer of a decode step (one token per request) in one
// operator call, for models whose projections are stored weights (model/decode_layers.py
// says when). The same kernels in the same order as the Python modules (llama.py), so the
// result is bit-identical; what goes away is the Python between them: at one token, ~30
// dispatched operators per layer cost about as much as the layer's arithmetic.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "bindings.h"

namespace {

// Weights per layer, in this order: qkv_proj, o_proj, gate_up_proj, down_proj (stored
// bytes), post_attention_layernorm, then the norm after the layer (the next layer's
// input_layernorm, or the model's final norm). Formats per layer: (ggml type, rows8) of
// each of the four projections.
constexpr int64_t kWeightsPerLayer = 6, kFormatsPerLayer = 8;

// x: [T, hidden] float32, the first layer's normed input; residual [T, hidden] the stream
// before it (updated in place). Returns the final norm's output [T, hidden].
at::Tensor decode_layers(const at::Tensor& x, at::Tensor& residual, at::TensorList kv_caches, at::TensorList weights,
                         at::IntArrayRef formats, const at::Tensor& cos, const at::Tensor& signed_sin,
                         const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         int64_t num_heads, double eps, double scale) {
  const char* op = "decode_layers";
  const int64_t layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers &&
                  static_cast<int64_t>(formats.size()) == kFormatsPerLayer * layers,
              op, ": ", kWeightsPerLayer, " weights and ", kFormatsPerLayer, " formats per layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [tokens, hidden]");
  const int64_t tokens = x.size(0), head_dim = kv_caches[0].size(4);
  at::Tensor h = x;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[kWeightsPerLayer * l];
    const int64_t* f = &formats[kFormatsPerLayer * l];
    at::Tensor cache = kv_caches[l];
    // Attention: q|k|v, rotary + cache write, attention over the cache, output projection.
    at::Tensor qkv = at::empty({tokens, w[0].size(0)}, x.options());
    tmk_ops::stored_matmul(qkv, h, w[0], f[0], f[1]);
    tmk_ops::rotary_and_cache(qkv, cos, signed_sin, cache, slots, num_heads);
    const at::Tensor q = qkv.narrow(1, 0, num_heads * head_dim).view({tokens, num_heads, head_dim});
    at::Tensor attn = at::empty({tokens, num_heads, head_dim}, x.options());
    tmk_ops::paged_decode_attention(attn, q, cache, block_tables, seq_lens, scale);
    at::Tensor o = at::empty({tokens, w[1].size(0)}, x.options());
    tmk_ops::stored_matmul(o, attn.view({tokens, num_heads * head_dim}), w[1], f[2], f[3]);
    tmk_ops::add_rms_norm(o, residual, w[4], eps);
    // MLP: gate|up, silu(gate) * up, down; then the next norm with the residual add.
    at::Tensor gate_up = at::empty({tokens, w[2].size(0)}, x.options());
    tmk_ops::stored_matmul(gate_up, o, w[2], f[4], f[5]);
    at::Tensor act = at::empty({tokens, w[2].size(0) / 2}, x.options());
    tmk_ops::silu_and_mul(act, gate_up);
    at::Tensor down = at::empty({tokens, w[3].size(0)}, x.options());
    tmk_ops::stored_matmul(down, act, w[3], f[6], f[7]);
    tmk_ops::add_rms_norm(down, residual, w[5], eps);
    h = down;
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("decode_layers(Tensor x, Tensor(a!) residual, Tensor(b!)[] kv_caches, Tensor[] weights, int[] formats, "
        "Tensor cos, Tensor signed_sin, Tensor slots, Tensor block_tables, Tensor seq_lens, int num_heads, "
        "float eps, float scale) -> Tensor",
        &decode_layers);
}
