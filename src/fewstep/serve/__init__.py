"""``fewstep serve``: the real-time page. :mod:`.engine` (stream batching, caches, latest-wins, back-pressure,
LoRA weights) over :mod:`.batching` (the micro-batcher), :mod:`.protocol` (the messages and their checks),
:mod:`.app` (the Starlette app on uvicorn) and ``static/`` (the page: plain HTML, JS and CSS)."""
