// The selection pass on the CPU: the k largest keys in rank order (+inf > finite > -inf >
// NaN, ties by lower index, as ReferenceBackend.select; see descending_key in hash.h), the
// counter-based uniforms of fastsel/rng.py and the shuffle. A radix select on the top 16 key bits keeps only the
// candidates that can be among the k; a stable LSD radix sort orders them.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "hash.h"
#include "ops.h"

namespace fastsel {
namespace {
constexpr int kDigitBits = 11;
constexpr uint32_t kDigits = 1u << kDigitBits;

// radix_sort_pairs for short arrays (a batch's sample indices, a small selection): 8-bit
// digits, whose 256-entry histograms cost little to clear, and no pass over a digit that
// every key shares (indices below 2**16 take two passes).
void radix_sort_pairs_short(std::vector<uint32_t>& key, std::vector<uint32_t>& val) {
  const size_t m = key.size();
  uint32_t any = 0, all = ~0u;
  for (const uint32_t k : key) {
    any |= k;
    all &= k;
  }
  const uint32_t varying = any ^ all;  // the bits that differ between some keys
  std::vector<uint32_t> k2(m), v2(m);
  for (int shift = 0; shift < 32; shift += 8) {
    if (((varying >> shift) & 0xFFu) == 0) continue;
    uint32_t start[256] = {0};
    for (size_t i = 0; i < m; ++i) ++start[(key[i] >> shift) & 0xFFu];
    uint32_t sum = 0;
    for (uint32_t& s : start) {
      const uint32_t cnt = s;
      s = sum;
      sum += cnt;
    }
    for (size_t i = 0; i < m; ++i) {
      const uint32_t pos = start[(key[i] >> shift) & 0xFFu]++;
      k2[pos] = key[i];
      v2[pos] = val[i];
    }
    key.swap(k2);
    val.swap(v2);
  }
}
}  // namespace

void radix_sort_pairs(std::vector<uint32_t>& key, std::vector<uint32_t>& val) {
  const size_t m = key.size();
  if (m < 2) return;
  if (m <= 2048) {
    radix_sort_pairs_short(key, val);
    return;
  }
  std::vector<uint32_t> hist(3 * kDigits, 0);
  for (size_t i = 0; i < m; ++i) {
    const uint32_t k = key[i];
    ++hist[k & (kDigits - 1)];
    ++hist[kDigits + ((k >> kDigitBits) & (kDigits - 1))];
    ++hist[2 * kDigits + (k >> (2 * kDigitBits))];
  }
  std::vector<uint32_t> k2(m), v2(m);
  for (int pass = 0; pass < 3; ++pass) {
    uint32_t* h = hist.data() + pass * kDigits;
    const int shift = pass * kDigitBits;
    const uint32_t first = (key[0] >> shift) & (kDigits - 1);
    if (h[first] == m) continue;  // every key has the same digit: this pass would not move anything
    uint32_t sum = 0;
    for (uint32_t d = 0; d < kDigits; ++d) {
      const uint32_t cnt = h[d];
      h[d] = sum;
      sum += cnt;
    }
    for (size_t i = 0; i < m; ++i) {
      const uint32_t pos = h[(key[i] >> shift) & (kDigits - 1)]++;
      k2[pos] = key[i];
      v2[pos] = val[i];
    }
    key.swap(k2);
    val.swap(v2);
  }
}

at::Tensor cpu_select(const at::Tensor& keys, int64_t k) {
  TORCH_CHECK(keys.device().is_cpu(), "fastsel::select_csrc: keys must be on the CPU, got ", keys.device());
  TORCH_CHECK(keys.scalar_type() == at::kFloat, "fastsel::select_csrc: keys must be float32, got ",
              keys.scalar_type(), " (cast with .float())");
  TORCH_CHECK(keys.dim() == 1 && keys.is_contiguous(),
              "fastsel::select_csrc: keys must be a contiguous 1-D tensor, got shape ", keys.sizes());
  const int64_t n = keys.size(0);
  TORCH_CHECK(n < (int64_t(1) << 32), "fastsel::select_csrc: at most 2**32 - 1 keys, got ", n);
  TORCH_CHECK(k >= 0 && k <= n, "fastsel::select_csrc: k must be in [0, ", n, "] (the number of keys), got ", k);
  at::Tensor out = at::empty({k}, at::kLong);
  if (k == 0) return out;
  const float* kp = keys.data_ptr<float>();

  // Keys as uint32 ascending in rank order, and a histogram of their top 16 bits per chunk.
  std::vector<uint32_t> u(n);
  const int nchunks = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n / 65536) + 1));
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  std::vector<std::vector<uint32_t>> hists(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t ci = lo; ci < hi; ++ci) {
      auto& h = hists[ci];
      h.assign(65536, 0);
      const int64_t a = ci * chunk, b = std::min(n, a + chunk);
      for (int64_t i = a; i < b; ++i) {
        const uint32_t v = descending_key(kp[i]);
        u[i] = v;
        ++h[v >> 16];
      }
    }
  });
  // The bin holding the k-th key: every key in a lower bin is selected, keys in a higher
  // bin are not; only the keys of bins <= t need sorting.
  uint64_t cum = 0;
  uint32_t t = 0;
  for (;; ++t) {
    uint64_t cnt = 0;
    for (int ci = 0; ci < nchunks; ++ci) cnt += hists[ci][t];
    if (cum + cnt >= static_cast<uint64_t>(k)) {
      cum += cnt;
      break;
    }
    cum += cnt;
  }
  std::vector<uint32_t> ck, cv;
  if (cum == static_cast<uint64_t>(n)) {
    ck.swap(u);
    cv.resize(n);
    for (int64_t i = 0; i < n; ++i) cv[i] = static_cast<uint32_t>(i);
  } else {
    ck.reserve(cum);
    cv.reserve(cum);
    for (int64_t i = 0; i < n; ++i)
      if ((u[i] >> 16) <= t) {
        ck.push_back(u[i]);
        cv.push_back(static_cast<uint32_t>(i));
      }
  }
  radix_sort_pairs(ck, cv);  // stable: candidates were gathered in index order
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) o[i] = cv[i];
  return out;
}

at::Tensor cpu_uniform(const at::Tensor& idx, int64_t key, int64_t stream) {
  TORCH_CHECK(idx.device().is_cpu(), "fastsel::uniform_csrc: idx must be on the CPU, got ", idx.device());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              "fastsel::uniform_csrc: idx must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.is_contiguous(), "fastsel::uniform_csrc: idx must be contiguous");
  at::Tensor out = at::empty(idx.sizes(), at::kFloat);
  const uint32_t base = stream_base(key, stream);
  float* o = out.data_ptr<float>();
  const int64_t n = idx.numel();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "fastsel_uniform", [&] {
    const index_t* p = idx.data_ptr<index_t>();
    at::parallel_for(0, n, 32768, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = hash_to_uniform(hash_index(static_cast<int64_t>(p[i]), base));
    });
  });
  return out;
}

at::Tensor cpu_shuffle(const at::Tensor& chosen, int64_t key) {
  TORCH_CHECK(chosen.device().is_cpu(), "fastsel::shuffle_csrc: chosen must be on the CPU, got ", chosen.device());
  TORCH_CHECK(chosen.scalar_type() == at::kLong || chosen.scalar_type() == at::kInt,
              "fastsel::shuffle_csrc: chosen must be int64 or int32, got ", chosen.scalar_type());
  TORCH_CHECK(chosen.dim() == 1 && chosen.is_contiguous(),
              "fastsel::shuffle_csrc: chosen must be a contiguous 1-D tensor, got shape ", chosen.sizes());
  const int64_t m = chosen.size(0);
  TORCH_CHECK(m < (int64_t(1) << 32), "fastsel::shuffle_csrc: at most 2**32 - 1 entries, got ", m);
  const uint32_t base = stream_base(key, kStreamShuffle);
  std::vector<uint32_t> ukey(m), pos(m);
  at::Tensor out = at::empty_like(chosen);
  AT_DISPATCH_INDEX_TYPES(chosen.scalar_type(), "fastsel_shuffle", [&] {
    const index_t* p = chosen.data_ptr<index_t>();
    at::parallel_for(0, m, 32768, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        // Positive floats order as their bit patterns: sort on the uniform's bits, so
        // uniforms that round to the same float tie and keep their order, as torch.sort does.
        const float f = hash_to_uniform(hash_index(static_cast<int64_t>(p[i]), base));
        uint32_t bits;
        std::memcpy(&bits, &f, sizeof bits);
        ukey[i] = bits;
        pos[i] = static_cast<uint32_t>(i);
      }
    });
    radix_sort_pairs(ukey, pos);
    index_t* o = out.data_ptr<index_t>();
    for (int64_t i = 0; i < m; ++i) o[i] = p[pos[i]];
  });
  return out;
}

}  // namespace fastsel
