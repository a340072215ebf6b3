"""The reference side of `ks-keras bench --reference-dir`: a PyTorch model measured like ours.

The authors' PyTorch code has no licence, so nothing of it is copied here: the user points the
bench at their own checkout and this module imports it at run time, in a fresh child process
per measure (like every measure of the bench), never in the bench's parent process.
PyTorch is imported only here, inside those children.

Loader contract (`--reference-dir PATH --reference-entry MODULE:CALLABLE`):

1. The child puts PATH first on `sys.path` and imports MODULE (a dotted name, found under
   PATH or anywhere else on the path, e.g. an adapter module of your own on PYTHONPATH).
2. It calls `CALLABLE(**kwargs)` with the bench config's sizes, by keyword (lists in modality
   order, `model.modalities`: `[audio, text]` for the paper):

       input_dim=[512, 1024]        # feature widths (model.audio_dim, model.text_dim)
       ffn_embed_dim=[256, 512]     # FFN widths (model.audio_ffn_dim, model.text_ffn_dim)
       num_layers=[5, 3, 2]         # FEM layers, CCABs, DFM layers (n_fem, n_ccab, n_dfm)
       num_heads=8
       num_classes=4

   and expects a `torch.nn.Module`. Everything else (sparsity, dropout, head) is what the
   reference code itself fixes.
3. Its forward is called positionally with the inputs, then their padding masks:
   `model(audio, text, audio_padding_mask, text_padding_mask)`; `audio` is a float32
   `[B, 460, 512]` tensor, `text` `[B, 20, 1024]` (the config's lengths and widths), each
   padding mask a bool `[B, T]` tensor that is **True at padded steps** (PyTorch's
   `key_padding_mask` convention). A uni-modal config passes one input and one mask.
   It must return the logits, a `[B, num_classes]` tensor.

The default entry, `model.KS_transformer:build_ks_transformer`, is the model builder of the
authors' repository (github.com/HappyColor/Key-Sparse-Transformer, as of its last commit
`cda9685`), whose arguments and forward follow exactly this contract; checkouts from before
2022-10-08 (`ac85471`) name it `model.KS_transformer_model:build_ks_transformer_model`.
For any other code, write a small adapter module with a `build(**kwargs)` that returns a
module obeying point 3.

Protocol (the same as ours, from the same spec): the same synthetic inputs (same seeds,
shapes, padding), batch sizes, warm-up rule and repetitions (`bench._timed`); threads: the
bench's `--threads` for intra- and inter-op, else one per core this process may use
(TensorFlow's default); a training step is zero-grad, forward, cross-entropy, backward and a
`torch.optim.Adam` step (at `train.lr`); inference runs under `torch.inference_mode()` in
eval mode; latency is batch 1 on requests padded to the full length. The reference runs
eagerly, as its code is written; with a GPU (and `torch.cuda`) it runs there, under
`torch.autocast` when the headline precision is mixed. Peak memory is the child's VmHWM.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

DEFAULT_REFERENCE_ENTRY = "model.KS_transformer:build_ks_transformer"

# Shown by `ks-keras bench --help` (and `python -m ks_keras.bench --help`).
REFERENCE_HELP = """\
Side-by-side comparison with the authors' PyTorch code (measured in the same run):
  --reference-dir PATH points at a checkout of their code (not shipped: it has no licence).
  Each reference measure runs in a fresh child process that puts PATH first on sys.path,
  imports MODULE and calls CALLABLE (--reference-entry MODULE:CALLABLE, default
  model.KS_transformer:build_ks_transformer) with keyword arguments
    input_dim=[audio_dim, text_dim], ffn_embed_dim=[audio_ffn_dim, text_ffn_dim],
    num_layers=[n_fem, n_ccab, n_dfm], num_heads=H, num_classes=C
  (lists in model.modalities order) and expects a torch.nn.Module whose forward takes
  (audio, text, audio_padding_mask, text_padding_mask): float32 [B, T, D] inputs and bool
  [B, T] masks, True at padded steps; it returns logits [B, num_classes]. PyTorch is needed
  only then. Without --reference-dir the report has our absolute figures and this machine's
  CPU; stored figures from another machine are shown as information only (no ratios).
  See docs/performance.md."""


class ReferenceLoadError(ValueError):
    """The reference directory, module, callable, model or PyTorch is not what the contract
    expects (the message names the path or entry and what was expected)."""


def parse_entry(entry: str) -> tuple[str, str]:
    """`"package.module:callable"` → `("package.module", "callable")`.

    Raises:
        ReferenceLoadError: `entry` is not of that form.
    """
    module, sep, name = (entry or "").partition(":")
    if not sep or not module.strip() or not name.strip() or ":" in name:
        raise ReferenceLoadError(
            f"--reference-entry: expected MODULE:CALLABLE (e.g. {DEFAULT_REFERENCE_ENTRY}), "
            f"got {entry!r}"
        )
    return module.strip(), name.strip()


def check_reference_dir(path: str | Path) -> Path:
    """The absolute reference directory, or a `FileNotFoundError` naming it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--reference-dir {path}: no such directory (expected a checkout of the reference "
            "PyTorch code, e.g. the authors' Key-Sparse-Transformer repository)"
        )
    return folder.resolve()


def reference_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the reference builder gets, from a `ModelConfig` dict."""
    modalities = list(model["modalities"])
    return {
        "input_dim": [int(model[f"{m}_dim"]) for m in modalities],
        "ffn_embed_dim": [int(model[f"{m}_ffn_dim"]) for m in modalities],
        "num_layers": [int(model["n_fem"]), int(model["n_ccab"]), int(model["n_dfm"])],
        "num_heads": int(model["num_heads"]),
        "num_classes": int(model["num_classes"]),
    }


def import_torch():
    """`torch`, or a `ReferenceLoadError` saying the comparison needs it."""
    try:
        import torch
    except ImportError as e:
        raise ReferenceLoadError(
            f"--reference-dir needs PyTorch to run the reference model, and it cannot be "
            f"imported here ({type(e).__name__}: {e}); install it (CPU wheel: "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu) or run the "
            "bench without --reference-dir"
        ) from e
    return torch


def load_reference_model(path: str | Path, entry: str, kwargs: dict[str, Any]):
    """Build the reference model by the loader contract (module docstring).

    Args:
        path: the reference code's directory (put first on `sys.path`).
        entry: `MODULE:CALLABLE`.
        kwargs: the builder's keyword arguments (`reference_kwargs`).

    Returns:
        The `torch.nn.Module` the callable returns.

    Raises:
        FileNotFoundError: `path` is not a directory.
        ReferenceLoadError: PyTorch, the module or the callable is missing, or the callable
            fails or returns something else than a module.
    """
    folder = check_reference_dir(path)
    module_name, attr = parse_entry(entry)
    torch = import_torch()
    where = f"--reference-dir {path}, --reference-entry {entry}"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ReferenceLoadError(
                f"{where}: no module {module_name!r} (expected {module_name.replace('.', '/')}"
                f".py under {folder} or elsewhere on the Python path)"
            ) from e
        raise ReferenceLoadError(
            f"{where}: importing {module_name!r} failed: the reference code needs "
            f"{e.name!r}, which is not installed ({e})"
        ) from e
    except Exception as e:
        raise ReferenceLoadError(
            f"{where}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ReferenceLoadError(
            f"{where}: module {module_name!r} ({getattr(module, '__file__', None) or folder}) "
            f"has no callable {attr!r} (expected a function or class that takes "
            f"{', '.join(kwargs)} by keyword and returns a torch.nn.Module)"
        )
    try:
        model = builder(**kwargs)
    except Exception as e:
        raise ReferenceLoadError(
            f"{where}: {attr}(**{kwargs}) failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise ReferenceLoadError(
            f"{where}: {attr}(...) returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _forward_signature(modalities: list[str]) -> str:
    names = list(modalities) + [f"{m}_padding_mask" for m in modalities]
    return f"model({', '.join(names)})"


def _to_torch(torch, inputs: dict, labels, modalities: list[str], device: str):
    """Numpy batch (`bench.synthetic_batch`) → (positional forward args, labels) on `device`."""
    xs = [torch.from_numpy(inputs[m]).to(device) for m in modalities]
    # Our masks are 1 at real steps; the reference convention is True at padded steps.
    pads = [torch.from_numpy(inputs[f"{m}_mask"] == 0).to(device) for m in modalities]
    return [*xs, *pads], torch.from_numpy(labels.astype("int64")).to(device)


def _check_forward(torch, model, spec, modalities, device) -> dict[str, Any]:
    """The `load` measure: one forward on 2 samples must give `[2, num_classes]` logits."""
    from ks_keras import bench

    ref, m = spec["reference"], spec["model"]
    x, y = _to_torch(torch, *bench.synthetic_batch(spec, 2, 0), modalities, device)
    model.eval()
    call = _forward_signature(modalities)
    try:
        with torch.inference_mode():
            out = model(*x)
    except Exception as e:
        raise ReferenceLoadError(
            f"--reference-dir {ref['dir']}, --reference-entry {ref['entry']}: calling the "
            f"model as {call} (float32 inputs, bool masks True at padded steps) failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    expected = (2, int(m["num_classes"]))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ReferenceLoadError(
            f"--reference-dir {ref['dir']}, --reference-entry {ref['entry']}: {call} "
            f"should return logits of shape {list(expected)}, got {got}"
        )
    return {"peak_rss_gib": round(bench._peak_rss_gib(), 3)}


def _reference_step(torch, model, measure, next_batch, autocast, amp_dtype, device, spec):
    """The timed step of a `train`, `infer` or `latency` measure (waits for its result)."""
    if measure == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.get("lr", 5e-4))
        loss_fn = torch.nn.CrossEntropyLoss()
        scaler = torch.amp.GradScaler(device) if amp_dtype is torch.float16 else None

        def step():
            x, y = next_batch()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(*x).float(), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            value = float(loss)  # waits for the step, as `train_on_batch` does
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite reference training loss {value}")

    elif measure in ("infer", "latency"):
        model.eval()

        def step():
            x, _ = next_batch()
            with torch.inference_mode(), autocast():
                out = model(*x)
            out.float().cpu().numpy()  # waits for the result, as `predict_on_batch` does

    else:
        raise ValueError(f"unknown reference measure {measure!r}")
    return step


def measure_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """One reference measure in this (child) process: `spec["measure"]` is `load` (build,
    count parameters, check one forward against the contract), `train`, `infer` or `latency`.
    """
    from ks_keras import bench

    torch = import_torch()
    threads = spec.get("threads") or bench._cores()
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(int(threads))
    except RuntimeError:  # already set (only possible if something ran parallel work first)
        pass
    torch.manual_seed(int(spec.get("seed", 0)))

    ref, m = spec["reference"], spec["model"]
    modalities = list(m["modalities"])
    kwargs = reference_kwargs(m)
    model = load_reference_model(ref["dir"], ref["entry"], kwargs)
    device = "cuda" if ref.get("gpu") and torch.cuda.is_available() else "cpu"
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "trainable_params": int(n_params),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device,
        "module_file": getattr(sys.modules.get(parse_entry(ref["entry"])[0]), "__file__", None),
        "kwargs": kwargs,
    }

    policy = spec.get("precision", "float32")
    amp_dtype = {"mixed_float16": torch.float16, "mixed_bfloat16": torch.bfloat16}.get(policy)

    def autocast():
        if amp_dtype is None:
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=amp_dtype)

    measure = spec["measure"]
    if measure == "load":
        return {**info, **_check_forward(torch, model, spec, modalities, device)}

    batch = spec["batch"]
    batches = [
        _to_torch(torch, *bench.synthetic_batch(spec, batch, seed), modalities, device)
        for seed in range(spec.get("distinct", 3))
    ]
    counter = [0]

    def next_batch():
        counter[0] += 1
        return batches[counter[0] % len(batches)]

    step = _reference_step(torch, model, measure, next_batch, autocast, amp_dtype, device, spec)
    timing = bench._timed(step, spec["warmup"], spec["max_warmup"], spec["repeats"])
    return {
        **timing,
        **info,
        "samples_per_s": batch / timing["median_s"],
        "peak_rss_gib": round(bench._peak_rss_gib(), 3),
    }
