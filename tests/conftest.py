import torch

# The suite runs tiny tensors on a 2-core machine: one intra-op thread avoids thread-sync
# overhead that otherwise dominates (and explodes when another process uses the other core).
torch.set_num_threads(1)
