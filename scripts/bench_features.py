#!/usr/bin/env python
"""Benchmark feature extraction and the training input pipeline on the shipped EmoDB.

Measures, on this machine:

1. audio decoding (soundfile + soxr): utterances/s;
2. log-mel (`features.audio`): utterances/s and real-time factor (compute time / audio time),
   after one warm-up batch (the tf.function trace is reported separately);
3. the text encoder (`features.text`, default the offline MiniLM): model load time and
   utterances/s over every transcript (no de-duplication here, so it is the per-utterance
   cost a corpus with distinct transcripts pays);
4. `extract_corpus` end to end into a temporary cache (what `ks-keras features` does; it
   encodes each distinct transcript once);
5. the tf.data pipeline (`make_dataset`, shuffled, batch `train.batch_size`): batches/s on the
   first epoch (reads the TFRecords) and on later epochs (cached);
6. the model's training step (`build_model` + Adam, one batch repeated): steps/s.

The pipeline is not the bottleneck when its batches/s exceeds the model's steps/s; the script
prints the ratio.

Usage:

```bash
python scripts/bench_features.py                       # configs/emodb_demo.yaml
python scripts/bench_features.py --config configs/emodb_demo.yaml --set data.labels=[] \
    --model-steps 20 --json bench_features.json
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "emodb_demo.yaml"))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override (repeatable)",
    )
    parser.add_argument("--skip-text", action="store_true", help="no text encoder benchmark")
    parser.add_argument(
        "--model-steps", type=int, default=10, help="timed training steps (0 = skip the model)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from ks_keras.audio import load_audio
    from ks_keras.config import load_config
    from ks_keras.corpora import load_corpus
    from ks_keras.data import compute_norm_stats, make_dataset
    from ks_keras.features import get_audio_extractor, get_text_extractor
    from ks_keras.features.cache import extract_corpus

    cfg = load_config(args.config, args.overrides)
    corpus = load_corpus(cfg.data)
    results: dict[str, dict] = {
        "setup": {
            "config": args.config,
            "overrides": args.overrides,
            "utterances": len(corpus),
            "cpu_count": os.cpu_count(),
            "tensorflow": tf.__version__,
        }
    }
    n = len(corpus)
    print(f"{corpus!r}")

    a = cfg.features.audio
    waves, t_load = timed(
        lambda: [load_audio(u.path, a.sample_rate, a.min_seconds) for u in corpus.utterances]
    )
    audio_seconds = sum(len(w) for w in waves) / a.sample_rate
    results["decode"] = {"seconds": t_load, "utt_per_s": n / t_load, "audio_seconds": audio_seconds}
    print(
        f"decode   {n} files, {audio_seconds / 60:.1f} min of audio: {t_load:.2f} s "
        f"({n / t_load:.0f} utt/s)"
    )

    if a.type == "logmel":
        ext = get_audio_extractor(a)
        _, t_trace = timed(lambda: ext.extract(waves[: ext.batch_size]))
        _, t_mel = timed(lambda: ext.extract(waves))
        results["logmel"] = {
            "seconds": t_mel,
            "first_batch_seconds": t_trace,
            "utt_per_s": n / t_mel,
            "real_time_factor": t_mel / audio_seconds,
        }
        print(
            f"log-mel  {t_mel:.2f} s ({n / t_mel:.0f} utt/s, real-time factor "
            f"{t_mel / audio_seconds:.5f} = {audio_seconds / t_mel:.0f}× real time); first "
            f"batch incl. tracing {t_trace:.2f} s"
        )

    if not args.skip_text and "text" in cfg.model.modalities:
        text = get_text_extractor(cfg.features.text)
        _, t_model = timed(text._load)
        texts = [u.text for u in corpus.utterances]
        text.extract(texts[:2])  # warm-up
        _, t_text = timed(lambda: text.extract(texts))
        results["text"] = {
            "name": text.name,
            "load_seconds": t_model,
            "seconds": t_text,
            "utt_per_s": n / t_text,
            "distinct_texts": len(set(texts)),
        }
        print(
            f"text     {text.name}: load {t_model:.2f} s, {n} transcripts {t_text:.2f} s "
            f"({n / t_text:.0f} utt/s; {len(set(texts))} distinct)"
        )

    with tempfile.TemporaryDirectory(prefix="ks_bench_features_") as tmp:
        run_cfg = replace(cfg, features=replace(cfg.features, cache_dir=str(Path(tmp) / "c")))
        cache, t_cache = timed(lambda: extract_corpus(run_cfg, corpus, progress=False))
        results["extract_corpus"] = {"seconds": t_cache, "utt_per_s": n / t_cache}
        print(
            f"cache    extract_corpus (all modalities, shards, metadata): {t_cache:.2f} s "
            f"({n / t_cache:.0f} utt/s)"
        )

        ids, labels = corpus.ids, corpus.label_ids()
        mode = cfg.features.audio.normalize
        normalizer = (
            compute_norm_stats(cache, ids, mode, corpus.speaker_of())
            if mode != "none" and "audio" in cache.modalities
            else None
        )
        batch = cfg.train.batch_size
        ds = make_dataset(
            cache,
            ids,
            labels,
            cfg.data,
            batch,
            shuffle=True,
            seed=0,
            modalities=cfg.model.modalities,
            normalizer=normalizer,
            speaker_of=corpus.speaker_of(),
            drop_remainder=True,
        )
        epochs = []
        for _ in range(3):
            count, t_epoch = timed(lambda: sum(1 for _ in ds))
            epochs.append(count / t_epoch)
        results["pipeline"] = {
            "batch_size": batch,
            "batches_per_s_first_epoch": epochs[0],
            "batches_per_s_cached": float(np.median(epochs[1:])),
        }
        print(
            f"pipeline batch {batch}: {epochs[0]:.0f} batches/s first epoch (TFRecords), "
            f"{np.median(epochs[1:]):.0f} batches/s cached"
        )

        if args.model_steps > 0:
            import keras

            from ks_keras.model import build_model

            model = build_model(cfg)
            model.compile(
                optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=cfg.train.jit_compile,
            )
            inputs, y = next(iter(ds))
            for _ in range(2):
                model.train_on_batch(inputs, y)  # build + trace
            _, t_steps = timed(
                lambda: [model.train_on_batch(inputs, y) for _ in range(args.model_steps)]
            )
            steps = args.model_steps / t_steps
            ratio = results["pipeline"]["batches_per_s_first_epoch"] / steps
            results["model"] = {"steps_per_s": steps, "pipeline_over_model": ratio}
            verdict = "not the bottleneck" if ratio > 1 else "THE BOTTLENECK"
            print(
                f"model    {steps:.2f} train steps/s → the input pipeline (first epoch) is "
                f"{ratio:.0f}× faster: {verdict}"
            )

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
