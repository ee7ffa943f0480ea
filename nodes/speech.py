"""Speech for the voice streams: G.711 µ-law (PCMU) and the lab's speech sample.

µ-law follows ITU-T G.711 as in the classic Sun reference code: the 16-bit sample is reduced
to 14 bits, clipped at ±8159, biased by 33 and coded as sign, 3-bit segment and 4-bit
mantissa, all bits inverted (so 0 → 0xFF). Decoding returns 16-bit values (±32124 at most).

`TimelineWav` writes received speech at sample positions (holes read back as silence).

The sample is `media/speech_8k.wav` (8 kHz mono 16-bit, 10 s), shipped so the lab runs
without espeak-ng; `python -m nodes.speech generate` rebuilds it with espeak-ng and sox.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import wave
from array import array
from functools import cache
from pathlib import Path

SAMPLE_RATE = 8000
MEDIA_DIR = Path(__file__).resolve().parent.parent / "media"
DEFAULT_SAMPLE = MEDIA_DIR / "speech_8k.wav"
DEFAULT_TEXT = (
    "This is terminal A one, calling terminal B one over the secure data channel. "
    "The call may move to another link, another terminal, or to video."
)

_BIAS = 0x21  # in 14-bit units (0x84 in 16-bit units)
_CLIP = 8159
_SEG_END = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)


def ulaw_encode_sample(sample: int) -> int:
    """One signed 16-bit sample → one µ-law byte."""
    if not -32768 <= sample <= 32767:
        raise ValueError(f"sample {sample} is not a signed 16-bit value")
    pcm = sample >> 2  # 14-bit linear, as G.711 defines it
    mask = 0xFF
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    pcm = min(pcm, _CLIP) + _BIAS
    for seg, end in enumerate(_SEG_END):
        if pcm <= end:
            return ((seg << 4) | ((pcm >> (seg + 1)) & 0x0F)) ^ mask
    return 0x7F ^ mask  # unreachable after clipping; kept for clarity


def ulaw_decode_sample(code: int) -> int:
    """One µ-law byte → one signed 16-bit sample."""
    if not 0 <= code <= 0xFF:
        raise ValueError(f"µ-law code {code} is not a byte")
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


@cache
def _encode_table() -> bytes:
    # indexed by the sample as an unsigned 16-bit value
    return bytes(ulaw_encode_sample(v - 65536 if v >= 32768 else v) for v in range(65536))


@cache
def _decode_table() -> tuple[bytes, ...]:
    return tuple(array("h", [ulaw_decode_sample(c)]).tobytes() for c in range(256))


def _native(pcm: bytes, kind: str) -> array:
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even length, got {len(pcm)} bytes")
    samples = array(kind, pcm)
    if sys.byteorder == "big":  # WAV and this API are little-endian
        samples.byteswap()
    return samples


def ulaw_encode(pcm: bytes) -> bytes:
    """Little-endian signed 16-bit PCM → µ-law bytes."""
    table = _encode_table()
    return bytes(table[v] for v in _native(pcm, "H"))


def ulaw_decode(data: bytes) -> bytes:
    """µ-law bytes → little-endian signed 16-bit PCM."""
    table = _decode_table()
    out = b"".join(table[c] for c in data)
    if sys.byteorder == "big":
        samples = array("h", out)
        samples.byteswap()
        out = samples.tobytes()
    return out


def load_pcm(path: str | Path = DEFAULT_SAMPLE) -> bytes:
    """The samples of an 8 kHz mono 16-bit WAV file (little-endian bytes)."""
    try:
        with wave.open(str(path), "rb") as wav:
            params = (wav.getframerate(), wav.getnchannels(), wav.getsampwidth())
            if params != (SAMPLE_RATE, 1, 2):
                raise ValueError(
                    f"{path}: need 8000 Hz mono 16-bit, got {params[0]} Hz, "
                    f"{params[1]} channel(s), {8 * params[2]}-bit")
            pcm = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file: {exc}") from None
    if not pcm:
        raise ValueError(f"{path}: WAV file has no samples")
    return pcm


_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


def _wav_header(data_bytes: int) -> bytes:
    return _WAV_HEADER.pack(b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1, SAMPLE_RATE,
                            2 * SAMPLE_RATE, 2, 16, b"data", data_bytes)


class TimelineWav:
    """8 kHz mono 16-bit WAV written at arbitrary sample positions.

    Writes go straight to their place in the file; positions never written (lost packets)
    are file holes and read back as zeros, i.e. silence. The header is refreshed at most
    once a second and on close, so a killed receiver leaves a playable file.
    """

    HEADER_EVERY_S = 1.0

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "w+b")  # noqa: SIM115 — lives as long as the stream
        self._file.write(_wav_header(0))
        self.samples = 0  # length: one past the last sample written
        self._header_at = time.monotonic()
        self._dirty = False

    def write(self, position: int, pcm: bytes) -> None:
        """Write little-endian 16-bit `pcm` starting at sample `position` (≥ 0)."""
        if position < 0:
            raise ValueError(f"WAV position {position} before the start")
        if len(pcm) % 2:
            raise ValueError(f"16-bit PCM must have an even length, got {len(pcm)} bytes")
        self._file.seek(_WAV_HEADER.size + 2 * position)
        self._file.write(pcm)
        end = position + len(pcm) // 2
        if end > self.samples:
            self.samples, self._dirty = end, True
        if self._dirty and time.monotonic() - self._header_at >= self.HEADER_EVERY_S:
            self._write_header()

    def _write_header(self) -> None:
        self._file.seek(0)
        self._file.write(_wav_header(2 * self.samples))
        self._file.flush()
        self._header_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self._file.closed:
            return
        self._write_header()
        # a trailing hole is not possible (the last write ends the file), but be exact
        self._file.truncate(_WAV_HEADER.size + 2 * self.samples)
        self._file.close()


def generate(path: str | Path = DEFAULT_SAMPLE, text: str = DEFAULT_TEXT,
             seconds: float = 10.0, voice: str = "en-us") -> Path:
    """Speak `text` with espeak-ng, resample with sox to 8 kHz mono 16-bit, exactly
    `seconds` long (trimmed or padded with silence), normalised to -3 dBFS."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: install it (scripts/setup.sh) "
                               "or use the shipped media/speech_8k.wav")
    if not 0 < seconds <= 600:
        raise ValueError(f"seconds must be in (0, 600], got {seconds}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text],
                       check=True, capture_output=True)
        subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
                        "-e", "signed-integer", str(out), "norm", "-3",
                        "pad", "0", str(seconds), "trim", "0", str(seconds)],
                       check=True, capture_output=True)
    load_pcm(out)  # fail here, not in the lab, if the result is unusable
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.speech",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="(re)build the speech sample with espeak-ng + sox")
    gen.add_argument("--out", default=str(DEFAULT_SAMPLE))
    gen.add_argument("--seconds", type=float, default=10.0)
    gen.add_argument("--text", default=DEFAULT_TEXT)
    gen.add_argument("--voice", default="en-us")
    args = parser.parse_args(argv)
    try:
        out = generate(args.out, args.text, args.seconds, args.voice)
    except (RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {len(load_pcm(out)) // 2} samples at {SAMPLE_RATE} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
