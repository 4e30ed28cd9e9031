"""Whisper: parity with transformers on the tiny fixture, cached decoding, export, counts, PEFT
and LoRA, the audio data path and the recipe's ``:runlocal``.

Fixtures: ``tests/fixtures/make_whisper_fixtures.py`` (torch venv) wrote ``tiny_whisper/`` and
``peft_whisper/``; their reference logits, greedy ids and (``decoding.json``) beam-search ids
and scores are transformers' and peft's.
"""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from ftlab import tree
from ftlab.interop import files
from ftlab.interop.peft import export_peft_adapter, load_peft_adapter
from ftlab.interop.pretrained import export_hf, hf_tensors, load_pretrained
from ftlab.interop.whisper import example_inputs
from ftlab.methods import build_method
from ftlab.models.whisper import (
    Whisper,
    WhisperConfig,
    init_cache,
    scan_params,
    unscan_params,
)
from ftlab.schema import base_config
from ftlab.train.losses import causal_lm_loss
from ftlab.train.state import TrainState
from ftlab.train.step import make_train_step

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_whisper"
SAMPLE = Path(__file__).parent.parent / "configs" / "data" / "speech_sample"


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained(TINY)


@pytest.fixture(scope="module")
def ref():
    with np.load(TINY / "reference.npz") as d:
        return dict(d)


@pytest.fixture(scope="module")
def forward(tiny):
    """The jitted forward pass (batch dict -> logits), compiled once for the module."""
    return jax.jit(lambda params, batch: tiny.model.apply({"params": params}, batch))


def batch_of(ref):
    return {"input_features": ref["input_features"], "decoder_input_ids": ref["decoder_input_ids"]}


def test_logits_match_transformers(tiny, ref, forward):
    assert tiny.notes == []
    logits = np.asarray(forward(tiny.params, batch_of(ref)))
    assert logits.shape == ref["logits"].shape
    assert np.abs(logits - ref["logits"]).max() < 1e-4


def test_cached_decoding_equals_uncached_and_greedy_equals_hf(tiny, ref, forward):
    """Greedy decoding with the cache (the 4 forced tokens in one chunk that also computes the
    cross keys, then one token a step) gives HF's ids, and its logits are the uncached
    forward pass's on the same ids."""
    from ftlab.eval.generate import generate_seq2seq

    model, params = tiny.model, tiny.params
    out = generate_seq2seq(
        model,
        params,
        None,
        input_features=ref["input_features"],
        max_new_tokens=6,
        decoder_start_token_id=ref["prefix"],
        return_logits=True,
    )
    prefix = np.broadcast_to(ref["prefix"], (len(out.tokens), len(ref["prefix"])))
    ids, logits = np.concatenate([prefix, np.asarray(out.tokens)], axis=1), out.logits
    np.testing.assert_array_equal(np.asarray(ids), ref["greedy_ids"])
    width = ref["decoder_input_ids"].shape[1]  # the forward pass compiled for this length
    batch = {"input_features": ref["input_features"], "decoder_input_ids": ids[:, :width]}
    full = np.asarray(forward(params, batch))
    # logits of step k come from position 3 + k (the prefix's last token is at position 3)
    cached = np.asarray(logits)[:, : width - 3]
    np.testing.assert_allclose(cached, full[:, 3:], atol=1e-5, rtol=0)
    cache = init_cache(model, 2, 10)
    assert cache["decoder"]["layers_0"]["encoder_attn"]["cross_key"].shape == (2, 100, 4, 8)
    assert cache["decoder"]["layers_0"]["self_attn"]["cached_key"].shape == (2, 10, 4, 8)


def test_beam_search_encodes_each_clip_once(tiny, ref, monkeypatch):
    """With beams the encoder (most of Whisper's compute) runs on the clips, not on
    clips x beams: its output is repeated per beam, as Hugging Face does."""
    from ftlab.eval.generate import generate_seq2seq

    rows = []
    encode = Whisper.encode

    def counted(module, features, train=False):
        rows.append(features.shape[0])
        return encode(module, features, train)

    monkeypatch.setattr(Whisper, "encode", counted)
    out = generate_seq2seq(
        tiny.model,
        tiny.params,
        None,
        input_features=ref["input_features"],
        max_new_tokens=2,  # a length no other test decodes: traced here, not cached
        decoder_start_token_id=ref["prefix"],
        num_beams=3,
    )
    assert out.tokens.shape == (2, 2)
    assert rows == [2]


def test_beam_search_gives_transformers_ids_and_scores(tiny):
    """``generate_seq2seq`` from the forced prefix with ``num_beams=3`` gives the ids and
    scores of transformers' beam search (``WhisperForConditionalGeneration.generate`` with
    language / task and no timestamps: the fixture suppresses no tokens). EOS is a token this
    random model emits often (``beam_eos``): three clips' hypotheses end early, where length
    normalisation and HF's stopping rule choose, and one runs to the length limit, as every
    clip does with the real EOS (``beam``: checked when the fixture is made, one compilation
    less here)."""
    from ftlab.data import audio
    from ftlab.eval.generate import generate_seq2seq

    ref = json.loads((TINY / "decoding.json").read_text())
    clips = [audio.read_audio(f, SAMPLE) for f in ref["clips"]]
    features = audio.log_mel(audio.feature_extractor(TINY), clips, 200)
    pad = tiny.model.config.pad_token_id
    for name, eos in (("beam_eos", ref["fake_eos_token_id"]),):
        out = generate_seq2seq(
            tiny.model,
            tiny.params,
            None,
            input_features=features,
            decoder_start_token_id=ref["prefix"],
            max_new_tokens=ref["max_new_tokens"],
            num_beams=ref["num_beams"],
            length_penalty=ref["length_penalty"],
            eos_token_id=eos,
            pad_token_id=pad,
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), ref[f"{name}_ids"], err_msg=name)
        np.testing.assert_allclose(np.asarray(out.scores), ref[f"{name}_scores"], atol=1e-5)
    # beam search chose other ids than greedy decoding would (the comparison is not trivial)
    assert ref["beam_ids"] != ref["greedy_ids"]
    assert any(ref["fake_eos_token_id"] in row for row in ref["beam_eos_ids"])


def test_scanned_layers_compute_the_unrolled_function_and_train(tiny, ref, forward):
    """``scan_layers=True`` (with remat): one ``nn.scan`` per stack over ``scan_params``' tree
    gives the unrolled logits, gradients reach every layer and a step lowers the loss, the
    tree converts back bit for bit (and exports as it is to the checkpoint's tensors), and cached
    decoding is refused."""
    import jax.numpy as jnp

    params = jax.device_get(tiny.params)
    stacked = scan_params(params)
    assert set(stacked["encoder"]) == {"conv1", "conv2", "embed_positions", "layers", "layer_norm"}
    assert stacked["decoder"]["layers"]["fc1"]["kernel"].shape == (2, 32, 64)
    scanned = tiny.model.clone(scan_layers=True, remat=True)
    batch = batch_of(ref)
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), batch))["params"]
    shapes = {k: v.shape for k, v in tree.flatten(nn.meta.unbox(boxed)).items()}
    assert shapes == {k: np.shape(v) for k, v in tree.flatten(stacked).items()}
    axes = [v.names[0] for k, v in tree.flatten(boxed).items() if "/layers/" in k]
    assert axes and set(axes) == {"layers"}

    ids = ref["decoder_input_ids"]
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), -100, ids.dtype)], axis=1)

    def loss(model):
        def f(p):
            logits = model.apply({"params": p}, batch, train=True)
            logp = jax.nn.log_softmax(logits)
            picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
            return -jnp.sum(picked * (labels >= 0)) / jnp.sum(labels >= 0), logits

        return f

    step = jax.jit(jax.value_and_grad(loss(scanned), has_aux=True))
    (l0, logits), grads = step(stacked)
    (l1, _), _ = step(jax.tree.map(lambda p, g: p - 0.05 * g, stacked, grads))
    diff = np.abs(np.asarray(logits) - np.asarray(forward(tiny.params, batch))).max()
    assert diff < 1e-6, diff
    # gradients reach every layer of both scanned stacks (not the fixed positions), and train
    for stack in ("encoder", "decoder"):
        g = np.asarray(grads[stack]["layers"]["fc1"]["kernel"])
        assert g.shape[0] == 2 and all(np.abs(g[i]).max() > 1e-4 for i in range(2)), stack
    assert not np.asarray(grads["encoder"]["embed_positions"]).any()
    assert float(l1) < float(l0) - 1e-3
    back = unscan_params(stacked)
    a, b = tree.flatten(params), tree.flatten(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tensors = hf_tensors(stacked, tiny.hf_config)  # the family unscans a scanned tree
    original = dict(files.iter_tensors(TINY))
    assert all(np.array_equal(tensors[k], original[k]) for k in original)
    with pytest.raises(ValueError, match="decode=True.*scan_layers=False"):
        init_cache(scanned, 1, 8)


def test_export_round_trip_is_bit_exact(tiny, tmp_path):
    original = dict(files.iter_tensors(TINY))
    tensors = hf_tensors(tiny.params, tiny.hf_config)
    assert sorted(tensors) == sorted(original)
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    out = export_hf(tmp_path / "hf", tiny.params, tiny.hf_config, source=TINY)
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer.json").is_file()
    back = load_pretrained(out)
    a, b = tree.flatten(tiny.params), tree.flatten(back.params)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)


REAL = {  # openai/whisper-tiny and -small config.json (no download: widths and depths)
    "tiny": (384, 4, 6, 1536, 37_760_640),
    "small": (768, 12, 12, 3072, 241_734_912),
}


@pytest.mark.parametrize("name", REAL)
def test_parameter_counts_from_shapes(name):
    d, layers, heads, ffn, expected = REAL[name]
    cfg = WhisperConfig(
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
    )
    model = Whisper(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example_inputs(model)))
    assert tree.count(nn.meta.unbox(boxed["params"])) == expected
    # every weight carries logical axis names
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)


def test_peft_adapter_gives_peft_logits_and_exports_back(tiny, ref, forward, tmp_path):
    with np.load(FIXTURES / "peft_whisper" / "reference.npz") as d:
        peft_ref = dict(d)
    adapter = load_peft_adapter(FIXTURES / "peft_whisper", tiny.params, tiny.hf_config)
    assert len(adapter.factors) == 2 * 2 + 2 * 2 * 2  # encoder self; decoder self + cross
    method, trainable, frozen = adapter.split(tiny.params)
    unmerged = jax.jit(lambda t, f, b: method.apply(tiny.model, t, f, b, train=False))(
        trainable, frozen, batch_of(ref)
    )
    merged = forward(method.merged_params(trainable, frozen), batch_of(ref))
    assert np.abs(np.asarray(unmerged) - peft_ref["peft_logits"]).max() < 1e-4
    assert np.abs(np.asarray(merged) - peft_ref["merged_logits"]).max() < 1e-4
    assert np.abs(peft_ref["peft_logits"] - ref["logits"]).max() > 1e-2  # the adapter matters
    # and it exports back to peft's tensors, bit for bit
    out = export_peft_adapter(
        tmp_path / "adapter", adapter.factors, adapter.spec, tiny.params, tiny.hf_config
    )
    theirs = load_file(str(FIXTURES / "peft_whisper" / "adapter_model.safetensors"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["task_type"] is None  # as peft's own Whisper adapters (no SEQ_2_SEQ_LM)
    assert config["lora_alpha"] / config["r"] == 2.0


def test_lora_on_attention_trains_only_its_factors(tiny, ref):
    cfg = base_config()
    cfg.method.name = "lora"
    cfg.method.lora.rank = 2
    cfg.method.lora.targets = (r".*(self_attn|encoder_attn)/(q_proj|v_proj)/kernel",)
    method = build_method(cfg.method, tiny.params)
    assert len(method.lora_targets) == 12
    trainable, frozen = method.split(tiny.params, jax.random.key(0))
    assert set(trainable) == {"lora"} or not tree.flatten(trainable.get("params", {}))
    tx = optax.adam(1e-2)
    state = TrainState.create(trainable, frozen, tx, seed=0)
    ids = ref["decoder_input_ids"]
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), -100, ids.dtype)], axis=1)
    batch = {"inputs": batch_of(ref), "labels": labels}
    step = jax.jit(
        make_train_step(tiny.model, method, tx, optax.constant_schedule(1e-2), causal_lm_loss)
    )
    before = jax.tree.map(np.asarray, state.frozen)
    lora_before = jax.tree.map(np.asarray, state.trainable)
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = jax.tree.map(np.asarray, state.frozen)
    for path, value in tree.flatten(before).items():
        np.testing.assert_array_equal(value, tree.flatten(after)[path], err_msg=path)
    changed = [
        p
        for p, v in tree.flatten(lora_before).items()
        if not np.array_equal(v, np.asarray(tree.flatten(state.trainable)[p]))
    ]
    assert any(p.endswith("/b") for p in changed)


# -- audio data --------------------------------------------------------------------------


def speech_data_config(**overrides):
    c = base_config().data
    c.source = "hf"
    c.path = str(SAMPLE / "transcripts.csv")
    c.columns = "audio=file,text=text"
    c.tokenizer = str(TINY)
    c.max_length = 24
    c.val_fraction = 0.25
    c.test_fraction = 0.25
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        (c[section] if section else c)[name] = value
    return c


def test_audio_features_equal_the_feature_extractor_on_the_same_clip():
    from scipy.io import wavfile
    from transformers import WhisperFeatureExtractor

    from ftlab.data import audio

    clip = audio.read_audio("clip_003.wav", SAMPLE)
    rate, pcm = wavfile.read(SAMPLE / "clip_003.wav")
    assert rate == 16_000 and clip.dtype == np.float32
    np.testing.assert_array_equal(clip, pcm.astype(np.float32) / 32768.0)
    extractor = WhisperFeatureExtractor.from_pretrained(TINY)
    direct = extractor(pcm.astype(np.float32) / 32768.0, sampling_rate=16_000, return_tensors="np")
    ours = audio.log_mel(audio.feature_extractor(TINY), [clip], audio.window_frames(TINY))
    assert ours.shape == (1, 40, 200)  # 2 x max_source_positions (100) frames
    np.testing.assert_array_equal(ours, direct["input_features"])
    # a clip at 8 kHz is resampled to 16 kHz; stereo int16 is averaged to mono
    stereo = np.stack([pcm[::2], pcm[::2]], axis=1)
    assert len(audio.read_audio(stereo, sampling_rate=8_000)) == 2 * len(stereo)


def test_speech_dataset_targets_prefix_and_train_only_augmentation():
    from ftlab.data import load_dataset
    from ftlab.data.augment import augment_train_batch

    cfg = speech_data_config(augment__speed=0.1, augment__noise=0.05)
    data = load_dataset(cfg)
    assert data.task == "seq2seq" and (len(data.train), len(data.val), len(data.test)) == (
        16,
        8,
        8,
    )
    tok = data.tokenizer
    prefix = tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    )
    ids, labels = data.train.inputs["decoder_input_ids"], data.train.labels
    assert ids.shape == labels.shape == (16, 24)
    assert (ids[:, :4] == prefix).all() and (labels[:, :3] == prefix[1:]).all()
    np.testing.assert_array_equal(
        ids[:, 1:][labels[:, :-1] >= 0], labels[:, :-1][labels[:, :-1] >= 0]
    )
    n = int(data.train.weights[0])  # target tokens: prefix (3) + text + EOS
    assert labels[0, n - 1] == tok.eos_token_id and (labels[0, n:] == -100).all()
    assert tok.decode(labels[0, 3 : n - 1]) == data.train.text["text"][0]
    assert "waveform" in data.train.inputs and "waveform" not in data.test.inputs
    batch = {"inputs": {k: v[:4] for k, v in data.train.inputs.items()}, "labels": labels[:4]}
    one = augment_train_batch(cfg, data, {**batch}, step=5, seed=0)
    two = augment_train_batch(cfg, data, {**batch}, step=5, seed=0)
    other = augment_train_batch(cfg, data, {**batch}, step=6, seed=0)
    assert sorted(one["inputs"]) == [
        "decoder_attention_mask",
        "decoder_input_ids",
        "input_features",
    ]
    np.testing.assert_array_equal(one["inputs"]["input_features"], two["inputs"]["input_features"])
    assert not np.array_equal(one["inputs"]["input_features"], other["inputs"]["input_features"])
    assert not np.array_equal(one["inputs"]["input_features"], batch["inputs"]["input_features"])


def test_flac_needs_soundfile_or_says_so(tmp_path):
    from ftlab.data import audio

    (tmp_path / "clip.flac").write_bytes(b"fLaC not really")
    try:
        import soundfile  # noqa: F401

        reason = "LibsndfileError|Error|error"  # installed: its own reason for a bad file
    except ImportError:
        reason = r"reading \.flac audio needs the soundfile package \(pip install soundfile\)"
    with pytest.raises(ValueError, match=reason):
        audio.read_audio("clip.flac", tmp_path)


def test_audio_arrays_go_the_same_way_as_files():
    import pandas as pd

    from ftlab.data import audio, load_dataset

    table = pd.read_csv(SAMPLE / "transcripts.csv").iloc[:8]
    clips = [audio.read_audio(f, SAMPLE) for f in table["file"]]
    arrays = {"train": {"audio": clips, "text": list(table["text"])}}
    cfg = speech_data_config(source="arrays", path="", columns="")
    data = load_dataset(cfg, arrays=arrays)
    split = data.train if len(data.train) else data.val
    first = split.text["text"][0]
    row = list(table["text"]).index(first)
    assert split.text["audio"][0].startswith("row ")  # no file name for in-memory clips
    expected = audio.log_mel(audio.feature_extractor(TINY), [clips[row]], 200)[0]
    np.testing.assert_array_equal(split.inputs["input_features"][0], expected)


def test_hugging_face_audio_columns_are_read(tmp_path):
    import datasets
    import pandas as pd

    from ftlab.data import audio, load_dataset

    table = pd.read_csv(SAMPLE / "transcripts.csv").iloc[:8]
    ds = datasets.Dataset.from_dict(
        {"audio": [str(SAMPLE / f) for f in table["file"]], "text": list(table["text"])}
    ).cast_column("audio", datasets.Audio(sampling_rate=16_000))
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = speech_data_config(
        path=str(tmp_path / "ds"), format="disk", columns="audio=audio,text=text"
    )
    data = load_dataset(cfg)
    name = data.train.text["audio"][0]  # the clip's file name, from the Audio cell's path
    expected = audio.log_mel(audio.feature_extractor(TINY), [audio.read_audio(name, SAMPLE)], 200)
    np.testing.assert_array_equal(data.train.inputs["input_features"][:1], expected)


def test_a_bad_audio_file_is_one_line_naming_file_and_row(tmp_path, capsys):
    from ftlab.cli import main

    rows = (SAMPLE / "transcripts.csv").read_text().splitlines()
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wav file")
    for name in rows[1:]:
        clip = name.split(",")[0]
        (tmp_path / clip).symlink_to(SAMPLE / clip)
    rows[3] = "broken.wav,turn the radio off"
    (tmp_path / "transcripts.csv").write_text("\n".join(rows) + "\n")
    code = main(
        [
            "train",
            str(Path(__file__).parent.parent / "configs" / "whisper_asr.py:runlocal"),
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.path={tmp_path / 'transcripts.csv'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if line.startswith("ftlab:")]  # (datasets' progress bars)
    assert code == 2, err
    # the source table's data row 2 (0-based, as cleaning's rejects name rows)
    assert len(ours) == 1 and "broken.wav" in ours[0] and "row 2:" in ours[0], err


def test_wer():
    from ftlab.eval.text_metrics import wer

    refs = ["turn on the light", "dim the fan"]
    assert wer(refs, refs) == 0.0
    assert wer(["Turn on the light.", "dim fan"], refs) == 1 / 7  # one deletion in 7 words
    assert wer(["turn on the light", "x the fan please"], refs) == 2 / 7


# -- the recipe ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runlocal_run(tmp_path_factory):
    """The recipe's ``:runlocal`` trained once for the module (its directory)."""
    from ftlab.cli import main
    from ftlab.interop import build

    if build.head_for("seq2seq") != "lm":  # the trainer's seq2seq task (shared with T5)
        pytest.skip("the trainer does not run data.task 'seq2seq' yet (interop.build.head_for)")
    workdir = tmp_path_factory.mktemp("whisper") / "run"
    config = str(Path(__file__).parent.parent / "configs" / "whisper_asr.py:runlocal")
    assert main(["train", config, "--workdir", str(workdir)]) == 0
    return workdir


def test_whisper_asr_runlocal_trains_and_writes_a_wer(runlocal_run):
    workdir = runlocal_run
    summary = json.loads((workdir / "summary.json").read_text())
    test = summary["test"]
    assert 0 <= test["wer"] and test["generated_examples"] == 8
    rows = [json.loads(x) for x in (workdir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["audio"].endswith(".wav") and r["reference"] for r in rows)


def test_predict_transcribes_audio_files_as_evaluation_did(runlocal_run, tmp_path):
    """``ftlab predict RUN --input FILE`` on a speech run: a csv of clip paths (relative to
    the csv, the training data's ``file`` column) gives, per row, the transcript the run's
    final evaluation wrote for the same clip; a wav file or a folder of them is read too."""
    from ftlab import saved_run
    from ftlab.cli import main

    done = [json.loads(x) for x in (runlocal_run / "generations.jsonl").read_text().splitlines()]
    names = [Path(r["audio"]).name for r in done[:3]]
    for name in names:
        (tmp_path / name).symlink_to(SAMPLE / name)
    (tmp_path / "clips.csv").write_text("file\n" + "\n".join(names) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["predict", str(runlocal_run), "--input", str(tmp_path / "clips.csv")]
    assert main([*args, "--output", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2]
    assert [Path(r["audio"]).name for r in rows] == names
    assert [r["output"] for r in rows] == [r["output"] for r in done[:3]]
    # an audio file, or a folder of them, is one row per clip (no table needed)
    cfg = saved_run.load_config(runlocal_run)
    one = saved_run.file_rows(cfg, tmp_path / names[0], labelled=False, what="--input")
    assert one.frame["audio"].tolist() == [str(tmp_path / names[0])]
    folder = saved_run.file_rows(cfg, tmp_path, labelled=False, what="--input")
    assert folder.frame["audio"].tolist() == sorted(str(tmp_path / n) for n in names)
    with pytest.raises(saved_run.InputError, match="holds audio files"):
        saved_run.file_rows(cfg, tmp_path, labelled=True, what="--split")
