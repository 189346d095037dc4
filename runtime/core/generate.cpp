#include "generate.h"

#include <algorithm>
#include <stdexcept>

namespace iwp
{

std::vector<int32_t> generate(Backend& backend, KvArena& arena, float const* firstLogits, int64_t nextPosition,
    Sampler& sampler, StopConditions const& stop, TokenCallback const& onToken)
{
    if (stop.maxNewTokens < 1)
    {
        throw std::invalid_argument("generate: max_new_tokens must be >= 1");
    }
    std::vector<int32_t> tokens;
    int32_t token = sampler.sample(firstLogits, backend.vocab());
    for (int64_t step = 0;; ++step)
    {
        tokens.push_back(token);
        bool const keepGoing = !onToken || onToken(token);
        bool const stopToken = std::find(stop.stopTokens.begin(), stop.stopTokens.end(), token) != stop.stopTokens.end();
        if (!keepGoing || stopToken || step + 1 >= stop.maxNewTokens)
        {
            return tokens;
        }
        float const* logits = backend.decode(token, nextPosition + step, step, arena);
        arena.swap(); // the present just written is the next step's past
        token = sampler.sample(logits, backend.vocab());
    }
}

} // namespace iwp
