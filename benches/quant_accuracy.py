"""Accuracy of each quantization scheme against float32 on the tiny-glm2 fixture: top-1
agreement of the next-token prediction at every position and the largest logit error.

    python benches/quant_accuracy.py [FIXTURES_DIR]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import glm2rs


def main() -> None:
    fx = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GLM2RS_FIXTURES", "../shared/fixtures/tiny-glm2"))
    ref = glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32")
    tok = ref.tokenizer
    prompts = [p["input_ids"] for p in json.loads((fx / "golden" / "prompts.json").read_text())]
    prompts += [tok.encode(c["text"]) for c in json.loads((fx / "golden" / "tokenizer.json").read_text())[:40]
                if len(tok.encode(c["text"])) > 3]
    refs = [ref.logits(p) for p in prompts]
    print(f"{sum(len(p) for p in prompts)} positions in {len(prompts)} prompts")
    print("| scheme | top-1 agreement with float32 | max abs logit error |")
    print("| --- | --- | --- |")
    rows = [("float16", None, "float16"), ("bfloat16", None, "bfloat16")]
    rows += [(q, q, "float32") for q in ["8", "4", "q8_0", "q5_0", "q4_1", "q4_0"]]
    for name, q, dtype in rows:
        m = glm2rs.Model.from_pretrained(str(fx / "model"), dtype=dtype, quantize=q)
        agree, total, err = 0, 0, 0.0
        for p, r in zip(prompts, refs):
            lg = m.logits(p)
            agree += int((lg.argmax(-1) == r.argmax(-1)).sum())
            total += len(p)
            err = max(err, float(np.abs(lg - r).max()))
        label = {"8": "int8 (official)", "4": "int4 (official)"}.get(name, name)
        print(f"| {label} | {agree / total:.3f} | {err:.4f} |")


if __name__ == "__main__":
    main()
