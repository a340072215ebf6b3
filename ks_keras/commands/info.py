"""`ks-keras info`: versions, devices, the strategy training would use, and model size."""

from __future__ import annotations

from ks_keras import runtime
from ks_keras.info import describe_strategy_choice, package_versions


def run_info(args) -> int:
    import tensorflow as tf

    from ks_keras.config import load_config

    print("ks_keras", __import__("ks_keras").__version__)
    for name, version in package_versions().items():
        print(f"  {name:24s} {version or '-'}")
    devices = tf.config.list_physical_devices()
    gpus = [d for d in devices if d.device_type == "GPU"]
    print("devices:")
    for d in devices:
        print(f"  {d.device_type:4s} {d.name}")
    print(f"strategy (train.strategy=auto): {describe_strategy_choice(len(gpus))}")
    print(f"built with CUDA: {tf.test.is_built_with_cuda()}")
    onednn = runtime.onednn_status()
    state = {True: "on", False: "off", None: "unknown"}[onednn["enabled"]]
    line = runtime.describe_onednn_state(state, onednn["source"], onednn["tensorflow_default"])
    print(f"oneDNN CPU kernels: {line}")

    if args.config or args.overrides:
        from ks_keras.model import build_model, count_trainable_params

        cfg = load_config(args.config, args.overrides)
        model = build_model(cfg)
        n = count_trainable_params(model)
        m = cfg.model
        print(
            f"model ({args.config or 'defaults'}): modalities={m.modalities} n_ccab={m.n_ccab} "
            f"sparsity={m.sparsity}"
        )
        print(f"trainable parameters: {n:,} ({n / 1e6:.1f} M)")
    return 0
