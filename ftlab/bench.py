"""``ftlab bench``: fine-tuning step throughput, MFU and memory of ftlab (and, side by side,
of PyTorch + transformers + PEFT) on the machine at hand.

Four cases (issue 10): GPT-2-medium at 8 x 1024 trained fully, with LoRA r=4 on the query and
value projections, and on its top two blocks; LLaMA-7B at 16 x 256 with LoRA r=8 on q_proj
and v_proj over a bf16 frozen base. On an accelerator they run at full size in bf16 compute;
on CPU they are shrunk (GPT-2: 6 layers, width 384, vocabulary 8192, batch 4 x 256; LLaMA:
4 layers, width 512, vocabulary 8192, batch 4 x 128) and run in float32, so every machine and
CI can run them. Weights are random; the batch is random tokens; every case is timed in its
own subprocess (clean peak-memory statistics, no memory held by the previous case), ftlab's
jitted step and, with ``--torch``, the same case through transformers + PEFT, eager and with
``torch.compile`` (``ftlab/bench_torch.py``, run by a Python that has torch: ``--torch-python``).

Per case: median step time over ``--steps`` steps after warm-up, tokens/s, model FLOPs per
step (``ftlab.train.flops``: the formula is written in the output) beside XLA's
``cost_analysis()`` count, MFU against the device's peak (the vendor bf16 figure on
accelerators; on CPU a measured float32 matmul), peak device memory (``memory_stats``; on CPU,
which has none, the compiled step's ``memory_analysis`` and the process's peak RSS).
Results: ``bench.json`` and ``bench.md`` in ``--out`` (default
``experiments/results/bench_<device>``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ftlab.plan import KNOWN_MODELS

HERE = Path(__file__).parent
TORCH_WORKER = HERE / "bench_torch.py"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case at full size; ``small`` overrides for CPU."""

    name: str
    family: str  # gpt2 | llama
    config: dict  # Hugging Face config fields
    batch: int
    seq: int
    method: str  # full | lora | partial
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()  # ftlab regexes
    torch_lora_targets: tuple[str, ...] = ()  # PEFT target_modules
    last_k: int = 0
    frozen_dtype: str = "float32"  # on accelerators; CPU keeps everything float32
    small: dict = dataclasses.field(default_factory=dict)  # CPU: config fields, batch, seq
    title: str = ""

    def sized(self, shrink: bool) -> Case:
        if not shrink:
            return self
        small = dict(self.small)
        batch, seq = small.pop("batch", self.batch), small.pop("seq", self.seq)
        return dataclasses.replace(
            self, config={**self.config, **small}, batch=batch, seq=seq, small={}
        )


GPT2_MEDIUM = {  # the planner's shapes of the hub model, with its training-time settings
    **KNOWN_MODELS["gpt2-medium"],
    "activation_function": "gelu_new",
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "resid_pdrop": 0.1,
    "tie_word_embeddings": True,
}
GPT2_SMALL = {"n_embd": 384, "n_layer": 6, "n_head": 6, "vocab_size": 8192, "n_positions": 256}
LLAMA_7B = {**KNOWN_MODELS["huggyllama/llama-7b"], "tie_word_embeddings": False}
LLAMA_SMALL = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 8192,
    "max_position_embeddings": 256,
}
GPT2_CPU = {**GPT2_SMALL, "batch": 4, "seq": 256}

CASES: dict[str, Case] = {
    "gpt2m-full": Case(
        "gpt2m-full",
        "gpt2",
        GPT2_MEDIUM,
        8,
        1024,
        "full",
        small=GPT2_CPU,
        title="GPT-2-medium, full",
    ),
    "gpt2m-lora": Case(
        "gpt2m-lora",
        "gpt2",
        GPT2_MEDIUM,
        8,
        1024,
        "lora",
        lora_rank=4,
        lora_alpha=32.0,
        lora_dropout=0.1,
        lora_targets=(r"attn/(q|v)_proj/kernel",),
        torch_lora_targets=("c_attn",),
        small=GPT2_CPU,
        title="GPT-2-medium, LoRA r=4 q,v",
    ),
    "gpt2m-top2": Case(
        "gpt2m-top2",
        "gpt2",
        GPT2_MEDIUM,
        8,
        1024,
        "partial",
        last_k=2,
        small=GPT2_CPU,
        title="GPT-2-medium, top-2 blocks",
    ),
    "llama7b-lora": Case(
        "llama7b-lora",
        "llama",
        LLAMA_7B,
        16,
        256,
        "lora",
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.05,
        lora_targets=(r"self_attn/(q|v)_proj/kernel",),
        torch_lora_targets=("q_proj", "v_proj"),
        frozen_dtype="bfloat16",
        small={**LLAMA_SMALL, "batch": 4, "seq": 128},
        title="LLaMA-7B, LoRA r=8 q,v, bf16 base",
    ),
    # for tests: seconds on CPU
    "tiny": Case(
        "tiny",
        "gpt2",
        {
            **GPT2_SMALL,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "vocab_size": 256,
            "n_positions": 32,
            "model_type": "gpt2",
        },
        2,
        32,
        "lora",
        lora_rank=2,
        lora_alpha=4.0,
        lora_targets=(r"attn/(q|v)_proj/kernel",),
        torch_lora_targets=("c_attn",),
        title="tiny GPT-2 (tests)",
    ),
}
DEFAULT_CASES = ("gpt2m-full", "gpt2m-lora", "gpt2m-top2", "llama7b-lora")
OPTIM = {"lr": 1e-4, "weight_decay": 0.01, "b1": 0.9, "b2": 0.999, "clip_norm": 1.0}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


# -- ftlab's step -----------------------------------------------------------------------------


def _cost(compiled) -> dict:
    out: dict[str, Any] = {}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
        out["xla_flops"] = float(cost.get("flops", 0.0)) or None
    except Exception as e:  # noqa: BLE001 (backends without cost analysis)
        out["xla_flops_error"] = str(e)
    try:
        m = compiled.memory_analysis()
        out["compiled_memory"] = {
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                - m.alias_size_in_bytes
                + m.temp_size_in_bytes
            ),
        }
    except Exception as e:  # noqa: BLE001
        out["compiled_memory_error"] = str(e)
    return out


def bench_config(case: Case, accelerator: bool):
    """The ``ftlab train`` config of ``case`` (model from its Hugging Face config, method,
    optimiser); options other engineers add to the config keep their defaults."""
    from ftlab.schema import base_config

    cfg = base_config()
    cfg.model.name = "hf"
    cfg.model.hf_config = dict(case.config)
    cfg.train.loss = "causal_lm"
    cfg.train.compute_dtype = "bfloat16" if accelerator else "float32"
    m = cfg.method
    m.name = case.method
    m.lora.rank = case.lora_rank or m.lora.rank
    m.lora.alpha = case.lora_alpha or m.lora.alpha
    m.lora.dropout = case.lora_dropout
    m.lora.targets = case.lora_targets
    m.partial.last_k = case.last_k
    if "frozen_dtype" in m:
        m.frozen_dtype = case.frozen_dtype if accelerator else "float32"
    for k, v in OPTIM.items():
        cfg.optim[k] = v
    cfg.optim.name = "adamw"
    cfg.optim.schedule = "constant"
    return cfg


def build_ftlab_step(case: Case, accelerator: bool, seed: int = 0):
    """``(jitted step, state, batch, StepFlops)`` for ``case`` as ``ftlab train`` builds it:
    the model from the config (``build_model``), the method (``build_method``), ftlab's
    optimiser, the sharded state and the donated, jitted train step."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftlab.interop.build import build_model
    from ftlab.methods import build_method
    from ftlab.parallel import mesh as mesh_lib
    from ftlab.parallel import shard
    from ftlab.train import flops as flops_lib
    from ftlab.train import losses, optim
    from ftlab.train import step as step_lib
    from ftlab.train.loop import compute_dtype, use_fast_cpu_rng

    use_fast_cpu_rng()
    cfg = bench_config(case, accelerator)
    frozen_dtype = jnp.dtype(case.frozen_dtype) if accelerator else jnp.float32
    model = build_model(cfg.model, 0, compute_dtype(cfg.train.compute_dtype), "causal_lm")
    model_cfg = model.config

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model_cfg.vocab_size, (case.batch, case.seq + 1), dtype=np.int32)
    batch = {
        "inputs": {"input_ids": ids[:, :-1]},
        "labels": ids[:, 1:],
        "weights": np.full((case.batch,), float(case.seq), np.float32),
    }
    sample = batch["inputs"]["input_ids"][:1]
    boxed = jax.eval_shape(model.init, jax.random.key(seed), sample)
    method = build_method(cfg.method, nn.meta.unbox(boxed["params"]))
    tx, lr = optim.optimizer(cfg.optim, 1000)
    mesh = mesh_lib.make_mesh(cfg.mesh.shape.to_dict())
    init = shard.init_state_fn(method, tx, seed)
    state_sh = shard.state_shardings(shard.abstract_state(init, boxed), boxed, mesh)
    batch_sh = shard.batch_sharding(mesh)

    # a LoRA case with a smaller frozen dtype initialises in it: no float32 copy of a 7B base
    # (only LoRA factors, created float32 by the method, are trained)
    init_model = model
    if case.method == "lora" and frozen_dtype != jnp.float32 and hasattr(model, "param_dtype"):
        init_model = model.clone(param_dtype=frozen_dtype)

    def make_state(key):
        params = nn.meta.unbox(init_model.init(key, sample))["params"]
        state = init(params, {})  # the method stores frozen leaves in its frozen_dtype
        frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), state.frozen)
        return state.replace(frozen=frozen)

    state = jax.jit(make_state, out_shardings=state_sh)(jax.random.key(seed))
    loss_fn = losses.per_example_loss("causal_lm")
    kwargs = {}
    if hasattr(step_lib, "training_loss"):  # chunked cross-entropy when configured
        loss_fn, model_kwargs = step_lib.training_loss(cfg.train, method, loss_fn)
        kwargs = {"model_kwargs": model_kwargs} if model_kwargs else {}
    train_step = step_lib.make_train_step(model, method, tx, lr, loss_fn, **kwargs)
    step = shard.jit_train_step(train_step, state_sh, batch_sh)
    batch = shard.shard_batch(batch, batch_sh)
    step_flops = flops_lib.method_step_flops(
        method,
        state.trainable,
        state.frozen,
        batch=case.batch,
        seq_len=case.seq,
        tied=bool(getattr(model_cfg, "tie_word_embeddings", False)),
    )
    return step, state, batch, step_flops


def run_ftlab(case: Case, steps: int, warmup: int, accelerator: bool) -> dict:
    """Time ftlab's step for ``case`` in this process."""
    import jax

    t0 = time.perf_counter()
    step, state, batch, step_flops = build_ftlab_step(case, accelerator)
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    info = _cost(compiled)
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    from ftlab.train.run_files import device_memory

    peak = device_memory("peak_bytes_in_use")
    loss = float(metrics["loss"])
    median = _median(times)
    tokens = case.batch * case.seq
    return {
        "impl": "ftlab",
        "mode": "jit",
        "step_s": median,
        "step_s_all": times,
        "cpu_s": _median(cpu),  # process CPU time per step, all threads
        "tokens_per_s": tokens / median,
        "loss": loss,
        "build_and_compile_s": compile_s,
        "model_flops": step_flops.total,
        "flops": step_flops.as_dict(),
        "peak_device_bytes": peak,
        "peak_rss_bytes": _rss_bytes(),
        **info,
    }


# -- orchestration ----------------------------------------------------------------------------


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    info = {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    for name in ("jax", "jaxlib", "flax", "optax"):
        with contextlib.suppress(ImportError, AttributeError):
            info[name] = __import__(name).__version__
    return info


def _peak(info: dict, accelerator: bool) -> dict:
    from ftlab.train import flops as flops_lib

    found = flops_lib.peak_flops(info["device_kind"])
    if found is not None:
        return {"peak_flops": found[0], "peak_source": found[1]}
    dtype = "bfloat16" if accelerator else "float32"
    out = {
        "peak_flops": flops_lib.measure_matmul_flops(2048, dtype),
        "peak_source": f"measured: one 2048^3 {dtype} matmul (jax), wall clock",
    }
    if not accelerator:  # per CPU-second: what a step's CPU time is compared with
        out["peak_flops_per_cpu_s"] = flops_lib.measure_matmul_flops(
            2048, dtype, clock=time.process_time
        )
    return out


def _worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch runs after us on the GPU
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_subprocess(cmd: list[str], timeout: float) -> dict:
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env(), check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    result["load_avg_1m_after"] = os.getloadavg()[0]  # other work on the machine skews timings
    return result


def torch_python(explicit: str | None) -> str | None:
    """A Python that imports torch, transformers and peft: ``explicit``, else this one."""
    candidates = [explicit] if explicit else [sys.executable, "/tmp/torchvenv/bin/python"]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-I", "-c", "import torch, transformers, peft"],
            capture_output=True,
            timeout=300,
            check=False,
        )
        if probe.returncode == 0:
            return python
    return None


def run(
    cases: list[str],
    steps: int = 10,
    warmup: int = 2,
    with_torch: bool = False,
    torch_python_path: str | None = None,
    out: str | Path | None = None,
    shrink: bool | None = None,
    torch_modes: tuple[str, ...] = ("eager", "compile"),
    timeout: float = 1800,
    log=print,
) -> dict:
    """Run ``cases`` (each ftlab and, with ``with_torch``, torch in its own subprocess) and
    write ``bench.json`` / ``bench.md`` to ``out``; returns the results."""
    import jax

    info = device_info()
    accelerator = info["platform"] in ("gpu", "tpu", "cuda", "rocm")
    shrink = (not accelerator) if shrink is None else shrink
    info.update(_peak(info, accelerator))
    python = torch_python(torch_python_path) if with_torch else None
    if with_torch and python is None:
        log("bench: torch, transformers or peft do not import; the torch rows are left out")
    if python:
        code = (
            "import torch, transformers, peft; "
            "print(torch.__version__, transformers.__version__, peft.__version__)"
        )
        v = subprocess.run(
            [python, "-I", "-c", code], capture_output=True, text=True, check=False
        ).stdout.split()
        if len(v) >= 3:
            info.update({"torch": v[0], "transformers": v[1], "peft": v[2]})
    device_name = info["device_kind"].replace("NVIDIA ", "").split()[0].lower()
    if info["platform"] == "cpu":
        device_name = "cpu"
    out = Path(out) if out else Path("experiments/results") / f"bench_{device_name}"
    results = {
        "device": info,
        "shrunk": shrink,
        "compute_dtype": "bfloat16" if accelerator else "float32",
        "steps": steps,
        "warmup": warmup,
        "cases": [],
    }
    del jax
    for name in cases:
        case = CASES[name].sized(shrink)
        spec = {
            "case": dataclasses.asdict(case),
            "steps": steps,
            "warmup": warmup,
            "accelerator": accelerator,
        }
        rows = []
        log(f"bench: {name} (ftlab) ...")
        row = _run_subprocess(
            [sys.executable, "-m", "ftlab.bench", "--worker", json.dumps(spec)], timeout
        )
        rows.append({"impl": "ftlab", "mode": "jit", **row})
        _say(log, name, rows[-1])
        if python:
            for mode in torch_modes:
                log(f"bench: {name} (torch {mode}) ...")
                row = _run_subprocess(
                    [python, "-I", str(TORCH_WORKER), json.dumps({**spec, "mode": mode})], timeout
                )
                rows.append({"impl": "torch", "mode": mode, **row})
                _say(log, name, rows[-1])
        flops = rows[0].get("model_flops")
        for r in rows:
            if flops and r.get("step_s"):
                r["model_flops"] = flops
                r["mfu"] = flops / r["step_s"] / info["peak_flops"]
                if r.get("cpu_s") and info.get("peak_flops_per_cpu_s"):  # CPU: per CPU-second
                    r["mfu_cpu_time"] = flops / r["cpu_s"] / info["peak_flops_per_cpu_s"]
        results["cases"].append(
            {
                "name": name,
                "title": CASES[name].title,
                "batch": case.batch,
                "seq": case.seq,
                "config": case.config,
                "frozen_dtype": case.frozen_dtype if accelerator else "float32",
                "rows": rows,
            }
        )
        _write(out, results)  # after every case: a run cut short keeps what it measured
    log(f"bench: wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return results


def _write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "bench.md").write_text(markdown(results))


def _say(log, name: str, row: dict) -> None:
    if "error" in row:
        log(f"bench: {name} {row['impl']} {row['mode']}: {row['error']}")
    else:
        log(
            f"bench: {name} {row['impl']} {row['mode']}: {row['step_s'] * 1e3:.1f} ms/step, "
            f"{row['tokens_per_s']:,.0f} tok/s"
        )


def _mfu(r: dict) -> str:
    text = f"{r.get('mfu', 0):.1%}"
    if r.get("mfu_cpu_time") is not None:
        text += f" ({r['mfu_cpu_time']:.0%} per CPU-s)"
    return text


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _gib(x) -> str:
    return "–" if not x else f"{x / 2**30:.2f}"


def markdown(results: dict) -> str:
    info = results["device"]
    versions = ", ".join(
        f"{k} {info[k]}"
        for k in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")
        if k in info
    )
    cpu = info["platform"] == "cpu"
    lines = [
        f"# ftlab bench: {info['device_kind']} x{info['device_count']} ({info['platform']})",
        "",
        f"{versions}; Python {info['python']}; {info['cpu_count']} CPU cores.",
        f"Compute {results['compute_dtype']}; random weights and tokens; median of "
        f"{results['steps']} steps after {results['warmup']} warm-up steps"
        + (
            "; cases SHRUNK for CPU (see each case's config in bench.json)."
            if results["shrunk"]
            else "; full size."
        ),
        (
            f"Peak for MFU: {info['peak_flops'] / 1e12:.2f} TFLOP/s per device "
            f"({info['peak_source']})"
            + (
                f"; per CPU-second {info['peak_flops_per_cpu_s'] / 1e9:.1f} GFLOP."
                if info.get("peak_flops_per_cpu_s")
                else "."
            )
        ),
        "",
        (
            "| case | batch x seq | impl | tok/s | ratio vs ftlab | ms/step | CPU s/step | "
            "model GFLOP/step | XLA GFLOP/step | MFU | peak device GiB | compiled step GiB | "
            "peak RSS GiB | load (1 min) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        base = c["rows"][0].get("tokens_per_s")
        for r in c["rows"]:
            impl = f"{r['impl']} {r['mode']}"
            if "error" in r:
                lines.append(
                    f"| {c['title']} | {c['batch']}x{c['seq']} | {impl} | "
                    f"error: {r['error'][:120]} |||||||||||"
                )
                continue
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "–"
            if r["impl"] != "ftlab" and base:
                ratio = f"{base / r['tokens_per_s']:.2f}x (ftlab/this)"
            compiled = r.get("compiled_memory", {}).get("total_bytes")
            lines.append(
                f"| {c['title']} | {c['batch']}x{c['seq']} | {impl} | {r['tokens_per_s']:,.0f} | "
                f"{ratio} | {r['step_s'] * 1e3:.1f} | "
                f"{_num(r.get('cpu_s'), '.2f')} | "
                f"{r['model_flops'] / 1e9:.2f} | "
                f"{_num(r['xla_flops'] / 1e9 if r.get('xla_flops') else None, '.2f')} | {_mfu(r)} | "
                f"{_gib(r.get('peak_device_bytes'))} | {_gib(compiled)} | "
                f"{_gib(r.get('peak_rss_bytes'))} | {_num(r.get('load_avg_1m_after'), '.1f')} |"
            )
    lines += ["", "Model FLOPs per case (ftlab.train.flops):", ""]
    for c in results["cases"]:
        f = c["rows"][0].get("flops")
        if f:
            lines.append(f"- {c['title']}: {f['formula']}")
    lines += [
        "",
        "Notes: 'ratio vs ftlab' on torch rows is ftlab's tokens/s over that row's (>1: ftlab "
        "faster). MFU uses the model FLOPs above for every row; on a shared CPU the wall-clock "
        "MFU can exceed 100% when the matmul that sets the peak ran at a busier moment than "
        "the steps. "
        + (
            "On CPU the machine may be shared: 'CPU s/step' is the process's CPU time per "
            "step (all threads), and 'per CPU-s' MFU compares model FLOPs per CPU-second with "
            "a 2048^3 matmul's FLOPs per CPU-second (less sensitive to other jobs than wall "
            "time; threads that spin while waiting count as busy). "
            "CPU has no device memory statistics: 'compiled step GiB' is XLA's "
            "memory_analysis of ftlab's step (arguments + outputs - aliased + temporaries); "
            "'peak RSS' is each worker process's peak resident memory (weights, optimizer, "
            "activations, the runtime itself)."
            if cpu
            else "Peak device GiB: jax memory_stats peak_bytes_in_use / "
            "torch.cuda.max_memory_allocated, each in its own process."
        )
        + " PEFT's GPT-2 LoRA targets the fused c_attn (q, k and v); ftlab's targets q_proj "
        "and v_proj (its GPT-2 has separate projections).",
        "",
    ]
    return "\n".join(lines)


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    c = spec["case"]
    case = Case(
        **{
            **c,
            "lora_targets": tuple(c["lora_targets"]),
            "torch_lora_targets": tuple(c["torch_lora_targets"]),
        }
    )
    result = run_ftlab(case, spec["steps"], spec["warmup"], spec["accelerator"])
    print("BENCH_RESULT " + json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: ftlab bench --help (python -m ftlab.bench --worker SPEC is internal)")
