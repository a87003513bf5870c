"""``fewstep serve``: the real-time page. :mod:`.engine` (stream batching, caches, latest-wins, back-pressure,
LoRA weights) over :mod:`.batching` (the micro-batcher), :mod:`.protocol` (the messages and their checks),
:mod:`.app` (the Starlette app on uvicorn) and ``static/`` (the page: plain HTML, JS and CSS)."""

# what runs the served networks, fastest first: each falls back to the ones after it (fewstep.serve.traced); a
# torch-free leaf so the command line can offer them without importing torch
BACKENDS = ("onnxruntime", "torchscript", "eager")
BACKEND_CHOICES = ("auto", *BACKENDS)
