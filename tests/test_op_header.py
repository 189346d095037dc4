"""params.h, the generated C/C++ copy of the op contract: current, and saying what contract.py says."""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from iwp.plugins.visual_token_select import METHODS, codegen, contract, cuda

FOLDER = Path(__file__).resolve().parents[1] / "plugins" / "visual_token_select"
HEADER = (FOLDER / "params.h").read_text()


def test_committed_header_is_current():
    assert HEADER == codegen.render(), \
        "params.h is stale: run `python -m iwp.plugins.visual_token_select.codegen` and commit it"


def test_check_flags_a_stale_copy(tmp_path):
    stale = tmp_path / "params.h"
    stale.write_text(HEADER.replace("kIwpVtsBtp = 6", "kIwpVtsBtp = 7"))
    assert codegen.main(["--check", "--output", str(stale)]) == 1
    assert codegen.main(["--check", "--output", str(FOLDER / "params.h")]) == 0


def _enum(name: str) -> dict[str, int]:
    body = HEADER[HEADER.index(f"enum {name} : int32_t"):]
    body = body[:body.index("};")]
    return {entry: int(value) for entry, value in re.findall(r"(kIwpVts\w+) = (\d+),", body)}


def test_method_ids_are_the_contracts():
    assert set(contract.METHOD_IDS) == set(METHODS)
    assert sorted(contract.METHOD_IDS.values()) == list(range(len(METHODS)))
    ids = _enum("IwpVtsMethod")
    assert ids.pop("kIwpVtsNumMethods") == len(METHODS)
    assert {codegen.camel(name): i for name, i in contract.METHOD_IDS.items()} == \
        {entry.removeprefix("kIwpVts"): i for entry, i in ids.items()}
    # the names kernel.cu and plugin.cpp use stay as they were
    assert ids["kIwpVtsFastV"] == 1 and ids["kIwpVtsTransPrune"] == 5 and ids["kIwpVtsBtp"] == 6


def test_inputs_and_dtypes_are_the_contracts():
    inputs = _enum("IwpVtsInput")
    assert inputs.pop("kIwpVtsNumInputs") == len(contract.INPUTS) == 13
    assert list(inputs) == [f"kIwpVts{codegen.camel(n)}" for n in contract.INPUTS]
    assert inputs["kIwpVtsQRot"] == 3 and inputs["kIwpVtsVisualXy"] == 11
    assert list(_enum("IwpVtsDtype").values()) == list(range(len(contract.DTYPES)))
    rows = re.findall(r'\{"(\w+)", ((?:\(1U << kIwpVts\w+\)(?: \| )?)+), (true|false)\}', HEADER)
    assert [name for name, _, _ in rows] == list(contract.INPUTS)
    for name, mask, activation in rows:
        allowed = tuple(re.findall(r"kIwpVts(\w+)\)", mask))
        assert allowed == tuple(codegen.camel(d) for d in contract.INPUT_DTYPES[name]), name
        assert (activation == "true") == (name in contract.ACTIVATIONS)


def attribute_table() -> dict[str, tuple[str, str]]:
    """params.h's kAttributes: name -> (kind, default as written)."""
    kinds = {"kInt": "integer", "kFloat": "real", "kText": "text"}
    rows = re.findall(r'\{"(\w+)", AttributeType::(\w+), (-?\d+), (-?[\d.e+-]+), ("[^"]*")', HEADER)
    return {name: (kinds[kind], {"integer": i, "real": r, "text": t.strip('"')}[kinds[kind]])
            for name, kind, i, r, t in rows}


def test_attribute_table_is_the_contracts_with_the_configs_defaults():
    table = attribute_table()
    kinds = {str: "text", int: "integer", bool: "integer", float: "real"}
    assert list(table) == list(contract.scalar_attributes())
    assert {n: k for n, (k, _) in table.items()} == {n: kinds[t] for n, t in contract.scalar_attributes().items()}
    checked = 0
    for cls in METHODS.values():
        for field in cls.Config.__dataclass_fields__.values():
            if field.name in table and field.name != "layer":   # `layer` differs by method; no kernel reads it
                written = table[field.name][1]
                kind = type(field.default)
                assert kind(written if kind is str else float(written)) == field.default, field.name
                checked += 1
    assert checked >= 10
    assert table["method"] == ("text", "iwp") and table["n_stages"] == ("integer", "1")


def test_params_fields_read_real_attributes():
    sources = [source for _, _, source in contract.PARAMS if source]
    assert set(sources) <= set(contract.scalar_attributes())
    assert len(sources) == len(set(sources))
    for name, _, _ in contract.PARAMS:
        assert re.search(rf"\b(int32_t|int64_t|double) {name};", HEADER), name


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is missing")
def test_ctypes_mirror_matches_the_compiled_struct(tmp_path):
    """cuda.Params (built from contract.PARAMS) has the size and field offsets the C++ compiler gives."""
    fields = [name for name, _, _ in contract.PARAMS]
    program = tmp_path / "layout.cpp"
    program.write_text('#include "params.h"\n#include <cstdio>\nint main() {\n'
                       '    std::printf("%zu\\n", sizeof(IwpVtsParams));\n'
                       + "".join(f'    std::printf("%zu\\n", offsetof(IwpVtsParams, {f}));\n' for f in fields)
                       + "}\n")
    binary = tmp_path / "layout"
    subprocess.run(["g++", "-std=c++17", f"-I{FOLDER}", str(program), "-o", str(binary)], check=True)
    size, *offsets = [int(x) for x in subprocess.run([str(binary)], capture_output=True, text=True,
                                                     check=True).stdout.split()]
    assert size == ctypes.sizeof(cuda.Params)
    assert offsets == [getattr(cuda.Params, f).offset for f in fields]


def test_method_names_are_spelled_only_in_the_generated_header():
    """C and C++ look methods up through params.h; a method-name literal elsewhere is a hand copy."""
    from iwp.plugins.visual_token_select.contract import METHOD_IDS

    literals = {f'"{name}"' for name in METHOD_IDS}
    found = {}
    for path in sorted(FOLDER.glob("*")):
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh") or path.name == "params.h":
            continue
        hits = [n for n, line in enumerate(path.read_text().splitlines(), 1)
                if any(lit in line.split("//")[0] for lit in literals)]
        if hits:
            found[path.name] = hits
    assert not found, found
