"""The methods, as recipes: build a student from a teacher, pick an objective, train, save; no formulas
(those are in :mod:`fewstep.core` and :mod:`fewstep.objectives`). One module per method family:
teachers, consistency models (CD, CT, iCT, ACT), continuous-time ones (sCD, sCT), guided and progressive distillation, latent
consistency models (LCD, LCF, LCM-LoRA), trajectory consistency models (TCD, TCD-LoRA) and style LoRAs. Each family
registers its methods in :mod:`fewstep.methods.registry` when imported, here."""

from . import consistency, scm, lcm, guided, progressive  # noqa: F401, I001  (each registers its methods; the CLI lists them in this order)
from . import tcd  # noqa: F401, E402  (TCD, TCD-LoRA: after LCD's family)
