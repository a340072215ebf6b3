"""TF Serving clients: REST against a local stub that checks the documented request format,
gRPC requests checked tensor by tensor against the exported signature (and a local stub)."""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import keras  # noqa: E402
import soundfile as sf  # noqa: E402
import tensorflow as tf  # noqa: E402
from _tiny import tiny_config  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from ks_keras import cli, serving  # noqa: E402
from ks_keras import export as ex  # noqa: E402
from ks_keras.features import get_audio_extractor, get_text_extractor  # noqa: E402
from ks_keras.model import build_model  # noqa: E402
from ks_keras.predict import Predictor, RequestFeaturizer  # noqa: E402

LABELS = ["angry", "happy", "neutral", "sad"]
NAME = "ser"
TEXTS = ["I can't believe you did that", "fine, whatever", "what a lovely day"]
_PATH_RE = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A multimodal export (log-mel + MiniLM features), its loaded SavedModel and wav files."""
    root = tmp_path_factory.mktemp("serving")
    cfg = tiny_config(  # the suite's tiny config (tests/_tiny.py), MiniLM text, 4 classes
        model={"text_dim": 384, "text_d_model": 16, "num_classes": 4},
        data={"audio_max_len": 30, "text_max_len": 8, "labels": LABELS},
    )
    keras.utils.set_random_seed(5)
    model = build_model(cfg)
    meta = {
        "audio": get_audio_extractor(cfg.features.audio).metadata,
        "text": get_text_extractor(cfg.features.text).metadata,
    }
    export_dir = ex.export_model(
        model, cfg, LABELS, meta, base_dir=root / "saved_models", name=NAME, verify=False
    )
    rng = np.random.default_rng(0)
    wavs = []
    for i, seconds in enumerate((0.4, 0.7, 0.25)):
        path = root / f"u{i}.wav"
        n = int(seconds * 16000)
        wave = 0.2 * np.sin(np.arange(n) * (0.05 + 0.03 * i)) + 0.01 * rng.standard_normal(n)
        sf.write(str(path), wave.astype(np.float32), 16000)
        wavs.append(path)
    loaded = tf.saved_model.load(str(export_dir))
    local = Predictor.load(export_dir)
    return export_dir, loaded, wavs, local


def _probs(predictions):
    return np.array([[p.probabilities[lab] for lab in LABELS] for p in predictions])


# ---------------------------------------------------------------------------------------------
# REST: a stub that speaks TF Serving's documented REST predict API.


def _nested_shape(value):
    """Shape of a rectangular nested list (None if ragged)."""
    if not isinstance(value, list):
        return ()
    if not value:
        return (0,)
    inner = [_nested_shape(v) for v in value]
    if any(s is None or s != inner[0] for s in inner):
        return None
    return (len(value), *inner[0])


def _leaves(value):
    if isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


class _StubHandler(BaseHTTPRequestHandler):
    server: _StubServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        stub = self.server
        match = _PATH_RE.match(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        stub.requests.append({"path": self.path, "headers": dict(self.headers), "raw": raw})
        if not match:
            return self._reply(404, {"error": f"Malformed request: POST {self.path}"})
        if match["name"] != NAME:
            version = match["version"] or "latest"
            return self._reply(
                404, {"error": f"Servable not found for request: Specific({match['name']}, "
                               f"{version})"}
            )  # fmt: skip
        problems = []
        if self.headers.get("Content-Type") != "application/json":
            problems.append(f"Content-Type {self.headers.get('Content-Type')!r}")
        body = json.loads(raw)
        if set(body) - {"signature_name", "inputs"} or "inputs" not in body:
            problems.append(f"body keys {sorted(body)} (columnar format: signature_name, inputs)")
        signature = body.get("signature_name", "serving_default")
        fn = stub.loaded.signatures.get(signature)
        if fn is None:
            return self._reply(400, {"error": f'Serving signature name: "{signature}" not found'})
        _, specs = fn.structured_input_signature
        inputs = body.get("inputs", {})
        if set(inputs) != set(specs):
            problems.append(f"inputs {sorted(inputs)} != signature inputs {sorted(specs)}")
        tensors, batch = {}, set()
        for name, spec in specs.items():
            value = inputs.get(name)
            shape = _nested_shape(value)
            if shape is None or not spec.shape.is_compatible_with(shape):
                problems.append(f"{name}: shape {shape} vs {spec.shape}")
                continue
            leaves = list(_leaves(value))
            if spec.dtype.is_integer and not all(type(v) is int for v in leaves):
                problems.append(f"{name}: {spec.dtype.name} input holds non-integers")
            if spec.dtype.is_floating and not all(type(v) in (int, float) for v in leaves):
                problems.append(f"{name}: {spec.dtype.name} input holds non-numbers")
            batch.add(shape[0])
            tensors[name] = tf.constant(value, dtype=spec.dtype)
        if len(batch) > 1:
            problems.append(f"batch sizes disagree: {sorted(batch)}")
        if problems:
            stub.problems += problems
            return self._reply(400, {"error": "; ".join(problems)})
        result = fn(**tensors)
        outputs = {k: v.numpy().tolist() for k, v in result.items()}
        self._reply(200, {"outputs": outputs})


class _StubServer(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture()
def rest_stub(served):
    _, loaded, _, _ = served
    server = _StubServer(("127.0.0.1", 0), _StubHandler)
    server.loaded, server.requests, server.problems = loaded, [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_rest_urls():
    assert serving.rest_predict_url("http://h:8501/", "m") == "http://h:8501/v1/models/m:predict"
    assert (
        serving.rest_predict_url("http://h:8501", "m", 3)
        == "http://h:8501/v1/models/m/versions/3:predict"
    )


def test_rest_client_wav_and_text_to_prediction(served, rest_stub):
    export_dir, _, wavs, local = served
    server, url = rest_stub
    remote = serving.serving_predictor(export_dir.parent, rest_url=url)
    got = remote.predict_files(wavs, TEXTS)
    np.testing.assert_allclose(_probs(got), _probs(local.predict_files(wavs, TEXTS)), atol=1e-6)
    assert server.problems == []
    # One request, pinned to the version whose metadata built it, in the columnar format.
    [request] = server.requests
    assert request["path"] == f"/v1/models/{NAME}/versions/1:predict"
    body = json.loads(request["raw"])
    assert body["signature_name"] == "serving_default"
    assert np.asarray(body["inputs"]["audio"]).shape == (3, 30, 16)
    assert np.asarray(body["inputs"]["text_mask"]).shape == (3, 8)


def test_rest_client_raw_waveform_signature(served, rest_stub):
    export_dir, _, wavs, local = served
    server, url = rest_stub
    remote = serving.serving_predictor(export_dir, rest_url=url)
    got = remote.predict_files(wavs, TEXTS, signature="serving_waveform")
    np.testing.assert_allclose(_probs(got), _probs(local.predict_files(wavs, TEXTS)), atol=1e-5)
    body = json.loads(server.requests[0]["raw"])
    assert body["signature_name"] == "serving_waveform"
    assert set(body["inputs"]) == {"waveform", "waveform_length", "text", "text_mask"}
    assert body["inputs"]["waveform_length"] == [6400, 11200, 4000]
    assert server.problems == []


def test_rest_errors_are_clear(served, rest_stub, capsys):
    export_dir, _, wavs, _ = served
    server, url = rest_stub
    client = serving.RestClient(url, "other", version=2)
    inputs = {"audio": np.zeros((1, 4, 16)), "audio_mask": np.ones((1, 4), int),
              "text": np.zeros((1, 2, 384)), "text_mask": np.ones((1, 2), int)}  # fmt: skip
    with pytest.raises(serving.ServingError, match=r"HTTP 404: Servable not found .*other, 2"):
        client.predict(inputs)
    # Through the CLI: a clean one-line error, exit code 1.
    code = cli.main(["predict", str(wavs[0]), "--text", TEXTS[0], "--model", str(export_dir),
                     "--rest", url, "--model-name", "other"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Servable not found" in err and "Traceback" not in err
    # The metadata-checked client refuses a malformed batch before sending anything.
    meta = ex.load_export_metadata(export_dir)[1]
    checked = serving.RestClient(url, NAME, metadata=meta)
    with pytest.raises(ValueError, match="'text' has 2 steps but 'text_mask' has 3"):
        checked.predict(dict(inputs, text_mask=np.ones((1, 3), int)))
    assert len(server.requests) == 2
    # No server listening.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(serving.ServingError, match="cannot reach TF Serving"):
        serving.RestClient(f"http://127.0.0.1:{port}", NAME, timeout=5).predict(inputs)


def test_rest_response_parsing():
    good = {"outputs": {"probabilities": [[0.25, 0.75]], "class_id": [1]}}
    out = serving.parse_rest_response(good)
    assert out["probabilities"].dtype == np.float32 and out["class_id"].tolist() == [1]
    with pytest.raises(serving.ServingError, match="boom"):
        serving.parse_rest_response({"error": "boom"})
    with pytest.raises(serving.ServingError, match="named outputs"):
        serving.parse_rest_response({"predictions": [[0.1, 0.9]]})
    with pytest.raises(serving.ServingError, match="no output"):
        serving.parse_rest_response({"outputs": {"probabilities": [[0.1, 0.9]]}})


# ---------------------------------------------------------------------------------------------
# gRPC.


@pytest.mark.parametrize("signature", ["serving_default", "serving_waveform"])
def test_grpc_request_has_exactly_the_signature_tensors(served, signature):
    export_dir, loaded, wavs, _ = served
    meta = ex.load_export_metadata(export_dir)[1]
    inputs, _ = RequestFeaturizer(meta).inputs(wavs, TEXTS, signature=signature)
    request = serving.grpc_predict_request(inputs, NAME, signature, version=1, metadata=meta)
    assert isinstance(request, predict_pb2.PredictRequest)
    assert request.model_spec.name == NAME
    assert request.model_spec.signature_name == signature
    assert request.model_spec.version.value == 1
    _, specs = loaded.signatures[signature].structured_input_signature
    assert set(request.inputs) == set(specs)
    for name, spec in specs.items():
        proto = request.inputs[name]
        assert proto.dtype == spec.dtype.as_datatype_enum, name
        shape = [d.size for d in proto.tensor_shape.dim]
        assert spec.shape.is_compatible_with(shape) and shape[0] == 3, (name, shape)
        np.testing.assert_array_equal(tf.make_ndarray(proto), inputs[name])
    if signature == "serving_default":
        assert [d.size for d in request.inputs["audio"].tensor_shape.dim] == [3, 30, 16]
        assert [d.size for d in request.inputs["text_mask"].tensor_shape.dim] == [3, 8]
    else:
        assert tf.make_ndarray(request.inputs["waveform_length"]).tolist() == [6400, 11200, 4000]


class _PredictionStub(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, loaded):
        self.loaded = loaded
        self.requests = []

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        self.requests.append(request)
        if request.model_spec.name != NAME:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({request.model_spec.name})",
            )
        fn = self.loaded.signatures[request.model_spec.signature_name]
        result = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        response = predict_pb2.PredictResponse()
        for k, v in result.items():
            response.outputs[k].CopyFrom(tf.make_tensor_proto(v.numpy()))
        return response


def test_grpc_client_against_local_stub(served):
    export_dir, loaded, wavs, local = served
    stub = _PredictionStub(loaded)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        remote = serving.serving_predictor(export_dir, grpc_target=f"127.0.0.1:{port}")
        got = remote.predict_files(wavs, TEXTS)
        np.testing.assert_allclose(_probs(got), _probs(local.predict_files(wavs, TEXTS)), atol=1e-6)
        assert stub.requests[0].model_spec.version.value == 1
        client = serving.GrpcClient(f"127.0.0.1:{port}", "missing", timeout=10)
        with pytest.raises(serving.ServingError, match="NOT_FOUND: Servable not found"):
            client.predict({"audio": np.zeros((1, 2, 16), np.float32)})
    finally:
        server.stop(grace=None).wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Reliability (issue 14): answers checked against the export, broken servers, deadlines.


class _RawServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client that hung up is expected
        pass


@pytest.fixture()
def raw_server():
    """`serve(reply)` starts a TCP server that reads one HTTP request and calls
    `reply(socket, stop)`; `stop` is set when the test ends."""
    started, stop = [], threading.Event()

    def serve(reply):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                reply(self.request, stop)

        server = _RawServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    stop.set()
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _http(payload, status=200):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def _answer(probabilities, class_id):
    def reply(sock, stop):
        body = {"outputs": {"probabilities": probabilities, "class_id": class_id}}
        sock.sendall(_http(json.dumps(body).encode()))  # json.dumps writes NaN as NaN

    return reply


@pytest.fixture(scope="module")
def one_request(served):
    export_dir, _, wavs, _ = served
    meta = ex.load_export_metadata(export_dir)[1]
    inputs, _ = RequestFeaturizer(meta).inputs(wavs[:1], TEXTS[:1])
    return meta, inputs


@pytest.mark.parametrize(
    "probabilities, class_id, message",
    [
        ([[0.2] * 5], [0], r"shape \(1, 5\), expected \[1, 4\]"),
        ([[0.5, 0.5]], [0], r"shape \(1, 2\), expected \[1, 4\]"),
        ([[0.25] * 4, [0.25] * 4], [0, 0], r"shape \(2, 4\), expected \[1, 4\]"),
        ([[float("nan"), 0.5, 0.25, 0.25]], [1], "NaN/inf probabilities"),
        ([[-0.5, 1.0, 0.25, 0.25]], [1], "not a probability distribution"),
        ([[0.1, 0.1, 0.1, 0.1]], [0], "not a probability distribution"),
        ([[0.1, 0.7, 0.1, 0.1]], [3], "class_id .* is not the most probable class"),
    ],
)
def test_rest_answers_are_checked_against_the_export(
    raw_server, one_request, probabilities, class_id, message
):
    meta, inputs = one_request
    url = raw_server(_answer(probabilities, class_id))
    with pytest.raises(serving.ServingError, match=message):
        serving.RestClient(url, NAME, metadata=meta, timeout=30).predict(inputs)


def test_wrong_answer_through_the_cli_is_one_clear_error(served, raw_server, capsys):
    export_dir, _, wavs, _ = served
    url = raw_server(_answer([[0.5, 0.5]], [0]))
    code = cli.main(["predict", str(wavs[0]), "--text", TEXTS[0], "--model", str(export_dir),
                     "--rest", url])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and "expected [1, 4]" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # no partial output


def _incomplete_read():
    head, _, body = _http(b"x" * 200).partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + body[:20]  # Content-Length promises more than is sent


@pytest.mark.parametrize(
    "raw, kind",
    [
        # What an HTTP/1.1 client reads from a gRPC (HTTP/2) port: a binary frame.
        (b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03garbage\r\n\r\n", "BadStatusLine"),
        (_incomplete_read(), "IncompleteRead"),
    ],
)
def test_rest_broken_http_is_a_clear_error(raw_server, one_request, raw, kind):
    meta, inputs = one_request

    def reply(sock, stop):
        sock.sendall(raw)

    url = raw_server(reply)
    with pytest.raises(serving.ServingError, match=rf"not a valid HTTP answer \({kind}") as e:
        serving.RestClient(url, NAME, metadata=meta, timeout=30).predict(inputs)
    assert "8501" in str(e.value) and "--grpc" in str(e.value)


def test_rest_deadline_bounds_a_server_that_trickles_its_answer(
    served, raw_server, one_request, capsys
):
    meta, inputs = one_request
    good = json.dumps({"outputs": {"probabilities": [[0.25] * 4], "class_id": [0]}})
    data = _http(good.encode() + b" " * 200)

    def trickle(sock, stop):
        head, _, body = data.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        for i in range(len(body)):  # one byte at a time: every socket read succeeds
            if stop.wait(0.02):
                return
            sock.sendall(body[i : i + 1])

    url = raw_server(trickle)
    with pytest.raises(serving.ServingError, match=r"no complete answer within 0\.5 s"):
        serving.RestClient(url, NAME, metadata=meta, timeout=0.5).predict(inputs)
    # The CLI takes the deadline as --timeout.
    export_dir, _, wavs, _ = served
    argv = ["predict", str(wavs[0]), "--text", TEXTS[0], "--model", str(export_dir), "--rest", url]
    assert cli.main([*argv, "--timeout", "0.5"]) == 1
    assert "no complete answer within 0.5 s" in capsys.readouterr().err
    assert cli.main([*argv, "--timeout", "0"]) == 1
    assert "timeout: expected a number of seconds > 0" in capsys.readouterr().err


def test_labels_txt_that_disagrees_with_the_metadata_is_refused(served, tmp_path):
    import shutil

    export_dir = served[0]
    copy = tmp_path / NAME / "1"
    shutil.copytree(export_dir, copy)
    (copy / "assets" / "labels.txt").write_text("angry\nhappy\nsad\n")
    with pytest.raises(ValueError, match=r"labels.txt: lists \['angry', 'happy', 'sad'\]"):
        ex.load_export_metadata(copy)


# ---------------------------------------------------------------------------------------------
# openSMILE functionals input: computed on the client, sent as a 2-D input without mask.


@pytest.fixture(scope="module")
def served_functionals(served, tmp_path_factory):
    """An audio + eGeMAPS export (per-speaker normalisation), loaded, with a local predictor."""
    root = tmp_path_factory.mktemp("serving_functionals")
    cfg = tiny_config(
        model={"modalities": ["audio"], "num_classes": 4, "functionals_dim": 88},
        features={"audio": {"normalize": "speaker"}, "functionals": "egemaps"},
        data={"audio_max_len": 30, "labels": LABELS},
    )
    keras.utils.set_random_seed(6)
    model = build_model(cfg)
    meta = {"audio": get_audio_extractor(cfg.features.audio).metadata}
    export_dir = ex.export_model(
        model, cfg, LABELS, meta, base_dir=root / "saved_models", name=NAME, verify=False
    )
    loaded = tf.saved_model.load(str(export_dir))
    return export_dir, loaded, served[2], Predictor.load(export_dir)


def test_rest_and_grpc_requests_carry_the_functionals(served_functionals):
    export_dir, loaded, wavs, local = served_functionals
    speakers = ["s1", "s1", "s2"]
    server = _StubServer(("127.0.0.1", 0), _StubHandler)
    server.loaded, server.requests, server.problems = loaded, [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = serving.serving_predictor(export_dir, rest_url=url)
        got = remote.predict_files(wavs, None, speakers=speakers)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    want = local.predict_files(wavs, None, speakers=speakers)
    np.testing.assert_allclose(_probs(got), _probs(want), atol=1e-6)
    assert server.problems == []
    [request] = server.requests
    body = json.loads(request["raw"])
    assert body["signature_name"] == "serving_default"
    assert set(body["inputs"]) == {"audio", "audio_mask", "functionals"}
    functionals = np.asarray(body["inputs"]["functionals"])
    assert functionals.shape == (3, 88) and np.isfinite(functionals).all()
    # Normalised per speaker on the client: s1's two rows have mean 0, s2's one row is 0.
    np.testing.assert_allclose(functionals[:2].mean(axis=0), 0.0, atol=1e-5)
    assert not functionals[2].any()
    # gRPC: one float32 [3, 88] tensor; a request without it is refused before sending.
    meta = ex.load_export_metadata(export_dir)[1]
    inputs, _ = RequestFeaturizer(meta).inputs(wavs, None, speakers=speakers)
    proto = serving.grpc_predict_request(inputs, NAME, metadata=meta).inputs["functionals"]
    assert proto.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in proto.tensor_shape.dim] == [3, 88]
    np.testing.assert_array_equal(tf.make_ndarray(proto), inputs["functionals"])
    with pytest.raises(ValueError, match=r"missing \['functionals'\]"):
        serving.rest_request_body(
            {k: v for k, v in inputs.items() if k != "functionals"}, metadata=meta
        )
