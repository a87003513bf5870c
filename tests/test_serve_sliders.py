"""LoRA sliders served from fused weights (:mod:`fewstep.serve.sliders`) on the set ``./run serve`` starts
(emoji-sd + LCM-LoRA + style LoRA): the fused weights are diffusers' ``set_adapters`` + ``fuse_lora``, a slider
change shows in the next image, a re-fuse never touches the weights a request holds, and many clients moving
sliders at once each get the images of their own weights."""

import copy
import threading
import time

import pytest
import torch
from test_serve import close_images

from fewstep.models.folders import load_model, pipeline_of, shipped_models_dir
from fewstep.models.loras import apply_loras
from fewstep.sampling.generate import generate
from fewstep.serve.engine import Engine
from fewstep.serve.protocol import Request
from fewstep.serve.sliders import FusedSliders

MODELS = shipped_models_dir()
LORAS = (MODELS / "emoji-lcm-lora", MODELS / "emoji-style-lora")
DEFAULT = (1.0, 0.0)                              # ./run serve's sliders
SETTINGS = [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.5, -0.7), (1.5, 2.0)]


@pytest.fixture(scope="module")
def base():
    return load_model(MODELS / "emoji-sd")


@pytest.fixture(scope="module")
def served(base):
    return apply_loras(base, list(zip(LORAS, DEFAULT)), fuse=False)


def fused_reference(base, weights):
    """emoji-sd with the two LoRAs through diffusers alone: ``load_lora_weights``, ``set_adapters(names, weights)``,
    ``fuse_lora``, ``unload_lora_weights``, on a fresh copy of the base UNet."""
    pipe = pipeline_of(base, copy.deepcopy(base.unet))          # a StableDiffusionPipeline of emoji-sd's parts
    names = ["lcm", "style"]
    for name, path in zip(names, LORAS):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(weights))
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe.unet


def test_fused_weights_are_diffusers_set_adapters_then_fuse_lora(served, base):
    sliders = FusedSliders(served, list(served.backbone.peft_config))
    try:
        x = torch.randn(2, *served.shape, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([14.6, 0.5])
        cond = served.conditioner(["dog face", "red apple"])
        for weights in SETTINGS:
            state = sliders.fuse(weights)
            unet = fused_reference(base, weights)
            want, got = unet.state_dict(), sliders.backbone_state(state)
            assert sorted(got) == sorted(want)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{name} at {weights}")
            reference = served.derive(net=unet)
            with torch.no_grad():
                torch.testing.assert_close(sliders(state.tensors, x, sigma, **cond),
                                           reference.denoiser(x, sigma, **cond), rtol=1e-4, atol=1e-5)
    finally:
        sliders.close()


def test_a_refuse_writes_nothing_a_request_holds(served):
    layers = [m for m in served.backbone.modules() if hasattr(m, "lora_A")]
    scales = [dict(m.scaling) for m in layers]
    sliders = FusedSliders(served, list(served.backbone.peft_config), keep=1)
    try:
        assert [dict(m.scaling) for m in layers] == scales       # the unfused adapters (maybe serving) untouched
        base = [t.clone() for t in sliders.base]
        held = sliders.fuse(DEFAULT)
        copies = [t.clone() for t in held.tensors]
        other = sliders.fuse((0.3, 1.0))                    # evicts the held state (keep=1): it lives on
        assert other.tensors[0] is not held.tensors[0] and sliders.get(DEFAULT) is not held   # evicted: fused anew
        assert all(torch.equal(a, b) for a, b in zip(held.tensors, copies))
        assert all(torch.equal(a, b) for a, b in zip(sliders.base, base))
        unfused = {m.get_base_layer().weight.data_ptr() for m in served.backbone.modules() if hasattr(m, "lora_A")}
        assert {w.data_ptr() for w in sliders.base} == unfused     # θ_pre shared with the unfused UNet, not copied
    finally:
        sliders.close()


FUSED: dict = {}


def reference_images(base, weights, prompt, seed):
    from fewstep.io.data_urls import png_data_urls

    if weights not in FUSED:
        FUSED[weights] = apply_loras(base, list(zip(LORAS, weights)))     # fused: set_adapters + fuse_lora
    model = FUSED[weights]
    return png_data_urls(generate(model, [prompt], steps=4, guidance_scale=1.0, seed=seed))


def test_served_fused_and_traced_and_a_slider_change_shows_in_the_next_image(served, base):
    engine = Engine(served)
    try:
        engine.warm_up()
        assert engine.sliders is not None and engine.backend == "onnxruntime"
        first = engine.submit("a", Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=3, loras=DEFAULT))
        first = first.result(timeout=60)["images"]
        assert engine.stats()["lora_weights"]["unfused"] == 0          # warm-up and request: fused
        assert [net.traced for net in engine._networks.values()] == [1, 1]   # fused denoiser and decoder traced
        assert close_images(first, reference_images(base, DEFAULT, "dog face", 3))
        denoiser = next(net for (name, _), net in engine._networks.items() if name == "denoise-fused")
        deadline = time.time() + 60       # the state's weights bound into a session of their own, in the background
        while denoiser.bound < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert denoiser.bound == 1
        bound = engine.submit("a", Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=3, loras=DEFAULT))
        assert close_images(bound.result(timeout=60)["images"], first)
        moved = (1.0, 1.0)                      # the style slider to 1: the next image, fused by its own request
        engine.sliders.inline = 60.0            # (a fuse known to be cheap: ~7 ms here, under the 20 ms default)
        nxt = engine.submit("a", Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=3, loras=moved))
        nxt = nxt.result(timeout=60)["images"]
        assert nxt != first and close_images(nxt, reference_images(base, moved, "dog face", 3))
        assert engine.stats()["lora_weights"]["unfused"] == 0
        engine.sliders.inline = 0.0             # a fuse too slow to wait for: answered unfused, fused in the background
        again = (0.5, 1.0)
        before = engine.stats()["lora_weights"]
        nxt = engine.submit("a", Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=3, loras=again))
        assert close_images(nxt.result(timeout=60)["images"], reference_images(base, again, "dog face", 3))
        assert engine.stats()["lora_weights"] == {"fused": before["fused"], "unfused": before["unfused"] + 1}
        engine.sliders.fuse(again)              # (the fusing thread's job, done now)
        fused = engine.submit("a", Request(prompt="dog face", steps=4, guidance_scale=1.0, seed=4, loras=again))
        assert close_images(fused.result(timeout=60)["images"], reference_images(base, again, "dog face", 4))
        assert engine.stats()["lora_weights"] == {"fused": before["fused"] + 1, "unfused": before["unfused"] + 1}
    finally:
        engine.close()


def test_many_clients_moving_sliders_each_get_their_own_weights(served, base):
    """Clients at different weights, in threads, while states are fused and evicted (keep=2 for 3 settings):
    every image is its own weights' (never a torn mix), within float rounding."""
    engine = Engine(served, result_cache=0)                    # every request computed, none answered from the cache
    engine.sliders.keep = 2
    engine.sliders.inline = 0.0                # new weights answered unfused while the fusing thread fuses them
    settings = [DEFAULT, (1.0, 1.0), (0.5, 1.0)]
    prompts = ["dog face", "red apple"]
    want = {(w, p, s): reference_images(base, w, p, s) for w in settings for p in prompts for s in (1, 2)}
    got, errors = {}, []

    def client(k: int) -> None:
        try:
            for i, (w, p, s) in enumerate(list(want)[k::3] * 2):
                out = engine.submit(f"c{k}", Request(prompt=p, steps=4, guidance_scale=1.0, seed=s, loras=w))
                got.setdefault((w, p, s), []).append(out.result(timeout=120)["images"])
        except Exception as e:  # the assertion below shows it
            errors.append(repr(e))
    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
        assert not errors and len(got) == len(want)
        wrong = [key for key, outs in got.items() for out in outs if not close_images(out, want[key])]
        assert not wrong, wrong
        served_how = engine.stats()["lora_weights"]
        assert served_how["fused"] > 0 and served_how["unfused"] > 0 and engine.sliders.fuses >= 3
    finally:
        engine.close()
