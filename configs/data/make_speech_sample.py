"""Write the small spoken-clip sample the Whisper recipe uses under ``runlocal``.

Short English commands spoken by the ``espeak-ng`` synthesiser (``apt install espeak-ng``)
in a few voices and speeds, resampled to Whisper's 16 kHz, 16-bit mono WAV, with their
transcripts in ``transcripts.csv`` (``file``, ``text``): the layout of an audio folder a user
would bring (a column of audio files, a column of text). Deterministic for one espeak-ng
version; the clips are synthetic, so a number reached on them says the pipeline works, not
how well a model hears people.

    python configs/data/make_speech_sample.py
"""

from __future__ import annotations

import csv
import itertools
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

HERE = Path(__file__).parent / "speech_sample"
RATE = 16_000

VERBS = ["turn on", "turn off", "dim", "check"]
THINGS = ["the light", "the radio", "the fan", "the heater"]
PLACES = ["in the kitchen", "in the hall", "upstairs"]
VOICES = ["en-us", "en-gb", "en-us+f2", "en-gb+m3"]
SPEEDS = [150, 175]


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """``text`` as 16 kHz int16 samples (espeak-ng speaks at 22.05 kHz), silence trimmed to
    0.1 s at either end."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        rate, samples = wavfile.read(path)
    audio = resample_poly(samples.astype(np.float32), RATE, rate)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    pad = RATE // 10
    audio = audio[max(loud[0] - pad, 0) : loud[-1] + pad]
    return np.clip(np.round(audio), -32768, 32767).astype(np.int16)


def main(n: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    sentences = [" ".join(p) for p in itertools.product(VERBS, THINGS, PLACES)]
    rng.shuffle(sentences)
    HERE.mkdir(exist_ok=True)
    rows = []
    for i, text in enumerate(sentences[:n]):
        name = f"clip_{i:03d}.wav"
        wavfile.write(HERE / name, RATE, speak(text, VOICES[i % 4], SPEEDS[(i // 4) % 2]))
        rows.append({"file": name, "text": text})
    with open(HERE / "transcripts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "text"])
        writer.writeheader()
        writer.writerows(rows)
    size = sum(p.stat().st_size for p in HERE.iterdir())
    print(f"{len(rows)} clips, {size / 1e6:.2f} MB in {HERE}")


if __name__ == "__main__":
    main()
