"""The PyTorch + transformers + PEFT side of ``ftlab bench`` (see ``ftlab/bench.py``).

Standalone: it imports nothing of ftlab (nor jax), so it runs under any Python that has torch,
transformers and peft, as ``python -I ftlab/bench_torch.py SPEC_JSON`` (``-I``: this folder
is not put on ``sys.path``). SPEC_JSON is what ``ftlab.bench`` passes: the case (Hugging Face
config, batch, sequence, method), steps, warm-up, accelerator or not, and ``mode`` (``eager`` or
``compile``). It prints one line ``BENCH_RESULT {json}``.

The step: random weights, random tokens, ``model(input_ids, labels=input_ids)`` (transformers
shifts the labels), loss.backward(), global-norm clipping at 1.0, AdamW (lr 1e-4, weight decay
0.01; fused on GPU); bf16 autocast on GPU, float32 on CPU; dropout as the config says (train
mode). LoRA through PEFT (``LoraConfig``: r, alpha, dropout, target_modules); top-k blocks by
``requires_grad``; the LLaMA case loads its frozen base in bf16 on GPU (LoRA factors float32).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def build(case: dict, accelerator: bool, mode: str):
    import torch
    import transformers

    device = "cuda" if accelerator and torch.cuda.is_available() else "cpu"
    cfg = dict(case["config"])
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    if model_type == "gpt2":
        config = transformers.GPT2Config(**cfg)
        config.n_ctx = cfg.get("n_positions", 1024)
        model_cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(**cfg)
        model_cls = transformers.LlamaForCausalLM
    config.loss_type = "ForCausalLM"  # a name transformers knows: no warning, no graph break
    base_dtype = torch.float32
    if device == "cuda" and case.get("frozen_dtype") == "bfloat16":
        base_dtype = torch.bfloat16
    with torch.device(device):  # built in its dtype: no float32 copy of a 7B base on the way
        model = model_cls._from_config(config, dtype=base_dtype)
    model.train()
    if case["method"] == "lora":
        import peft

        lora = peft.LoraConfig(
            r=case["lora_rank"],
            lora_alpha=case["lora_alpha"],
            lora_dropout=case["lora_dropout"],
            target_modules=list(case["torch_lora_targets"]),
            fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)  # adapters float32 (autocast_adapter_dtype)
    elif case["method"] == "partial":
        for p in model.parameters():
            p.requires_grad_(False)
        blocks = model.transformer.h if model_type == "gpt2" else model.model.layers
        for block in blocks[-case["last_k"] :]:
            for p in block.parameters():
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused)
    fwd = torch.compile(model) if mode == "compile" else model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (case["batch"], case["seq"]), generator=g).to(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, device


def main(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    case, mode = spec["case"], spec.get("mode", "eager")
    if not spec["accelerator"]:
        torch.set_num_threads(int(os.environ.get("FTLAB_BENCH_THREADS", os.cpu_count() or 1)))
    t0 = time.perf_counter()
    step, device = build(case, spec["accelerator"], mode)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    loss = None
    for _ in range(max(spec["warmup"], 3 if mode == "compile" else 1)):
        loss = step()
    sync()
    compile_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(spec["steps"]):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    median = statistics.median(times)
    tokens = case["batch"] * case["seq"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "impl": "torch",
        "mode": mode,
        "step_s": median,
        "step_s_all": times,
        "cpu_s": statistics.median(cpu),  # process CPU time per step, all threads
        "tokens_per_s": tokens / median,
        "loss": float(loss.detach().float().cpu()),
        "build_and_compile_s": compile_s,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,
        "threads": torch.get_num_threads(),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
