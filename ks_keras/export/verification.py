"""Verification in a fresh process: an export against its Keras model (`verify_export`).

The export is reloaded by `python -m ks_keras.export.verify` (see that module) in a new
interpreter; `saved_model_cli show --all` runs beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import ks_keras
from ks_keras.export.metadata import (
    DEFAULT_SIGNATURE,
    EXPORT_FORMAT,
    FUNCTIONALS_INPUT,
    METADATA_FILE,
    WAVEFORM_SIGNATURE,
    _read_json,
    metadata_config,
    metadata_functionals,
)
from ks_keras.export.signatures import _logmel_graph_fn
from ks_keras.sequences import fit_length_np, normalize_np

# The program that reloads the export in the fresh process (not imported here).
VERIFY_MODULE = "ks_keras.export.verify"


@dataclass
class VerificationReport:
    """What `verify_export` compared and found."""

    path: str
    cases: list[dict] = field(default_factory=list)
    max_abs_diff: float = 0.0
    signatures: list[str] = field(default_factory=list)


def _random_case(
    metadata: dict,
    batch: int,
    rng: np.random.Generator,
    longer: bool = False,
    shorter: bool = False,
):
    """Random features/masks: `request` goes to the export, `reference` to the Keras model.

    By default both get the same arrays at the trained length. With `longer` the first sample
    runs 5 steps past the trained maximum (the export must crop, at the end, like training);
    with `shorter` the batch is padded only to its longest sample, which is shorter than the
    trained maximum (the export must pad).
    """
    request = {}
    for mod in metadata["modalities"]:
        dim, max_len = metadata["inputs"][mod]["dim"], metadata["inputs"][mod]["max_len"]
        if longer:
            lengths = rng.integers(1, max_len + 6, size=batch)
            lengths[0] = max_len + 5
        elif shorter:
            lengths = rng.integers(1, max(2, max_len), size=batch)
        else:
            lengths = rng.integers(1, max_len + 1, size=batch)
            lengths[0] = max_len
        t_req = int(lengths.max())
        x = rng.standard_normal((batch, t_req, dim)).astype("float32")
        mask = (np.arange(t_req)[None, :] < lengths[:, None]).astype("int32")
        x *= mask[:, :, None]
        request[mod], request[f"{mod}_mask"] = x, mask
    functionals = metadata_functionals(metadata)
    if functionals is not None:
        # Utterance-level values pass through the graph unchanged: both sides get the same.
        request[FUNCTIONALS_INPUT] = rng.standard_normal((batch, functionals["dim"])).astype(
            "float32"
        )
    return request, _fit_numpy(request, metadata)


def normalize_numpy(fixed: dict[str, np.ndarray], metadata: dict) -> dict[str, np.ndarray]:
    """Apply global normalisation (if any) to cropped/padded inputs, as the graph does."""
    norm = metadata.get("normalization")
    if norm is None or norm["mode"] != "global" or norm["modality"] not in fixed:
        return fixed
    m = norm["modality"]
    return {**fixed, m: normalize_np(fixed[m], fixed[f"{m}_mask"], norm["mean"], norm["std"])}


def _reference_probabilities(model, inputs: dict) -> np.ndarray:
    import keras

    logits = model(inputs, training=False)
    return np.asarray(
        keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.cast(logits, "float32"), axis=-1))
    )


def _saved_model_cli() -> list[str]:
    exe = Path(sys.executable).parent / "saved_model_cli"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("saved_model_cli")
    if found:
        return [found]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def verify_export(
    path: str | Path,
    model,
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-5,
    seed: int = 0,
    timeout: float = 600.0,
    check_cli: bool = True,
) -> VerificationReport:
    """Check an export against its Keras model in a fresh Python process.

    The export is loaded with `tf.saved_model.load` in a new interpreter (nothing cached from
    this one) and its signatures are called on random inputs at each batch size; the Keras
    model gets the same inputs. Also checked: inputs longer than the trained maximum give the
    Keras result on the cropped inputs, a batch padded only to its longest sample gives the
    result at the trained length, the `functionals` input (when the model has one) reaches
    the model unchanged, `serving_waveform` (when present) agrees with the Keras
    model on in-process log-mel features, and `saved_model_cli show --all` lists every
    signature with its named inputs and outputs.

    Args:
        path: the version folder (or a temporary folder before it is moved into place).
        model: the Keras model that was exported.
        batch_sizes: batch sizes compared at the trained length.
        atol: the largest absolute difference allowed on `probabilities`.
        seed: seed of the random inputs.
        timeout: seconds allowed for each subprocess.
        check_cli: also run `saved_model_cli show --all` (default on).

    Returns:
        A `VerificationReport`.

    Raises:
        ValueError: a difference above `atol`, a wrong `class_id`, a missing signature, or a
            subprocess that failed (its stderr tail is in the message).
    """
    path = Path(path)
    meta_path = path / "assets" / METADATA_FILE
    metadata = _read_json(meta_path) if meta_path.is_file() else None
    if metadata is None or metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a ks_keras export (no valid assets/{METADATA_FILE})")
    rng = np.random.default_rng(seed)
    cases, case_specs, references, arrays = _verification_cases(metadata, model, batch_sizes, rng)
    outputs, cli_out = _run_reload_and_cli(path, arrays, case_specs, timeout, check_cli)
    report = _compare_outputs(path, cases, case_specs, references, outputs, atol)
    if check_cli:
        report.signatures = _check_cli_listing(cli_out, metadata, path)
    return report


def _verification_cases(
    metadata: dict, model, batch_sizes: tuple[int, ...], rng: np.random.Generator
):
    """`(cases, case_specs, references, arrays)`: each case as `(kind, batch, request,
    reference)`, its signature and input names, the Keras model's probabilities, and every
    request array keyed `"<case index>/<input>"` for the reload check."""
    cases, references = [], []
    for batch in batch_sizes:
        cases.append(("default", batch, *_random_case(metadata, batch, rng)))
    top = max(batch_sizes)
    cases.append(("cropped", top, *_random_case(metadata, top, rng, longer=True)))
    cases.append(("padded", top, *_random_case(metadata, top, rng, shorter=True)))
    case_specs = [{"signature": DEFAULT_SIGNATURE, "inputs": sorted(c[2])} for c in cases]
    for _, _, _, reference in cases:
        references.append(_reference_probabilities(model, normalize_numpy(reference, metadata)))
    arrays = {f"{i}/{k}": v for i, c in enumerate(cases) for k, v in c[2].items()}

    if WAVEFORM_SIGNATURE in metadata["signatures"]:
        waveform_case = _waveform_case(metadata, top, rng)
        if waveform_case is not None:
            request, reference = waveform_case
            i = len(cases)
            cases.append(("waveform", top, request, reference))
            case_specs.append({"signature": WAVEFORM_SIGNATURE, "inputs": sorted(request)})
            references.append(_reference_probabilities(model, normalize_numpy(reference, metadata)))
            arrays.update({f"{i}/{k}": v for k, v in request.items()})
    return cases, case_specs, references, arrays


def _run_reload_and_cli(
    path: Path, arrays: dict, case_specs: list[dict], timeout: float, check_cli: bool
) -> tuple[dict[str, np.ndarray], str | None]:
    """The reload check's outputs, and the stdout of `saved_model_cli show --all` (None
    without `check_cli`)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryDirectory(prefix="ks_keras_verify_") as tmp:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_path, **arrays)
        Path(in_path + ".json").write_text(json.dumps(case_specs))
        # Both subprocesses import TensorFlow (seconds each): run them side by side.
        commands = {"load": [sys.executable, "-m", VERIFY_MODULE, str(path), in_path, out_path]}
        envs = {"load": _reload_env(env), "cli": env}
        if check_cli:
            commands["cli"] = [*_saved_model_cli(), "show", "--dir", str(path), "--all"]
        procs = {
            k: subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=envs[k]
            )
            for k, cmd in commands.items()
        }
        results = {}
        try:
            for key, proc in procs.items():
                what = "saved_model_cli show --all" if key == "cli" else "the reload check"
                results[key] = _communicate(proc, timeout, what)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        if procs["load"].returncode != 0:
            raise ValueError(
                f"{path}: reloading the export in a fresh process failed:\n"
                f"{_tail(results['load'][1])}"
            )
        if check_cli and procs["cli"].returncode != 0:
            raise ValueError(
                f"{path}: saved_model_cli show --all failed:\n{_tail(results['cli'][1])}"
            )
        outputs = dict(np.load(out_path))
    return outputs, results["cli"][0] if check_cli else None


def _compare_outputs(
    path: Path,
    cases: list[tuple],
    case_specs: list[dict],
    references: list[np.ndarray],
    outputs: dict[str, np.ndarray],
    atol: float,
) -> VerificationReport:
    """The report of every case; raises on a difference above `atol` or a wrong `class_id`."""
    report = VerificationReport(path=str(path))
    for i, ((kind, batch, _, _), expected) in enumerate(zip(cases, references)):
        got = outputs[f"{i}/probabilities"]
        class_id = outputs[f"{i}/class_id"]
        if got.shape != expected.shape:
            raise ValueError(
                f"{path}: {case_specs[i]['signature']} ({kind}, batch {batch}) returned "
                f"probabilities of shape {got.shape}, expected {expected.shape}"
            )
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= atol:
            raise ValueError(
                f"{path}: {case_specs[i]['signature']} ({kind}, batch {batch}) differs from "
                f"the Keras model by {diff:.3g} (allowed {atol:g})"
            )
        if not np.array_equal(class_id, np.argmax(got, axis=-1)):
            raise ValueError(f"{path}: class_id is not the argmax of probabilities ({kind})")
        report.cases.append(
            {
                "signature": case_specs[i]["signature"],
                "case": kind,
                "batch": batch,
                "max_abs_diff": diff,
            }
        )
        report.max_abs_diff = max(report.max_abs_diff, diff)
    return report


def _waveform_case(metadata: dict, batch: int, rng: np.random.Generator):
    """Random waveforms for `serving_waveform`; the reference runs log-mel in this process."""
    import tensorflow as tf

    cfg = metadata_config(metadata)
    logmel_tf = _logmel_graph_fn(cfg.features.audio)
    sr = metadata["sample_rate"]
    lengths = rng.integers(sr // 4, sr, size=batch).astype("int32")
    waves = np.zeros((batch, int(lengths.max())), "float32")
    for b, n in enumerate(lengths):
        waves[b, :n] = 0.1 * rng.standard_normal(n).astype("float32")
    feats, mask = logmel_tf(tf.constant(waves), tf.constant(lengths))
    request = {"waveform": waves, "waveform_length": lengths}
    features = {"audio": np.asarray(feats, "float32"), "audio_mask": np.asarray(mask, "int32")}
    # The other inputs (text, functionals) as in `serving_default`.
    others = [m for m in metadata["modalities"] if m != "audio"]
    other_req, _ = _random_case({**metadata, "modalities": others}, batch, rng)
    request.update(other_req)
    features.update(other_req)
    return request, _fit_numpy(features, metadata)


def _fit_numpy(inputs: dict, metadata: dict) -> dict:
    """numpy twin of `fit_length` for every modality in `inputs` (`functionals`, which has
    no time axis, passes unchanged)."""
    fixed = {}
    if FUNCTIONALS_INPUT in inputs:
        fixed[FUNCTIONALS_INPUT] = np.asarray(inputs[FUNCTIONALS_INPUT], "float32")
    for mod in metadata["modalities"]:
        if mod not in inputs:
            continue
        max_len = metadata["inputs"][mod]["max_len"]
        fixed[mod], fixed[f"{mod}_mask"] = fit_length_np(
            inputs[mod], inputs[f"{mod}_mask"], max_len
        )
    return fixed


def _reload_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the folder holding this process's `ks_keras` first on PYTHONPATH, so that the
    fresh process runs `ks_keras.export.verify` from the same checkout (a relative PYTHONPATH,
    another working directory or an editable install of another checkout could find another
    one); unchanged when `ks_keras` is installed in site-packages (found there anyway)."""
    root = Path(ks_keras.__file__).resolve().parent.parent
    site_dirs = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    if root in site_dirs:
        return env
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
    return {**env, "PYTHONPATH": os.pathsep.join([str(root), *paths])}


def _communicate(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{what} did not finish within {timeout:g} s") from None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _check_cli_listing(cli_out: str, metadata: dict, path: Path) -> list[str]:
    """`saved_model_cli show --all` lists each signature with its named inputs/outputs."""
    blocks = re.split(r"^signature_def\['", cli_out, flags=re.MULTILINE)
    listed = {}
    for block in blocks[1:]:
        name, _, body = block.partition("']")
        listed[name] = body
    for sig, spec in metadata["signatures"].items():
        if sig not in listed:
            raise ValueError(
                f"{path}: saved_model_cli show --all does not list signature {sig!r} "
                f"(lists {sorted(listed)})"
            )
        body = listed[sig]
        for kind in ("inputs", "outputs"):
            for tensor in spec[kind]:
                if f"{kind}['{tensor}']" not in body:
                    raise ValueError(
                        f"{path}: saved_model_cli lists no {kind[:-1]} {tensor!r} for "
                        f"signature {sig!r}"
                    )
    return sorted(s for s in listed if not s.startswith("__"))
