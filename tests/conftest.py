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
