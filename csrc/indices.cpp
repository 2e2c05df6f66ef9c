// Index builders for the GPT data pipeline: document shuffles, sample index, blending index.
//
// Results are identical to the NumPy references in megaevo/data/index_ref.py, which follow
// Megatron-LM's definitions: the shuffles reproduce numpy.random.RandomState(seed).shuffle
// draw for draw (MT19937 with the legacy bounded-integer rejection sampling), so a C++ build and
// a NumPy build of the same dataset give the same samples in the same order.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// MT19937 giving the same stream as numpy's legacy RandomState (and std::mt19937), but generated a
// block of 624 words at a time in loops the compiler vectorises: several times faster per draw.
class Mt19937 {
 public:
  static constexpr int kN = 624, kM = 397;
  explicit Mt19937(uint32_t seed) {
    state_[0] = seed;
    for (int i = 1; i < kN; ++i) state_[i] = 1812433253u * (state_[i - 1] ^ (state_[i - 1] >> 30)) + uint32_t(i);
    pos_ = kN;
  }
  inline uint32_t operator()() {
    if (pos_ == kN) refill();
    return out_[pos_++];
  }
 private:
  static inline uint32_t twist(uint32_t a, uint32_t b, uint32_t c) {
    const uint32_t y = (a & 0x80000000u) | (b & 0x7fffffffu);
    return c ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
  }
  void refill() {
    uint32_t* s = state_;
    for (int i = 0; i < kN - kM; ++i) s[i] = twist(s[i], s[i + 1], s[i + kM]);
    for (int i = kN - kM; i < kN - 1; ++i) s[i] = twist(s[i], s[i + 1], s[i + kM - kN]);
    s[kN - 1] = twist(s[kN - 1], s[0], s[kM - 1]);
    for (int i = 0; i < kN; ++i) {
      uint32_t y = s[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= y >> 18;
      out_[i] = y;
    }
    pos_ = 0;
  }
  uint32_t state_[kN];
  uint32_t out_[kN];
  int pos_;
};

// numpy's legacy RandomState draws a bounded integer in [0, max] by masking 32-bit (or 64-bit)
// MT19937 outputs to the smallest covering power of two and rejecting values above max.
class LegacyRng {
 public:
  explicit LegacyRng(uint32_t seed) : mt_(seed) {}

  uint64_t interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t value;
    if (max <= 0xffffffffULL) {
      do {
        value = static_cast<uint64_t>(mt_()) & mask;
      } while (value > max);
    } else {
      do {
        uint64_t hi = mt_();
        uint64_t lo = mt_();
        value = ((hi << 32) | lo) & mask;
      } while (value > max);
    }
    return value;
  }

  // Fisher-Yates from the back, as RandomState.shuffle on a 1-D array. Swap targets are drawn a
  // block ahead (the draws do not depend on the data) so the random memory accesses of a block can
  // be prefetched and overlap instead of stalling one by one.
  template <typename T>
  void shuffle(T* data, int64_t n) {
    constexpr int64_t kBlock = 4096;
    constexpr int64_t kAhead = 32;
    std::vector<int64_t> js(kBlock);
    for (int64_t top = n - 1; top >= 1; top -= kBlock) {
      const int64_t count = std::min<int64_t>(kBlock, top);  // i runs top, top-1, ..., top-count+1
      for (int64_t k = 0; k < count; ++k) js[k] = static_cast<int64_t>(interval(static_cast<uint64_t>(top - k)));
      for (int64_t k = 0; k < count; ++k) {
        if (k + kAhead < count) __builtin_prefetch(data + js[k + kAhead], 1);
        const int64_t i = top - k;
        std::swap(data[i], data[js[k]]);
      }
    }
  }

 private:
  Mt19937 mt_;
};

template <typename T>
py::array_t<T> check_1d(py::array arr, const char* what) {
  if (arr.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be a 1-D array");
  return py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(arr);
}

template <typename T>
void shuffle_array(LegacyRng& rng, py::array arr) {
  auto a = py::array_t<T>::ensure(arr);
  if (!a || a.ndim() != 1 || !(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument("shuffle needs a writable, contiguous 1-D array");
  T* data = a.mutable_data();
  const int64_t n = a.shape(0);
  py::gil_scoped_release release;
  rng.shuffle(data, n);
}

void shuffle(LegacyRng& rng, py::array arr) {
  if (py::isinstance<py::array_t<int32_t>>(arr)) return shuffle_array<int32_t>(rng, arr);
  if (py::isinstance<py::array_t<uint32_t>>(arr)) return shuffle_array<uint32_t>(rng, arr);
  if (py::isinstance<py::array_t<int64_t>>(arr)) return shuffle_array<int64_t>(rng, arr);
  throw std::invalid_argument("shuffle supports int32, uint32 and int64 arrays");
}

// Document index: `num_epochs` copies of `documents`, shuffled as one; with a separate final epoch
// the first num_epochs - 1 copies are shuffled together and the last copy on its own.
void fill_document_index(const int32_t* documents, int64_t n, int64_t num_epochs, bool separate_final_epoch,
                         LegacyRng& rng, int32_t* out) {
  for (int64_t e = 0; e < num_epochs; ++e) std::copy(documents, documents + n, out + e * n);
  if (separate_final_epoch && num_epochs > 1) {
    rng.shuffle(out, (num_epochs - 1) * n);
    rng.shuffle(out + (num_epochs - 1) * n, n);
  } else {
    rng.shuffle(out, num_epochs * n);
  }
}

// Sample index: row s = (position in the document index, token offset) where sample s starts;
// sample s runs to row s + 1 plus `add_extra_token` tokens (the label of its last position), so
// consecutive samples share one token. Returns false if a document id is outside `sizes`.
template <typename T>
bool fill_sample_index(const int32_t* sizes, int64_t n_sizes, const int32_t* doc_index, int64_t n_docs,
                       int64_t seq_length, int64_t num_samples, int64_t add_extra_token, T* idx) {
  constexpr int64_t kPrefetch = 32;
  int64_t d = 0;       // position in the document index
  int64_t offset = 0;  // token offset inside document doc_index[d]
  idx[0] = 0;
  idx[1] = 0;
  for (int64_t s = 1; s <= num_samples; ++s) {
    int64_t remaining = seq_length + add_extra_token;
    while (remaining != 0) {
      // Document lengths are read in shuffled order: fetch a few documents ahead.
      if (d + kPrefetch < n_docs) __builtin_prefetch(sizes + doc_index[d + kPrefetch]);
      const int32_t doc = doc_index[d];
      if (doc < 0 || doc >= n_sizes) return false;
      const int64_t available = int64_t(sizes[doc]) - offset;
      remaining -= available;
      if (remaining <= 0) {
        offset += remaining + available - add_extra_token;
        remaining = 0;
      } else {
        ++d;  // num_samples never asks for more tokens than the documents hold
        offset = 0;
      }
    }
    idx[2 * s] = static_cast<T>(d);
    idx[2 * s + 1] = static_cast<T>(offset);
  }
  return true;
}

// Shuffle index: a permutation of [0, first) followed by a separately shuffled permutation of
// [first, total) (the samples of a separate final epoch).
template <typename T>
void fill_shuffle_index(int64_t first, int64_t total, LegacyRng& rng, T* out) {
  for (int64_t i = 0; i < total; ++i) out[i] = static_cast<T>(i);
  rng.shuffle(out, first);
  if (total > first) rng.shuffle(out + first, total - first);
}

int64_t count_tokens(const int32_t* sizes, int64_t n_sizes, const int32_t* documents, int64_t n) {
  int64_t tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (documents[i] < 0 || documents[i] >= n_sizes)
      throw std::invalid_argument("document id " + std::to_string(documents[i]) + " is outside sizes");
    tokens += sizes[documents[i]];
  }
  return tokens;
}

// The three indices of one GPT dataset split, from one MT19937 stream seeded with `seed`: the
// document shuffle draws first, then the sample shuffle. The sample shuffle runs on a second
// thread, on a copy of the stream advanced past the document shuffle's draws (their number does
// not depend on the data), while the first thread shuffles documents and cuts samples.
py::tuple build_gpt_indices(py::array sizes_in, py::array documents_in, int64_t seq_length, int64_t num_epochs,
                            bool separate_final_epoch, int64_t samples_before_final_epoch, int64_t seed,
                            int64_t add_extra_token) {
  auto sizes = check_1d<int32_t>(sizes_in, "sizes");
  auto documents = check_1d<int32_t>(documents_in, "documents");
  if (seq_length < 1) throw std::invalid_argument("seq_length must be positive");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be at least 1");
  if (add_extra_token < 0) throw std::invalid_argument("add_extra_token must be 0 or more");
  if (seed < 0 || seed > int64_t(UINT32_MAX)) throw std::invalid_argument("seed must be in [0, 2**32)");
  const int32_t* sz = sizes.data();
  const int32_t* docs = documents.data();
  const int64_t n_sizes = sizes.shape(0), n = documents.shape(0);

  const int64_t tokens_per_epoch = count_tokens(sz, n_sizes, docs, n);
  const int64_t usable = num_epochs * tokens_per_epoch - add_extra_token;
  if (usable < seq_length) throw std::invalid_argument("the documents hold too few tokens for one sample");
  const int64_t num_samples = usable / seq_length;
  const int64_t first = separate_final_epoch ? samples_before_final_epoch : num_samples;
  if (first < 0 || first > num_samples) throw std::invalid_argument("samples_before_final_epoch out of range");

  const int64_t n_doc_index = n * num_epochs;
  py::array_t<int32_t> doc_index(n_doc_index);
  const bool wide_samples = n_doc_index >= INT32_MAX;
  py::array sample_index = wide_samples ? py::array(py::array_t<int64_t>({num_samples + 1, int64_t(2)}))
                                        : py::array(py::array_t<int32_t>({num_samples + 1, int64_t(2)}));
  const bool wide_shuffle = num_samples >= int64_t(UINT32_MAX) - 1;
  py::array shuffle_index =
      wide_shuffle ? py::array(py::array_t<int64_t>(num_samples)) : py::array(py::array_t<uint32_t>(num_samples));
  int32_t* di = doc_index.mutable_data();
  void* si = sample_index.mutable_data();
  void* sh = shuffle_index.mutable_data();

  {
    py::gil_scoped_release release;
    LegacyRng rng(static_cast<uint32_t>(seed));
    LegacyRng rng_samples = rng;
    std::thread sample_shuffler([&] {
      // Skip the document shuffle's draws: Fisher-Yates draws interval(i) for i = len-1 .. 1.
      auto skip = [&](int64_t len) {
        for (int64_t i = len - 1; i >= 1; --i) rng_samples.interval(static_cast<uint64_t>(i));
      };
      if (separate_final_epoch && num_epochs > 1) {
        skip((num_epochs - 1) * n);
        skip(n);
      } else {
        skip(num_epochs * n);
      }
      if (wide_shuffle)
        fill_shuffle_index(first, num_samples, rng_samples, static_cast<int64_t*>(sh));
      else
        fill_shuffle_index(first, num_samples, rng_samples, static_cast<uint32_t*>(sh));
    });
    fill_document_index(docs, n, num_epochs, separate_final_epoch, rng, di);
    if (wide_samples)
      fill_sample_index(sz, n_sizes, di, n_doc_index, seq_length, num_samples, add_extra_token,
                        static_cast<int64_t*>(si));
    else
      fill_sample_index(sz, n_sizes, di, n_doc_index, seq_length, num_samples, add_extra_token,
                        static_cast<int32_t*>(si));
    sample_shuffler.join();
  }
  return py::make_tuple(doc_index, sample_index, shuffle_index, tokens_per_epoch);
}

// Blending index: sample n (1-based) goes, among the datasets at least 1/(2k-2) of a sample behind
// their share (weight * n - taken), to the one that would soonest fall sigma = 1 - 1/(2k-2) behind
// (smallest (taken + sigma) / weight; ties to the lower index). This earliest-deadline rule
// (Tijdeman's chairman assignment) keeps |taken - weight * n| <= sigma < 1 at every prefix, for any
// number of datasets, so every window of the blend holds each dataset's share to within one sample.
py::tuple build_blending_indices(py::array weights_in, int64_t size) {
  auto weights = check_1d<double>(weights_in, "weights");
  const int64_t k = weights.shape(0);
  if (k < 1 || k > INT16_MAX) throw std::invalid_argument("need between 1 and 32767 datasets");
  if (size < 0) throw std::invalid_argument("size must be non-negative");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  const double* w = weights.data();
  const double slack = k > 1 ? 1.0 / double(2 * (k - 1)) : 0.0;
  const double sigma = 1.0 - slack;
  const double tolerance = 1e-9;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(k, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double n = double(i + 1);
      int64_t best = -1;
      double best_deadline = 0.0;
      for (int64_t d = 0; d < k; ++d) {
        if (w[d] <= 0.0 || w[d] * n - double(taken[d]) < slack - tolerance) continue;
        const double deadline = (double(taken[d]) + sigma) / w[d];
        if (best < 0 || deadline < best_deadline) {
          best = d;
          best_deadline = deadline;
        }
      }
      di[i] = static_cast<int16_t>(best);
      dsi[i] = taken[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megaevo C++ index builders for the data pipeline (NumPy arrays in and out)";

  py::class_<LegacyRng>(m, "Rng", "MT19937 stream that shuffles exactly as numpy.random.RandomState(seed)")
      .def(py::init([](int64_t seed) {
             if (seed < 0 || seed > int64_t(UINT32_MAX)) throw std::invalid_argument("seed must be in [0, 2**32)");
             return LegacyRng(static_cast<uint32_t>(seed));
           }),
           py::arg("seed"))
      .def("interval", &LegacyRng::interval, py::arg("max"), "a uniform integer in [0, max]")
      .def("shuffle", &shuffle, py::arg("array"), "shuffle a 1-D int32/uint32/int64 array in place");

  m.def(
      "count_tokens",
      [](py::array sizes_in, py::array documents_in) {
        auto sizes = check_1d<int32_t>(sizes_in, "sizes");
        auto documents = check_1d<int32_t>(documents_in, "documents");
        return count_tokens(sizes.data(), sizes.shape(0), documents.data(), documents.shape(0));
      },
      py::arg("sizes"), py::arg("documents"), "total length of the given documents");
  m.def("build_gpt_indices", &build_gpt_indices, py::arg("sizes"), py::arg("documents"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("separate_final_epoch"), py::arg("samples_before_final_epoch"),
        py::arg("seed"), py::arg("add_extra_token") = 1,
        "(document_index, sample_index, shuffle_index, tokens_per_epoch) of one GPT dataset split");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
