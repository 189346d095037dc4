#include "kv_arena.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace iwp
{
namespace
{
constexpr size_t kAlign = 256; // every buffer starts on a 256-byte boundary (what CUDA and TensorRT want)

size_t aligned(size_t bytes)
{
    return (bytes + kAlign - 1) / kAlign * kAlign;
}
} // namespace

size_t KvLayout::keyBytes(size_t layer) const
{
    return static_cast<size_t>(kvHeads * capacities.at(layer) * headDim) * elementBytes;
}

size_t KvLayout::validBytes(size_t layer) const
{
    return static_cast<size_t>(capacities.at(layer));
}

size_t KvLayout::setBytes() const
{
    size_t total = 0;
    for (size_t layer = 0; layer < capacities.size(); ++layer)
    {
        total += 2 * aligned(keyBytes(layer)) + aligned(validBytes(layer));
    }
    return total;
}

size_t KvLayout::unprunedSetBytes(int64_t tokens) const
{
    KvLayout full = *this;
    full.capacities.assign(capacities.size(), tokens);
    return full.setBytes();
}

Allocator Allocator::host()
{
    return Allocator{[](size_t bytes) { return std::aligned_alloc(kAlign, aligned(bytes)); },
        [](void* p) { std::free(p); }, [](void* p, size_t bytes) { std::memset(p, 0, bytes); }};
}

KvArena::KvArena(KvLayout layout, Allocator allocator)
    : mLayout(std::move(layout))
    , mAllocator(std::move(allocator))
{
    if (mLayout.capacities.empty() || mLayout.kvHeads < 1 || mLayout.headDim < 1
        || (mLayout.elementBytes != 2 && mLayout.elementBytes != 4))
    {
        throw std::invalid_argument("KvArena: need >= 1 layer, kv heads and head dim >= 1, and 2- or 4-byte elements");
    }
    size_t offset = 0;
    for (size_t layer = 0; layer < mLayout.capacities.size(); ++layer)
    {
        if (mLayout.capacities[layer] < 1)
        {
            throw std::invalid_argument("KvArena: layer " + std::to_string(layer) + " has capacity "
                + std::to_string(mLayout.capacities[layer]) + "; every layer needs >= 1 slot");
        }
        mOffsets.push_back(offset);
        offset += aligned(mLayout.keyBytes(layer));
        mOffsets.push_back(offset);
        offset += aligned(mLayout.keyBytes(layer));
        mOffsets.push_back(offset);
        offset += aligned(mLayout.validBytes(layer));
    }
    mBase = static_cast<char*>(mAllocator.allocate(bytes()));
    if (mBase == nullptr)
    {
        throw std::bad_alloc();
    }
    reset();
}

KvArena::~KvArena()
{
    mAllocator.release(mBase);
}

char* KvArena::at(int set, size_t layer, size_t part) const
{
    if ((set != 0 && set != 1) || layer >= layers())
    {
        throw std::out_of_range("KvArena: set must be 0 or 1 and layer < " + std::to_string(layers()));
    }
    return mBase + static_cast<size_t>(set) * mLayout.setBytes() + mOffsets[3 * layer + part];
}

void* KvArena::key(int set, size_t layer) const
{
    return at(set, layer, 0);
}

void* KvArena::value(int set, size_t layer) const
{
    return at(set, layer, 1);
}

uint8_t* KvArena::valid(int set, size_t layer) const
{
    return reinterpret_cast<uint8_t*>(at(set, layer, 2));
}

void KvArena::reset()
{
    mAllocator.zero(mBase, bytes());
    mPast = 0;
}

} // namespace iwp
