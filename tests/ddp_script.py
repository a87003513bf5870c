"""Run by test_train.py under `accelerate launch --multi_gpu --num_processes 2` on CPU."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from helpers import tiny_setup
from safetensors.torch import save_file

from fewstep.training import TrainConfig, train

out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
model, objective, data = tiny_setup()
if acc.is_main_process:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "init.safetensors")
config = TrainConfig(out_dir=str(out / "run"), max_steps=4, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=1,
                     checkpoint_every=2, log_every=1, progress=False)
result = train(model, objective, data, config, accelerator=acc)
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, out / f"rank{acc.process_index}.safetensors")
acc.wait_for_everyone()
if acc.is_main_process:
    (out / "world.json").write_text(json.dumps({str(r): acc.num_processes for r in range(acc.num_processes)}))
