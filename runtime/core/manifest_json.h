// The manifest reader's JSON helpers (internal to manifest.cpp): a value and its path as iwp/engine_format.py
// spells it, its type conversions, and the error line's wording (_kind, _shown) so that both readers refuse a
// document with the same line.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace iwp
{
namespace manifest_json
{
// ordered: the io section is walked in the document's order, as Python's dict keeps it
using Json = nlohmann::ordered_json;

std::string const kRebuild = "; rebuild it with `make engine`";

// What is wrong with the document, without the engine's name and the rebuild hint (parseManifest adds both).
class ShapeError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

// engine_format._kind
inline char const* kindOf(Json const& value)
{
    switch (value.type())
    {
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "an integer";
    case Json::value_t::number_float: return "a number";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "an array";
    case Json::value_t::object: return "an object";
    default: return "null";
    }
}

// Python's json.dumps: ASCII (non-ASCII and DEL escaped), ", " and ": " between items.
inline std::string pythonDump(Json const& value)
{
    if (value.is_array() || value.is_object())
    {
        std::string out = value.is_array() ? "[" : "{";
        bool first = true;
        for (auto const& item : value.items())
        {
            out += first ? "" : ", ";
            first = false;
            if (value.is_object())
            {
                out += pythonDump(Json(item.key())) + ": ";
            }
            out += pythonDump(item.value());
        }
        return out + (value.is_array() ? "]" : "}");
    }
    return value.dump(-1, ' ', true, Json::error_handler_t::replace);
}

// engine_format._shown: a value on the error's one line, shortened, whatever the file holds.
inline std::string shown(Json const& value)
{
    std::string const text = pythonDump(value);
    return text.size() <= 40 ? text : text.substr(0, 37) + "...";
}

inline std::string shown(std::string const& text)
{
    return shown(Json(text));
}

// Python's str.isidentifier for ASCII keys (other keys are spelled as ["..."], which stays ASCII).
inline bool isIdentifier(std::string const& key)
{
    if (key.empty() || std::isdigit(static_cast<unsigned char>(key[0])))
    {
        return false;
    }
    return std::all_of(key.begin(), key.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
    });
}

inline std::string list(std::vector<std::string> const& words)
{
    std::string out;
    for (std::string const& w : words)
    {
        out += (out.empty() ? "" : ", ") + w;
    }
    return out;
}

[[noreturn]] inline void bad(std::string const& what)
{
    throw ShapeError("manifest.json field " + what);
}

// A value in the document and its path as the Python reader spells it (io["segment.0"].inputs[3].layer).
class Field
{
public:
    Field(Json const& value, std::string path)
        : mValue(&value)
        , mPath(std::move(path))
    {
    }

    std::string const& path() const { return mPath; }
    Json const& json() const { return *mValue; }

    [[noreturn]] void fail(std::string const& what) const
    {
        throw ShapeError((mPath.empty() ? "manifest.json " : "manifest.json field " + mPath + " ") + what);
    }

    [[noreturn]] void wrongType(char const* wanted) const
    {
        fail(std::string("is ") + kindOf(*mValue) + ", not " + wanted);
    }

    // A dataclass field: required, or (optional) absent and null read as unset.
    Field operator[](std::string const& key) const
    {
        Json const* value = find(key);
        if (value == nullptr)
        {
            throw ShapeError("manifest.json field " + sub(key) + " is missing");
        }
        return Field(*value, sub(key));
    }

    bool isSet(std::string const& key) const
    {
        Json const* value = find(key);
        return value != nullptr && !value->is_null();
    }

    std::vector<Field> elements() const
    {
        if (!mValue->is_array())
        {
            wrongType("an array");
        }
        std::vector<Field> out;
        for (size_t i = 0; i < mValue->size(); ++i)
        {
            out.emplace_back((*mValue)[i], mPath + "[" + std::to_string(i) + "]");
        }
        return out;
    }

    // A fixed-length tuple.
    std::vector<Field> elements(size_t count) const
    {
        std::vector<Field> out = elements();
        if (out.size() != count)
        {
            fail("has " + std::to_string(out.size()) + " elements, not " + std::to_string(count));
        }
        return out;
    }

    // A dict's entries, in the document's order.
    std::vector<std::pair<std::string, Field>> entries() const
    {
        if (!mValue->is_object())
        {
            wrongType("an object");
        }
        std::vector<std::pair<std::string, Field>> out;
        for (auto const& item : mValue->items())
        {
            std::string const& key = item.key();
            out.emplace_back(key, Field(item.value(), mPath + (isIdentifier(key) ? "." + key : "[" + shown(key) + "]")));
        }
        return out;
    }

    // A JSON integer (not 2.0, not true), as the Python reader takes them; ranges are checked later, as there.
    int64_t integer() const
    {
        if (!mValue->is_number_integer())
        {
            wrongType("an integer");
        }
        if (mValue->is_number_unsigned()
            && mValue->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        {
            fail("is " + shown(*mValue) + ", past this runtime's 64-bit integers");
        }
        return mValue->get<int64_t>();
    }

    // int | None: -1 when absent or null (every such field is a layer, a stage or an index, so >= 0 when set).
    int64_t optionalInteger(std::string const& key) const
    {
        return isSet(key) ? (*this)[key].integer() : -1;
    }

    std::string const& string() const
    {
        if (!mValue->is_string())
        {
            wrongType("a string");
        }
        return mValue->get_ref<std::string const&>();
    }

    bool boolean() const
    {
        if (!mValue->is_boolean())
        {
            wrongType("a boolean");
        }
        return mValue->get<bool>();
    }

private:
    Json const* find(std::string const& key) const
    {
        if (!mValue->is_object())
        {
            wrongType("an object");
        }
        auto const it = mValue->find(key);
        return it == mValue->end() ? nullptr : &*it;
    }

    std::string sub(std::string const& key) const { return mPath.empty() ? key : mPath + "." + key; }

    Json const* mValue;
    std::string mPath;
};

} // namespace manifest_json
} // namespace iwp
