// bench paged-read: how fast this machine reads a paged KV pool. A pool of blocks is read in
// shuffled block order, as decode attention reads a sequence whose blocks came off a free list
// after some churn, for block sizes from 4 KiB to 256 KiB and 1, 2, 4 or 8 blocks in flight per
// thread. Every figure is a ratio to the sequential DRAM probe of the same run. The result tells
// which block sizes a decode kernel can stream at the DRAM rate (an attention block holds
// block_size * Hkv * D elements of K, and as many of V).
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

namespace qllm::bench {

int bench_paged_read(const Options& o) {
  Reporter rep(o);
  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  const int threads = ctx.threads();
  const Peak peak = measure_peak(threads, o.quick ? 0.05 : 0.3);
  rep.row(peak_row(peak));
  // 512 MiB: 16x the L3, so every pass reads DRAM; from aligned_malloc, so huge-page eligible
  // like a serving KV pool.
  const size_t pool = o.quick ? size_t{64} << 20 : size_t{512} << 20;
  detail::AlignedBuffer buf(static_cast<uint8_t*>(aligned_malloc(pool)));
  fill_random(buf.get(), pool, 7);
  const std::vector<size_t> sizes = o.quick ? std::vector<size_t>{16 << 10, 64 << 10}
                                            : std::vector<size_t>{4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10};
  const std::vector<int> flights = o.quick ? std::vector<int>{1, 4} : std::vector<int>{1, 2, 4, 8};
  const int reps = o.quick ? 1 : 5;
  for (const size_t bytes : sizes) {
    std::vector<const uint8_t*> blocks(pool / bytes);
    for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = buf.get() + i * bytes;
    std::mt19937 g(static_cast<uint32_t>(bytes));
    std::shuffle(blocks.begin(), blocks.end(), g);
    for (const int f : flights) {
      const double dram_now = measure_dram(threads, o.quick ? 1 : 3);
      const double gbps = measure_paged_read(threads, blocks, bytes, f, reps);
      nlohmann::ordered_json j;
      j["bench"] = "paged-read";
      j["case"] = {{"block_bytes", bytes}, {"in_flight", f}, {"order", "shuffled"}, {"threads", threads}};
      j["gbps"] = gbps;
      j["dram_gbps"] = dram_now;
      j["dram_ratio"] = gbps / dram_now;
      rep.row(j);
    }
  }
  return 0;
}

}  // namespace qllm::bench
