"""Signatures: input specs, the in-graph crop/pad and checks, and the serving functions
(`serving_default`, `serving_waveform`)."""

from __future__ import annotations

from ks_keras.config import Config, padding_invariant
from ks_keras.export.metadata import (
    DEFAULT_SIGNATURE,
    FUNCTIONALS_INPUT,
    WAVEFORM_SIGNATURE,
    metadata_config,
    metadata_functionals,
)
from ks_keras.sequences import fit_length, normalize_tf


def feature_input_specs(metadata: dict) -> dict:
    """`tf.TensorSpec`s of the `serving_default` inputs (dynamic batch and length)."""
    import tensorflow as tf

    specs = {}
    for mod in metadata["modalities"]:
        dim = metadata["inputs"][mod]["dim"]
        specs[mod] = tf.TensorSpec([None, None, dim], tf.float32, name=mod)
        specs[f"{mod}_mask"] = tf.TensorSpec([None, None], tf.int32, name=f"{mod}_mask")
    functionals = metadata_functionals(metadata)
    if functionals is not None:
        specs[FUNCTIONALS_INPUT] = tf.TensorSpec(
            [None, functionals["dim"]], tf.float32, name=FUNCTIONALS_INPUT
        )
    return specs


def waveform_input_specs(metadata: dict) -> dict:
    """`tf.TensorSpec`s of the `serving_waveform` inputs."""
    import tensorflow as tf

    specs = {
        "waveform": tf.TensorSpec([None, None], tf.float32, name="waveform"),
        "waveform_length": tf.TensorSpec([None], tf.int32, name="waveform_length"),
    }
    for name, spec in feature_input_specs(metadata).items():
        if not name.startswith("audio"):
            specs[name] = spec
    return specs


def waveform_signature_problem(cfg: Config) -> str | None:
    """Why `serving_waveform` cannot be exported for `cfg`, or None when it can.

    The built-in log-mel front-end runs in the graph, so raw audio can be served. Features
    normalised per speaker (`features.audio.normalize: speaker`) cannot be reproduced from
    one waveform alone, and openSMILE functionals (`features.functionals`) are not TensorFlow
    ops, so such models get `serving_default` only.
    """
    audio = cfg.features.audio
    if "audio" not in cfg.model.modalities:
        return "the model has no audio input"
    if audio.type != "logmel":
        return f"features.audio.type is {audio.type!r}; only the built-in log-mel runs in-graph"
    if cfg.model.functionals_dim:
        return (
            f"the model reads openSMILE functionals (features.functionals="
            f"{cfg.features.functionals!r}), which cannot run inside the graph; clients "
            "compute them from the audio file (ks-keras predict does)"
        )
    if audio.normalize == "speaker":
        return (
            "features.audio.normalize is 'speaker': each speaker's statistics come from that "
            "speaker's utterances and cannot be part of the graph"
        )
    return None


def _check_batch(inputs: dict, modalities: list[str]):
    """Graph-side shape (and `functionals` value) checks; TF Serving returns their messages
    to the client."""
    import tensorflow as tf

    checks = []
    if FUNCTIONALS_INPUT in inputs:
        functionals = inputs[FUNCTIONALS_INPUT]
        checks.append(
            tf.debugging.assert_equal(
                tf.reduce_all(tf.math.is_finite(functionals)),
                True,
                message="'functionals' holds NaN/inf (openSMILE gives NaN for audio that is "
                "too short); every value must be finite",
            )
        )
        if modalities:
            first = modalities[0]
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(functionals)[0],
                    tf.shape(inputs[first])[0],
                    message=f"'functionals' and '{first}' must have the same batch size",
                )
            )
    for mod in modalities:
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(inputs[mod])[:2],
                tf.shape(inputs[f"{mod}_mask"]),
                message=f"'{mod}' [batch, time, dim] and '{mod}_mask' [batch, time] must agree "
                "in batch size and length",
            )
        )
    if len(modalities) == 2:
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(inputs["audio"])[0],
                tf.shape(inputs["text"])[0],
                message="'audio' and 'text' must have the same batch size",
            )
        )
    return checks


def make_serving_functions(model, metadata: dict, audio_config=None) -> dict:
    """Serving functions keyed by signature name (`tf.function`s or plain Python functions,
    traced by the archive).

    Args:
        model: the Keras model (dict inputs, logits output).
        metadata: `build_metadata(...)` of that model.
        audio_config: `AudioFeatureConfig` of a log-mel front-end to also build
            `serving_waveform`; None for `serving_default` only.
    """
    import tensorflow as tf

    modalities = metadata["modalities"]
    max_len = {mod: metadata["inputs"][mod]["max_len"] for mod in modalities}
    crop = metadata.get("crop_to_longest")
    if crop is None:  # metadata written before the flag existed: decide from its config
        crop = "config" in metadata and padding_invariant(metadata_config(metadata).model)
    norm = metadata.get("normalization")
    if norm is not None and norm["mode"] == "global":
        norm_mean = tf.constant(norm["mean"], tf.float32)
        norm_std = tf.constant(norm["std"], tf.float32)

    def classify(inputs):
        checks = _check_batch(inputs, modalities)
        with tf.control_dependencies(checks):
            fixed = {}
            for mod in modalities:
                fixed[mod], fixed[f"{mod}_mask"] = fit_length(
                    inputs[mod], inputs[f"{mod}_mask"], max_len[mod], crop_to_longest=crop
                )
            if FUNCTIONALS_INPUT in inputs:
                # Utterance-level values, normalised (or not) by the client as in training.
                fixed[FUNCTIONALS_INPUT] = tf.identity(inputs[FUNCTIONALS_INPUT])
        if norm is not None and norm["mode"] == "global":
            # Training-set statistics, applied to real steps only (as ks_keras.data does).
            m = norm["modality"]
            fixed[m] = normalize_tf(fixed[m], fixed[f"{m}_mask"], norm_mean, norm_std)
        logits = model(fixed, training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        return {
            "probabilities": probabilities,
            "class_id": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        }

    # Traced once; `serving_waveform` calls this graph instead of tracing the model again.
    classify = tf.function(
        classify, input_signature=[feature_input_specs(metadata)], autograph=False
    )
    functions = {DEFAULT_SIGNATURE: classify}
    if audio_config is not None:
        logmel_tf = _logmel_graph_fn(audio_config)

        def classify_waveform(inputs):
            features, mask = logmel_tf(inputs["waveform"], inputs["waveform_length"])
            request = {k: v for k, v in inputs.items() if not k.startswith("waveform")}
            request["audio"] = tf.cast(features, tf.float32)
            request["audio_mask"] = tf.cast(mask, tf.int32)
            return classify(request)

        functions[WAVEFORM_SIGNATURE] = classify_waveform
    return functions


def _logmel_graph_fn(audio_config):
    """`(waveforms [B, N], lengths [B]) -> (features [B, T, n_mels], mask [B, T])` in-graph."""
    from ks_keras.features.logmel import LogMelExtractor

    return LogMelExtractor(audio_config).logmel_tf


def _signature_metadata(specs: dict, num_classes: int) -> dict:
    return {
        "inputs": {
            name: {"dtype": spec.dtype.name, "shape": [d for d in spec.shape.as_list()]}
            for name, spec in specs.items()
        },
        "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, num_classes]},
            "class_id": {"dtype": "int32", "shape": [None]},
        },
    }
