#include "manifest.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace iwp
{

class JsonParser
{
public:
    explicit JsonParser(std::string const& text)
        : mText(text)
    {
    }

    Json document()
    {
        Json value = parseValue(0);
        skipSpace();
        if (mPos != mText.size())
        {
            fail("trailing characters after the JSON value");
        }
        return value;
    }

private:
    static constexpr int kMaxDepth = 256; // deeper nesting is refused instead of overflowing the stack

    // After an object member or array element: consumes the ',' (false) or the closing bracket (true).
    bool closesAfterElement(char close)
    {
        skipSpace();
        if (mPos < mText.size() && (mText[mPos] == ',' || mText[mPos] == close))
        {
            return mText[mPos++] == close;
        }
        fail(std::string("expected ',' or '") + close + "'");
    }

    [[noreturn]] void fail(std::string const& what) const
    {
        throw std::runtime_error("JSON: " + what + " at byte " + std::to_string(mPos));
    }

    void skipSpace()
    {
        while (mPos < mText.size()
            && (mText[mPos] == ' ' || mText[mPos] == '\n' || mText[mPos] == '\r' || mText[mPos] == '\t'))
        {
            ++mPos;
        }
    }

    void expectWord(char const* word, size_t length)
    {
        if (mText.compare(mPos, length, word) != 0)
        {
            fail("unexpected token");
        }
        mPos += length;
    }

    Json parseValue(int depth)
    {
        if (depth > kMaxDepth)
        {
            fail("nesting deeper than 256 levels");
        }
        skipSpace();
        if (mPos >= mText.size())
        {
            fail("unexpected end of input");
        }
        Json value;
        char const c = mText[mPos];
        if (c == '{')
        {
            value.mType = Json::Type::kObject;
            ++mPos;
            skipSpace();
            if (mPos < mText.size() && mText[mPos] == '}')
            {
                ++mPos;
                return value;
            }
            while (true)
            {
                skipSpace();
                if (mPos >= mText.size() || mText[mPos] != '"')
                {
                    fail("expected a string key");
                }
                std::string key = parseString();
                skipSpace();
                if (mPos >= mText.size() || mText[mPos] != ':')
                {
                    fail("expected ':'");
                }
                ++mPos;
                value.mObject[key] = parseValue(depth + 1);
                if (closesAfterElement('}'))
                {
                    return value;
                }
            }
        }
        if (c == '[')
        {
            value.mType = Json::Type::kArray;
            ++mPos;
            skipSpace();
            if (mPos < mText.size() && mText[mPos] == ']')
            {
                ++mPos;
                return value;
            }
            while (true)
            {
                value.mArray.push_back(parseValue(depth + 1));
                if (closesAfterElement(']'))
                {
                    return value;
                }
            }
        }
        if (c == '"')
        {
            value.mType = Json::Type::kString;
            value.mString = parseString();
            return value;
        }
        if (c == 't' || c == 'f')
        {
            value.mType = Json::Type::kBool;
            value.mBool = c == 't';
            c == 't' ? expectWord("true", 4) : expectWord("false", 5);
            return value;
        }
        if (c == 'n')
        {
            expectWord("null", 4);
            return value;
        }
        value.mType = Json::Type::kNumber;
        value.mNumber = parseNumber();
        return value;
    }

    double parseNumber()
    {
        size_t const start = mPos;
        if (mPos < mText.size() && mText[mPos] == '-')
        {
            ++mPos;
        }
        auto digits = [&] {
            size_t const first = mPos;
            while (mPos < mText.size() && mText[mPos] >= '0' && mText[mPos] <= '9')
            {
                ++mPos;
            }
            return mPos > first;
        };
        if (!digits())
        {
            fail("expected a value");
        }
        if (mPos < mText.size() && mText[mPos] == '.')
        {
            ++mPos;
            if (!digits())
            {
                fail("expected digits after '.'");
            }
        }
        if (mPos < mText.size() && (mText[mPos] == 'e' || mText[mPos] == 'E'))
        {
            ++mPos;
            if (mPos < mText.size() && (mText[mPos] == '+' || mText[mPos] == '-'))
            {
                ++mPos;
            }
            if (!digits())
            {
                fail("expected an exponent");
            }
        }
        // strtod on the validated span (the C locale's decimal point is what JSON uses)
        return std::strtod(mText.substr(start, mPos - start).c_str(), nullptr);
    }

    static void appendUtf8(std::string& out, uint32_t cp)
    {
        if (cp < 0x80)
        {
            out += static_cast<char>(cp);
        }
        else if (cp < 0x800)
        {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else if (cp < 0x10000)
        {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        else
        {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4()
    {
        if (mPos + 4 > mText.size())
        {
            fail("truncated \\u escape");
        }
        uint32_t value = 0;
        for (int i = 0; i < 4; ++i)
        {
            char const h = mText[mPos++];
            value <<= 4;
            if (h >= '0' && h <= '9')
                value |= static_cast<uint32_t>(h - '0');
            else if (h >= 'a' && h <= 'f')
                value |= static_cast<uint32_t>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F')
                value |= static_cast<uint32_t>(h - 'A' + 10);
            else
                fail("bad hex digit in \\u escape");
        }
        return value;
    }

    std::string parseString()
    {
        ++mPos; // the opening quote
        std::string out;
        while (true)
        {
            if (mPos >= mText.size())
            {
                fail("unterminated string");
            }
            char const c = mText[mPos++];
            if (c == '"')
            {
                return out;
            }
            if (static_cast<unsigned char>(c) < 0x20)
            {
                fail("control character in a string");
            }
            if (c != '\\')
            {
                out += c;
                continue;
            }
            if (mPos >= mText.size())
            {
                fail("unterminated escape");
            }
            char const e = mText[mPos++];
            switch (e)
            {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u':
            {
                uint32_t cp = hex4();
                if (cp >= 0xD800 && cp < 0xDC00) // a surrogate pair
                {
                    if (mText.compare(mPos, 2, "\\u") != 0)
                    {
                        fail("unpaired surrogate");
                    }
                    mPos += 2;
                    uint32_t const low = hex4();
                    if (low < 0xDC00 || low >= 0xE000)
                    {
                        fail("bad low surrogate");
                    }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                }
                appendUtf8(out, cp);
                break;
            }
            default: fail("bad escape");
            }
        }
    }

    std::string const& mText;
    size_t mPos = 0;
};

Json Json::parse(std::string const& text)
{
    return JsonParser(text).document();
}

namespace
{
char const* typeName(Json::Type type)
{
    switch (type)
    {
    case Json::Type::kNull: return "null";
    case Json::Type::kBool: return "a boolean";
    case Json::Type::kNumber: return "a number";
    case Json::Type::kString: return "a string";
    case Json::Type::kArray: return "an array";
    case Json::Type::kObject: return "an object";
    }
    return "?";
}

void expect(Json::Type actual, Json::Type wanted)
{
    if (actual != wanted)
    {
        throw std::runtime_error(std::string("JSON: expected ") + typeName(wanted) + ", found " + typeName(actual));
    }
}
} // namespace

bool Json::asBool() const
{
    expect(mType, Type::kBool);
    return mBool;
}

double Json::asNumber() const
{
    expect(mType, Type::kNumber);
    return mNumber;
}

int64_t Json::asInt() const
{
    expect(mType, Type::kNumber);
    if (mNumber != std::floor(mNumber) || std::fabs(mNumber) > 9.007199254740992e15)
    {
        throw std::runtime_error("JSON: expected a whole number, found " + std::to_string(mNumber));
    }
    return static_cast<int64_t>(mNumber);
}

std::string const& Json::asString() const
{
    expect(mType, Type::kString);
    return mString;
}

std::vector<Json> const& Json::asArray() const
{
    expect(mType, Type::kArray);
    return mArray;
}

bool Json::has(std::string const& key) const
{
    return mType == Type::kObject && mObject.count(key) > 0;
}

Json const& Json::operator[](std::string const& key) const
{
    expect(mType, Type::kObject);
    auto const it = mObject.find(key);
    if (it == mObject.end())
    {
        throw std::runtime_error("JSON: missing key \"" + key + "\"");
    }
    return it->second;
}

KvLayout EngineManifest::kvLayout() const
{
    KvLayout layout;
    layout.capacities = cacheLen;
    layout.kvHeads = nKvHeads;
    layout.headDim = headDim;
    layout.elementBytes = dtype == "fp16" ? 2 : 4;
    return layout;
}

namespace
{
std::vector<int64_t> intList(Json const& value)
{
    std::vector<int64_t> out;
    for (Json const& item : value.asArray())
    {
        out.push_back(item.asInt());
    }
    return out;
}
} // namespace

EngineManifest readManifest(std::string const& directory)
{
    std::string const path = directory + "/manifest.json";
    std::string const rebuild = "; rebuild it with `make engine`";
    std::ifstream file(path, std::ios::binary);
    if (!file)
    {
        throw std::runtime_error("engine " + directory + ": has no readable manifest.json" + rebuild);
    }
    std::stringstream text;
    text << file.rdbuf();
    EngineManifest m;
    m.directory = directory;
    try
    {
        Json const doc = Json::parse(text.str());
        int64_t const format = doc["format"].asInt();
        if (format != kManifestFormat)
        {
            throw std::runtime_error("manifest format " + std::to_string(format) + " is not this runtime's format "
                + std::to_string(kManifestFormat));
        }
        Json const& model = doc["model"];
        Json const& shapes = doc["shapes"];
        Json const& tokens = doc["tokens"];
        m.model = model["name"].asString();
        m.method = doc["method"]["name"].asString();
        m.dtype = doc["dtype"].asString();
        m.nLayers = model["n_layers"].asInt();
        m.nKvHeads = model["n_kv_heads"].asInt();
        m.headDim = model["head_dim"].asInt();
        m.hiddenSize = model["hidden_size"].asInt();
        m.vocabSize = model["vocab_size"].asInt();
        m.nVisual = model["n_visual"].asInt();
        m.maxPrompt = shapes["max_prompt"].asInt();
        m.maxNewTokens = shapes["max_new_tokens"].asInt();
        m.prefillLen = intList(shapes["prefill_len"]);
        m.cacheLen = intList(shapes["cache_len"]);
        m.stages = static_cast<int64_t>(doc["method"]["stages"].asArray().size());
        m.imageToken = static_cast<int32_t>(tokens["image"].asInt());
        m.eosToken = static_cast<int32_t>(tokens["eos"].asInt());
        m.padToken = static_cast<int32_t>(tokens["pad"].asInt());
    }
    catch (std::runtime_error const& error)
    {
        throw std::runtime_error("engine " + directory + ": manifest.json is unusable (" + error.what() + ")" + rebuild);
    }
    if (static_cast<int64_t>(m.cacheLen.size()) != m.nLayers || static_cast<int64_t>(m.prefillLen.size()) != m.nLayers
        || (m.dtype != "fp32" && m.dtype != "fp16"))
    {
        throw std::runtime_error("engine " + directory + ": manifest.json has per-layer shapes for "
            + std::to_string(m.cacheLen.size()) + " layers but " + std::to_string(m.nLayers)
            + " layers, or an unknown dtype" + rebuild);
    }
    return m;
}

} // namespace iwp
