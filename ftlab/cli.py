"""``ftlab train|plan CONFIG [--workdir DIR] [--config.key=value ...]`` (also ``python -m ftlab``).

``train`` runs (or resumes) the experiment; ``plan`` compiles its train step without weights
and prints per-device memory. The config may be given positionally or absl-style
(``--config=path.py[:arg]``). Exit codes: 0 done (plan: fits or unknown), 1 training failed
(non-finite loss) or the plan does not fit, 2 bad config or input, 130 interrupted (after
saving a checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ftlab.config import ConfigError, apply_overrides, load_config, split_config_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftlab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the experiment of a config file")
    t.add_argument("config_file", nargs="?", help="path/to/config.py[:arg]")
    t.add_argument("--workdir", help="output folder (default: runs/<config name>)")
    q = sub.add_parser("plan", help="per-device memory of the config's train step, no weights")
    q.add_argument("config_file", nargs="?", help="path/to/config.py[:arg]")
    q.add_argument("--device-memory", help="bytes per device to check against (e.g. 80GB)")
    q.add_argument("--devices", type=int, help="plan for this many devices (shapes only)")
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
        args = _parser().parse_args(rest)
        if args.config_file and spec:
            raise ConfigError("give the config either positionally or as --config=..., not both")
        spec = spec or args.config_file
        if not spec:
            raise ConfigError("no config file given: ftlab train configs/NAME.py [--workdir DIR]")
        cfg = apply_overrides(load_config(spec), overrides)
        from ftlab.parallel import runtime

        runtime.setup(cfg.platform, cfg.distributed)  # before any jax computation
        if args.command == "plan":
            return _plan(cfg, args)
        workdir = Path(args.workdir or Path("runs") / Path(spec.split(":")[0]).stem)
        from ftlab.experiment import (
            run_experiment,
        )  # heavy imports after the cheap checks
        from ftlab.train.loop import NonFiniteLossError

        try:
            run_experiment(cfg, workdir)
        except NonFiniteLossError as e:
            log.error("%s", e)
            return 1
    except ConfigError as e:
        print(f"ftlab: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftlab: interrupted", file=sys.stderr)
        return 130
    return 0


def _plan(cfg, args) -> int:
    from ftlab.parallel import plan

    memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    text, fits = plan.describe(cfg, device_memory=memory, devices=args.devices)
    print(text)
    return 1 if fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
