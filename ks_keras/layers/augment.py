"""Training-time augmentation of a feature sequence (SpecAugment-style masks, noise).

`FeatureAugment` sits right after a model input. In training it zeroes random spans of frames
(time masks) and random bands of feature dimensions (frequency masks) of each sample's real
frames, and adds Gaussian noise to them; outside training it is the identity, so evaluation,
`predict` and exported SavedModels never see it. With normalised features (the default
configs), zero is the feature mean, so a masked span looks like "average" rather than silence.
Draws come from a Keras `SeedGenerator`, so a run is reproducible under `keras.utils.set_random_seed`.
"""

from __future__ import annotations

import keras
from keras import ops

from ks_keras.layers.masks import check_sequence_mask


@keras.saving.register_keras_serializable(package="ks_keras")
class FeatureAugment(keras.layers.Layer):
    """Random time masks, frequency masks and noise on `[B, T, D]` features, in training only.

    Args:
        time_masks: spans of frames zeroed per sample.
        time_mask_frames: maximum width of each span (uniform in `[0, time_mask_frames]`,
            never longer than a fifth of the sample's real frames).
        freq_masks: bands of feature dimensions zeroed per sample.
        freq_mask_bins: maximum width of each band (uniform in `[0, freq_mask_bins]`).
        noise_std: standard deviation of Gaussian noise added to real frames.
        seed: seed of the layer's `SeedGenerator` (None: drawn from the global Keras seed).
        **kwargs: base layer arguments.

    Call args:
        inputs: `[B, T, D]`.
        padding_mask: `[B, T]`, 1 for real steps; padded steps stay exactly as they were.
        training: augmentation happens only when true.
    """

    def __init__(
        self,
        time_masks=0,
        time_mask_frames=0,
        freq_masks=0,
        freq_mask_bins=0,
        noise_std=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("time_masks", time_masks),
            ("time_mask_frames", time_mask_frames),
            ("freq_masks", freq_masks),
            ("freq_mask_bins", freq_mask_bins),
        ):
            if int(value) != value or value < 0:
                raise ValueError(f"FeatureAugment: {name} must be an integer >= 0, got {value!r}")
        if not noise_std >= 0:
            raise ValueError(f"FeatureAugment: noise_std must be >= 0, got {noise_std!r}")
        self.time_masks = int(time_masks)
        self.time_mask_frames = int(time_mask_frames)
        self.freq_masks = int(freq_masks)
        self.freq_mask_bins = int(freq_mask_bins)
        self.noise_std = float(noise_std)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="augment_seed")

    @property
    def active(self) -> bool:
        return bool(
            (self.time_masks and self.time_mask_frames)
            or (self.freq_masks and self.freq_mask_bins)
            or self.noise_std > 0
        )

    def call(self, inputs, padding_mask=None, training=None):
        if not training or not self.active:
            return inputs
        x = inputs
        shape = ops.shape(x)
        batch, steps, dim = shape[0], shape[1], shape[2]
        if padding_mask is None:
            real = ops.ones((batch, steps), "float32")
        else:
            check_sequence_mask(inputs, padding_mask, "padding_mask")
            real = ops.cast(padding_mask, "float32")
        length = ops.sum(real, axis=1, keepdims=True)  # [B, 1]
        keep = ops.ones((batch, steps), "float32")
        positions = ops.cast(ops.arange(steps), "float32")[None, :]
        for _ in range(self.time_masks if self.time_mask_frames else 0):
            limit = ops.minimum(float(self.time_mask_frames), ops.floor(length / 5.0))
            width = ops.floor(
                keras.random.uniform((batch, 1), seed=self.seed_generator) * (limit + 1.0)
            )
            start = ops.floor(
                keras.random.uniform((batch, 1), seed=self.seed_generator)
                * ops.maximum(length - width + 1.0, 1.0)
            )
            inside = ops.logical_and(positions >= start, positions < start + width)
            keep = keep * (1.0 - ops.cast(inside, "float32"))
        band_keep = ops.ones((batch, dim), "float32")
        bins = ops.cast(ops.arange(dim), "float32")[None, :]
        for _ in range(self.freq_masks if self.freq_mask_bins else 0):
            width = ops.floor(
                keras.random.uniform((batch, 1), seed=self.seed_generator)
                * (float(self.freq_mask_bins) + 1.0)
            )
            start = ops.floor(
                keras.random.uniform((batch, 1), seed=self.seed_generator)
                * ops.maximum(ops.cast(dim, "float32") - width + 1.0, 1.0)
            )
            inside = ops.logical_and(bins >= start, bins < start + width)
            band_keep = band_keep * (1.0 - ops.cast(inside, "float32"))
        # Only real frames change: padded ones keep their value (zeros from the pipeline).
        factor = 1.0 - real[:, :, None] * (1.0 - keep[:, :, None] * band_keep[:, None, :])
        out = ops.cast(x, "float32") * factor
        if self.noise_std > 0:
            noise = keras.random.normal(ops.shape(out), seed=self.seed_generator)
            out = out + self.noise_std * noise * real[:, :, None]
        return ops.cast(out, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, padding_mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "time_masks": self.time_masks,
                "time_mask_frames": self.time_mask_frames,
                "freq_masks": self.freq_masks,
                "freq_mask_bins": self.freq_mask_bins,
                "noise_std": self.noise_std,
                "seed": self.seed,
            }
        )
        return config
