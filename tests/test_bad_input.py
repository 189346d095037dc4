"""Bad input to the command line: exit code 2 and one line on stderr that says what to do, never a traceback,
and (for builds) before any work starts, so nothing is left behind."""
import json

import pytest
from PIL import Image

from iwp.tools.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.err


def _png(path, size=(32, 32)):
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return str(path)


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


CASES = {
    "option of the wrong kind (float for int)": (["engine", "--option", "layer=1.5"], "layer=1.5 must be an integer"),
    "option of the wrong kind (bool for int)": (["engine", "--option", "layer=true"], "layer=True must be an integer"),
    "option of the wrong kind (chunk)": (["engine", "--option", "chunk=1.5"], "chunk=1.5 must be an integer"),
    "option that is not a number": (["engine", "--option", "lam=abc"], "lam='abc' must be a finite number"),
    "a grid the processor cannot run": (["engine", "--grid", "1x4"], "give 1x1, 1x2, 1x3, 2x1, 2x2"),
    "a directory as the image": (["engine", "--image", "{tmp}"], "is a directory"),
    "a prompt that is not UTF-8": (["engine", "--prompt", "bad \udcff bytes"], "is not valid UTF-8"),
    "--out is a file": (["ovqa-export", "--examples", "1", "--out", "{file}/sub"], "pass a directory"),
    "a JSONL file that is not UTF-8": (["eval", "--data", "{latin1}", "--methods", "none"], "latin1.jsonl:2 is not UTF-8"),
    "a JSONL question of the wrong type": (["eval", "--data", "{wrongtype}", "--methods", "none"],
                                           'wrongtype.jsonl:1: "question" must be a non-empty string'),
    "an image past PIL's pixel limit": (["engine", "--image", "{bomb}"], "more pixels than PIL's safety limit"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_exit_code_2(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    paths = {"tmp": str(tmp_path), "file": str(tmp_path / "afile"), "bomb": _png(tmp_path / "bomb.png", (100, 100)),
             "latin1": _jsonl(tmp_path / "latin1.jsonl", [json.dumps({"image": "a.png", "question": "q?",
                                                                      "answers": ["a"]}).encode(), "caf\xe9".encode("latin-1")]),
             "wrongtype": _jsonl(tmp_path / "wrongtype.jsonl", [json.dumps({"image": "a.png", "question": 3,
                                                                            "answers": ["a"]}).encode()])}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 100x100 is past twice the limit: PIL refuses it
    argv, expected = CASES[case]
    code, err = run(capsys, *[a.format(**paths) for a in argv])
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert not (tmp_path / "engines").exists(), "a refused build must start no work"
