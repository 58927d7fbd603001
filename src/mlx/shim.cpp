// A thin C ABI over MLX's C++ API. Every fallible call catches C++
// exceptions and returns non-zero, leaving the message for mlxd_last_error,
// so that no exception ever unwinds into Rust.
#include <dlfcn.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
using arr = mx::array;

namespace {
thread_local std::string last_error;

#define GUARD(...)                           \
  try {                                      \
    __VA_ARGS__;                                  \
    return 0;                                \
  } catch (const std::exception& e) {        \
    last_error = e.what();                   \
    return 1;                                \
  } catch (...) {                            \
    last_error = "unknown error inside MLX"; \
    return 1;                                \
  }

mx::Dtype to_dtype(int code) {
  switch (code) {
    case 0: return mx::bool_;
    case 1: return mx::uint8;
    case 2: return mx::uint16;
    case 3: return mx::uint32;
    case 4: return mx::uint64;
    case 5: return mx::int8;
    case 6: return mx::int16;
    case 7: return mx::int32;
    case 8: return mx::int64;
    case 9: return mx::float16;
    case 10: return mx::float32;
    case 11: return mx::float64;
    case 12: return mx::bfloat16;
    case 13: return mx::complex64;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

int from_dtype(mx::Dtype d) { return static_cast<int>(d.val()); }

mx::Shape to_shape(const int* s, int n) { return mx::Shape(s, s + n); }

arr* box(arr a) { return new arr(std::move(a)); }

// `a` evaluated, as a row-contiguous buffer: itself when it is one (most
// results are), else a contiguous copy (views).
arr evaluated_contiguous(const arr& a) {
  arr c = a;
  c.eval();
  if (!c.flags().row_contiguous || c.data_size() != c.size()) {
    c = mx::contiguous(c);
    c.eval();
  }
  return c;
}

std::optional<arr> opt(const arr* a) {
  return a ? std::optional<arr>(*a) : std::nullopt;
}
}  // namespace

extern "C" {

typedef void (*array_cb)(void* ctx, const char* name, arr* a);
typedef void (*string_cb)(void* ctx, const char* key, const char* value);

const char* mlxd_last_error() { return last_error.c_str(); }
const char* mlxd_version() {
  static std::string v = mx::version();
  return v.c_str();
}

void mlxd_free(arr* a) { delete a; }
arr* mlxd_clone(const arr* a) { return new arr(*a); }

int mlxd_from_data(arr** out, const void* data, const int* shape, int ndim, int dtype) {
  GUARD({
    auto dt = to_dtype(dtype);
    auto sh = to_shape(shape, ndim);
    size_t n = 1;
    for (auto d : sh) n *= d;
    // Copy so the caller's memory may go away; MLX frees the copy (or its
    // own device copy of it) through the deleter.
    char* copy = new char[n * dt.size() + 1];
    if (n) std::memcpy(copy, data, n * dt.size());
    *out = box(arr(copy, sh, dt, [](void* p) { delete[] static_cast<char*>(p); }));
  })
}
int mlxd_scalar(arr** out, double v, int dtype) {
  GUARD(*out = box(arr(static_cast<float>(v), to_dtype(dtype))))
}
int mlxd_zeros(arr** out, const int* shape, int ndim, int dtype) {
  GUARD(*out = box(mx::zeros(to_shape(shape, ndim), to_dtype(dtype))))
}
int mlxd_full(arr** out, const int* shape, int ndim, double v, int dtype) {
  GUARD(*out = box(mx::full(to_shape(shape, ndim), arr(static_cast<float>(v)), to_dtype(dtype))))
}
int mlxd_arange(arr** out, double start, double stop, double step, int dtype) {
  GUARD(*out = box(mx::arange(start, stop, step, to_dtype(dtype))))
}

int mlxd_ndim(const arr* a) { return static_cast<int>(a->ndim()); }
void mlxd_shape(const arr* a, int* out) {
  for (size_t i = 0; i < a->ndim(); ++i) out[i] = a->shape(i);
}
int mlxd_dtype(const arr* a) { return from_dtype(a->dtype()); }
size_t mlxd_size(const arr* a) { return a->size(); }
size_t mlxd_nbytes(const arr* a) { return a->nbytes(); }

int mlxd_eval(arr* const* as, size_t n) {
  GUARD({
    std::vector<arr> v;
    for (size_t i = 0; i < n; ++i) v.push_back(*as[i]);
    mx::eval(v);
  })
}
int mlxd_async_eval(arr* const* as, size_t n) {
  GUARD({
    std::vector<arr> v;
    for (size_t i = 0; i < n; ++i) v.push_back(*as[i]);
    mx::async_eval(v);
  })
}
// Whether `a` is computed: scheduled work on it has finished. Never blocks.
int mlxd_is_available(const arr* a) { return a->is_available() ? 1 : 0; }
// Evaluates `a` and copies its elements, row-major, into `out` (nbytes long).
int mlxd_to_host(const arr* a, void* out, size_t nbytes) {
  GUARD({
    arr c = evaluated_contiguous(*a);
    if (c.nbytes() != nbytes) throw std::invalid_argument("to_host: size mismatch");
    if (nbytes) std::memcpy(out, c.data<char>(), nbytes);
  })
}

enum Binary {
  ADD, SUB, MUL, DIV, MAXIMUM, MINIMUM, POWER, LESS, LESS_EQUAL, GREATER,
  GREATER_EQUAL, EQUAL, LOGICAL_AND, LOGICAL_OR, MATMUL
};
int mlxd_binary(arr** out, int op, const arr* a, const arr* b) {
  GUARD({
    switch (op) {
      case ADD: *out = box(mx::add(*a, *b)); break;
      case SUB: *out = box(mx::subtract(*a, *b)); break;
      case MUL: *out = box(mx::multiply(*a, *b)); break;
      case DIV: *out = box(mx::divide(*a, *b)); break;
      case MAXIMUM: *out = box(mx::maximum(*a, *b)); break;
      case MINIMUM: *out = box(mx::minimum(*a, *b)); break;
      case POWER: *out = box(mx::power(*a, *b)); break;
      case LESS: *out = box(mx::less(*a, *b)); break;
      case LESS_EQUAL: *out = box(mx::less_equal(*a, *b)); break;
      case GREATER: *out = box(mx::greater(*a, *b)); break;
      case GREATER_EQUAL: *out = box(mx::greater_equal(*a, *b)); break;
      case EQUAL: *out = box(mx::equal(*a, *b)); break;
      case LOGICAL_AND: *out = box(mx::logical_and(*a, *b)); break;
      case LOGICAL_OR: *out = box(mx::logical_or(*a, *b)); break;
      case MATMUL: *out = box(mx::matmul(*a, *b)); break;
      default: throw std::invalid_argument("unknown binary op");
    }
  })
}

enum Unary { NEG, EXP, LOG, SIGMOID, SQRT, RSQRT, ABS, LOGICAL_NOT, COS, SIN, CONTIGUOUS, SQUARE, ROUND };
int mlxd_unary(arr** out, int op, const arr* a) {
  GUARD({
    switch (op) {
      case NEG: *out = box(mx::negative(*a)); break;
      case EXP: *out = box(mx::exp(*a)); break;
      case LOG: *out = box(mx::log(*a)); break;
      case SIGMOID: *out = box(mx::sigmoid(*a)); break;
      case SQRT: *out = box(mx::sqrt(*a)); break;
      case RSQRT: *out = box(mx::rsqrt(*a)); break;
      case ABS: *out = box(mx::abs(*a)); break;
      case LOGICAL_NOT: *out = box(mx::logical_not(*a)); break;
      case COS: *out = box(mx::cos(*a)); break;
      case SIN: *out = box(mx::sin(*a)); break;
      case CONTIGUOUS: *out = box(mx::contiguous(*a)); break;
      case SQUARE: *out = box(mx::square(*a)); break;
      case ROUND: *out = box(mx::round(*a)); break;
      default: throw std::invalid_argument("unknown unary op");
    }
  })
}

enum Reduce { SUM, MAX, MIN, LOGSUMEXP, ARGMAX, MEAN };
// axis == INT32_MIN reduces over every axis.
int mlxd_reduce(arr** out, int op, const arr* a, int axis, bool keepdims) {
  GUARD({
    bool all = axis == INT32_MIN;
    std::vector<int> axes;
    if (all) {
      for (size_t i = 0; i < a->ndim(); ++i) axes.push_back(static_cast<int>(i));
    } else {
      axes.push_back(axis);
    }
    switch (op) {
      case SUM: *out = box(mx::sum(*a, axes, keepdims)); break;
      case MAX: *out = box(mx::max(*a, axes, keepdims)); break;
      case MIN: *out = box(mx::min(*a, axes, keepdims)); break;
      case LOGSUMEXP: *out = box(mx::logsumexp(*a, axes, keepdims)); break;
      case MEAN: *out = box(mx::mean(*a, axes, keepdims)); break;
      case ARGMAX:
        *out = box(all ? mx::argmax(*a, keepdims) : mx::argmax(*a, axis, keepdims));
        break;
      default: throw std::invalid_argument("unknown reduction");
    }
  })
}

// silu(gate) * x, compiled (fused into one kernel) as mlx-lm compiles it.
int mlxd_swiglu(arr** out, const arr* gate, const arr* x) {
  GUARD({
    static auto fn = mx::compile(
        [](const std::vector<arr>& in) {
          return std::vector<arr>{mx::multiply(mx::multiply(in[0], mx::sigmoid(in[0])), in[1])};
        },
        /* shapeless */ true);
    *out = box(fn({*gate, *x})[0]);
  })
}

int mlxd_astype(arr** out, const arr* a, int dtype) {
  GUARD(*out = box(mx::astype(*a, to_dtype(dtype))))
}
int mlxd_reshape(arr** out, const arr* a, const int* shape, int n) {
  GUARD(*out = box(mx::reshape(*a, to_shape(shape, n))))
}
int mlxd_transpose(arr** out, const arr* a, const int* axes, int n) {
  GUARD(*out = box(mx::transpose(*a, std::vector<int>(axes, axes + n))))
}
int mlxd_swapaxes(arr** out, const arr* a, int a1, int a2) {
  GUARD(*out = box(mx::swapaxes(*a, a1, a2)))
}
int mlxd_expand_dims(arr** out, const arr* a, int axis) {
  GUARD(*out = box(mx::expand_dims(*a, axis)))
}
int mlxd_squeeze(arr** out, const arr* a, int axis) {
  GUARD(*out = box(mx::squeeze(*a, axis)))
}
int mlxd_concatenate(arr** out, arr* const* as, size_t n, int axis) {
  GUARD({
    std::vector<arr> v;
    for (size_t i = 0; i < n; ++i) v.push_back(*as[i]);
    *out = box(mx::concatenate(v, axis));
  })
}
// Splits at `indices` (n of them) along `axis`; `outs` has room for n + 1.
int mlxd_split(arr** outs, const arr* a, const int* indices, int n, int axis) {
  GUARD({
    auto parts = mx::split(*a, mx::Shape(indices, indices + n), axis);
    for (size_t i = 0; i < parts.size(); ++i) outs[i] = box(parts[i]);
  })
}
int mlxd_slice(arr** out, const arr* a, const int* start, const int* stop, const int* strides, int n) {
  GUARD(*out = box(mx::slice(*a, to_shape(start, n), to_shape(stop, n), to_shape(strides, n))))
}
int mlxd_slice_update(arr** out, const arr* src, const arr* upd, const int* start, const int* stop, int n) {
  GUARD(*out = box(mx::slice_update(*src, *upd, to_shape(start, n), to_shape(stop, n))))
}
int mlxd_take(arr** out, const arr* a, const arr* idx, int axis) {
  GUARD(*out = box(mx::take(*a, *idx, axis)))
}
int mlxd_take_along_axis(arr** out, const arr* a, const arr* idx, int axis) {
  GUARD(*out = box(mx::take_along_axis(*a, *idx, axis)))
}
int mlxd_put_along_axis(arr** out, const arr* a, const arr* idx, const arr* vals, int axis) {
  GUARD(*out = box(mx::put_along_axis(*a, *idx, *vals, axis)))
}
// Writes `upd` into `a` at the positions `idx[0..n]` give along `axes`.
int mlxd_scatter(arr** out, const arr* a, const arr* const* idx, int n, const arr* upd, const int* axes) {
  GUARD({
    std::vector<mx::array> indices;
    for (int i = 0; i < n; ++i) indices.push_back(*idx[i]);
    *out = box(mx::scatter(*a, indices, *upd, std::vector<int>(axes, axes + n)));
  })
}
int mlxd_where(arr** out, const arr* c, const arr* x, const arr* y) {
  GUARD(*out = box(mx::where(*c, *x, *y)))
}
int mlxd_softmax(arr** out, const arr* a, int axis, bool precise) {
  GUARD(*out = box(mx::softmax(*a, std::vector<int>{axis}, precise)))
}
int mlxd_argpartition(arr** out, const arr* a, int kth, int axis) {
  GUARD(*out = box(mx::argpartition(*a, kth, axis)))
}
int mlxd_sort(arr** out, const arr* a, int axis) { GUARD(*out = box(mx::sort(*a, axis))) }
int mlxd_cumsum(arr** out, const arr* a, int axis, bool reverse, bool inclusive) {
  GUARD(*out = box(mx::cumsum(*a, axis, reverse, inclusive)))
}
int mlxd_addmm(arr** out, const arr* c, const arr* a, const arr* b) {
  GUARD(*out = box(mx::addmm(*c, *a, *b)))
}

int mlxd_quantized_matmul(arr** out, const arr* x, const arr* w, const arr* scales, const arr* biases,
                          bool transpose, int group_size, int bits) {
  GUARD(*out = box(mx::quantized_matmul(*x, *w, *scales, opt(biases), transpose, group_size, bits)))
}
int mlxd_dequantize(arr** out, const arr* w, const arr* scales, const arr* biases, int group_size, int bits) {
  GUARD(*out = box(mx::dequantize(*w, *scales, opt(biases), group_size, bits)))
}
int mlxd_quantize(arr** w_out, arr** s_out, arr** b_out, const arr* w, int group_size, int bits) {
  GUARD({
    auto q = mx::quantize(*w, group_size, bits);
    *w_out = box(q.at(0));
    *s_out = box(q.at(1));
    *b_out = q.size() > 2 ? box(q.at(2)) : nullptr;
  })
}

int mlxd_rms_norm(arr** out, const arr* x, const arr* w, float eps) {
  GUARD(*out = box(mx::fast::rms_norm(*x, opt(w), eps)))
}
// `offsets` (int32 [B], one per batch row) if given, else `offset`.
int mlxd_rope(arr** out, const arr* x, int dims, bool traditional, bool has_base, float base, float scale,
              int offset, const arr* offsets, const arr* freqs) {
  GUARD({
    std::optional<float> b = has_base ? std::optional<float>(base) : std::nullopt;
    *out = box(offsets ? mx::fast::rope(*x, dims, traditional, b, scale, *offsets, opt(freqs))
                       : mx::fast::rope(*x, dims, traditional, b, scale, offset, opt(freqs)));
  })
}
int mlxd_sdpa(arr** out, const arr* q, const arr* k, const arr* v, float scale, const char* mask_mode,
              const arr* mask) {
  GUARD(*out = box(mx::fast::scaled_dot_product_attention(*q, *k, *v, scale, mask_mode, opt(mask))))
}

int mlxd_random_key(arr** out, uint64_t seed) { GUARD(*out = box(mx::random::key(seed))) }
int mlxd_random_split(arr** a, arr** b, const arr* key) {
  GUARD({
    auto p = mx::random::split(*key);
    *a = box(p.first);
    *b = box(p.second);
  })
}
int mlxd_categorical(arr** out, const arr* logits, int axis, const arr* key) {
  GUARD(*out = box(mx::random::categorical(*logits, axis, opt(key))))
}

size_t mlxd_active_memory() { return mx::get_active_memory(); }
size_t mlxd_peak_memory() { return mx::get_peak_memory(); }
size_t mlxd_cache_memory() { return mx::get_cache_memory(); }
void mlxd_reset_peak_memory() { mx::reset_peak_memory(); }
void mlxd_clear_cache() { mx::clear_cache(); }
int mlxd_default_device_is_gpu() { return mx::default_device() == mx::Device::gpu ? 1 : 0; }

int mlxd_load_safetensors(const char* path, void* ctx, array_cb on_array, string_cb on_meta) {
  GUARD({
    auto loaded = mx::load_safetensors(std::string(path));
    for (auto& [k, v] : loaded.first) on_array(ctx, k.c_str(), box(v));
    for (auto& [k, v] : loaded.second) on_meta(ctx, k.c_str(), v.c_str());
  })
}
int mlxd_save_safetensors(const char* path, const char* const* names, arr* const* as, size_t n) {
  GUARD({
    std::unordered_map<std::string, arr> m;
    for (size_t i = 0; i < n; ++i) m.insert({names[i], *as[i]});
    mx::save_safetensors(std::string(path), m);
  })
}
// Device properties come back through two callbacks: string values and
// numbers (sizes, counts).
typedef void (*size_cb)(void* ctx, const char* key, size_t value);
int mlxd_device_info(void* ctx, string_cb on_string, size_cb on_size) {
  GUARD({
    for (auto& [k, v] : mx::device_info(mx::default_device())) {
      if (auto s = std::get_if<std::string>(&v)) {
        on_string(ctx, k.c_str(), s->c_str());
      } else {
        on_size(ctx, k.c_str(), std::get<size_t>(v));
      }
    }
  })
}

// Evaluates `a` and returns in *out a handle on a buffer holding its elements
// row-major and contiguous (`a` itself when it is, else a contiguous copy),
// with their host address and size, so they can be read without a copy.
int mlxd_host_data(arr** out, const arr* a, const void** data, size_t* nbytes) {
  GUARD({
    arr c = evaluated_contiguous(*a);
    *data = c.nbytes() ? c.data<char>() : nullptr;
    *nbytes = c.nbytes();
    *out = box(std::move(c));
  })
}

// Builds an array over `nbytes` at `data`, which the caller keeps alive until
// `release(ctx)`. With `adopt`, MLX uses the memory in place where its
// allocator can wrap host memory (Metal) and copies it otherwise; without,
// it is copied. `release` runs exactly once, errors included: on return after
// a copy, or when MLX frees an adopted buffer (on any thread). MLX never
// writes into such a buffer: memory it did not allocate is never donated.
typedef void (*release_cb)(void* ctx);
int mlxd_from_external(arr** out, void* data, size_t nbytes, const int* shape, int ndim, int dtype,
                       int adopt, release_cb release, void* ctx, int* adopted) {
  struct Owner {
    release_cb release;
    void* ctx;
    std::atomic<bool> copied{false};
    Owner(release_cb r, void* c) : release(r), ctx(c) {}
    Owner(const Owner&) = delete;
    ~Owner() { release(ctx); }
  };
  *adopted = 0;
  GUARD({
    std::shared_ptr<Owner> owner;
    try {
      owner = std::make_shared<Owner>(release, ctx);
    } catch (...) {
      release(ctx);
      throw;
    }
    auto dt = to_dtype(dtype);
    auto sh = to_shape(shape, ndim);
    size_t n = 1;
    for (auto d : sh) n *= d;
    if (n * dt.size() != nbytes) throw std::invalid_argument("from_external: size mismatch");
    if (adopt && nbytes) {
      // MLX calls the deleter right after copying; when it adopts, only once
      // it frees the buffer. The last copy of `owner` releases the memory.
      arr a(data, sh, dt, [owner](void*) { owner->copied = true; });
      *adopted = owner->copied ? 0 : 1;
      *out = box(std::move(a));
    } else {
      arr a(mx::allocator::malloc(nbytes), sh, dt);
      if (nbytes) std::memcpy(a.data<char>(), data, nbytes);
      *out = box(std::move(a));
    }
  })
}

}  // extern "C"

// A mailbox: an array whose bytes are delivered after the graph that reads
// it was launched (see src/mlx/mailbox.rs).
//
// On the CPU (and Metal) it is computed on a CPU stream of its own by a task
// that waits for the delivery; MLX makes the computing stream wait for that
// task (an event), not the thread that launches.
//
// On a CUDA GPU a kernel at the head of the graph polls a flag word and then
// copies the payload that follows it. Delivering is a plain host write: no
// CUDA call, which another thread's implicitly synchronising call (an
// allocation, a free) could hold up behind the waiting kernel, as MLX's own
// CPU-to-GPU event (a kernel launched to signal) would be. The box is pinned
// host memory the GPU reads across the bus (`PinnedBoxes`). MLX's unified
// memory, where each delivery moves the page to the host and the next poll
// moves it back, is the fallback (and `MLX_DIST_MAILBOX=unified`): on an
// H200, delivery to result of a small step took 22-61 us (medians) pinned,
// 183 us unified.

// A pinned box, used again once no mailbox holds it and the kernel that
// read it has run (`read`). A box whose kernel was never launched (its graph
// dropped unlaunched) is never used again: hence `kMaxPinnedBoxes`.
struct PinnedBox {
  uint32_t* ptr;
  size_t bytes;
  bool held;
  std::optional<arr> read;
};
struct Mailbox {
  std::mutex m;
  std::condition_variable cv;
  bool delivered = false;
  std::vector<char> bytes;
  // The GPU's box: flag word, then the payload (`nbytes`), and its owner
  // (an MLX array, or a pinned box).
  uint32_t* host = nullptr;
  size_t nbytes = 0;
  std::optional<arr> box;
  PinnedBox* pinned = nullptr;
};

namespace {
class MailboxRead : public mx::UnaryPrimitive {
 public:
  MailboxRead(mx::Stream s, std::shared_ptr<Mailbox> box)
      : mx::UnaryPrimitive(s), box_(std::move(box)) {}
  void eval_cpu(const std::vector<arr>&, arr& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_output_array(out);
    enc.dispatch([box = box_, dst = out.data<char>(), n = out.nbytes()]() {
      std::unique_lock<std::mutex> lock(box->m);
      box->cv.wait(lock, [&] { return box->delivered; });
      size_t k = std::min(n, box->bytes.size());
      if (k) std::memcpy(dst, box->bytes.data(), k);
      if (n > k) std::memset(dst + k, 0, n - k);
    });
  }
  void eval_gpu(const std::vector<arr>&, arr&) override {
    throw std::runtime_error("a mailbox is read on a CPU stream");
  }
  const char* name() const override { return "MailboxRead"; }

 private:
  std::shared_ptr<Mailbox> box_;
};
// The GPU's mailbox kernels: one block waits for the flag, then copies the
// payload (W words). The wait sleeps between polls, up to 2 us. The pinned
// kernel finds its box at the address its input holds.
#define MAILBOX_BODY                                             \
  "  if (threadIdx.x == 0) {\n"                                 \
  "    unsigned int ns = 64;\n"                                 \
  "    while (*flag == 0) {\n"                                  \
  "      __nanosleep(ns);\n"                                    \
  "      if (ns < 2048) ns *= 2;\n"                             \
  "    }\n"                                                     \
  "  }\n"                                                       \
  "  __syncthreads();\n"                                        \
  "  __threadfence_system();\n"                                 \
  "  const volatile uint32_t* data = flag + 1;\n"               \
  "  for (int i = threadIdx.x; i < W; i += blockDim.x) {\n"     \
  "    out[i] = data[i];\n"                                     \
  "  }\n"
const char* kMailboxSource = "  const volatile uint32_t* flag = box;\n" MAILBOX_BODY;
const char* kPinnedMailboxSource =
    "  const volatile uint32_t* flag =\n"
    "      reinterpret_cast<const volatile uint32_t*>(addr[0]);\n" MAILBOX_BODY;
#undef MAILBOX_BODY

// The most pinned boxes a process makes; past it, mailboxes use unified
// memory.
constexpr size_t kMaxPinnedBoxes = 64;

// Pinned host memory for GPU mailboxes, through the CUDA driver that MLX
// loaded (none: the unified-memory fallback).
class PinnedBoxes {
 public:
  static PinnedBoxes& get() {
    static PinnedBoxes p;
    return p;
  }
  bool usable() const { return alloc_ != nullptr; }
  // A box of at least `bytes`, its flag cleared.
  PinnedBox* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(m_);
    for (auto& b : boxes_) {
      if (!b->held && b->bytes >= bytes && (!b->read || b->read->is_available())) {
        return ready(b.get());
      }
    }
    // Past the cap, mailboxes use unified memory.
    if (boxes_.size() >= kMaxPinnedBoxes) return nullptr;
    size_t size = std::max<size_t>(4096, (bytes + 4095) / 4096 * 4096);
    void* p = nullptr;
    ensure_context();
    // CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP
    if (alloc_(&p, size, 0x01 | 0x02) != 0 || p == nullptr) return nullptr;
    boxes_.push_back(std::make_unique<PinnedBox>(PinnedBox{static_cast<uint32_t*>(p), size, false, {}}));
    return ready(boxes_.back().get());
  }
  void give_back(PinnedBox* b) {
    std::lock_guard<std::mutex> lock(m_);
    b->held = false;
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(m_);
    return boxes_.size();
  }

 private:
  using AllocFn = int (*)(void**, size_t, unsigned int);
  using CtxGetFn = int (*)(void**);
  using RetainFn = int (*)(void**, int);
  using CtxSetFn = int (*)(void*);
  PinnedBoxes() {
    if (const char* v = std::getenv("MLX_DIST_MAILBOX"); v && std::string(v) == "unified") return;
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!h) return;
    ctx_get_ = reinterpret_cast<CtxGetFn>(dlsym(h, "cuCtxGetCurrent"));
    retain_ = reinterpret_cast<RetainFn>(dlsym(h, "cuDevicePrimaryCtxRetain"));
    ctx_set_ = reinterpret_cast<CtxSetFn>(dlsym(h, "cuCtxSetCurrent"));
    auto alloc = reinterpret_cast<AllocFn>(dlsym(h, "cuMemHostAlloc"));
    if (ctx_get_ && retain_ && ctx_set_) alloc_ = alloc;
  }
  // The driver call needs a current context: MLX's (the device's primary
  // one) where this thread has none yet.
  void ensure_context() {
    void* ctx = nullptr;
    if (ctx_get_(&ctx) == 0 && ctx) return;
    if (retain_(&ctx, mx::default_stream(mx::Device::gpu).device.index) == 0) ctx_set_(ctx);
  }
  PinnedBox* ready(PinnedBox* b) {
    b->held = true;
    b->read.reset();
    __atomic_store_n(b->ptr, 0u, __ATOMIC_RELEASE);
    return b;
  }
  std::mutex m_;
  std::vector<std::unique_ptr<PinnedBox>> boxes_;
  AllocFn alloc_ = nullptr;
  CtxGetFn ctx_get_ = nullptr;
  RetainFn retain_ = nullptr;
  CtxSetFn ctx_set_ = nullptr;
};

// The array a GPU mailbox fills, `shape` of `dtype` (`nbytes`).
arr device_mailbox(Mailbox& b, const mx::Shape& shape, mx::Dtype dtype, size_t nbytes) {
  int words = static_cast<int>((nbytes + 3) / 4);
  // Enough threads to read the payload across the bus in one go.
  int threads = std::min(1024, std::max(32, (words + 31) / 32 * 32));
  auto& pinned = PinnedBoxes::get();
  PinnedBox* pb = pinned.usable() ? pinned.take((words + 1) * 4) : nullptr;
  std::vector<arr> outs;
  if (pb) {
    static auto kernel =
        mx::fast::cuda_kernel("mlxd_mailbox_pinned", {"addr"}, {"out"}, kPinnedMailboxSource);
    b.pinned = pb;
    b.host = pb->ptr;
    arr addr(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(pb->ptr)), mx::uint64);
    outs = kernel({mx::reshape(addr, {1})}, {{words}}, {mx::uint32}, {threads, 1, 1},
                  {threads, 1, 1}, {{"W", words}}, std::nullopt, false, {});
    pb->read = outs[0];
  } else {
    arr box(mx::allocator::malloc((words + 1) * 4), {words + 1}, mx::uint32);
    b.host = box.data<uint32_t>();
    __atomic_store_n(b.host, 0u, __ATOMIC_RELEASE);
    b.box = box;
    static auto kernel = mx::fast::cuda_kernel("mlxd_mailbox", {"box"}, {"out"}, kMailboxSource);
    outs = kernel({box}, {{words}}, {mx::uint32}, {threads, 1, 1}, {threads, 1, 1},
                  {{"W", words}}, std::nullopt, false, {});
  }
  b.nbytes = nbytes;
  auto bytes = mx::view(outs[0], mx::uint8);
  if (nbytes % 4) bytes = mx::slice(bytes, {0}, {static_cast<int>(nbytes)});
  return mx::reshape(mx::view(bytes, dtype), shape);
}
}  // namespace

extern "C" {
// A new CPU stream (its own thread), for mailboxes: a task waiting there
// holds up nothing else.
int mlxd_new_cpu_stream(int* index) {
  GUARD(*index = mx::new_stream(mx::Device::cpu).index)
}
// Whether mailboxes wait on the device (a CUDA GPU is the default device).
int mlxd_mailbox_on_device() {
  return mx::default_device() == mx::Device::gpu && mx::cu::is_available();
}
// A mailbox and, in *out, the array it fills, scheduled on CPU stream
// `stream`; the mailbox is freed with mlxd_mailbox_free.
int mlxd_mailbox_new(void** mbox, arr** out, int stream, const int* shape, int ndim, int dtype) {
  GUARD({
    auto b = std::make_shared<Mailbox>();
    auto sh = to_shape(shape, ndim);
    auto dt = to_dtype(dtype);
    size_t nbytes = dt.size();
    for (auto d : sh) nbytes *= d;
    if (mlxd_mailbox_on_device()) {
      *out = box(device_mailbox(*b, sh, dt, nbytes));
    } else {
      arr a(sh, dt, std::make_shared<MailboxRead>(mx::Stream(stream, mx::Device::cpu), b), {});
      mx::async_eval({a});
      *out = box(std::move(a));
    }
    *mbox = new std::shared_ptr<Mailbox>(std::move(b));
  })
}
// How many pinned boxes this process has made (they are reused).
size_t mlxd_mailbox_pinned_boxes() { return PinnedBoxes::get().count(); }
// Delivers `n` bytes (the array's size; missing ones read as zeros). Only
// the first delivery counts.
void mlxd_mailbox_deliver(void* box, const void* data, size_t n) {
  auto& b = *static_cast<std::shared_ptr<Mailbox>*>(box);
  {
    std::lock_guard<std::mutex> lock(b->m);
    if (b->delivered) return;
    b->delivered = true;
    if (b->host) {
      size_t k = std::min(n, b->nbytes);
      auto* payload = reinterpret_cast<char*>(b->host + 1);
      if (k) std::memcpy(payload, data, k);
      if (b->nbytes > k) std::memset(payload + k, 0, b->nbytes - k);
      __atomic_store_n(b->host, 1u, __ATOMIC_RELEASE);
      return;
    }
    b->bytes.assign(static_cast<const char*>(data), static_cast<const char*>(data) + n);
  }
  b->cv.notify_all();
}
void mlxd_mailbox_free(void* box) {
  auto* b = static_cast<std::shared_ptr<Mailbox>*>(box);
  if ((*b)->pinned) PinnedBoxes::get().give_back((*b)->pinned);
  delete b;
}
}  // extern "C"
