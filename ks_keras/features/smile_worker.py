"""openSMILE low-level descriptors in a child process (no TensorFlow here).

openSMILE's native library corrupts the heap when it is loaded after TensorFlow in the same
process ("malloc(): invalid size"), so `OpenSmileLLDExtractor` runs it here:

    python -m ks_keras.features.smile_worker <egemaps|compare> <sample_rate>

Protocol on stdin/stdout, one request at a time: the parent sends an 8-byte little-endian
length and then a `.npy` float32 waveform; the worker answers with a status byte (`0` ok,
`1` error), an 8-byte length and then either a `.npy` float64 array `[T, 2 + D]` (frame
start and end in seconds, then the D descriptors) or a UTF-8 error message. A zero length
request ends the worker.
"""

from __future__ import annotations

import io
import struct
import sys

import numpy as np

FEATURE_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}


def read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError(f"stream closed with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send(stream, status: int, payload: bytes) -> None:
    stream.write(struct.pack("<BQ", status, len(payload)))
    stream.write(payload)
    stream.flush()


def make_smile(feature_set: str):
    import opensmile

    return opensmile.Smile(
        feature_set=getattr(opensmile.FeatureSet, FEATURE_SETS[feature_set]),
        feature_level=opensmile.FeatureLevel.LowLevelDescriptors,
    )


def descriptors(smile, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """`[T, 2 + D]` float64: frame start/end in seconds, then the LLDs."""
    frame = smile.process_signal(wave, sample_rate)
    starts = frame.index.get_level_values("start").total_seconds().to_numpy()
    ends = frame.index.get_level_values("end").total_seconds().to_numpy()
    values = frame.to_numpy(dtype=np.float64)
    return np.concatenate([starts[:, None], ends[:, None], values], axis=1)


def serve(feature_set: str, sample_rate: int, stdin=None, stdout=None) -> None:
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    smile = make_smile(feature_set)
    while True:
        (length,) = struct.unpack("<Q", read_exact(stdin, 8))
        if length == 0:
            return
        wave = np.load(io.BytesIO(read_exact(stdin, length)), allow_pickle=False)
        try:
            out = descriptors(smile, np.asarray(wave, np.float32), sample_rate)
        except Exception as e:  # reported to the parent, which names the utterance
            send(stdout, 1, f"{type(e).__name__}: {e}".encode())
            continue
        buffer = io.BytesIO()
        np.save(buffer, out, allow_pickle=False)
        send(stdout, 0, buffer.getvalue())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in FEATURE_SETS:
        sys.exit("usage: python -m ks_keras.features.smile_worker {egemaps|compare} RATE")
    serve(sys.argv[1], int(sys.argv[2]))
