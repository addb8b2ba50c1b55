// KvBlockAllocator / KvBlockManager: free list, reference counts, prefix sharing, copy-on-write,
// exhaustion (a clear error and no change), and an end-to-end check that a forked sequence
// attends to exactly the keys of its own history after copy-on-write.
#include <numeric>

#include "test_util.h"

namespace qllm {
namespace {

TEST(KvBlockAllocator, FreeListAndRefcounts) {
  KvBlockAllocator a(3, 16);
  EXPECT_EQ(a.num_free(), 3);
  const int32_t b0 = a.allocate(), b1 = a.allocate(), b2 = a.allocate();
  EXPECT_EQ(b0, 0);
  EXPECT_EQ(b1, 1);
  EXPECT_EQ(b2, 2);
  EXPECT_EQ(a.num_free(), 0);
  try {
    a.allocate();
    ADD_FAILURE() << "expected exhaustion";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::OutOfMemory);
    EXPECT_NE(std::string(e.what()).find("exhausted"), std::string::npos) << e.what();
  }
  a.retain(b1);
  EXPECT_EQ(a.refcount(b1), 2);
  a.release(b1);
  EXPECT_EQ(a.num_free(), 0);
  a.release(b1);
  EXPECT_EQ(a.num_free(), 1);
  EXPECT_EQ(a.allocate(), b1);  // LIFO: the block just freed comes back first
  a.release(b2);
  test::expect_error([&] { a.release(b2); }, {"kv_block_allocator", "double free"});
  test::expect_error([&] { a.retain(b2); }, {"kv_block_allocator", "is free"});
  test::expect_error([&] { a.release(7); }, {"kv_block_allocator", "block 7", "num_blocks = 3"});
  test::expect_error([] { KvBlockAllocator(4, 0); }, {"kv_block_allocator", "block_size"});
}

TEST(KvBlockManager, AppendForkCopyOnWriteFree) {
  KvBlockManager m(6, 4);
  std::vector<int32_t> slots;
  std::vector<KvBlockManager::Copy> copies;
  m.add_sequence(1);
  m.append(1, 6, slots, copies);  // blocks [0, 1], 6 tokens
  EXPECT_EQ(slots, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_TRUE(copies.empty());
  m.fork(1, 2);  // shares both blocks, the second partially filled
  EXPECT_EQ(m.block_table(2), m.block_table(1));
  EXPECT_EQ(m.allocator().refcount(0), 2);
  EXPECT_EQ(m.allocator().refcount(1), 2);
  EXPECT_EQ(m.blocks_needed(2, 1), 1);  // the copy
  slots.clear();
  m.append(2, 1, slots, copies);  // copy-on-write of block 1 into a fresh block
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, 1);
  const int32_t own = copies[0].dst;
  EXPECT_NE(own, 1);
  EXPECT_EQ(m.block_table(2), (std::vector<int32_t>{0, own}));
  EXPECT_EQ(slots, (std::vector<int32_t>{own * 4 + 2}));
  EXPECT_EQ(m.allocator().refcount(1), 1);
  EXPECT_EQ(m.allocator().refcount(0), 2);
  // The parent keeps writing into its own block 1 with no copy.
  copies.clear();
  slots.clear();
  m.append(1, 3, slots, copies);  // fills block 1, opens a new one
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(slots.size(), 3u);
  EXPECT_EQ(slots[0], 6);
  EXPECT_EQ(slots[1], 7);
  EXPECT_EQ(m.length(1), 9);
  // A prefix share on a block boundary needs no copy on append.
  m.fork(1, 3, 4);
  EXPECT_EQ(m.block_table(3), (std::vector<int32_t>{0}));
  EXPECT_EQ(m.blocks_needed(3, 1), 1);
  slots.clear();
  m.append(3, 1, slots, copies);
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(m.allocator().refcount(0), 3);
  // Exhaustion: all or nothing.
  const int32_t free_before = m.allocator().num_free();
  const auto table_before = m.block_table(1);
  slots.clear();
  try {
    m.append(1, 4 * (free_before + 1), slots, copies);
    ADD_FAILURE() << "expected exhaustion";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::OutOfMemory);
    EXPECT_NE(std::string(e.what()).find("more block(s) needed"), std::string::npos);
  }
  EXPECT_TRUE(slots.empty());
  EXPECT_EQ(m.allocator().num_free(), free_before);
  EXPECT_EQ(m.block_table(1), table_before);
  EXPECT_EQ(m.length(1), 9);
  // Freeing returns only unshared blocks.
  m.free_sequence(1);
  EXPECT_EQ(m.allocator().refcount(0), 2);
  m.free_sequence(2);
  m.free_sequence(3);
  EXPECT_EQ(m.allocator().num_free(), 6);
  test::expect_error([&] { m.free_sequence(3); }, {"kv_block_allocator", "sequence 3 does not exist"});
  m.add_sequence(4);
  test::expect_error([&] { m.add_sequence(4); }, {"already exists"});
  test::expect_error([&] { m.fork(4, 5, 10); }, {"cannot share 10"});
}

TEST(KvBlockManager, ForkedSequenceAttendsToItsOwnHistory) {
  // Parent writes 6 tokens, child forks and both append different tokens; after copy_blocks each
  // sequence's paged attention equals flash attention over its own token history.
  Context& ctx = test::default_context();
  const int64_t bs = 4, Hkv = 1, Hq = 2, D = 8, nb = 8;
  std::vector<uint16_t> kc(nb * bs * Hkv * D), vc(kc.size());
  const KvCache cache = KvCache::of(kc.data(), vc.data(), DType::f16, nb, bs, Hkv, D);
  KvBlockManager m(nb, bs);
  std::vector<float> hist_k[2], hist_v[2];
  // Appends n random tokens to seq (copy-on-write first when needed) and to the histories given.
  auto write = [&](int64_t seq, int64_t n, std::initializer_list<int64_t> owners) {
    std::vector<int32_t> slots;
    std::vector<KvBlockManager::Copy> copies;
    m.append(seq, n, slots, copies);
    if (!copies.empty()) {
      std::vector<int32_t> pairs;
      for (auto c : copies) pairs.insert(pairs.end(), {c.src, c.dst});
      copy_blocks(ctx, cache, TensorView(pairs.data(), DType::s32, {static_cast<int64_t>(copies.size()), 2}));
    }
    auto k = test::rand_f32(n * Hkv * D), v = test::rand_f32(n * Hkv * D);
    for (auto& x : k) x = f16_to_f32(f32_to_f16(x));  // values the f16 cache holds exactly
    for (auto& x : v) x = f16_to_f32(f32_to_f16(x));
    reshape_and_cache(ctx, TensorView(k.data(), DType::f32, {n, Hkv, D}), TensorView(v.data(), DType::f32, {n, Hkv, D}), cache,
                      TensorView(slots.data(), DType::s32, {n}));
    for (int64_t o : owners) {
      hist_k[o].insert(hist_k[o].end(), k.begin(), k.end());
      hist_v[o].insert(hist_v[o].end(), v.begin(), v.end());
    }
    return copies.size();
  };
  m.add_sequence(0);
  EXPECT_EQ(write(0, 6, {0, 1}), 0u);  // the shared prefix: 1.5 blocks
  m.fork(0, 1);
  EXPECT_EQ(write(1, 3, {1}), 1u);  // the child copies the half-full block before writing
  EXPECT_EQ(write(0, 2, {0}), 0u);  // the parent writes into its original block
  for (int64_t s = 0; s < 2; ++s) {
    const int64_t L = m.length(s);
    ASSERT_EQ(static_cast<int64_t>(hist_k[s].size()), L * D);
    const auto q = test::rand_f32(Hq * D);
    std::vector<int32_t> table = m.block_table(s), lens = {static_cast<int32_t>(L)}, cq = {0, 1}, ck = {0, static_cast<int32_t>(L)};
    PagedAttentionArgs a;
    a.q = TensorView(q.data(), DType::f32, {1, Hq, D});
    a.cache = cache;
    a.block_tables = TensorView(table.data(), DType::s32, {1, static_cast<int64_t>(table.size())});
    a.context_lens = TensorView(lens.data(), DType::s32, {1});
    std::vector<float> o(Hq * D), want(Hq * D);
    paged_attention(ctx, a, TensorView(o.data(), DType::f32, {1, Hq, D}));
    FlashAttentionArgs f;
    f.q = a.q;
    f.k = TensorView(hist_k[s].data(), DType::f32, {L, Hkv, D});
    f.v = TensorView(hist_v[s].data(), DType::f32, {L, Hkv, D});
    f.cu_seqlens_q = TensorView(cq.data(), DType::s32, {2});
    f.cu_seqlens_k = TensorView(ck.data(), DType::s32, {2});
    flash_attention(ctx, f, TensorView(want.data(), DType::f32, {1, Hq, D}), AttentionParams{0.0f, true, 0});
    ASSERT_EQ(o, want) << "sequence " << s;
  }
}

}  // namespace
}  // namespace qllm
