"""The streaming engine under ``fewstep serve`` and its message checks, in process: parity with ``generate``
(alone and batched with others), latest wins, back-pressure, the caches, LoRA weights as adapter scales,
pixel models with labels, and every kind of bad request as one clear message."""

import asyncio
import base64
import io
import json
import re
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.errors import FewstepError
from fewstep.io.data_urls import png_data_urls
from fewstep.models.folders import load_model, shipped_models_dir
from fewstep.models.loras import apply_loras
from fewstep.sampling.generate import generate
from fewstep.serve.batching import Cancelled, MicroBatcher, Ticket
from fewstep.serve.engine import Busy, Engine, set_adapter_scales
from fewstep.serve.protocol import ProtocolError, Request, limits, parse
from fewstep.serve.traced import Traced

MODELS = shipped_models_dir()


@pytest.fixture(scope="module")
def lcm():
    return load_model(MODELS / "emoji-lcm")


@pytest.fixture(scope="module")
def engine(lcm):
    engine = Engine(lcm)
    yield engine
    engine.close()


def pixels(urls: list[str]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))))
                        .int() for u in urls])


def close_images(a: list[str], b: list[str]) -> bool:
    """Same PNGs within one 8-bit level: the served networks run on ONNX Runtime (fewstep serve's default backend),
    whose fused kernels round floats unlike eager torch (and fused LoRAs, or a batch, unlike unfused or alone)."""
    return len(a) == len(b) and (pixels(a) - pixels(b)).abs().max().item() <= 1


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_one_request_is_exactly_generate(engine, lcm):
    out = engine.submit("a", Request(prompt="red apple", steps=4, guidance_scale=3.0, seed=5, num=2)).result()
    assert close_images(out["images"], png_data_urls(generate(lcm, ["red apple"], num=2, steps=4, guidance_scale=3.0,
                                                                seed=5)))
    sketch = Image.new("RGB", (32, 32), "white")
    sketch.paste((200, 30, 30), (8, 8, 24, 24))
    request = parse(json.dumps({"type": "generate", "prompt": "red apple", "image": data_url(sketch), "strength": 0.5,
                                "seed": 1}), engine.info)
    out = engine.submit("a", request).result()
    want = generate(lcm, ["red apple"], num=1, steps=4, guidance_scale=3.0, seed=1, init_images=request.image,
                    strength=0.5)
    assert close_images(out["images"], png_data_urls(want))


def test_concurrent_requests_share_batches_and_match_generate(engine, lcm):
    rows_before, batches_before = engine.batcher.rows, engine.batcher.batches
    futures = [engine.submit(f"c{i}", Request(prompt=p, steps=s, guidance_scale=g, seed=i, num=1 + i % 2))
               for i, (p, s, g) in enumerate([("dog face", 4, 3.0), ("flag: Japan", 2, 2.0), ("red apple", 4, 1.5),
                                              ("grinning face", 1, 3.0), ("cat face", 8, 3.0), ("star", 4, 4.0)])]
    results = [f.result(timeout=120) for f in futures]
    mean_batch = (engine.batcher.rows - rows_before) / (engine.batcher.batches - batches_before)
    assert mean_batch > 1.5        # stream batching: several requests (at different steps) per network call
    for i, ((p, s, g), out) in enumerate(zip([("dog face", 4, 3.0), ("flag: Japan", 2, 2.0), ("red apple", 4, 1.5),
                                              ("grinning face", 1, 3.0), ("cat face", 8, 3.0), ("star", 4, 4.0)],
                                             results)):
        want = generate(lcm, [p], num=1 + i % 2, steps=s, guidance_scale=g, seed=i)
        assert (pixels(out["images"]) - pixels(png_data_urls(want))).abs().max() <= 1   # batched float noise only


def test_prompts_tokenized_by_many_requests_at_once_are_padded_as_alone(lcm):
    """A fast CLIP tokenizer's padding is state of one shared backend, set by every call (transformers#47085):
    requests encoding prompts in their own threads once got each other's settings (5 ids, not 77: another
    image, then cached as that prompt's). 3 threads x 300 calls gave 16 such calls before the lock."""
    conditioner = lcm.conditioner
    prompts = ["dog face", "red apple", "flag: Japan"]
    alone = {p: conditioner.tokenize([p]) for p in prompts}
    wrong: list = []

    def hammer(p: str) -> None:
        for _ in range(300):
            try:
                ids = conditioner.tokenize([p])
                if not torch.equal(ids, alone[p]):
                    wrong.append(tuple(ids.shape))
            except Exception as e:  # "Already borrowed"
                wrong.append(repr(e)[:80])
    threads = [threading.Thread(target=hammer, args=(p,)) for p in prompts]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert alone["dog face"].shape[1] == conditioner.tokenizer.model_max_length
    assert not wrong, f"{len(wrong)} of 900 concurrent tokenizations differed from alone: {wrong[:3]}"


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_the_served_networks_run_compiled_and_give_the_eager_images(lcm, backend):
    engine = Engine(lcm, backend=backend)
    eager = Engine(lcm, backend="eager")
    try:
        engine.submit("t", Request(prompt="star", steps=2, guidance_scale=2.0, seed=9)).result(timeout=60)
        assert engine.backends() == {"denoise": [backend], "decode": [backend]}    # neither fell back
        request = Request(prompt="star", steps=2, guidance_scale=2.0, seed=9, num=2)
        got, want = (e.submit("t", request).result(timeout=60)["images"] for e in (engine, eager))
        # TorchScript replays eager's kernels: the same bytes; ONNX Runtime's fused kernels round otherwise
        assert got == want if backend == "torchscript" else close_images(got, want)
        assert not eager._networks and eager.backends() == {}
    finally:
        engine.close()
        eager.close()


def test_the_default_backend_is_onnxruntime_and_names_a_missing_one(monkeypatch):
    import importlib.util

    from fewstep.serve.traced import backend_chain

    assert backend_chain("auto") == ("onnxruntime", "torchscript", "eager")
    assert backend_chain("torchscript") == ("torchscript", "eager") and backend_chain("eager") == ("eager",)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else found(name, *a))
    assert backend_chain("auto") == ("torchscript", "eager")
    with pytest.raises(FewstepError, match="pip install onnxruntime"):
        backend_chain("onnxruntime")
    with pytest.raises(FewstepError, match="choose one of auto, onnxruntime"):
        backend_chain("tensorrt")


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_a_trace_that_would_freeze_a_value_or_a_batch_size_is_not_used(backend):
    scale = Traced(lambda x, w: x * w, "scale", backend=backend)
    x, w = torch.randn(3, 2), torch.rand(3, 1)
    torch.testing.assert_close(scale(x, w), x * w)
    torch.testing.assert_close(scale(x[:1], w[:1]), x[:1] * w[:1])     # any batch size, one trace
    assert scale.traced == 1
    frozen = Traced(lambda x: x * float(x[0, 0]), "frozen value", backend=backend)      # a tensor value read as a Python number
    torch.testing.assert_close(frozen(x), x * float(x[0, 0]))
    y = torch.randn(3, 2)
    torch.testing.assert_close(frozen(y), y * float(y[0, 0]))          # eager: right for every batch
    branchy = Traced(lambda x: x + 1 if len(x) == 3 else x - 1, "batch-size branch", backend=backend)
    assert torch.equal(branchy(x), x + 1) and torch.equal(branchy(x[:2]), x[:2] - 1)
    assert frozen.traced == 0 and branchy.traced == 0
    # weighted (a fused LoRA slider state's weights): the weights are inputs of the trace, one trace for all of them
    weighted = Traced(lambda ws, x: x @ ws[0] + ws[1], "weights as inputs", weighted=True, backend=backend)
    for _ in range(2):
        ws = (torch.randn(2, 4), torch.randn(4))
        torch.testing.assert_close(weighted(ws, x), x @ ws[0] + ws[1])
    assert weighted.traced == 1
    if backend == "onnxruntime":       # a weight state asked for again runs on a session with them bound, made aside
        deadline = time.time() + 30
        while weighted.bound < 2 and time.time() < deadline:      # both states above (keep_bound = 2)
            time.sleep(0.01)
        assert weighted.bound == 2
        torch.testing.assert_close(weighted(ws, x), x @ ws[0] + ws[1])      # bound: the same answer
        other = (ws[0] + 1, ws[1])                                           # another state is not served by it
        torch.testing.assert_close(weighted(other, x), x @ other[0] + other[1])
        weighted.close()
    stuck = Traced(lambda ws, x: x * float(ws[0].sum()), "weights read as a number", weighted=True, backend=backend)
    for _ in range(2):
        ws = (torch.randn(3),)
        torch.testing.assert_close(stuck(ws, x), x * float(ws[0].sum()))   # eager: the trace would freeze them
    assert stuck.traced == 0


def test_latest_request_wins_and_repeats_come_from_the_caches(engine):
    first = engine.submit("typist", Request(prompt="red appl", steps=8, num=8, guidance_scale=3.0, seed=11))
    second = engine.submit("typist", Request(prompt="red apple", steps=4, guidance_scale=3.0, seed=11))
    assert second.result(timeout=60)["images"]
    with pytest.raises((Cancelled, Exception)) as caught:
        first.result(timeout=60)
    assert caught.type.__name__ in ("Cancelled", "CancelledError")
    hits = engine.prompts.cache.hits
    again = engine.submit("typist", Request(prompt="red apple", steps=4, guidance_scale=3.0, seed=11)).result()
    assert again["cached"] and again["images"] == second.result()["images"]
    engine.submit("typist", Request(prompt="red apple", steps=4, guidance_scale=3.0, seed=12)).result(timeout=60)
    assert engine.prompts.cache.hits > hits                   # the embedding was not recomputed
    stats = engine.stats()
    assert stats["images_per_second"] > 0 and stats["p95_ms"] >= stats["p50_ms"] > 0


def test_a_full_queue_refuses_at_once(lcm):
    engine = Engine(lcm, queue_limit=1)
    try:
        slow = engine.submit("a", Request(prompt="red apple", steps=8, num=8, guidance_scale=3.0))
        with pytest.raises(Busy, match="server busy"):
            engine.submit("b", Request(prompt="dog face", steps=4, guidance_scale=3.0))
        slow.result(timeout=60)
        assert engine.submit("b", Request(prompt="dog face", steps=4, guidance_scale=3.0)).result(timeout=60)["images"]
    finally:
        engine.close()


def test_batcher_cancels_a_waiting_call_and_runs_nothing_for_it():
    batcher = MicroBatcher(max_wait=10.0)
    ticket, other = Ticket(), Ticket()
    batcher.enter()
    batcher.enter()                     # two requests in flight: the first call waits for the second
    errors = []

    def wait():
        try:
            batcher.call(ticket, "k", lambda x: x + 1, torch.zeros(1, 2))
        except Cancelled as e:
            errors.append(e)
    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.05)
    batcher.cancel(ticket)
    thread.join(5)
    assert errors and batcher.batches == 0
    batcher.leave()
    assert batcher.call(other, "k", lambda x: x + 1, torch.zeros(1, 2)).tolist() == [[1.0, 1.0]]
    batcher.stop()


def test_cancelling_one_of_several_waiting_calls_leaves_the_others():
    """Cancel looks the request's calls up among the waiting ones by identity: with another call waiting before
    it (tensors of several values) the dataclass's field-by-field == raised "Boolean value of Tensor … ambiguous"
    and the server dropped the connection (seen in CI)."""
    batcher = MicroBatcher(max_wait=10.0)
    first, second = Ticket(), Ticket()
    for _ in range(3):
        batcher.enter()                 # three requests in flight: the two calls wait for the third
    outcome = {}

    def network(x):                     # one network for every call, as the engine has: == reaches the tensors
        return x + 1

    def call(name, ticket):
        try:
            outcome[name] = batcher.call(ticket, "k", network, torch.zeros(1, 4)).tolist()
        except Cancelled:
            outcome[name] = "cancelled"
    threads = [threading.Thread(target=call, args=a) for a in (("first", first), ("second", second))]
    for t in threads:
        t.start()
        time.sleep(0.05)                # first waits before second
    batcher.cancel(second)
    batcher.leave()
    batcher.leave()                     # the third request and the cancelled one leave: first runs alone
    for t in threads:
        t.join(5)
    assert outcome == {"first": [[1.0] * 4], "second": "cancelled"}
    batcher.stop()


def test_unfused_lora_sliders_are_adapter_weights_equal_to_diffusers_set_adapters():
    """``fewstep serve --no-fuse`` (and the path a slider state takes until it is fused: tests/test_serve_sliders.py)."""
    base = load_model(MODELS / "emoji-sd")
    loras = [(MODELS / "emoji-style-lora", 1.0), (MODELS / "emoji-lcm-lora", 1.0)]
    served = apply_loras(base, loras, fuse=False)
    engine = Engine(served, fuse=False)
    try:
        assert engine.sliders is None and not any(name.startswith("denoise") for name, _ in engine._networks)
        assert [s["kind"] for s in engine.info["loras"]] == ["style", "lcm-lora"]
        request = Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=3, loras=(0.3, 1.0))
        out = engine.submit("a", request).result(timeout=60)
        reference = apply_loras(base, [(MODELS / "emoji-style-lora", 0.3), (MODELS / "emoji-lcm-lora", 1.0)], fuse=False)
        assert out["images"] == png_data_urls(generate(reference, ["dog face"], steps=4, guidance_scale=1.0, seed=3))  # eager
        other = engine.submit("a", Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=3, loras=(1.0, 1.0)))
        assert other.result(timeout=60)["images"] != out["images"]
        assert engine.stats()["lora_weights"] == {"fused": 0, "unfused": 2}
        assert not any(name.startswith("denoise") for name, _ in engine._networks)   # a trace would freeze the scales
    finally:
        engine.close()
    layers = [m for m in served.unet.modules() if hasattr(m, "scaling")]
    served.unet.set_adapters(["lora0", "lora1"], [0.7, 0.2])
    by_diffusers = [dict(m.scaling) for m in layers]
    set_adapter_scales(layers, ["lora0", "lora1"], [0.7, 0.2])
    assert [dict(m.scaling) for m in layers] == by_diffusers


def test_pixel_models_take_labels_and_sketches():
    model = load_model(MODELS / "digits-cd")
    engine = Engine(model)
    try:
        assert not engine.info["text"] and engine.info["classes"][3] == "3"
        out = engine.submit("a", parse('{"type": "generate", "label": 3, "steps": 2, "num": 2, "seed": 4}',
                                       engine.info)).result(timeout=60)
        want = generate(model, torch.tensor([3]), num=2, steps=2, seed=4, guidance_scale=engine.info["guidance"]["default"])
        assert close_images(out["images"], png_data_urls(want))
        sketch = Image.new("L", (200, 200), 0)
        sketch.paste(255, (80, 20, 120, 180))
        request = parse(json.dumps({"type": "generate", "label": 1, "steps": 4, "image": data_url(sketch, "JPEG")}),
                        engine.info)
        assert request.image.shape == (1, 1, 16, 16)
        assert engine.submit("a", request).result(timeout=60)["images"]
        with pytest.raises(ProtocolError, match="pick a label, not a prompt"):
            parse('{"type": "generate", "prompt": "three"}', engine.info)
        with pytest.raises(ProtocolError, match="label must be in 0..9"):
            parse('{"type": "generate", "label": 10}', engine.info)
    finally:
        engine.close()


def big_png() -> str:
    noise = Image.frombytes("RGB", (700, 700), torch.randint(0, 256, (700 * 700 * 3,), dtype=torch.uint8).numpy()
                            .tobytes())
    return data_url(noise)


BAD = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"type": "delete", "path": "/etc/passwd"}', "unknown field 'path'"),
    ('{"type": "delete"}', "unknown message type"),
    ('{"type": "generate", "prompt": 42}', "prompt must be a string"),
    ('{"type": "generate", "prompt": "' + "a" * 10_000 + '"}', "prompt too long: 10,000 characters"),
    ('{"type": "generate", "steps": 0}', "steps must be in 1..8"),
    ('{"type": "generate", "steps": 4.5}', "steps must be an integer"),
    ('{"type": "generate", "steps": true}', "steps must be an integer"),
    ('{"type": "generate", "guidance_scale": 7}', "guidance_scale must be in [1, 6]"),
    ('{"type": "generate", "guidance_scale": "high"}', "guidance_scale must be a finite number"),
    ('{"type": "generate", "guidance_scale": NaN}', "guidance_scale must be a finite number"),
    ('{"type": "generate", "num": 100}', "num must be in 1..8"),
    ('{"type": "generate", "seed": -1}', "seed must be in 0..4294967295"),
    ('{"type": "generate", "strength": 0}', "strength must be in (0, 1]"),
    ('{"type": "generate", "label": 2}', "send a prompt, not a label"),
    ('{"type": "generate", "loras": [1.0]}', "loras must be a list of 0 weight(s)"),
    ('{"type": "generate", "image": "/etc/passwd"}', "base64 data URL"),
    ('{"type": "generate", "image": "file:///etc/passwd"}', "base64 data URL"),
    ('{"type": "generate", "image": "data:image/png;base64,@@@"}', "not valid base64"),
    ('{"type": "generate", "image": "data:image/png;base64,aGVsbG8gd29ybGQ="}', "not an image this server reads"),
    ('{"type": "generate", "image": "data:text/html;base64,aGVsbG8="}', "base64 data URL"),
    ('{"type": "generate", "image": 5}', "image must be a data URL string"),
    ('{"type": "generate", "id": "seven"}', "id must be an integer"),
    ('{"type": "generate", "prompt": "\\ud800 apple"}', "prompt is not valid text: it holds a lone UTF-16 surrogate"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"type": "generate", "steps": ' + "[" * 900 + "]" * 900 + "}", "steps must be an integer, got a JSON array"),
    ('{"type": "generate", "guidance_scale": ' + "9" * 4000 + "}", "guidance_scale must be a finite number"),
    ('{"type": "generate", "seed": ' + "9" * 4000 + "}", "seed must be in 0..4294967295, got 99999"),
    ('{"type": "generate", "image": "data:image/png;base64,' + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)
     .decode() + '"}', "could not be read as a PNG, JPEG or WebP image"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_requests_are_one_clear_message(engine, text, message):
    with pytest.raises(ProtocolError) as caught:
        parse(text, engine.info)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    assert not re.search(r"0x[0-9a-f]{6}|BytesIO|Error\b", str(caught.value)), str(caught.value)   # no Python text


def test_oversized_and_huge_uploads_are_refused(engine):
    with pytest.raises(ProtocolError, match="image too large"):
        parse(json.dumps({"type": "generate", "image": "data:image/png;base64," + "A" * (3 * 1024 * 1024)}), engine.info)
    with pytest.raises(ProtocolError, match="at most 2048×2048 pixels, got 3000×10"):
        parse(json.dumps({"type": "generate", "image": data_url(Image.new("RGB", (3000, 10)))}), engine.info)
    request = parse(json.dumps({"type": "generate", "image": big_png(), "id": 9}), engine.info)
    assert request.image.shape == (1, 3, 32, 32) and request.id == 9
    with pytest.raises(ProtocolError) as caught:
        parse('{"type": "generate", "id": 12, "steps": 99}', engine.info)
    assert caught.value.request_id == 12


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR chunk claiming ``width``×``height``, then a truncated IDAT: readable only up to
    its header (decoding it fails)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000))[:30])


def test_uploads_are_refused_from_their_header_before_decoding(engine):
    """The size is read from the PNG header: a 4096×4096 claim is refused as too large (had it been decoded first,
    its truncated data would have been the complaint), and a damaged image is one line without PIL's text."""
    def upload(raw: bytes) -> str:
        return json.dumps({"type": "generate", "image": "data:image/png;base64," + base64.b64encode(raw).decode()})
    with pytest.raises(ProtocolError, match="at most 2048×2048 pixels, got 4096×4096"):
        parse(upload(png_header(4096, 4096)), engine.info)
    with pytest.raises(ProtocolError, match="at most 2048×2048 pixels; this one is far larger"):
        parse(upload(png_header(100_000, 100_000)), engine.info)      # past PIL's own bomb limit
    with pytest.raises(ProtocolError) as caught:
        parse(upload(png_header(64, 64)), engine.info)
    assert str(caught.value) == "the uploaded image is damaged or truncated: it could not be decoded"


def test_a_large_upload_is_reduced_first_and_matches_the_exact_resize():
    """2048×1500 with alpha: box-reduced in PIL (over white) before the float resize, within two 8-bit levels of
    the exact path (:func:`fewstep.io.images.image_tensor` on the full image; [−1, 1] spans 255 levels as 2)."""
    from fewstep.io.images import image_tensor
    from fewstep.serve.uploads import decode_upload

    ramp = np.linspace(0, 255, 2048).astype(np.uint8)
    rgba = np.stack([np.tile(ramp, (1500, 1)), np.tile(ramp[:1500, None], (1, 2048)), np.full((1500, 2048), 90, np.uint8),
                     np.tile(ramp[::-1], (1500, 1))], -1)
    image = Image.fromarray(rgba, "RGBA")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fast = decode_upload(buf.getvalue(), 3, 32)
    assert fast.shape == (1, 3, 32, 32)
    assert (fast[0] - image_tensor(image, 3, 32)).abs().max() < 4 / 255
    gray = decode_upload(buf.getvalue(), 1, 16)
    assert (gray[0] - image_tensor(image, 1, 16)).abs().max() < 4 / 255


def test_a_busy_refusal_says_so_and_a_bad_message_keeps_the_connection():
    """Over a :class:`~fewstep.serve.app.Connection` (a fake socket and engine): a busy engine's refusal carries
    ``busy: true`` (the page retries on it), a message parse() did not foresee is one line, no traceback."""
    from fewstep.serve.app import Connection, Reader
    from fewstep.serve.engine import Busy

    class BusyEngine:
        info = {**limits(load_model(MODELS / "digits-cd"), []), "model": "digits-cd"}

        def submit(self, client, request):
            raise Busy("server busy: 1 requests in flight (the limit is 1); try again in a moment")

    reader = Reader()
    connection = Connection(BusyEngine(), None, reader)
    try:
        asyncio.run(connection._handle('{"type": "generate", "id": 4, "label": 1}'))
        asyncio.run(connection._handle(None))
    finally:
        reader.close()
    busy, binary = connection.outbox.get_nowait(), connection.outbox.get_nowait()
    assert busy == {"type": "error", "id": 4, "error": busy["error"], "busy": True} and "server busy" in busy["error"]
    assert binary["error"] == "send JSON text frames, not binary ones" and "busy" not in binary


def test_limits_follow_the_model(lcm):
    info = limits(lcm, [])
    assert info["guidance"] == {"min": 1.0, "max": 6.0, "default": 3.0, "input": True}
    for name in ("emoji-sd", "digits-cd"):     # no range in the config: 1 (no guidance) to 10, never 0
        assert limits(load_model(MODELS / name), [])["guidance"]["min"] == 1.0
    assert info["steps"] == {"min": 1, "max": 8, "default": 4}
    progressive = limits(load_model(MODELS / "emoji-progressive"), [])
    assert progressive["steps"]["allowed"] == [1, 2, 4]
    with pytest.raises(ProtocolError, match="serves steps 1, 2, 4"):
        parse('{"type": "generate", "steps": 3}', progressive)


def test_progressive_folders_serve_each_students_steps():
    model = load_model(MODELS / "emoji-progressive")
    engine = Engine(model)
    try:
        out = engine.submit("a", Request(prompt="red apple", steps=2, guidance_scale=3.0, seed=0)).result(timeout=60)
        assert close_images(out["images"], png_data_urls(generate(model, ["red apple"], steps=2, guidance_scale=3.0, seed=0)))
    finally:
        engine.close()



def test_serve_command_line_errors_are_one_line(capsys, tmp_path):
    import socket

    from helpers import run_cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        for argv, message in [(["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
                              (["--port", "70000"], "--port must be in 0..65535"),
                              (["--lora", str(tmp_path / "none.safetensors")], "does not exist"),
                              (["--tiny-vae", str(tmp_path)], "not an AutoencoderTiny folder")]:
            code, _, err = run_cli(capsys, "serve", "--model", str(MODELS / "emoji-lcm"), *argv)
            assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        # the safety options are refused before anything is loaded (the model here does not even exist)
        for argv, message in [(["--host", "0.0.0.0"], "give --token TOKEN (every request must carry it), or "
                                                      "--insecure-open"),
                              (["--host", "0.0.0.0", "--token", "short"], "--token must be 8 to 256 characters"),
                              (["--token", "has space in it"], "--token must be 8 to 256 characters"),
                              (["--allow-origin", "null"], "--allow-origin 'null' is not an origin"),
                              (["--allow-origin", "evil.example"], "is not an origin"),
                              (["--allow-origin", "http://a.example/page"], "is not an origin")]:
            code, _, err = run_cli(capsys, "serve", "--model", str(tmp_path / "no-model"), "--port", "0", *argv)
            assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        code, _, err = run_cli(capsys, "serve", "--model", str(MODELS / "emoji-progressive"), "--lora",
                               str(MODELS / "emoji-style-lora"), "--port", "0")
        assert code == 2 and "progressive folder" in err
    finally:
        taken.close()
