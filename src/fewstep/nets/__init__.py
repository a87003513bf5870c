"""Networks: the UNets fewstep builds, the guidance-conditioned UNet, LoRA adapters, ACT's
discriminator and the small classifier behind the metrics."""
