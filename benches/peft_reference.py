"""Make LoRA adapters with `peft` on a ChatGLM2 checkpoint and record what the official PyTorch
model computes with them: the reference `tests/test_lora_peft.py` holds glm2rs to.

Needs torch, transformers, peft and the official model code (`modeling_chatglm.py` and
`configuration_chatglm.py` of THUDM/chatglm2-6b, given with --official-code). Nothing here is
glm2rs: the adapters are trained a few steps with peft's own modules on the official model (as
`ptuning`'s LoRA recipes do), saved with `save_pretrained`, and the logits come from the official
`ChatGLMForConditionalGeneration.forward` with the adapter applied by peft, unmerged and after
`merge_and_unload()` (both are written; they agree to float32 rounding).

    python benches/peft_reference.py --model FIXTURES/model --official-code DIR --out tests/data/peft
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

# Two adapters unlike each other in every setting glm2rs reads: targets, rank, alpha, rsLoRA,
# per-module rank/alpha, trained biases, and both of peft's file formats.
ADAPTERS = {
    "adapter-a": dict(
        config=dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        safetensors=True, seed=1, target=[30910, 32049, 31123, 54546, 31155] * 4),
    "adapter-b": dict(
        config=dict(r=8, lora_alpha=16, target_modules=["query_key_value", "dense_4h_to_h"], use_rslora=True,
                    rank_pattern={"dense_4h_to_h": 2}, alpha_pattern={"dense_4h_to_h": 4}, bias="lora_only"),
        safetensors=False, seed=2, target=[54591, 31404, 35315, 31211, 30932, 31201] * 3),
}
STEPS = 30
NEW_TOKENS = 16


def load_official(model_dir: str, code_dir: str) -> torch.nn.Module:
    """The official `ChatGLMForConditionalGeneration` in float32 with the checkpoint's weights.

    Built directly from the official module (its `__init__` and `load_state_dict`) rather than
    through `AutoModel.from_pretrained`: transformers 5's loader no longer runs this remote code
    (it expects `all_tied_weights_keys` and re-initialises the missing `inv_freq` buffer)."""
    pkg = tempfile.mkdtemp()
    os.makedirs(os.path.join(pkg, "chatglm_official"))
    open(os.path.join(pkg, "chatglm_official", "__init__.py"), "w").close()
    for name in ("modeling_chatglm.py", "configuration_chatglm.py"):
        shutil.copy(os.path.join(code_dir, name), os.path.join(pkg, "chatglm_official"))
    sys.path.insert(0, pkg)
    official = importlib.import_module("chatglm_official.modeling_chatglm")
    sys.path.pop(0)
    config = official.ChatGLMConfig(**json.load(open(os.path.join(model_dir, "config.json"))))
    config.torch_dtype = torch.float32
    # transformers 5 dropped the generation defaults from configs; the official __init__ reads
    # `config.max_length` (generation only; 20 was the default it saw), its forward `use_cache`
    # and `output_hidden_states` (passed explicitly below).
    for attr, default in (("max_length", 20), ("use_cache", False), ("output_hidden_states", False),
                          ("output_attentions", False), ("use_return_dict", True)):
        if not hasattr(config, attr):
            setattr(config, attr, default)
    model = official.ChatGLMForConditionalGeneration(config, empty_init=False)
    state = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".bin"):
            state.update(torch.load(os.path.join(model_dir, f), map_location="cpu"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert set(missing) <= {"transformer.rotary_pos_emb.inv_freq"} and not unexpected, (missing, unexpected)
    return model.float().eval()


def last_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=False, return_dict=True)
    return out.logits[0, -1].float().numpy()


def greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(last_logits(model, ids)))
        out.append(nxt)
        ids.append(nxt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--official-code", required=True)
    ap.add_argument("--prompts", required=True, help="golden/prompts.json of the fixture")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    prompts = [p["input_ids"] for p in json.load(open(a.prompts))][:2]
    os.makedirs(a.out, exist_ok=True)
    base = load_official(a.model, a.official_code)
    meta = {"prompts": prompts, "base_greedy": greedy(base, prompts[0], NEW_TOKENS), "adapters": {}}
    arrays = {}
    for name, spec in ADAPTERS.items():
        torch.manual_seed(spec["seed"])
        model = get_peft_model(load_official(a.model, a.official_code),
                               LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec["config"]))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        seq = torch.tensor([prompts[0] + spec["target"]])
        model.train()
        for step in range(STEPS):
            loss = model(input_ids=seq, labels=seq, use_cache=False, output_hidden_states=False, return_dict=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        print(f"{name}: loss after {STEPS} steps {loss.item():.3f}", flush=True)
        model.save_pretrained(os.path.join(a.out, name), safe_serialization=spec["safetensors"])
        unmerged = [last_logits(model, p) for p in prompts]
        merged_model = model.merge_and_unload()
        merged = [last_logits(merged_model, p) for p in prompts]
        diff = max(float(np.abs(u - m).max()) for u, m in zip(unmerged, merged))
        meta["adapters"][name] = {"greedy": greedy(merged_model, prompts[0], NEW_TOKENS),
                                  "unmerged_vs_merged_max_abs": diff}
        for i, (u, m) in enumerate(zip(unmerged, merged)):
            arrays[f"{name}/unmerged_{i}"] = u
            arrays[f"{name}/merged_{i}"] = m
        print(f"{name}: unmerged vs merged max |diff| {diff:.2e}; greedy {meta['adapters'][name]['greedy']}", flush=True)
    import peft
    import transformers
    meta["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    np.savez_compressed(os.path.join(a.out, "reference.npz"), **arrays)
    json.dump(meta, open(os.path.join(a.out, "reference.json"), "w"), indent=1)
    print("base greedy", meta["base_greedy"])


if __name__ == "__main__":
    main()
