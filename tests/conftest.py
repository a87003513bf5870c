import pytest
import torch
from helpers import CAPTIONS, TINY

# The suite runs tiny tensors on a 2-core machine: one intra-op thread avoids thread-sync
# overhead that otherwise dominates (and explodes when another process uses the other core).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random-weight SD-format pipeline folder (no training): a stand-in teacher."""
    from helpers import save_pipeline

    from fewstep.nets.unets import (
        build_cond_unet,
        build_text_encoder,
        build_tokenizer,
        build_vae,
    )

    torch.manual_seed(0)
    tok = build_tokenizer(CAPTIONS, TINY.vocab_size, TINY.max_length)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return save_pipeline(folder, build_cond_unet(TINY), build_vae(TINY), build_text_encoder(TINY, tok), tok,
                         {"kind": "diffusion", "dataset": "tiny", "default_steps": 4})


@pytest.fixture(scope="session")
def tiny_lcm_lora(tiny_sd, tmp_path_factory):
    """An LCM-LoRA of ``tiny_sd`` trained for 3 steps (read-only: tests copy it before changing anything)."""
    from helpers import tiny_data

    from fewstep.methods.lcm import LCMSettings, distill_lcm
    from fewstep.models.folders import load_model
    from fewstep.training import TrainConfig

    root = tmp_path_factory.mktemp("lcm-lora")
    config = TrainConfig(out_dir=str(root / "work"), max_steps=3, batch_size=8, lr=1e-2, progress=False, checkpoint_every=3)
    return distill_lcm(load_model(tiny_sd), tiny_data(), root / "tiny-lcm-lora", config,
                       LCMSettings(method="lcm-lora", lora_rank=2, guidance_min=2, guidance_max=4), command="test")
