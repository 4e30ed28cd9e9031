"""``ftlab COMMAND ...`` (also ``python -m ftlab``): fine-tuning runs from config files.

Commands taking a config file (``path/to/config.py[:arg]``, positionally or absl-style as
``--config=path.py[:arg]``, with ``--config.key=value`` overrides):

- ``train CONFIG [--workdir DIR]``: run (or resume) the config's experiment;
- ``sweep CONFIG [--workdir DIR]``: the same for a config that declares stages, variants or a
  sweep (refused for a single-run config);
- ``list CONFIG``: the runs the config would make, without running anything;
- ``plan CONFIG [--target NAME]``: compile the train step for this machine or a TPU / GPU
  target, without data or weights, and print per-device memory.

Commands taking a finished run's directory (its ``config.json`` and ``checkpoints/``):

- ``eval RUN_DIR [--split val|test|FILE] [--checkpoint best|last|STEP]``: metrics as JSON on
  stdout and in a new file ``RUN_DIR/eval/<split>_<checkpoint>.json``;
- ``predict RUN_DIR --input FILE|DIR [--output FILE]``: class probabilities, values,
  generated text or transcripts (speech: audio files or a table of clip paths) per input row (jsonl, or csv for an ``--output`` ending in .csv);
- ``export RUN_DIR [--hf DIR] [--peft DIR]``: a Hugging Face model directory (LoRA merged)
  and / or the LoRA adapter in PEFT's format; ``export RUN_DIR --quantize int8|nf4 --out DIR``:
  weight-only quantised safetensors with a size and metric report (``ftlab.quantized_export``);
- ``compare RUN_DIR RUN_DIR ... [--out DIR] [--baseline NAME]``: a comparison table.

``bench [--case NAME] [--steps N] [--torch] [--out DIR]``: train-step throughput, MFU and
memory on this machine, beside PyTorch + PEFT (``ftlab.bench``).

Exit codes: 0 done (plan: fits or unknown), 1 training failed (non-finite loss) or the plan
does not fit, 2 bad config or input (one line ``ftlab: ...`` naming it, before any work is
done or any file written), 130 interrupted by Ctrl-C, 143 stopped by SIGTERM (preemption; both
after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import textwrap
from pathlib import Path

from ftlab.config import ConfigError, apply_overrides, config_name, load_config, split_config_args

CONFIG_ARG = (
    "path/to/config.py[:arg]: a config file; ':arg' is passed to its get_config (the file's "
    "ARGS lists what it accepts; several comma-separated, e.g. gpt2_e2e.py:lora,runlocal). "
    "Also accepted absl-style: --config=path/to/config.py[:arg]"
)
CONFIG_EPILOG = """\
config overrides:
  --config.KEY=VALUE    set any key of the config (typed by its current value), e.g.
                        --config.optim.lr=3e-4 --config.train.num_steps=100
                        --config.method.lora.targets="('attn/q_proj/kernel',)";
                        an unknown key is an error naming the nearest valid one.
                        Every key, its default and meaning: ftlab/schema.py
"""
RUN_EPILOG = """\
config overrides:
  --config.KEY=VALUE    change a key of the run's saved config (config.json) for this
                        command only, e.g. --config.data.path=NEW/PLACE/train.csv when the
                        data moved, or --config.train.eval_batch_size=64. A key that changes
                        the model or method makes the checkpoint unusable.
"""
CHECKPOINT_HELP = (
    "best, last or a step number (default: what the run's final evaluation used: the best "
    "checkpoint when early_stopping.restore_best and there is one, else the last)"
)


class UsageError(ConfigError):
    """A malformed command line (argparse's complaint, as one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        prog = self.prog.removeprefix("ftlab").strip()
        where = f"{prog}: " if prog else ""
        raise UsageError(f"{where}{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ftlab",
        description=__doc__.split("\n\n", 1)[1].split("\n\nExit codes")[0].replace("``", ""),
        epilog="Exit codes: 0 done, 1 training failed / plan does not fit, 2 bad config or "
        "input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). `ftlab COMMAND --help` for "
        "each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str, epilog: str = CONFIG_EPILOG):
        return sub.add_parser(
            name,
            help=help,
            description=textwrap.fill(description, 88),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    t = command(
        "train",
        "train (or resume) the experiment of a config file",
        "Train the config's run, or its stages then variants; rerunning the same command "
        "resumes from the latest checkpoint.",
    )
    t.add_argument("config_file", nargs="?", metavar="CONFIG", help=CONFIG_ARG)
    t.add_argument(
        "--workdir",
        help="output folder (default: runs/<config name>, or runs/<name>-<arg> for a config "
        "argument, its commas made dashes: runs/gpt2_e2e-lora-runlocal); or gs://BUCKET/PATH "
        "(checkpoints written there, the rest staged locally and copied: README, Scale-out)",
    )
    s = command(
        "sweep",
        "run every stage, variant and sweep point of a config",
        "Run a multi-run config (stages, variants, a sweep) and write its comparison; "
        "reruns resume. A config without any of them is refused: use `ftlab train`.",
    )
    s.add_argument("config_file", nargs="?", metavar="CONFIG", help=CONFIG_ARG)
    s.add_argument("--workdir", help="output folder (default: as for train)")
    ls = command(
        "list",
        "list the runs a config would make (nothing runs)",
        "Print the stages, variants (and seeds) a config declares, with their overrides.",
    )
    ls.add_argument("config_file", nargs="?", metavar="CONFIG", help=CONFIG_ARG)
    q = command(
        "plan",
        "per-device memory of the config's train step for a target, no data or weights",
        "Compile the config's train step ahead of time on abstract shapes (a synthesised "
        "batch, no weights) for this machine or a --target, and print per-device memory, "
        "FLOPs, and what would make a plan that does not fit fit. Each stage / variant of a "
        "multi-run config is planned (or --variant NAME).",
    )
    q.add_argument("config_file", nargs="?", metavar="CONFIG", help=CONFIG_ARG)
    q.add_argument(
        "--target",
        metavar="NAME",
        help="host (default), tpu-v5e-1, tpu-v5e-8, tpu-v6e-1, tpu-v4-32, tpu-v5p-8, gpu-h100, "
        'gpu-h100x8, gpu-a100-80gb, ... (TPU targets need libtpu: pip install -e ".[tpu-plan]")',
    )
    q.add_argument("--variant", metavar="NAME", help="plan only this stage or variant")
    q.add_argument("--device-memory", help="bytes per device to check against (e.g. 80GB)")
    q.add_argument("--devices", type=int, help="plan for this many devices (shapes only)")

    e = command(
        "eval",
        "evaluate a run's checkpoint on val, test or a file",
        "Rebuild the run from RUN_DIR/config.json, restore a checkpoint and evaluate it. "
        "Prints the metrics as JSON and writes them to a new file "
        "RUN_DIR/eval/<split>_<checkpoint>.json (never overwriting one). The best checkpoint "
        "on test reproduces summary.json's test metrics.",
        RUN_EPILOG,
    )
    e.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run's directory (holds config.json), or gs://BUCKET/PATH",
    )
    e.add_argument(
        "--split",
        default="test",
        metavar="val|test|FILE",
        help="the run's val or test split (default test), or a csv / jsonl / parquet file "
        "(or image folder) with the run's input and label columns, prepared by the run's own "
        "data pipeline (training statistics, label map, tokenizer)",
    )
    e.add_argument("--checkpoint", metavar="best|last|STEP", help=CHECKPOINT_HELP)

    pr = command(
        "predict",
        "predictions of a run for new rows",
        "Per input row: the predicted class and each class's probability (classification), "
        "the value in the target's original units (regression), or the text generated with "
        "the run's decoding settings (config.eval: num_beams, max_new_tokens, ...) for a "
        "causal LM (a transcript per clip for a speech run). Rows go through the run's data "
        "pipeline; a row it rejects is logged and left out (each output row names its input "
        "row).",
        RUN_EPILOG,
    )
    pr.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run's directory (holds config.json), or gs://BUCKET/PATH",
    )
    pr.add_argument(
        "--input",
        required=True,
        metavar="FILE|DIR",
        help="csv / jsonl / parquet with the run's input columns (source names as in its data, "
        "or ftlab's: text, prompt, context, image, audio, ...), a folder of images, or (speech "
        "runs) an audio file or a folder of them",
    )
    pr.add_argument(
        "--output",
        metavar="FILE",
        help="write here (jsonl; csv if it ends in .csv; must not exist) instead of stdout",
    )
    pr.add_argument("--checkpoint", metavar="best|last|STEP", help=CHECKPOINT_HELP)

    x = command(
        "export",
        "export a run as a Hugging Face model and / or PEFT adapter",
        "Write the run's model (LoRA merged) as a Hugging Face directory that transformers "
        "loads, with the tokenizer files, and / or its LoRA adapter in PEFT's format. A "
        "target that exists and is not an empty directory is refused.",
        RUN_EPILOG,
    )
    x.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run's directory (holds config.json), or gs://BUCKET/PATH",
    )
    x.add_argument("--hf", metavar="DIR", help="Hugging Face model directory to write")
    x.add_argument(
        "--peft", metavar="DIR", help="PEFT adapter directory to write (LoRA, IA3, prompt runs)"
    )
    x.add_argument(
        "--quantize",
        choices=("int8", "nf4"),
        help="weight-only quantised export (kernels int8 per channel or NF4 blocks of 64) into "
        "--out, with sizes and the val/test metric change against float32",
    )
    x.add_argument("--out", metavar="DIR", help="directory for --quantize's export")
    x.add_argument("--checkpoint", metavar="best|last|STEP", help=CHECKPOINT_HELP)

    c = command(
        "compare",
        "compare finished runs of one task",
        "A table of the runs' test metrics, parameters and costs, against a baseline run. "
        "Runs of different tasks cannot be compared (causal-LM and sequence-to-sequence runs, "
        "GPT-2 and T5 on E2E, share one table).",
        "",
    )
    c.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="finished run directories (or gs://BUCKET/PATH)",
    )
    c.add_argument("--out", metavar="DIR", help="also write the comparison files here")
    c.add_argument("--baseline", metavar="NAME", help="the run the others are compared with")

    b = command(
        "bench",
        "fine-tuning step throughput, MFU and memory (vs PyTorch + PEFT)",
        "Time ftlab's train step on GPT-2-medium (full, LoRA, top-2 blocks) and LLaMA-7B LoRA "
        "on this machine's accelerator (shrunk and float32 on CPU): tokens/s, model FLOPs and "
        "MFU, peak memory; with --torch the same cases through transformers + PEFT (eager and "
        "torch.compile). Writes bench.json and bench.md.",
        "",
    )
    b.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help="a case (repeatable; "
        "default all four): gpt2m-full, gpt2m-lora, gpt2m-top2, llama7b-lora, tiny",
    )
    b.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    b.add_argument("--torch", action="store_true", help="also run torch + transformers + peft")
    b.add_argument(
        "--torch-python",
        metavar="PYTHON",
        help="a Python that imports torch, transformers and peft (default: this one)",
    )
    b.add_argument("--torch-modes", default="eager,compile", help="default eager,compile")
    b.add_argument("--full-size", action="store_true", help="full-size cases even on CPU")
    b.add_argument(
        "--out", metavar="DIR", help="output folder (default experiments/results/bench_<device>)"
    )
    return p


def _setup_logging() -> logging.Logger:
    """ftlab's own messages at INFO; libraries (orbax, absl, jax) only when they warn."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("ftlab")
    log.setLevel(logging.INFO)
    return log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    log = _setup_logging()
    try:
        spec, overrides, rest = split_config_args(argv)
        try:
            args = _parser().parse_args(rest)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        return COMMANDS[args.command](args, spec, overrides, log)
    except ConfigError as e:
        from ftlab.saved_run import InputError

        kind = "" if isinstance(e, (InputError, UsageError)) else "config error: "
        print(f"ftlab: {kind}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):  # exiting now: a further one changes nothing
            signal.signal(sig, signal.SIG_IGN)
        signum = getattr(e, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name
        detail = f" ({e})" if str(e) else ""
        print(f"ftlab: {how}{detail}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        kind = _input_error(e)
        if kind is None:
            raise
        print(f"ftlab: {kind}{' '.join(str(e).split())}", file=sys.stderr)
        return 1 if kind == "checkpoint save failed: " else 2


def _input_error(e: Exception) -> str | None:
    """The one-line prefix for an exception that is bad input (exit 2) or a failed save (exit
    1); None for anything else (a bug: its traceback is shown). Types are looked up only in
    modules already imported (an exception of a module never imported cannot occur)."""
    kinds = {
        ("ftlab.data.frames", "DataError"): "data error: ",
        ("ftlab.interop.errors", "HFImportError"): "",
        ("ftlab.interop.errors", "PeftAdapterError"): "",
        ("ftlab.checkpoint", "CheckpointCorruptError"): "",
        ("ftlab.checkpoint", "CheckpointSaveError"): "checkpoint save failed: ",
    }
    for (module, name), kind in kinds.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return kind
    return None


# -- commands taking a config ------------------------------------------------------------------


def _config(args, spec: str | None, overrides) -> tuple[str, object]:
    if args.config_file and spec:
        raise ConfigError("give the config either positionally or as --config=..., not both")
    spec = spec or args.config_file
    if not spec:
        raise ConfigError(
            f"no config file given: ftlab {args.command} configs/NAME.py[:arg] (see --help)"
        )
    cfg = apply_overrides(load_config(spec), overrides)
    from ftlab.parallel import runtime

    runtime.setup(cfg.platform, cfg.distributed)  # before any jax computation
    return spec, cfg


def default_workdir(spec: str) -> Path:
    """``runs/<stem>``, or ``runs/<stem>-<arg>`` (commas made dashes) for a config argument."""
    return Path("runs") / config_name(spec)


def _train(args, spec, overrides, log) -> int:
    spec, cfg = _config(args, spec, overrides)
    sweeps = "sweep" in cfg and any(bool(v) for v in cfg.sweep.values())
    if args.command == "sweep" and not (cfg.stages or cfg.variants or sweeps):
        raise ConfigError(
            f"{spec} declares no stages, variants or sweep: nothing to sweep; "
            "`ftlab train` runs a single config"
        )
    workdir = args.workdir or default_workdir(spec)
    if "://" in str(workdir):  # gs://...: staged locally (ftlab.workdir); a scheme etils
        from ftlab.workdir import remote_path  # cannot open is refused here

        remote_path(str(workdir))
    else:
        workdir = Path(workdir)
    from ftlab.experiment import run_experiment  # heavy imports after the cheap checks
    from ftlab.train.loop import NonFiniteLossError

    try:
        run_experiment(cfg, workdir)
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    return 0


def _list(args, spec, overrides, log) -> int:
    _, cfg = _config(args, spec, overrides)
    from ftlab.experiment import describe

    print(describe(cfg), end="")
    return 0


def _plan(args, spec, overrides, log) -> int:
    if args.target not in (None, "", "host"):  # compile-only target devices: no local backend
        import jax

        jax.config.update("jax_platforms", "cpu")
    spec, cfg = _config(args, spec, overrides)
    from ftlab import plan

    memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    text, fits = plan.describe(
        cfg, device_memory=memory, devices=args.devices, target=args.target, variant=args.variant
    )
    print(text)
    return 1 if fits is False else 0


# -- commands taking a run directory -------------------------------------------------------------


def _on_run_dir(command):
    """``command(args, wd, overrides, log)`` on the run directory ``args.run_dir`` opened as a
    ``Workdir`` (a URL staged: ``saved_run.opened``); a config given instead is an error."""

    def run(args, spec, overrides, log) -> int:
        from ftlab import saved_run

        if spec:
            raise ConfigError(
                f"ftlab {args.command} takes a run directory, not --config={spec}; the run's "
                "own config.json is used"
            )
        with saved_run.opened(args.run_dir) as wd:
            return command(args, wd, overrides, log)

    return run


def _run(args, wd, overrides):
    """The run directory's config (with overrides) and chosen checkpoint: every check on them
    before anything is built."""
    from ftlab import saved_run

    cfg = saved_run.run_config_arg(saved_run.load_config(wd.local), overrides)
    which = saved_run.choose_checkpoint(wd.store, cfg, args.checkpoint)
    from ftlab.parallel import runtime

    runtime.setup(cfg.platform, cfg.distributed)
    return wd.local, cfg, which


@_on_run_dir
def _eval(args, wd, overrides, log) -> int:
    from ftlab import saved_run
    from ftlab.data.frames import DataError

    run_dir, cfg, which = _run(args, wd, overrides)
    rows, data, name = None, None, args.split
    if args.split not in saved_run.SPLITS:
        path = Path(args.split)
        if not path.exists():
            raise saved_run.InputError(
                f"--split: {args.split!r} is neither val, test nor an existing file"
            )
        name = path.stem if path.stem not in saved_run.SPLITS else f"file-{path.stem}"
        try:
            rows = saved_run.file_rows(cfg, path, labelled=True, what="--split")
            data, _ = saved_run.rows_dataset(cfg, rows)
        except DataError as e:
            raise saved_run.InputError(f"--split: {path}: {e}") from None
    restored = saved_run.restore(wd.store, cfg, which, data)
    run = restored.run
    split = run.data.test if rows is not None else getattr(run.data, args.split)
    if not len(split) and rows is not None:
        raise saved_run.InputError(f"--split: no row of '{args.split}' is left after cleaning")
    if not len(split):
        raise saved_run.InputError(
            f"the run has no {args.split} examples (data.{args.split}_fraction is 0?); "
            "choose another --split"
        )
    metrics = run.evaluate(restored.state, split)
    eval_dir = run_dir / "eval"
    stem = f"{name}_{which.name}"
    held_out = args.split == "test" or rows is not None
    held_out = held_out or (args.split == "val" and not len(run.data.test))
    decodes = run.data.task in ("causal_lm", "seq2seq")  # BLEU (T5, GPT-2) or WER (speech)
    if decodes and cfg.eval.generate_examples > 0 and held_out:
        from ftlab.eval.generation_eval import evaluate_generation

        eval_dir.mkdir(exist_ok=True)
        metrics.update(
            evaluate_generation(
                run.model,
                run.method,
                restored.state.trainable,
                restored.state.frozen,
                split,
                run.data.tokenizer,
                cfg.data.template,
                cfg.eval,
                saved_run.new_file(eval_dir, f"{stem}_generations", ".jsonl"),
            )
        )
    from ftlab.tree import jsonable

    result = {
        "run": wd.url or str(run_dir),
        "split": args.split,
        "checkpoint": which.name,
        "step": which.step,
        "examples": len(split),
        "metrics": jsonable(metrics),
    }
    eval_dir.mkdir(exist_ok=True)
    out = saved_run.new_file(eval_dir, stem)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    log.info("%s %s on %s: written to %s", wd.url or run_dir, which, args.split, out)
    return 0


@_on_run_dir
def _predict(args, wd, overrides, log) -> int:
    from ftlab import saved_run
    from ftlab.data.frames import DataError

    _, cfg, which = _run(args, wd, overrides)
    output = Path(args.output) if args.output else None
    if output is not None and output.exists():
        raise saved_run.InputError(f"--output: '{output}' exists; choose a new file")
    try:
        rows = saved_run.file_rows(cfg, args.input, labelled=False, what="--input")
        if saved_run.generates(rows.source):
            data, positions = None, None
        else:
            data, positions = saved_run.rows_dataset(cfg, rows)
    except DataError as e:
        raise saved_run.InputError(f"--input: {args.input}: {e}") from None
    restored = saved_run.restore(wd.store, cfg, which, data)
    if saved_run.generates(rows.source):
        records = saved_run.generate_rows(restored, rows.frame)
    else:
        records = saved_run.prediction_rows(restored, positions)
    saved_run.write_records(rows.named(records), output)
    if output is not None:
        log.info("%d predictions written to %s", len(records), output)
    return 0


@_on_run_dir
def _export(args, wd, overrides, log) -> int:
    from ftlab import saved_run

    _, cfg, which = _run(args, wd, overrides)
    if args.quantize or args.out:
        return _export_quantized(args, wd, cfg, which)
    if not (args.hf or args.peft):
        raise saved_run.InputError("export: give --hf DIR and / or --peft DIR")
    targets = {"--hf": args.hf, "--peft": args.peft}
    if args.hf and args.peft and Path(args.hf).resolve() == Path(args.peft).resolve():
        raise saved_run.InputError("export: --hf and --peft name the same directory")
    for flag, target in targets.items():
        if target is None:
            continue
        path = Path(target)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise saved_run.InputError(
                f"export {flag}: '{path}' exists and is not an empty directory; refusing to "
                "overwrite it"
            )
    if args.hf and cfg.model.name != "hf":
        raise saved_run.InputError(
            f"export --hf: the run's model is {cfg.model.name!r}, not a Hugging Face family "
            "(config.model.name='hf')"
        )
    if args.peft and cfg.method.name not in ("lora", "qlora", "ia3", "prompt"):
        raise saved_run.InputError(
            f"export --peft: the run's method is {cfg.method.name!r}; only a LoRA (DoRA, QLoRA) "
            "or IA3 run, or a prompt-tuning one, has an adapter (--hf exports the whole model)"
        )
    restored = saved_run.restore(wd.store, cfg, which)
    from ftlab.interop.errors import HFExportError, PeftAdapterError
    from ftlab.train.loop import export

    try:
        export(
            cfg,
            restored.run.data,
            restored.run.method,
            restored.state,
            hf_dir=Path(args.hf) if args.hf else None,
            peft_dir=Path(args.peft) if args.peft else None,
        )
    except (HFExportError, PeftAdapterError) as e:
        raise saved_run.InputError(f"export: {e}") from None
    for flag, target in targets.items():
        if target:
            print(f"{flag.lstrip('-')}: {target}")
    return 0


def _export_quantized(args, wd, cfg, which) -> int:
    """``export RUN --quantize int8|nf4 --out DIR`` (``ftlab.quantized_export``)."""
    from ftlab import saved_run

    if not (args.quantize and args.out):
        raise saved_run.InputError("export: --quantize int8|nf4 and --out DIR go together")
    if args.hf or args.peft:
        raise saved_run.InputError(
            "export: --quantize writes its own directory (--out), not --hf/--peft"
        )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise saved_run.InputError(
            f"export --out: '{out}' exists and is not an empty directory; refusing to overwrite it"
        )
    from ftlab import quantized_export

    report = quantized_export.export(saved_run.restore(wd.store, cfg, which), args.quantize, out)
    summary = {"out": str(out), "file_bytes": report["file_bytes"], "change": report["change"]}
    print(json.dumps(summary))
    return 0


def _compare(args, spec, overrides, log) -> int:
    from ftlab import saved_run

    if spec or overrides:
        raise ConfigError("ftlab compare takes run directories, not a config or overrides")
    if len(args.run_dirs) < 2:
        raise saved_run.InputError("compare: give at least two run directories")
    for d in args.run_dirs:
        saved_run.run_directory(d)
    try:
        from ftlab.eval.compare import compare_runs, run_names
    except ImportError as e:
        raise saved_run.InputError(f"compare: not available in this ftlab ({e})") from None
    from ftlab import workdir as workdir_lib

    with contextlib.ExitStack() as stack:  # URLs staged (their files pulled) while compared
        local = [stack.enter_context(saved_run.opened(d)).local for d in args.run_dirs]
        names = run_names([workdir_lib.as_path(d) for d in args.run_dirs])
        out = Path(args.out) if args.out else None
        print(compare_runs(local, out, args.baseline, names=names))
    return 0


def _bench(args, spec, overrides, log) -> int:
    from ftlab import bench

    if spec or overrides:
        raise UsageError("bench takes no config (see ftlab bench --help)")
    cases = args.case or list(bench.DEFAULT_CASES)
    unknown = [c for c in cases if c not in bench.CASES]
    if unknown:
        raise UsageError(f"bench: unknown case {unknown[0]!r}; known: {', '.join(bench.CASES)}")
    bench.run(
        cases,
        steps=args.steps,
        warmup=args.warmup,
        with_torch=args.torch,
        torch_python_path=args.torch_python,
        out=args.out,
        shrink=False if args.full_size else None,
        torch_modes=tuple(m for m in args.torch_modes.split(",") if m),
        log=log.info,
    )
    return 0


COMMANDS = {
    "train": _train,
    "sweep": _train,
    "list": _list,
    "plan": _plan,
    "eval": _eval,
    "predict": _predict,
    "export": _export,
    "compare": _compare,
    "bench": _bench,
}


if __name__ == "__main__":
    sys.exit(main())
