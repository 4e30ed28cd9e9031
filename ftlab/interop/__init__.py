"""Hugging Face and PEFT interop: hub access, checkpoint files, one module per model family.

Kept empty on purpose: ``ftlab.data`` imports ``ftlab.interop.hub`` for the offline check, and
importing this package must not pull in any model code. Import what you need from its modules:

- ``hub``: resolve a hub id or a local directory, read ``config.json``, detect offline fast;
- ``files``: safetensors read/write, shards, refusing pickles;
- ``table`` / ``family``: the bidirectional name tables and the family registry;
- ``gpt2``, ``llama``, ``bert``, ``vit``, ``resnet``: one family each (module + table);
- ``pretrained``: ``load_pretrained`` and ``export_hf`` for every family;
- ``build``: ``model.name = "hf"`` from a config; ``peft``: LoRA adapters in PEFT's format.
"""
