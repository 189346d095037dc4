// The KV-cache arena: every layer's keys, values and validity mask in one allocation, sized from the
// engine's per-layer capacities (pruned layers hold fewer slots). Two sets ping-pong: a decode step reads
// the past from one set and writes the present into the other, so no backend ever aliases its input and
// output buffers; the loop swaps them after each step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace iwp
{

struct KvLayout
{
    std::vector<int64_t> capacities; // slots per layer: pruned prefill + max new tokens
    int64_t kvHeads = 0;
    int64_t headDim = 0;
    size_t elementBytes = 4;          // 4 for fp32 caches, 2 for fp16/bf16

    size_t keyBytes(size_t layer) const;    // one of keys or values of a layer: [1, Hkv, capacity, d]
    size_t validBytes(size_t layer) const;  // the layer's validity mask: [1, capacity] bytes (bool)
    size_t setBytes() const;                // one set, every layer, with alignment padding
    // Bytes of one set if every layer held `tokens` slots: the unpruned engine's cache.
    size_t unprunedSetBytes(int64_t tokens) const;
};

// Where the arena's memory comes from: host by default; a GPU backend passes device allocation.
struct Allocator
{
    std::function<void*(size_t)> allocate;
    std::function<void(void*)> release;
    std::function<void(void*, size_t)> zero;
    static Allocator host();
};

class KvArena
{
public:
    explicit KvArena(KvLayout layout, Allocator allocator = Allocator::host());
    ~KvArena();
    KvArena(KvArena const&) = delete;
    KvArena& operator=(KvArena const&) = delete;

    KvLayout const& layout() const { return mLayout; }
    size_t layers() const { return mLayout.capacities.size(); }
    size_t bytes() const { return 2 * mLayout.setBytes(); }

    // Buffers of set `set` (0 or 1); `past()` is the set the next step reads, `present()` the one it writes.
    void* key(int set, size_t layer) const;
    void* value(int set, size_t layer) const;
    uint8_t* valid(int set, size_t layer) const;
    int past() const { return mPast; }
    int present() const { return 1 - mPast; }
    void swap() { mPast = 1 - mPast; }

    // Zero both sets (every slot invalid) and make set 0 the past: ready for the next prompt's prefill.
    void reset();

private:
    char* at(int set, size_t layer, size_t part) const;

    KvLayout mLayout;
    Allocator mAllocator;
    std::vector<size_t> mOffsets; // per layer: key, value, valid offsets within a set
    char* mBase = nullptr;
    int mPast = 0;
};

} // namespace iwp
