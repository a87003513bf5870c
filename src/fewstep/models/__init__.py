"""Models: the one handle (:class:`Model`: denoiser + codec + conditioner + config), the folders it is
loaded from and saved to, LoRA files, and the data sets models are trained on."""
