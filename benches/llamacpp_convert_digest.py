"""Run llama.cpp's own converter on a ChatGLM checkpoint and record the digest of what it wrote
(tests/data/llamacpp_converter.json), after checking that tests/llamacpp_convert.py writes the
same (the test rebuilds that file in CI, where the converter's torch and the official tokenizer
code are not available).

Needs: torch, transformers, sentencepiece, gguf; the converter (`convert_hf_to_gguf.py` with its
`conversion/` and `gguf-py/`, e.g. from llama-cpp-python's sdist `vendor/llama.cpp`); the official
ChatGLM3 `tokenization_chatglm.py` (THUDM/chatglm3-6b) and `configuration_chatglm.py`.

    python benches/llamacpp_convert_digest.py --converter DIR --official-code DIR \\
        --model FIXTURES/model --python /path/to/python-with-torch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llamacpp_convert import convert, digest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--converter", required=True, help="llama.cpp directory with convert_hf_to_gguf.py")
    ap.add_argument("--official-code", required=True, help="tokenization_chatglm.py (ChatGLM3) + configuration_chatglm.py")
    ap.add_argument("--model", required=True, help="the fixture's model/ (safetensors beside it: model-safetensors/)")
    ap.add_argument("--label", default="convert_hf_to_gguf.py of llama-cpp-python 0.3.36's sdist (vendor/llama.cpp)",
                    help="which converter this is, for the record")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch and transformers")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/data/llamacpp_converter.json"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    d = tmp / "model"
    shutil.copytree(a.model, d)
    for f in ("tokenization_chatglm.py", "configuration_chatglm.py"):
        shutil.copy(Path(a.official_code) / f, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["_name_or_path"] = "THUDM/chatglm3-6b"  # the converter's ChatGLM3 (SentencePiece) vocabulary path
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    real = tmp / "real.gguf"
    env = {**os.environ, "PYTHONPATH": str(Path(a.converter) / "gguf-py")}
    subprocess.run([a.python, "convert_hf_to_gguf.py", str(d), "--outtype", "f32", "--outfile", str(real)],
                   cwd=a.converter, env=env, check=True)
    mine = tmp / "mine.gguf"
    convert(Path(a.model).parent / "model-safetensors", mine)
    dr, dm = digest(real), digest(mine)
    if dr != dm:
        sys.exit(f"tests/llamacpp_convert.py differs from the converter:\nreal {dr}\nmine {dm}")
    version = subprocess.run([a.python, "-c", "import transformers, torch; print(transformers.__version__, torch.__version__)"],
                             capture_output=True, text=True).stdout.split()
    Path(a.out).write_text(json.dumps({
        "what": "digest of llama.cpp's convert_hf_to_gguf.py --outtype f32 output for the tiny-glm2 fixture "
                "named THUDM/chatglm3-6b (general.* keys left out)",
        "converter": a.label, "transformers": version[0], "torch": version[1],
        "digest": dr}, indent=1) + "\n")
    print(f"the converter's file and tests/llamacpp_convert.py's agree; digest written to {a.out}")


if __name__ == "__main__":
    main()
