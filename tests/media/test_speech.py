"""G.711 µ-law against table points and (where present) audioop; the shipped speech sample."""

from __future__ import annotations

import shutil
import warnings
import wave
from array import array
from pathlib import Path

import pytest

from nodes.speech import (
    DEFAULT_SAMPLE,
    generate,
    load_pcm,
    ulaw_decode,
    ulaw_decode_sample,
    ulaw_encode,
    ulaw_encode_sample,
)


@pytest.mark.parametrize(("sample", "code"), [
    (0, 0xFF),            # zero is the all-ones code
    (-1, 0x7E),           # smallest negative step: sign bit clear, segment 0
    (4 * 8159, 0x80),     # positive clip point (14-bit 8159)
    (32767, 0x80),        # beyond the clip: still the largest positive code
    (-4 * 8159, 0x00),    # negative clip point
    (-32768, 0x00),
    (4 * 30, 0xF0),       # top of segment 0 ...
    (4 * 31, 0xEF),       # ... and first value of segment 1
    (4 * 8031, 0x80),     # largest decoded magnitude lands in the top code
])
def test_encode_table_points(sample: int, code: int) -> None:
    assert ulaw_encode_sample(sample) == code


@pytest.mark.parametrize(("code", "sample"), [
    (0xFF, 0), (0x7F, 0), (0x80, 32124), (0x00, -32124), (0xF0, 120), (0xEF, 132),
])
def test_decode_table_points(code: int, sample: int) -> None:
    assert ulaw_decode_sample(code) == sample


def test_decode_encode_is_identity_on_codes() -> None:
    # every code except negative zero (0x7F) survives decode → encode
    for code in range(256):
        expect = 0xFF if code == 0x7F else code
        assert ulaw_encode_sample(ulaw_decode_sample(code)) == expect


def test_encode_is_monotonic() -> None:
    # larger input never decodes to a smaller value
    decoded = [ulaw_decode_sample(ulaw_encode_sample(v)) for v in range(-32768, 32768, 7)]
    assert decoded == sorted(decoded)


def test_buffer_functions_match_sample_functions() -> None:
    samples = [-32768, -1000, -1, 0, 1, 1000, 32767]
    pcm = array("h", samples).tobytes()
    codes = ulaw_encode(pcm)
    assert list(codes) == [ulaw_encode_sample(s) for s in samples]
    assert list(array("h", ulaw_decode(codes))) == [ulaw_decode_sample(c) for c in codes]


def test_matches_audioop_everywhere() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    pcm = array("h", range(-32768, 32768)).tobytes()
    assert ulaw_encode(pcm) == audioop.lin2ulaw(pcm, 2)
    codes = bytes(range(256))
    assert ulaw_decode(codes) == audioop.ulaw2lin(codes, 2)


@pytest.mark.parametrize(("value", "message"), [
    (32768, "not a signed 16-bit value"), (-32769, "not a signed 16-bit value"),
])
def test_encode_rejects_out_of_range(value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ulaw_encode_sample(value)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="is not a byte"):
        ulaw_decode_sample(256)
    with pytest.raises(ValueError, match="even length, got 3 bytes"):
        ulaw_encode(b"abc")


def test_shipped_sample() -> None:
    pcm = load_pcm(DEFAULT_SAMPLE)
    assert len(pcm) == 2 * 80000  # exactly 10 s: 500 frames of 160 samples
    assert max(abs(s) for s in array("h", pcm)) > 10000  # speech, not silence


def test_load_rejects_wrong_format(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(bytes(400))
    with pytest.raises(ValueError, match="need 8000 Hz mono 16-bit, got 16000 Hz, 2 channel"):
        load_pcm(path)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="not a PCM WAV file"):
        load_pcm(junk)


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")),
                    reason="espeak-ng and sox needed to regenerate the sample")
def test_generate(tmp_path: Path) -> None:
    out = generate(tmp_path / "s.wav", text="Hello from the lab.", seconds=2.0)
    pcm = load_pcm(out)
    assert len(pcm) == 2 * 16000
    assert max(abs(s) for s in array("h", pcm)) > 10000
