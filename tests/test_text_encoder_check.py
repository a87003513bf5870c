"""A text encoder whose weights did not load is refused (issue 31, item 4): transformers fills weights missing from
the files with random ones and only logs it (a transformers-5 folder read by transformers 4.x: every weight), so
fewstep checks what loaded and says so in one line instead of sampling with a random text encoder."""

from __future__ import annotations

import shutil

import pytest
from helpers import run_cli
from safetensors.torch import load_file, save_file

from fewstep.errors import FewstepError
from fewstep.models.folders import load_model, shipped_models_dir

SD = shipped_models_dir() / "emoji-sd"


def _copy_with_renamed_keys(tmp_path, rename, part="text_encoder", source=SD):
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    path = folder / part / "model.safetensors"
    save_file({rename(k): v for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})
    return folder


def test_a_text_encoder_with_a_renamed_weight_is_refused_in_one_line(tmp_path, capsys):
    renamed = _copy_with_renamed_keys(tmp_path, lambda k: k.replace("final_layer_norm.weight", "final_norm.weight"))
    with pytest.raises(FewstepError, match=r"text encoder in .* did not load: 1 of its 36 weights are not in its files "
                                           r"\(e.g\. final_layer_norm.weight\).*random weights.*incomplete"):
        load_model(renamed)
    capsys.readouterr()                                       # (transformers' loading bars of the call above)
    rc, _, err = run_cli(capsys, "sample", "--model", str(renamed), "--prompt", "red apple", "--steps", "2",
                         "--out", str(tmp_path / "a.png"))
    assert rc == 2 and "random weights" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "a.png").exists()


def test_a_folder_of_another_transformers_layout_is_refused(tmp_path):
    """Every weight under names this transformers does not look for (as transformers 4.x sees a transformers-5
    CLIPTextModel: no text_model. prefix), here the second SDXL encoder's: refused, naming the version."""
    other = _copy_with_renamed_keys(tmp_path, lambda k: "clip." + k, "text_encoder_2",
                                    shipped_models_dir() / "emoji-sdxl")
    with pytest.raises(FewstepError, match=r"text_encoder_2 did not load: 37 of its 37 .*another transformers version"):
        load_model(other)
    assert load_model(SD).parts["text_encoder"] is not None        # the shipped folder loads as it is
