// iwp_generate: a minimal C++ app on iwp's runtime core and its TensorRT backend, with no Python at run time.
//
//   iwp_generate --engine DIR --plugin build/plugins/libiwp_trt_plugins.so --ids PROMPT.ids --pixels PROMPT.pixels
//                [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--no-cuda-graphs]
//
// PROMPT.ids holds the prompt's token ids (whitespace-separated, the image's placeholder tokens expanded) and
// PROMPT.pixels the processor's pixel_values as raw bytes; `iwp prepare` writes both from an image and a
// prompt, since tokenization and image preprocessing stay in Python. It prints each stage's kept visual
// tokens, the generated token ids and the timings (time to first token, decode per token).
#include "generate.h"
#include "manifest.h"
#include "prompt.h"
#include "sampler.h"
#include "trt_engine.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{
struct Options
{
    std::string engine, plugin, ids, pixels;
    int64_t maxNewTokens = 0; // 0: the engine's capacity
    double temperature = 0.0, topP = 1.0;
    uint64_t seed = 0;
    bool cudaGraphs = true;
};

[[noreturn]] void usage(std::string const& problem)
{
    std::fprintf(stderr,
        "iwp_generate: %s\nusage: iwp_generate --engine DIR --plugin LIB --ids FILE --pixels FILE "
        "[--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--no-cuda-graphs]\n",
        problem.c_str());
    std::exit(2);
}

Options parse(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i)
    {
        std::string const flag = argv[i];
        if (flag == "--no-cuda-graphs")
        {
            o.cudaGraphs = false;
            continue;
        }
        if (i + 1 >= argc)
        {
            usage(flag + " needs a value");
        }
        std::string const value = argv[++i];
        try
        {
            if (flag == "--engine") o.engine = value;
            else if (flag == "--plugin") o.plugin = value;
            else if (flag == "--ids") o.ids = value;
            else if (flag == "--pixels") o.pixels = value;
            else if (flag == "--max-new-tokens") o.maxNewTokens = std::stoll(value);
            else if (flag == "--temperature") o.temperature = std::stod(value);
            else if (flag == "--top-p") o.topP = std::stod(value);
            else if (flag == "--seed") o.seed = iwp::parseSeed(value); // any integer, wrapped as Python wraps it
            else usage("unknown flag " + flag);
        }
        catch (std::logic_error const&) // stoll/stod/parseSeed on a non-number
        {
            usage(flag + " takes a number, got " + value);
        }
    }
    if (o.engine.empty() || o.plugin.empty() || o.ids.empty() || o.pixels.empty())
    {
        usage("--engine, --plugin, --ids and --pixels are required");
    }
    return o;
}

std::vector<int32_t> readIds(std::string const& path)
{
    std::ifstream file(path);
    if (!file)
    {
        throw std::runtime_error("cannot read " + path + "; write it with `iwp prepare`");
    }
    std::vector<int32_t> ids;
    long long id;
    while (file >> id)
    {
        ids.push_back(static_cast<int32_t>(id));
    }
    if (!file.eof() || ids.empty())
    {
        throw std::runtime_error(path + " is not whitespace-separated token ids; write it with `iwp prepare`");
    }
    return ids;
}

double millis(std::chrono::steady_clock::time_point from)
{
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - from).count();
}
} // namespace

int main(int argc, char** argv)
{
    Options const o = parse(argc, argv);
    try
    {
        iwp::TrtEngine engine(o.engine, o.plugin, o.cudaGraphs);
        iwp::EngineManifest const& m = engine.manifest();
        std::ifstream pixelFile(o.pixels, std::ios::binary);
        if (!pixelFile)
        {
            throw std::runtime_error("cannot read " + o.pixels + "; write it with `iwp prepare`");
        }
        std::vector<char> const pixels(std::istreambuf_iterator<char>(pixelFile), {});
        iwp::PrefillInputs const inputs = iwp::makePrefillInputs(readIds(o.ids), m);

        auto const start = std::chrono::steady_clock::now();
        std::vector<std::vector<int64_t>> kept;
        std::vector<float> const logits = engine.prefill(inputs, pixels.data(), pixels.size(), &kept);
        iwp::Sampler sampler(o.temperature, o.topP, o.seed);
        double ttft = 0.0;
        auto decodeStart = start;
        iwp::StopConditions stop{o.maxNewTokens > 0 ? o.maxNewTokens : m.maxNewTokens, {m.eosToken}};
        std::vector<int32_t> const tokens = iwp::generate(engine, engine.arena(), logits.data(), inputs.nextPosition,
            sampler, stop, [&](int32_t) {
                if (ttft == 0.0)
                {
                    ttft = millis(start);
                    decodeStart = std::chrono::steady_clock::now();
                }
                return true;
            });
        double const decoding = millis(decodeStart);

        for (size_t s = 0; s < kept.size(); ++s)
        {
            std::printf("kept     stage %zu: %zu of %lld visual tokens\n", s, kept[s].size(),
                static_cast<long long>(m.nVisual));
        }
        std::printf("tokens  ");
        for (int32_t t : tokens)
        {
            std::printf(" %d", t);
        }
        std::printf("\ntiming   time to first token %.2f ms, decode %.3f ms/token over %zu steps\n", ttft,
            tokens.size() > 1 ? decoding / static_cast<double>(tokens.size() - 1) : 0.0, tokens.size() - 1);
    }
    catch (std::exception const& error)
    {
        std::fprintf(stderr, "iwp_generate: %s\n", error.what());
        return 2;
    }
    return 0;
}
