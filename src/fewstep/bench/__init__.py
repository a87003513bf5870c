"""``fewstep bench``: the numbers behind BENCHMARKS.md. :mod:`.measure` (quality rows, side-by-side
timing), one module per section (:mod:`.pixel`, :mod:`.guided`, :mod:`.guided_latent`, :mod:`.latent`,
:mod:`.lora`), the report (:mod:`.report`) and the run (:mod:`.run`)."""
