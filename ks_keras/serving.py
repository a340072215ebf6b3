"""Clients for a TF Serving model server: REST (port 8501) and gRPC (port 8500).

The server itself runs from the `tensorflow/serving` Docker image (see `docs/serving.md`); the
binary is not installable on machines without Docker. This module builds requests in the
documented formats and reads the answers:

- REST: `POST /v1/models/<name>[/versions/<v>]:predict` with the columnar JSON body
  `{"signature_name": "serving_default", "inputs": {"audio": [[[...]]], "audio_mask": ..., ...}}`;
  the answer is `{"outputs": {"probabilities": [[...]], "class_id": [...]}}` (or
  `{"error": "..."}` with an HTTP error status).
- gRPC: `tensorflow_serving.apis.predict_pb2.PredictRequest` with `model_spec` (name,
  signature, optional version) and one `TensorProto` per named input
  (`tf.make_tensor_proto`), sent with `PredictionServiceStub.Predict`.

Turning audio files and transcripts into the request uses the export's own metadata (a local
copy of `saved_models/<name>/<version>/assets/ks_keras.json`): the same extractors, checks and
crop/pad rule as `ks-keras predict` (`ks_keras.predict.RequestFeaturizer`). A model with an
openSMILE functionals input also gets `"functionals": [[...D values...], ...]` (`[B, D]`
float32, no mask), computed and (per speaker, where the model was trained so) normalised on
the client: openSMILE cannot run inside TF Serving.

Example:

```python
predictor = serving_predictor("saved_models/ks_keras", rest_url="http://localhost:8501")
[p] = predictor.predict_files(["a.wav"], ["I can't believe it"])

# or lower level, with ready inputs (plus "functionals": f [B, D] if the export has that input)
client = RestClient("http://localhost:8501", "ks_keras", version=1)
client.predict({"audio": a, "audio_mask": am, "text": t, "text_mask": tm})
```
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.export import (
    DEFAULT_SIGNATURE,
    OUTPUT_NAMES,
    WAVEFORM_SIGNATURE,
    check_request,
    load_export_metadata,
)
from ks_keras.predict import Predictor, check_probabilities, request_config

REST_URL = "http://localhost:8501"
GRPC_TARGET = "localhost:8500"
# Features of a batch can be tens of MB (paper size: 32 × 460 × 512 float32 ≈ 30 MB); gRPC's
# client default is 4 MB. TF Serving's server accepts messages up to 2 GB.
GRPC_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
_OUTPUT_DTYPES = {"probabilities": np.float32, "class_id": np.int32}
# Seconds a whole request may take (connect, send, wait, read), unless given.
DEFAULT_TIMEOUT = 60.0


class ServingError(ValueError):
    """The server could not be reached or rejected the request (message says which)."""


def _signature_inputs(metadata: dict | None, signature: str) -> dict | None:
    if metadata is None:
        return None
    try:
        return metadata["signatures"][signature]["inputs"]
    except KeyError:
        raise ValueError(
            f"the export has no signature {signature!r} (has "
            f"{sorted(metadata.get('signatures', {}))})"
        ) from None


def _typed_inputs(inputs: dict[str, Any], specs: dict | None, where: str) -> dict[str, np.ndarray]:
    """Inputs as numpy arrays of the signature's dtypes, checked against its specs."""
    if specs is None:
        return {k: np.asarray(v) for k, v in inputs.items()}
    check_request(inputs, specs, where)
    return {k: np.asarray(inputs[k], dtype=specs[k]["dtype"]) for k in specs}


def check_timeout(timeout: Any) -> float:
    """`timeout` as float seconds > 0 (the deadline of a whole request)."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"timeout: expected a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _check_outputs(
    outputs: dict[str, Any],
    where: str,
    labels: list[str] | None = None,
    batch: int | None = None,
) -> dict[str, np.ndarray]:
    """The answer's outputs as arrays, checked: shapes, and with `labels` (the export's
    labels.txt / metadata) and `batch` (the request's size) one probability row per item and
    label, finite, each a distribution, `class_id` its arg-max."""
    missing = [k for k in OUTPUT_NAMES if k not in outputs]
    if missing:
        raise ServingError(
            f"{where}: the answer has no output(s) {missing} (got "
            f"{sorted(outputs)}); is this model a ks_keras export?"
        )
    out = {}
    for k in OUTPUT_NAMES:
        try:
            out[k] = np.asarray(outputs[k], dtype=_OUTPUT_DTYPES[k])
        except (ValueError, TypeError) as e:
            raise ServingError(f"{where}: output {k!r} is not a numeric array ({e})") from None
    probs, ids = out["probabilities"], out["class_id"]
    if probs.ndim != 2 or ids.shape != probs.shape[:1]:
        raise ServingError(
            f"{where}: unexpected output shapes probabilities {probs.shape}, class_id {ids.shape}"
        )
    if labels is not None:
        try:
            check_probabilities(probs, labels, probs.shape[0] if batch is None else batch, where)
        except ValueError as e:
            raise ServingError(str(e)) from None
        top = probs[np.arange(len(ids)), np.clip(ids, 0, len(labels) - 1)]
        if ((ids < 0) | (ids >= len(labels))).any() or (top < probs.max(axis=1) - 1e-6).any():
            raise ServingError(
                f"{where}: class_id {ids.tolist()[:10]} is not the most probable class of each "
                f"item ({probs.argmax(axis=1).tolist()[:10]}); is this the model these "
                f"labels {labels} belong to?"
            )
    return out


# ---------------------------------------------------------------------------------------------
# REST.


def rest_predict_url(base_url: str, model_name: str, version: int | None = None) -> str:
    """`<base_url>/v1/models/<name>[/versions/<v>]:predict`."""
    if not model_name:
        raise ValueError("model_name: required (TF Serving's MODEL_NAME)")
    url = f"{base_url.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{int(version)}"
    return url + ":predict"


def rest_request_body(
    inputs: dict[str, Any], signature_name: str = DEFAULT_SIGNATURE, metadata: dict | None = None
) -> dict[str, Any]:
    """The columnar ("inputs") JSON body of a TF Serving REST predict request.

    Args:
        inputs: named arrays (batch first), e.g. from `RequestFeaturizer.inputs`.
        signature_name: `serving_default` or `serving_waveform`.
        metadata: export metadata; when given, names/shapes/dtypes are checked and cast.
    """
    typed = _typed_inputs(
        inputs, _signature_inputs(metadata, signature_name), f"REST request [{signature_name}]"
    )
    return {"signature_name": signature_name, "inputs": {k: v.tolist() for k, v in typed.items()}}


def parse_rest_response(
    body: Any,
    where: str = "TF Serving",
    labels: list[str] | None = None,
    batch: int | None = None,
) -> dict[str, np.ndarray]:
    """`probabilities` and `class_id` arrays from a REST predict answer (columnar format).

    With `labels` and `batch` the answer must hold one probability distribution over the
    labels per request item (see `_check_outputs`); otherwise only the shapes are checked.
    """
    if not isinstance(body, dict):
        raise ServingError(f"{where}: expected a JSON object, got {type(body).__name__}")
    if "error" in body:
        raise ServingError(f"{where}: {body['error']}")
    outputs = body.get("outputs")
    if not isinstance(outputs, dict):
        raise ServingError(
            f"{where}: expected {{'outputs': {{...}}}} with named outputs, got keys {sorted(body)}"
        )
    return _check_outputs(outputs, where, labels, batch)


def _labels(metadata: dict | None) -> list[str] | None:
    return None if metadata is None else list(metadata["labels"])


def _batch_size(inputs: dict[str, Any]) -> int | None:
    return len(next(iter(inputs.values()))) if inputs else None


class RestClient:
    """TF Serving REST client.

    Args:
        url: server base URL, e.g. `http://localhost:8501`.
        model_name: the served model's name (`MODEL_NAME` / models.config `name`).
        version: a specific version, or None for the server's latest.
        timeout: deadline in seconds for a whole request (connect, send, wait, read): a
            server that trickles its answer cannot hold the client for longer.
        metadata: export metadata used to check requests and answers (optional): the
            answer must hold one probability distribution over its labels per item.
    """

    def __init__(
        self,
        url: str = REST_URL,
        model_name: str = "ks_keras",
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: dict | None = None,
    ):
        self.url = url
        self.model_name = model_name
        self.version = version
        self.timeout = check_timeout(timeout)
        self.metadata = metadata
        self.predict_url = rest_predict_url(url, model_name, version)
        parts = urllib.parse.urlsplit(self.predict_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"REST URL {url!r}: expected http://host:port (e.g. {REST_URL})")

    def __repr__(self) -> str:
        return f"RestClient({self.predict_url})"

    def predict(
        self, inputs: dict[str, Any], signature_name: str = DEFAULT_SIGNATURE
    ) -> dict[str, np.ndarray]:
        """POST one batch; returns `probabilities` `[B, C]` and `class_id` `[B]`."""
        body = json.dumps(rest_request_body(inputs, signature_name, self.metadata)).encode()
        status, raw = self._post(body)
        if status != 200:
            detail = raw.decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            raise ServingError(
                f"TF Serving at {self.predict_url} answered HTTP {status}: {detail}"
            ) from None
        try:
            answer = json.loads(raw)
        except ValueError:  # not JSON, or not even UTF-8
            raise ServingError(
                f"{self.predict_url}: the answer is not JSON: {raw[:200]!r}"
            ) from None
        return parse_rest_response(
            answer, self.predict_url, _labels(self.metadata), _batch_size(inputs)
        )

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """POST `body`; `(HTTP status, answer bytes)` within the deadline `self.timeout`.

        The exchange runs in a helper thread so that the deadline bounds the whole request:
        a socket timeout alone restarts with every byte a slow server trickles.
        """
        parts = urllib.parse.urlsplit(self.predict_url)
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = connection_class(parts.hostname, parts.port, timeout=self.timeout)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        outcome: dict[str, Any] = {}

        def exchange():
            try:
                conn.request("POST", target, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                outcome["answer"] = (response.status, response.read())
            except BaseException as e:  # handed to the caller's thread
                outcome["error"] = e

        worker = threading.Thread(target=exchange, name="ks-keras-rest", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the worker's blocked read
                except OSError:
                    pass
            conn.close()
            raise ServingError(
                f"TF Serving at {self.predict_url}: no complete answer within "
                f"{self.timeout:g} s (the deadline of a whole request; --timeout to change it)"
            )
        conn.close()
        error = outcome.get("error")
        if error is None:
            return outcome["answer"]
        if isinstance(error, http.client.HTTPException):
            raise ServingError(
                f"{self.predict_url}: not a valid HTTP answer ({type(error).__name__}: "
                f"{str(error)[:200] or 'no details'}); is this TF Serving's REST port (8501 by "
                "default; 8500 is its gRPC port: use --grpc host:8500)?"
            ) from None
        if isinstance(error, TimeoutError):
            raise ServingError(
                f"TF Serving at {self.predict_url}: no answer within {self.timeout:g} s "
                "(--timeout to change it)"
            ) from None
        if isinstance(error, OSError):
            raise ServingError(
                f"cannot reach TF Serving at {self.predict_url} ({error}); is "
                "the server running? (docs/serving.md)"
            ) from None
        raise error


# ---------------------------------------------------------------------------------------------
# gRPC.


def grpc_predict_request(
    inputs: dict[str, Any],
    model_name: str,
    signature_name: str = DEFAULT_SIGNATURE,
    version: int | None = None,
    metadata: dict | None = None,
):
    """A `PredictRequest` with one `TensorProto` per named input.

    Args:
        inputs: named arrays (batch first).
        model_name: the served model's name.
        signature_name: `serving_default` or `serving_waveform`.
        version: a specific version, or None for the server's latest.
        metadata: export metadata; when given, names/shapes/dtypes are checked and cast.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    if not model_name:
        raise ValueError("model_name: required (TF Serving's MODEL_NAME)")
    typed = _typed_inputs(
        inputs, _signature_inputs(metadata, signature_name), f"gRPC request [{signature_name}]"
    )
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, array in typed.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array, dtype=tf.as_dtype(array.dtype)))
    return request


def parse_grpc_response(
    response,
    where: str = "TF Serving",
    labels: list[str] | None = None,
    batch: int | None = None,
) -> dict[str, np.ndarray]:
    """`probabilities` and `class_id` arrays from a `PredictResponse` (checked as in
    `parse_rest_response`)."""
    import tensorflow as tf

    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    return _check_outputs(outputs, where, labels, batch)


class GrpcClient:
    """TF Serving gRPC client (`PredictionService/Predict`).

    Args:
        target: `host:port` of the gRPC endpoint, e.g. `localhost:8500`.
        model_name, version, timeout, metadata: as for `RestClient` (gRPC deadlines bound
            the whole call).
    """

    def __init__(
        self,
        target: str = GRPC_TARGET,
        model_name: str = "ks_keras",
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: dict | None = None,
    ):
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = check_timeout(timeout)
        self.metadata = metadata
        self._stub = None

    def __repr__(self) -> str:
        return f"GrpcClient({self.target}, {self.model_name}, version={self.version})"

    def _get_stub(self):
        if self._stub is None:
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            channel = grpc.insecure_channel(
                self.target,
                options=[
                    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                ],
            )
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return self._stub

    def predict(
        self, inputs: dict[str, Any], signature_name: str = DEFAULT_SIGNATURE
    ) -> dict[str, np.ndarray]:
        """Send one batch; returns `probabilities` `[B, C]` and `class_id` `[B]`."""
        import grpc

        request = grpc_predict_request(
            inputs, self.model_name, signature_name, self.version, self.metadata
        )
        where = f"TF Serving at {self.target} (gRPC, model {self.model_name})"
        try:
            response = self._get_stub().Predict(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") and e.code() else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            hint = "; is the server running? (docs/serving.md)" if code == "UNAVAILABLE" else ""
            raise ServingError(f"{where}: {code}: {details}{hint}") from None
        return parse_grpc_response(response, where, _labels(self.metadata), _batch_size(inputs))


# ---------------------------------------------------------------------------------------------
# Files → server → predictions.


def serving_predictor(
    model: str | Path,
    rest_url: str | None = None,
    grpc_target: str | None = None,
    model_name: str | None = None,
    version: int | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Predictor:
    """A `Predictor` whose model runs on a TF Serving server.

    Args:
        model: a local copy of the export (`saved_models/<name>[/<version>]`); only its
            `assets/ks_keras.json` is read (labels, extractors, max lengths, signatures).
        rest_url: e.g. `http://localhost:8501` (give this or `grpc_target`).
        grpc_target: e.g. `localhost:8500`.
        model_name: the served name; default the export's name.
        version: the served version; default the local export's version, so the labels and
            extractors used here are those of the model that answers.
        config, overrides: the request's extractor settings (default: the model's own).
        timeout: deadline in seconds of each request (the whole exchange).
    """
    if bool(rest_url) == bool(grpc_target):
        raise ValueError(
            "give exactly one of rest_url (e.g. http://localhost:8501) and "
            "grpc_target (e.g. localhost:8500)"
        )
    version_dir, metadata = load_export_metadata(model)
    name = model_name or metadata.get("name")
    version = version if version is not None else metadata.get("version")
    if rest_url:
        client: RestClient | GrpcClient = RestClient(rest_url, name, version, timeout, metadata)
    else:
        client = GrpcClient(grpc_target, name, version, timeout, metadata)

    def run(inputs):
        return client.predict(inputs, DEFAULT_SIGNATURE)["probabilities"]

    def run_waveform(inputs):
        return client.predict(inputs, WAVEFORM_SIGNATURE)["probabilities"]

    has_waveform = WAVEFORM_SIGNATURE in metadata["signatures"]
    return Predictor(
        metadata,
        run,
        repr(client),
        request_config(metadata, config, overrides),
        run_waveform if has_waveform else None,
    )
